"""Checks an installed sngm-optax (the wheel, not the source tree).

Run by .ci/run with the fresh virtualenv's python, from a directory outside
the checkout:

  python check_installed.py EXPECTED_VERSION

1. `import sngm_optax` works, from site-packages, with the expected version;
2. `sngm-optax --help` runs (the console script of the wheel);
3. `sngm-optax train` runs 20 SNGM steps on random data and writes finite
   metrics;
4. the wheel carries the Apache-2.0 LICENSE that its metadata declares.
"""

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np


def _check_import(expected_version: str) -> None:
  import sngm_optax  # pylint: disable=g-import-not-at-top
  location = pathlib.Path(sngm_optax.__file__).resolve()
  assert "site-packages" in location.parts, f"imported from {location}"
  assert sngm_optax.__version__ == expected_version, (
      sngm_optax.__version__, expected_version)
  assert "sngm" in sngm_optax.__all__
  print(f"import sngm_optax: {sngm_optax.__version__} from {location.parent}")


def _check_license() -> None:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  distribution = metadata.distribution("sngm-optax")
  assert distribution.metadata["License-Expression"] == "Apache-2.0"
  files = [f for f in distribution.files if f.name == "LICENSE"]
  assert files, "the wheel has no LICENSE"
  assert "Apache License" in files[0].read_text()
  print("LICENSE: Apache-2.0")


def _run(*argv: str) -> str:
  process = subprocess.run(argv, capture_output=True, text=True, check=False)
  assert process.returncode == 0, (argv, process.stdout, process.stderr)
  return process.stdout


def _check_help(script: str) -> None:
  out = _run(script, "--help")
  assert "usage: sngm-optax" in out and "train" in out, out
  print("sngm-optax --help: ok")


def _check_training(script: str, workdir: pathlib.Path) -> None:
  # 320 random examples at batch 16: one epoch is 20 steps.
  rng = np.random.default_rng(0)
  data = workdir / "random.npz"
  np.savez(data, x=rng.normal(size=(320, 40)).astype(np.float32),
           y=rng.integers(0, 10, 320),
           x_test=rng.normal(size=(64, 40)).astype(np.float32),
           y_test=rng.integers(0, 10, 64))
  out = workdir / "run"
  _run(script, "train", "--data", str(data), "--optimizer", "sngm",
       "--model", "mlp", "--batch-size", "16", "--lr", "0.1", "--epochs",
       "1", "--num-devices", "1", "--out", str(out), "--quiet")
  metrics = json.loads((out / "metrics.json").read_text())
  final = metrics["final"]
  assert metrics["steps"] == 20, metrics["steps"]
  assert np.isfinite(final["train_loss"]) and np.isfinite(final["test_loss"])
  print(f"sngm-optax train: 20 sngm steps, train loss "
        f"{final['train_loss']:.3f}, test loss {final['test_loss']:.3f}")


def main() -> int:
  expected_version = sys.argv[1]
  _check_import(expected_version)
  _check_license()
  # The console script of the environment that runs this check.
  script = str(pathlib.Path(sys.executable).with_name("sngm-optax"))
  assert shutil.which(script), f"no console script {script}"
  _check_help(script)
  with tempfile.TemporaryDirectory() as workdir:
    _check_training(script, pathlib.Path(workdir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
