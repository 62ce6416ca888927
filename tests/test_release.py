"""Release plumbing: one version, the lint and documentation settings."""

import pathlib
import tomllib

import sngm_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_is_defined_once():
  project = PYPROJECT["project"]
  assert "version" not in project and "version" in project["dynamic"]
  assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
      "attr": "sngm_optax.__version__"}
  # The wheel's metadata carries it: .ci/check_installed.py compares.
  assert sngm_optax.__version__.count(".") == 2


def test_docs_and_lint_tools_are_in_the_extras():
  extras = PYPROJECT["project"]["optional-dependencies"]
  names = {extra: {requirement.split(">")[0].split("[")[0]
                   for requirement in requirements}
           for extra, requirements in extras.items()}
  assert {"sphinx", "myst-nb", "sphinx-book-theme"} <= names["docs"]
  assert {"ruff", "build"} <= names["dev"]
  assert PYPROJECT["tool"]["ruff"]["line-length"] == 80
