"""Tests of the `sngm-optax` command line (sngm_optax.harness.cli)."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sngm_optax.harness import cli
from sngm_optax.harness import config as config_lib


def _run(argv, capsys):
  """Calls main(argv) like the console script; returns (status, out, err)."""
  try:
    status = cli.main(argv)
  except SystemExit as exit_:
    status = exit_.code
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def _tiny(tmp_path):
  return ["--num-samples", "300", "--cache-dir", str(tmp_path / "cache")]


@pytest.mark.parametrize("argv, message", [
    ([], "required: COMMAND"),
    (["fly"], "invalid choice: 'fly'"),
    (["train", "--optimizer", "adam2"], "invalid choice: 'adam2'"),
    (["train", "--batch-size", "0"], "--batch-size: expected a positive"),
    (["train", "--batch-size", "1.5"], "--batch-size: expected a positive"),
    (["train", "--lr", "-0.1"], "--lr: expected a positive number"),
    (["train", "--lr", "nan"], "--lr: expected a positive number"),
    (["train", "--epochs", "0"], "--epochs: expected a positive number"),
    (["train", "--num-samples", "-5"], "--num-samples: expected a positive"),
    (["compare", "--batch-size", "-1"], "--batch-size: expected a positive"),
    (["compare", "--grid-size", "zero"], "--grid-size: expected a positive"),
    (["train", "--set", "colour=red"], "bad override 'colour=red'"),
    (["train", "--warmup-epochs", "-1"],
     "--warmup-epochs: expected a number >= 0"),
    (["train", "--set", "epochs=many"], "epochs must be a real number"),
    (["train", "--set", "warmup_epochs=-1"], "warmup_epochs must be in [0"),
    (["train", "--model-kwargs", "{oops"], "--model-kwargs: expected a JSON"),
    (["train", "--set", 'model_kwargs={"colour": 1}'],
     "unexpected keyword argument 'colour'"),
    (["train", "--model", "resnet", "--set",
      'model_kwargs={"ghost_batch_size": 0}'],
     "ghost_batch_size must be a positive integer or None, got 0"),
    (["train", "--checkpoint-at-epoch-end", "maybe"],
     "--checkpoint-at-epoch-end: expected true or false"),
    (["train", "--batch-size", "100", "--num-microbatches", "3"],
     "not divisible by num_microbatches"),
    (["train", "--adaptive-batch", "median"], "invalid choice: 'median'"),
    (["train", "--adaptive-batch", "norm"], "needs --max-batch-size"),
    (["train", "--max-batch-size", "64"],
     "--max-batch-size needs --adaptive-batch"),
    (["train", "--initial-batch-size", "64"],
     "--initial-batch-size needs --adaptive-batch"),
    (["train", "--adaptive-batch", "norm", "--max-batch-size", "64",
      "--batch-size", "32"], "give --initial-batch-size"),
    (["train", "--lr", "0.1", "--adaptive-batch", "coordinate",
      "--max-batch-size", "64"], "use it with optimizer 'adadagrad'"),
    (["train", "--lr", "0.1", "--adaptive-batch", "norm",
      "--max-batch-size", "16"], "at least the initial"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
  status, out, err = _run(argv, capsys)
  assert status == 2
  assert out == ""
  assert len(err.strip().splitlines()) == 1, err
  assert message in err
  assert "Traceback" not in err


def test_values_that_do_not_fit_the_data_exit_2(tmp_path, capsys):
  # Checked after loading the data: still one line and status 2.
  status, _, err = _run(["train", "--batch-size", "4096", "--quiet",
                         *_tiny(tmp_path)], capsys)
  assert status == 2
  assert "larger than the training set (240 examples)" in err
  assert len(err.strip().splitlines()) == 1
  status, _, err = _run(["compare", "--optimizers", "sngm,adam2",
                         "--quiet", *_tiny(tmp_path)], capsys)
  assert status == 2 and "unknown optimizer 'adam2'" in err
  status, _, err = _run(["compare", "--batch-size", "1000", "--quiet",
                         *_tiny(tmp_path)], capsys)
  assert status == 2 and "larger than the training set" in err


def test_missing_and_malformed_npz_exit_2(tmp_path, capsys):
  status, _, err = _run(["train", "--data", str(tmp_path / "none.npz")],
                        capsys)
  assert status == 2 and "none.npz: no such file" in err
  bad = tmp_path / "bad.npz"
  with open(bad, "wb") as stream:
    np.savez(stream, x=np.zeros((4, 3)), y=np.zeros(4, int),
             x_test=np.zeros((2, 3)))
  status, _, err = _run(["compare", "--data", str(bad)], capsys)
  assert status == 2 and "missing key(s) y_test" in err
  assert len(err.strip().splitlines()) == 1


def test_train_writes_metrics_json(tmp_path, capsys):
  out = tmp_path / "run"
  status, stdout, _ = _run([
      "train", "--optimizer", "sngm", "--batch-size", "48", "--lr", "0.2",
      "--epochs", "2", "--model", "mlp", "--out", str(out), "--quiet",
      *_tiny(tmp_path)], capsys)
  assert status == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["config"]["batch_size"] == 48
  assert metrics["num_train"] == 240 and len(metrics["history"]) == 2
  assert metrics["steps"] == 10
  assert "test accuracy" in stdout


def test_adaptive_train_grows_the_batch_and_records_it(tmp_path, capsys):
  out = tmp_path / "run"
  status, stdout, _ = _run([
      "train", "--optimizer", "adadagrad_norm", "--lr", "2",
      "--adaptive-batch", "norm", "--max-batch-size", "64",
      "--initial-batch-size", "16", "--num-devices", "4", "--epochs", "2",
      "--model", "mlp", "--set", "schedule=constant",
      "--set", 'optimizer_kwargs={"eta": 0.5}', "--out", str(out),
      "--quiet", *_tiny(tmp_path)], capsys)
  assert status == 0
  metrics = json.loads((out / "metrics.json").read_text())
  sizes = metrics["batch_sizes"]
  assert sizes[0] == 16 and max(sizes) > 16
  assert sum(sizes) == metrics["samples_seen"] == 2 * 240
  assert len(sizes) == metrics["steps"]
  assert all("batch_size" in record for record in metrics["history"])
  assert "batch size 16 -> " in stdout


def test_train_reads_a_user_npz(tmp_path, capsys):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=96)
  x = rng.normal(size=(96, 8)) + labels[:, None]  # separable enough
  path = tmp_path / "mine.npz"
  with open(path, "wb") as stream:
    np.savez(stream, x=x[:64], y=labels[:64], x_test=x[64:],
             y_test=labels[64:])
  status, _, _ = _run(["train", "--data", str(path), "--model", "mlp",
                       "--batch-size", "16", "--epochs", "1", "--lr", "0.1",
                       "--out", str(tmp_path / "run"), "--quiet"], capsys)
  assert status == 0
  metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert metrics["num_train"] == 64 and metrics["num_test"] == 32


def test_compare_prints_the_table_and_writes_json_and_png(tmp_path, capsys):
  out = tmp_path / "cmp"
  status, stdout, _ = _run([
      "compare", "--optimizers", "sngm,lamb", "--batch-size", "64",
      "--small-batch-size", "16", "--epochs", "1", "--grid-size", "1",
      "--model", "mlp", "--out", str(out), "--quiet", *_tiny(tmp_path)],
      capsys)
  assert status == 0
  assert stdout.splitlines()[0].startswith("| optimizer | batch | best LR")
  rows = [line for line in stdout.splitlines()[2:] if line.startswith("|")]
  assert [row.split("|")[1].strip() for row in rows] == ["sngm", "lamb",
                                                         "msgd"]
  assert [row.split("|")[2].strip() for row in rows] == ["64", "64", "16"]
  result = json.loads((out / "compare.json").read_text())
  assert result["benchmark"] == "compare" and result["trial_budget"] == 1
  assert [c["batch_size"] for c in result["contenders"]] == [64, 64, 16]
  assert all(len(c["trials"]) == 1 for c in result["contenders"])
  assert all(c["trials"][0]["status"] in ("ok", "collapsed")
             for c in result["contenders"])
  assert len((out / "compare_runs.jsonl").read_text().splitlines()) == 4
  assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_entry_point_reports_errors_without_traceback():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  process = subprocess.run(
      [sys.executable, "-m", "sngm_optax.harness.cli", "train", "--lr", "0"],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert process.returncode == 2
  assert process.stderr.strip().splitlines() == [
      "sngm-optax train: error: argument --lr: expected a positive number, "
      "got '0' (see sngm-optax train --help)"]


def test_train_without_lr_needs_a_benchmark_pick(monkeypatch, capsys):
  from sngm_optax.harness import compare  # pylint: disable=g-import-not-at-top
  monkeypatch.delitem(compare.LR_GRIDS, "sgd")
  status, _, err = _run(["train", "--optimizer", "sgd"], capsys)
  assert status == 2
  assert "--lr is required for sgd" in err


def _train_parser():
  commands = next(action for action in cli.build_parser()._actions  # pylint: disable=protected-access
                  if isinstance(action, argparse._SubParsersAction))  # pylint: disable=protected-access
  return commands.choices["train"]


def test_train_has_a_flag_per_config_field_and_leaves_defaults_to_config():
  fields = {field.name for field in dataclasses.fields(config_lib.Config)}
  actions = {action.dest: action for action in _train_parser()._actions}  # pylint: disable=protected-access
  assert fields <= set(actions)
  # No restated default: an absent flag is absent from the namespace.
  assert all(actions[name].default is argparse.SUPPRESS for name in fields)
  assert not fields & set(vars(cli.build_parser().parse_args(["train"])))
  args = cli.build_parser().parse_args([
      "train", "--lr", "0.1", "--weight-decay", "0", "--batch-size", "64",
      "--model-kwargs", '{"hidden_sizes": [8]}', "--data", "mine.npz",
      "--checkpoint-at-epoch-end", "false", "--checkpoint-every", "7"])
  assert (args.learning_rate, args.weight_decay, args.batch_size) == (
      0.1, 0.0, 64)
  assert args.model_kwargs == {"hidden_sizes": [8]}
  assert args.data_path == "mine.npz"
  assert (args.checkpoint_at_epoch_end, args.checkpoint_every_steps) == (
      False, 7)


def test_train_flags_reach_the_config(tmp_path, capsys):
  out = tmp_path / "run"
  status, _, _ = _run([
      "train", "--optimizer", "msgd", "--batch-size", "48", "--lr", "0.1",
      "--weight-decay", "0.01", "--epochs", "1", "--model", "mlp",
      "--model-kwargs", '{"hidden_sizes": [8]}', "--schedule", "constant",
      "--out", str(out), "--quiet", *_tiny(tmp_path)], capsys)
  assert status == 0
  config = json.loads((out / "metrics.json").read_text())["config"]
  assert config["weight_decay"] == 0.01 and config["schedule"] == "constant"
  assert config["model_kwargs"] == {"hidden_sizes": [8]}
  # The rest are Config's defaults.
  assert config["warmup_epochs"] == config_lib.Config().warmup_epochs
