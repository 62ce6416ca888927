"""Runs the notebooks at full size and saves their outputs in place.

The documentation renders each notebook with the outputs saved in it and
never executes it (docs/conf.py: `nb_execution_mode = "off"`), so after a
change to a notebook, run it again here and commit the result:

  python docs/execute_notebooks.py                       # all of notebooks/
  python docs/execute_notebooks.py notebooks/quickstart.ipynb

Each notebook runs in a fresh kernel from notebooks/ with the package of
this checkout (PYTHONPATH), as a user would run it; the test suite runs its
own small-size copy (`tests/test_notebooks.py`) and saves nothing. Needs
the [dev] extra (nbclient, ipykernel).
"""

import argparse
import os
import pathlib
import re
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lines on stderr that describe the machine the notebook ran on, not the
# notebook: XLA's slow-compilation alarms (a loaded CPU) and tqdm's note that
# ipywidgets is not installed. They are dropped from the saved outputs.
_MACHINE_NOISE = re.compile(
    r"^E\d{4} .*slow_operation_alarm.*\n"
    r"(?:(?!E\d{4} ).*\n)*?\*{32}\n.*\n\*{32}\n"
    r"|^.*TqdmWarning: IProgress not found.*\n.*notebook_tqdm\n",
    re.MULTILINE)


def drop_machine_noise(notebook) -> None:
  """Removes `_MACHINE_NOISE` from the stderr outputs of `notebook`."""
  for cell in notebook.cells:
    if cell.cell_type != "code":
      continue
    outputs = []
    for output in cell.get("outputs", []):
      if output.get("output_type") == "stream" and output.name == "stderr":
        output.text = _MACHINE_NOISE.sub("", output.text)
        if not output.text.strip():
          continue
      outputs.append(output)
    cell.outputs = outputs


def execute(path: pathlib.Path, timeout: int) -> float:
  """Executes `path` in place; returns the wall time in seconds."""
  notebook = nbformat.read(path, as_version=4)
  os.environ["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
  os.environ.pop("SNGM_OPTAX_NOTEBOOK_SMALL", None)  # the full size
  start = time.perf_counter()
  # No per-cell timestamps: the saved file changes only with its outputs.
  NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                 record_timing=False,
                 resources={"metadata": {"path": str(path.parent)}}).execute()
  drop_machine_noise(notebook)
  nbformat.write(notebook, path)
  return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("notebooks", nargs="*", type=pathlib.Path,
                      default=sorted((ROOT / "notebooks").glob("*.ipynb")))
  parser.add_argument("--timeout", type=int, default=3600,
                      help="seconds a cell may run (default 3600)")
  args = parser.parse_args(argv)
  for path in args.notebooks:
    seconds = execute(path.resolve(), args.timeout)
    print(f"{path}: executed in {seconds:.0f} s, outputs saved", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
