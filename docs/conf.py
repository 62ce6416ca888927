"""Sphinx configuration of the sngm_optax documentation, after optax's.

Build (from the repository root, with the [docs] extra installed):

  python -m sphinx -W --keep-going -b html docs docs/_build/html

The API pages are written here, at configuration time, from
`sngm_optax.__all__`: each public name goes to the page of the area its
private module belongs to (`AREAS`), so a new public name needs no edit of
the docs; a public name from a module in no area fails the build, naming the
module. The notebooks are copied from notebooks/ and rendered with the
outputs saved in them, never executed.
"""

import inspect
import os
import pathlib
import pkgutil
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
import optax
import sngm_optax
import sngm_optax.harness
from sngm_optax.harness import cli
# pylint: enable=g-import-not-at-top,wrong-import-position

# -- Project information -----------------------------------------------------

project = "sngm_optax"
author = "sngm_optax contributors"
copyright = "2026, sngm_optax contributors"  # pylint: disable=redefined-builtin
version = release = sngm_optax.__version__

# -- General configuration ---------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",  # Markdown pages (README guides) and the .ipynb notebooks
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
root_doc = "index"
# `name` in a docstring is inline code, as it reads in the source.
default_role = "code"

# -- autodoc, autosummary, napoleon (Google-style docstrings) ----------------

autosummary_generate = True
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
maximum_signature_line_length = 1  # one parameter a line, as optax's
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- MyST and myst-nb: notebooks rendered from their saved outputs ------------

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"
nb_merge_streams = True

# -- HTML --------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = f"sngm_optax {release}"
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}
html_static_path = []

# -- The API pages, one an area ----------------------------------------------

# (page, title, what the area is, its private modules of sngm_optax).
AREAS = [
    ("sngm", "Normalization and SNGM",
     "SNGM (Zhao, Xie, Li, arXiv 2007.13985): normalized-gradient momentum "
     "for large batches, and its building blocks.",
     ("_normalize", "_sngm")),
    ("adaptive_batch", "Adaptive batch size",
     "AdAdaGrad (Lau, Liu, Kolar, arXiv 2402.11215): batch-size tests on "
     "per-sample gradient statistics, the controller that grows the batch, "
     "the gradient noise scale monitor (McCandlish et al., arXiv 1812.06162), "
     "AdaGrad-Norm, and gradient accumulation in a user's loop.",
     ("_adagrad_norm", "_gradient_statistics", "_noise_scale",
      "_batch_size_tests",
      "_adaptive_batch_size", "_adadagrad", "_accumulation",
      "_accumulate", "_microbatching")),
    ("trajectory", "Trajectory regularization (TR)",
     "TR (Zhang, Qu, Chen, Metaxas, IJCAI 2019) for very small batches.",
     ("_trajectory",)),
    ("sparse_communication", "Sparse communication (GMC, DGC)",
     "GMC (Xie, Zhao, Li et al., arXiv 1905.12948) and the Deep Gradient "
     "Compression baseline: data-parallel training that sends a few percent "
     "of the gradient.",
     ("_top_k", "_sparse_exchange", "_gmc", "_dgc")),
    ("distributed", "Distributed helpers",
     "Helpers for `jax.pmap` / `jax.shard_map` data parallelism.",
     ("_distributed",)),
]


def _area_of_module() -> dict[str, str]:
  return {f"sngm_optax.{module}": page
          for page, _, _, modules in AREAS for module in modules}


def _public_names_by_area() -> dict[str, list[str]]:
  """`sngm_optax.__all__` grouped by area; raises for a module in none."""
  area_of = _area_of_module()
  names = {page: [] for page, *_ in AREAS}
  unplaced = {}
  for name in sngm_optax.__all__:
    module = getattr(getattr(sngm_optax, name), "__module__", None)
    if module in area_of:
      names[area_of[module]].append(name)
    else:
      unplaced.setdefault(module, []).append(name)
  if unplaced:
    raise RuntimeError(
        "docs/conf.py: these public names come from a module that is in no "
        f"API area: {unplaced}; add the module to AREAS in docs/conf.py")
  return names


def _functions_then_classes(names: list[str]) -> tuple[list[str], list[str]]:
  classes = [n for n in names if inspect.isclass(getattr(sngm_optax, n))]
  return [n for n in names if n not in classes], classes


def _area_page(title: str, summary: str, names: list[str]) -> str:
  functions, classes = _functions_then_classes(names)
  lines = [title, "=" * len(title), "", summary, "",
           ".. currentmodule:: sngm_optax", ""]
  for heading, group in (("Transformations and functions", functions),
                         ("States and statistics", classes)):
    if not group:
      continue
    lines += [heading, "-" * len(heading), "", ".. autosummary::",
              "   :toctree: generated/", "",
              *(f"   {name}" for name in group), ""]
  return "\n".join(lines)


