"""Executes every notebook in notebooks/ at a small size, so none can rot.

A notebook reads `SNGM_OPTAX_NOTEBOOK_SMALL=1` in its parameters cell and
shrinks its data and epochs; new notebooks in notebooks/ are picked up
automatically and must follow the same convention.
"""

import os
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
  assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_at_small_size(path, tmp_path, monkeypatch):
  notebook = nbformat.read(path, as_version=4)
  first_code = next(cell for cell in notebook.cells
                    if cell.cell_type == "code")
  assert "pip install" in first_code.source, "first code cell must install"
  assert any("SNGM_OPTAX_NOTEBOOK_SMALL" in cell.source
             for cell in notebook.cells if cell.cell_type == "code"), (
                 "a cell must read SNGM_OPTAX_NOTEBOOK_SMALL")
  # The kernel inherits this environment: the package from this checkout,
  # a private cache and one CPU device (as on a laptop or a Colab GPU).
  monkeypatch.setenv("SNGM_OPTAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("SNGM_OPTAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *sys.path]))
  monkeypatch.delenv("MPLBACKEND", raising=False)  # keep the inline backend
  flags = os.environ.get("XLA_FLAGS", "").split()
  monkeypatch.setenv("XLA_FLAGS", " ".join(
      flag for flag in flags
      if not flag.startswith("--xla_force_host_platform_device_count")))
  # The timeout only guards against a hung kernel; speed is not asserted.
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [output for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), (
      "the notebook should plot its training curve")
