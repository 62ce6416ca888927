"""Writes every published table and measured sentence from the results JSON.

README.md and benchmarks/README.md hold generated blocks:

  <!-- begin: NAME -->
  ...what the renderer NAME writes from benchmarks/results/*.json...
  <!-- end: NAME -->

Usage:
  python benchmarks/report.py          # rewrite every block in place
  python benchmarks/report.py --check  # exit 1 if any block would change

A renderer is a function from nothing to Markdown, registered with `@block`.
It reads committed JSON only, and states verdicts (bold, "beats", "level")
through the engine's one rule, `sngm_optax.harness.sweep.verdict`; no number
in a block is typed by hand. The test suite runs `--check`.
"""

import argparse
import difflib
import json
import pathlib
import re
import sys
from typing import Callable

import _common

from sngm_optax.harness import sweep

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = _common.RESULTS
DOCUMENTS = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")

BLOCKS: dict[str, Callable[[], str]] = {}
_BEGIN = re.compile(r"^<!-- begin: ([\w-]+) -->$")
_END = "<!-- end: {} -->"


def block(name: str):
  """Registers the decorated function as the renderer of block `name`."""

  def register(render: Callable[[], str]) -> Callable[[], str]:
    if name in BLOCKS:
      raise ValueError(f"two renderers for block {name!r}")
    BLOCKS[name] = render
    return render

  return register


def render_document(text: str, where: str = "document") -> tuple[str, list]:
  """`text` with every block rewritten, and the names of its blocks.

  Raises:
    ValueError: a block has no renderer, or no end line.
  """
  lines, out, names = text.split("\n"), [], []
  index = 0
  while index < len(lines):
    line = lines[index]
    out.append(line)
    match = _BEGIN.match(line.strip())
    index += 1
    if not match:
      continue
    name = match.group(1)
    if name not in BLOCKS:
      raise ValueError(f"{where}: no renderer for block {name!r}")
    end = _END.format(name)
    try:
      stop = next(i for i in range(index, len(lines))
                  if lines[i].strip() == end)
    except StopIteration:
      raise ValueError(f"{where}: block {name!r} has no line {end!r}") from None
    out.extend(BLOCKS[name]().strip("\n").split("\n"))
    out.append(lines[stop])
    names.append(name)
    index = stop + 1
  return "\n".join(out), names


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 if a block is out of date")
  args = parser.parse_args(argv)
  stale, used = [], []
  for path in DOCUMENTS:
    text = path.read_text()
    new, names = render_document(text, str(path.relative_to(ROOT)))
    used += names
    if new == text:
      continue
    if args.check:
      stale.append(path)
      sys.stdout.writelines(difflib.unified_diff(
          text.splitlines(True), new.splitlines(True), str(path),
          f"{path} (generated)"))
    else:
      path.write_text(new)
      print(f"wrote {path.relative_to(ROOT)}")
  unused = sorted(set(BLOCKS) - set(used))
  if unused:
    print(f"renderers with no block in any document: {', '.join(unused)}")
    return 1
  if stale:
    print(f"out of date: {', '.join(str(p.relative_to(ROOT)) for p in stale)}"
          " (run python benchmarks/report.py)")
    return 1
  return 0


# ----------------------------------------------------------------------------
# What the renderers share.


def load(name: str) -> dict:
  """`benchmarks/results/NAME.json`."""
  return json.loads((RESULTS / f"{name}.json").read_text())


def percent(value: float | None, digits: int = 1) -> str:
  """A fraction as a percentage with `digits` decimals, "–" for None."""
  return "–" if value is None else f"{100 * value:.{digits}f}"


def mean_sd(summary: sweep.Summary | dict | None, digits: int = 1,
            scale: float = 100.0) -> str:
  """`mean ± sd` of a summary of fractions, in percent by default."""
  if summary is None:
    return "–"
  if isinstance(summary, dict):
    summary = sweep.Summary(**summary)
  return (f"{scale * summary.mean:.{digits}f} ± "
          f"{scale * summary.sd:.{digits}f}")


def number(value: float, digits: int = 0) -> str:
  """`value` with thousands separators and `digits` decimals."""
  return f"{value:,.{digits}f}"


def bold(text: str, on: bool) -> str:
  return f"**{text}**" if on else text


table = _common.markdown_table


def spread_rule() -> str:
  """The verdict rule, as every report states it."""
  return f"Verdicts follow one rule: {sweep.SPREAD_RULE}"


@block("spread-rule")
def _spread_rule_block() -> str:
  return spread_rule()


# ----------------------------------------------------------------------------
# compare --quick and the large-batch benchmark (large_batch.py).



# ----------------------------------------------------------------------------
# Adaptive batch size (adaptive_batch.py).



# ----------------------------------------------------------------------------
# TR at tiny batches (small_batch.py) and sparse communication
# (sparse_communication.py).



# ----------------------------------------------------------------------------
# Timing: update cost, top-k selection, step and harness throughput, the
# batch-size test's cost, the accelerator check.



if __name__ == "__main__":
  sys.exit(main())