def _harness_page() -> tuple[str, list[str]]:
  """The harness: every module of sngm_optax.harness, and the CLI's help."""
  modules = sorted(m.name for m in pkgutil.iter_modules(
      sngm_optax.harness.__path__, "sngm_optax.harness.")
                   if not m.name.rsplit(".", 1)[-1].startswith("_"))
  title = "Training harness (sngm_optax.harness)"
  lines = [title, "=" * len(title), "",
           ".. automodule:: sngm_optax.harness", "",
           "Command line", "------------", "",
           "The ``sngm-optax`` console script (`sngm_optax.harness.cli`).",
           ""]
  parser = cli.build_parser()
  helps = [("sngm-optax --help", parser.format_help())]
  for action in parser._subparsers._group_actions:  # pylint: disable=protected-access
    for command, subparser in action.choices.items():
      helps.append((f"sngm-optax {command} --help", subparser.format_help()))
  for command, text in helps:
    lines += [f"``{command}``::", "",
              *("   " + line if line else "" for line in text.splitlines()),
              ""]
  lines += ["Modules", "-------", "", ".. toctree::", "   :maxdepth: 1", "",
            *(f"   harness/{name.rsplit('.', 1)[-1]}" for name in modules), ""]
  return "\n".join(lines), modules


def _module_page(name: str) -> str:
  return "\n".join([f"``{name}``", "=" * (len(name) + 4), "",
                    f".. automodule:: {name}", "   :members:", ""])


def _write_if_changed(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  if not path.exists() or path.read_text() != text:
    path.write_text(text)


def _write_api_pages() -> None:
  names = _public_names_by_area()
  api = DOCS / "api"
  pages = []
  for page, title, summary, _ in AREAS:
    if names[page]:
      _write_if_changed(api / f"{page}.rst",
                        _area_page(title, summary, names[page]))
      pages.append(page)
  harness_page, harness_modules = _harness_page()
  _write_if_changed(api / "harness.rst", harness_page)
  for name in harness_modules:
    _write_if_changed(api / "harness" / f"{name.rsplit('.', 1)[-1]}.rst",
                      _module_page(name))
  pages.append("harness")
  _write_if_changed(api / "index.rst", "\n".join([
      "API reference", "=============", "",
      "The library's public names are those of ``sngm_optax.__all__``; "
      "``import sngm_optax`` loads only jax, optax and numpy. The harness "
      "is imported explicitly (``sngm_optax.harness``, the ``[harness]`` "
      "extra).", "", ".. toctree::", "   :maxdepth: 1", "",
      *(f"   {page}" for page in pages), ""]))


def _copy_notebooks() -> None:
  """notebooks/*.ipynb into docs/notebooks/, as saved (outputs included)."""
  target = DOCS / "notebooks"
  target.mkdir(exist_ok=True)
  sources = sorted((ROOT / "notebooks").glob("*.ipynb"))
  for stale in set(target.glob("*.ipynb")) - {target / s.name
                                              for s in sources}:
    stale.unlink()
  for source in sources:
    copy = target / source.name
    if not copy.exists() or copy.read_bytes() != source.read_bytes():
      shutil.copyfile(source, copy)


# -- Links between the included Markdown files ---------------------------------

# Repository files that are pages here, by their path from the root.
DOC_OF_FILE = {
    "README.md": "guide.md",
    "benchmarks/README.md": "benchmarks.md",
    **{f"notebooks/{path.name}": f"notebooks/{path.name}"
       for path in (ROOT / "notebooks").glob("*.ipynb")},
}
# [label](target#anchor), not an image and not a URL or an in-page anchor.
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\((?![a-z]+:|#)([^)#\s]+)(#[^)\s]*)?\)")


def _rewrite_links(text: str, source_dir: str) -> str:
  """Points links to repository files at their pages (paths from docs/);
  a link to a file that is no page becomes the label and the path."""

  def replace(match: re.Match) -> str:
    label, target, anchor = match.group(1), match.group(2), match.group(3)
    path = os.path.normpath(os.path.join(source_dir, target))
    if path in DOC_OF_FILE:
      return f"[{label}]({DOC_OF_FILE[path]}{anchor or ''})"
    return label if label.strip("`") == path else f"{label} (`{path}`)"

  return _LINK.sub(replace, text)


def _on_include_read(app, relative_path, parent_docname, content):
  del app, parent_docname  # unused
  source = (DOCS / relative_path).resolve()
  if source.suffix == ".md" and ROOT in source.parents:
    source_dir = os.path.relpath(source.parent, ROOT)
    content[0] = _rewrite_links(content[0], source_dir)


# -- Type aliases in signatures ------------------------------------------------

# optax's aliases, which Python expands into long unions: shown by name.
_ALIASES = {"optax.ScalarOrSchedule": optax.ScalarOrSchedule,
            "optax.Schedule": optax.Schedule,
            "optax.Params": optax.Params}


def _alias_texts() -> list[tuple[str, str]]:
  from sphinx.util import typing as sphinx_typing  # pylint: disable=g-import-not-at-top
  texts = [(sphinx_typing.stringify_annotation(alias, mode), name)
           for name, alias in _ALIASES.items()
           for mode in ("smart", "fully-qualified-except-typing")]
  return sorted(set(texts), key=lambda pair: -len(pair[0]))


def _on_process_signature(app, what, name, obj, options, signature,
                          return_annotation):
  del app, what, name, obj, options  # unused
  for text, alias in _alias_texts():
    if signature:
      signature = signature.replace(text, alias)
    if return_annotation:
      return_annotation = return_annotation.replace(text, alias)
  return signature, return_annotation


def setup(app):
  app.connect("include-read", _on_include_read)
  app.connect("autodoc-process-signature", _on_process_signature)


_write_api_pages()
_copy_notebooks()
