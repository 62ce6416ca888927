"""The generated blocks of README.md and benchmarks/README.md are current."""

import pathlib
import re
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import report  # noqa: E402  pylint: disable=wrong-import-position


def test_every_generated_block_matches_the_committed_json(capsys):
  assert report.main(["--check"]) == 0, capsys.readouterr().out


def test_the_documents_hold_at_least_six_generated_blocks():
  names = []
  for path in report.DOCUMENTS:
    names += report.render_document(path.read_text())[1]
  assert len(set(names)) >= 6, names


def _first_digit_in_a_block(text: str) -> int | None:
  """The position of the first digit inside a generated block, if any."""
  for match in re.finditer(r"<!-- begin: [\w-]+ -->\n", text):
    end = text.index("<!-- end:", match.end())
    digit = re.search(r"\d", text[match.end():end])
    if digit:
      return match.end() + digit.start()
  return None


@pytest.mark.parametrize("changed", range(len(report.DOCUMENTS)))
def test_check_fails_once_a_digit_inside_a_block_changes(
    changed, tmp_path, monkeypatch, capsys):
  copies = []
  for index, path in enumerate(report.DOCUMENTS):
    copy = tmp_path / str(index) / path.name
    copy.parent.mkdir()
    copy.write_text(path.read_text())
    copies.append(copy)
  text = copies[changed].read_text()
  at = _first_digit_in_a_block(text)
  assert at is not None, f"{report.DOCUMENTS[changed]} has no number in a block"
  copies[changed].write_text(
      text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:])
  monkeypatch.setattr(report, "DOCUMENTS", tuple(copies))
  monkeypatch.setattr(report, "ROOT", tmp_path)
  assert report.main(["--check"]) == 1
  assert "out of date" in capsys.readouterr().out
  assert report.main([]) == 0  # rewrites the block from the JSON
  assert copies[changed].read_text() == text


def test_a_block_without_renderer_or_end_line_is_an_error():
  with pytest.raises(ValueError, match="no renderer for block 'nope'"):
    report.render_document("<!-- begin: nope -->\n<!-- end: nope -->\n")
  with pytest.raises(ValueError, match="has no line"):
    report.render_document("<!-- begin: spread-rule -->\ntext\n")


def test_no_two_renderers_share_a_name():
  # A later definition would silently replace an earlier one of its name.
  import ast  # pylint: disable=g-import-not-at-top
  tree = ast.parse((BENCHMARKS / "report.py").read_text())
  names = [node.name for node in tree.body
           if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
  duplicates = sorted({name for name in names if names.count(name) > 1})
  assert not duplicates, duplicates
