"""Preemption: SIGTERM to `sngm-optax train` checkpoints, exits 75, resumes.

The interrupted run is a real subprocess that gets a real SIGTERM mid-run;
its resumption and the uninterrupted reference run in this process through
the same command line, so the comparison is of the CLI's own outputs.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sngm_optax.harness import checkpoint
from sngm_optax.harness import cli
from sngm_optax.harness import preemption

EPOCHS = 40  # 4 steps an epoch: 160 steps, far more than the stop needs


def _random_npz(path: pathlib.Path) -> pathlib.Path:
  rng = np.random.default_rng(0)
  np.savez(path, x=rng.normal(size=(64, 40)).astype(np.float32),
           y=rng.integers(0, 10, 64), x_test=rng.normal(size=(32, 40)),
           y_test=rng.integers(0, 10, 32))
  return path


def _argv(data, run, model="mlp") -> list[str]:
  return ["train", "--data", str(data), "--model", model, "--optimizer",
          "sngm", "--batch-size", "16", "--lr", "0.1", "--epochs",
          str(EPOCHS), "--num-devices", "1", "--checkpoint-dir",
          str(run / "ckpt"), "--out", str(run),
          "--set", "checkpoint_at_epoch_end=false",
          "--set", "eval_batch_size=32"] + (
              ["--set", 'model_kwargs={"width": 4}'] if model == "resnet"
              else [])


def _saved_state(directory: pathlib.Path, step: int):
  with ocp.StandardCheckpointer() as checkpointer:
    return jax.tree.map(np.asarray,
                        checkpointer.restore(directory / str(step) / "state"))


def _history(run: pathlib.Path) -> list[dict]:
  history = json.loads((run / "metrics.json").read_text())["history"]
  for record in history:
    del record["wall_time_s"]
  return history


def _sigterm_after_first_epoch(argv: list[str]) -> subprocess.CompletedProcess:
  """Runs the CLI in a subprocess; SIGTERM once its first epoch line shows."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  # Saving every 3 steps (a resumable setting) slows the subprocess alone, so
  # the signal lands long before the end even on a loaded machine.
  process = subprocess.Popen(
      [sys.executable, "-m", "sngm_optax.harness.cli", *argv,
       "--checkpoint-every", "3"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    lines = []
    for line in process.stdout:
      lines.append(line)
      if " epoch 1.00:" in line:
        process.send_signal(signal.SIGTERM)
        break
    out, err = process.communicate(timeout=120)
  finally:
    process.kill()
  return subprocess.CompletedProcess(process.args, process.returncode,
                                     "".join(lines) + out, err)


@pytest.mark.parametrize("model", ["mlp", "resnet"])  # resnet: BatchNorm
def test_sigterm_checkpoints_exits_75_and_resumes_bit_identically(tmp_path,
                                                                  model):
  data = _random_npz(tmp_path / "data.npz")
  stopped, straight = tmp_path / "stopped", tmp_path / "straight"

  process = _sigterm_after_first_epoch(_argv(data, stopped, model))
  assert process.returncode == preemption.EXIT_PREEMPTED, process.stderr
  assert "received SIGTERM: stopping after this step" in process.stderr
  total = 4 * EPOCHS
  last = process.stdout.strip().splitlines()[-1]
  prefix = "stopped by SIGTERM after step "
  assert last.startswith(prefix), process.stdout
  step = int(last[len(prefix):].split()[0])
  assert 4 <= step < total, last
  assert last.endswith(f"of {total}; checkpoint in {stopped / 'ckpt'}; "
                       "continue with: sngm-optax train --resume "
                       f"{stopped / 'ckpt'}")
  # The newest checkpoint is the step the signal let finish.
  assert checkpoint.Checkpointer(stopped / "ckpt").steps()[-1] == step

  assert cli.main(["train", "--resume", str(stopped / "ckpt"), "--out",
                   str(stopped), "--quiet",
                   "--set", "checkpoint_every_steps=0"]) == 0
  assert cli.main(_argv(data, straight, model) + ["--quiet"]) == 0
  assert _history(stopped) == _history(straight)
  resumed = _saved_state(stopped / "ckpt", total)
  expected = _saved_state(straight / "ckpt", total)
  assert ("batch_stats" in resumed) == (model == "resnet")
  assert jax.tree.structure(resumed) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_a_second_signal_ends_the_process_at_once():
  # The first signal restores the default action (terminate) right away:
  # a second one kills the process even inside a long computation.
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.StopOnSignal() as stop:
    assert signal.getsignal(signal.SIGTERM) == stop._handle  # pylint: disable=protected-access
    assert not preemption.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not stop.requested and time.monotonic() < deadline:
      time.sleep(0.001)
    assert stop.requested and preemption.requested()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  assert signal.getsignal(signal.SIGTERM) == previous
  assert not preemption.requested()
