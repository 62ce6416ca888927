"""Checkpoint and resume: an interrupted run continues bit-identically."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import sngm_optax
from sngm_optax.harness import checkpoint
from sngm_optax.harness import cli
from sngm_optax.harness import data
from sngm_optax.harness import train
from sngm_optax.harness import config as config_lib


@pytest.fixture(name="dataset", scope="module")
def fixture_dataset() -> data.Dataset:
  # 320 training examples: 4 steps per epoch at batch 80.
  return data.generate_mnist1d(400, seed=0)


def _config(directory, **changes) -> config_lib.Config:
  defaults = dict(model="mlp", optimizer="sngm", learning_rate=0.1,
                  batch_size=80, epochs=4, warmup_epochs=0.5, num_devices=2,
                  checkpoint_dir=str(directory), keep_checkpoints=2)
  defaults.update(changes)
  return config_lib.Config(**defaults)


def _final_state(config, step):
  """The saved TrainState pytree (params, optimizer state) of `step`."""
  path = pathlib.Path(config.checkpoint_dir) / str(step) / "state"
  with ocp.StandardCheckpointer() as checkpointer:
    return jax.tree.map(np.asarray, checkpointer.restore(path))


def _assert_trees_identical(a, b):
  leaves_a, structure_a = jax.tree.flatten(a)
  leaves_b, structure_b = jax.tree.flatten(b)
  assert structure_a == structure_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


# A small resnet: its BatchNorm statistics are part of the saved state.
RESNET = dict(model="resnet", model_kwargs={"width": 4})


@pytest.mark.parametrize("optimizer, stop_at, model", [
    ("sngm", 6, {}),      # mid-epoch (4 steps per epoch)
    ("tr_sgd", 13, {}),   # mid inner window (S = 10): k = 3 at the stop
    ("gmc", 7, {}),       # per-device error-feedback memory (2 devices)
    ("sngm", 6, RESNET),  # BatchNorm statistics, 2 devices
])
def test_interrupted_and_resumed_run_is_bit_identical(dataset, tmp_path,
                                                      optimizer, stop_at,
                                                      model):
  # TR with a constant learning rate: the inner 1/(k+1) decay is the only
  # step-size change, so the stop lands mid window with everything else equal.
  schedule = "constant" if optimizer == "tr_sgd" else "warmup_cosine"
  straight = _config(tmp_path / "straight", optimizer=optimizer,
                     schedule=schedule, **model)
  expected = train.train_and_evaluate(straight, dataset=dataset, quiet=True)
  total = expected["steps"]
  assert total == 16

  stopped = _config(tmp_path / "resumed", optimizer=optimizer,
                    schedule=schedule, max_steps=stop_at,
                    checkpoint_at_epoch_end=False, checkpoint_every_steps=5,
                    **model)
  first = train.train_and_evaluate(stopped, dataset=dataset, quiet=True)
  assert first["interrupted"] and first["steps"] == stop_at
  # every 5 steps plus the forced save at the stop; keep_checkpoints=2
  assert checkpoint.Checkpointer(stopped.checkpoint_dir).steps() == [
      5 * (stop_at // 5), stop_at]

  resumed = train.train_and_evaluate(
      _config(tmp_path / "resumed", optimizer=optimizer, schedule=schedule,
              **model),
      dataset=dataset,
      quiet=True, resume=True)
  assert not resumed["interrupted"] and resumed["steps"] == total
  assert resumed["samples_seen"] == expected["samples_seen"]
  _assert_trees_identical(_final_state(straight, total),
                          _final_state(stopped, total))
  if model:
    assert "batch_stats" in _final_state(stopped, total)
  assert [r["test_loss"] for r in resumed["history"]] == [
      r["test_loss"] for r in expected["history"]]
  assert [r["train_loss"] for r in resumed["history"]] == [
      r["train_loss"] for r in expected["history"]]


@pytest.mark.parametrize("model", [{}, RESNET])
def test_adaptive_batch_run_resumed_mid_epoch_after_growth_is_bit_identical(
    dataset, tmp_path, model):
  adaptive = dict(optimizer="adadagrad_norm", adaptive_batch="norm",
                  batch_size=16, max_batch_size=80, learning_rate=1.0,
                  schedule="constant", weight_decay=0.0,
                  optimizer_kwargs={"eta": 0.5}, **model)
  straight = _config(tmp_path / "straight", **adaptive)
  expected = train.train_and_evaluate(straight, dataset=dataset, quiet=True)
  stop_at = 4
  stopped = _config(tmp_path / "resumed", max_steps=stop_at,
                    checkpoint_at_epoch_end=False, **adaptive)
  first = train.train_and_evaluate(stopped, dataset=dataset, quiet=True)
  assert first["interrupted"] and first["steps"] == stop_at
  assert max(first["batch_sizes"]) > 16, "the batch must grow before the stop"
  assert first["samples_seen"] % first["num_train"] != 0, "stop mid-epoch"

  resumed = train.train_and_evaluate(
      _config(tmp_path / "resumed", **adaptive), dataset=dataset, quiet=True,
      resume=True)
  assert resumed["steps"] == expected["steps"]
  assert resumed["batch_sizes"] == expected["batch_sizes"]
  assert resumed["samples_seen"] == expected["samples_seen"]
  _assert_trees_identical(_final_state(straight, expected["steps"]),
                          _final_state(stopped, expected["steps"]))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(dataset,
                                                              tmp_path):
  straight = _config(tmp_path / "straight")
  train.train_and_evaluate(straight, dataset=dataset, quiet=True)

  stopped = _config(tmp_path / "resumed", max_steps=10,
                    checkpoint_every_steps=3, checkpoint_at_epoch_end=False,
                    keep_checkpoints=3)
  train.train_and_evaluate(stopped, dataset=dataset, quiet=True)
  directory = pathlib.Path(stopped.checkpoint_dir)
  assert checkpoint.Checkpointer(directory).steps() == [6, 9, 10]
  # Damage step 10: truncate every array file of its state to 0 bytes.
  damaged = 0
  for path in (directory / "10" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"")
      damaged += 1
  assert damaged

  with pytest.warns(RuntimeWarning, match="checkpoint 10 .* cannot be "
                    "restored .*; trying an older checkpoint"):
    resumed = train.train_and_evaluate(_config(directory), dataset=dataset,
                                       quiet=True, resume=True)
  assert resumed["steps"] == 16
  _assert_trees_identical(_final_state(straight, 16),
                          _final_state(stopped, 16))


def test_no_good_checkpoint_is_a_clear_error(dataset, tmp_path):
  config = _config(tmp_path / "empty")
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint found"):
    train.train_and_evaluate(config, dataset=dataset, quiet=True,
                             resume=True)
  stopped = _config(tmp_path / "one", max_steps=2,
                    checkpoint_at_epoch_end=False)
  train.train_and_evaluate(stopped, dataset=dataset, quiet=True)
  for path in pathlib.Path(stopped.checkpoint_dir).rglob("*"):
    if path.is_file() and "state" in path.parts:
      path.write_bytes(b"garbage")
  with pytest.warns(RuntimeWarning):
    with pytest.raises(checkpoint.CheckpointError,
                       match="no checkpoint could be restored"):
      train.train_and_evaluate(_config(tmp_path / "one"), dataset=dataset,
                               quiet=True, resume=True)


def test_resume_with_a_different_config_is_refused(dataset, tmp_path):
  stopped = _config(tmp_path, max_steps=2)
  train.train_and_evaluate(stopped, dataset=dataset, quiet=True)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"different configuration \(learning_rate\)"):
    train.train_and_evaluate(_config(tmp_path, learning_rate=0.3),
                             dataset=dataset, quiet=True, resume=True)


def test_cli_resume_continues_the_run(dataset, tmp_path, capsys):
  path = tmp_path / "data.npz"
  np.savez(path, x=dataset.x, y=dataset.y, x_test=dataset.x_test,
           y_test=dataset.y_test)
  run = tmp_path / "run"
  argv = ["train", "--data", str(path), "--model", "mlp", "--batch-size",
          "80", "--lr", "0.1", "--epochs", "2", "--num-devices", "1",
          "--out", str(run), "--quiet"]
  assert cli.main(argv + ["--checkpoint-dir", str(run / "ckpt"),
                          "--set", "max_steps=3"]) == 0
  out = capsys.readouterr().out
  assert "stopped after step 3 of 8" in out
  assert cli.main(["train", "--resume", str(run / "ckpt"), "--out",
                   str(run), "--quiet"]) == 0
  out = capsys.readouterr().out
  assert "after 8 steps" in out
  assert os.path.exists(run / "metrics.json")


def test_cli_resume_without_checkpoint_exits_2(tmp_path, capsys):
  assert cli.main(["train", "--resume", str(tmp_path / "nothing")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no checkpoint" in err[0]


def test_adadagrad_controller_state_round_trips_bit_identically(tmp_path):
  # Library level (the harness has no adaptive-batch loop yet): AdAdaGrad's
  # state after the batch size grew is saved, restored into a fresh init
  # template, and continues exactly like the uninterrupted optimizer.
  tx = sngm_optax.adadagrad_norm(0.1, max_batch_size=4096,
                                 initial_batch_size=8, microbatch_size=4)
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
  rng = np.random.default_rng(0)

  def grads_at(step):
    del step
    micro = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal((2,) + p.shape) + 0.01,
                              jnp.float32), params)
    return jax.tree.map(lambda m: m.mean(0), micro), micro

  inputs = [grads_at(step) for step in range(6)]
  step = jax.jit(lambda g, m, s, p: tx.update(g, s, p, microbatch_grads=m))

  def run(state, p, steps):
    for grads, micro in steps:
      updates, state = step(grads, micro, state, p)
      p = optax.apply_updates(p, updates)
    return state, p

  straight_state, straight_params = run(tx.init(params), params, inputs)
  state, p = run(tx.init(params), params, inputs[:3])
  batch = optax.tree.get(state, "next_batch_size")
  assert int(batch) > 8  # the batch size grew before the interruption
  with checkpoint.Checkpointer(tmp_path) as checkpointer:
    checkpointer.save(3, {"opt_state": state, "params": p}, {"step": 3})
  with checkpoint.Checkpointer(tmp_path) as checkpointer:
    _, restored, meta = checkpointer.restore_latest(
        {"opt_state": tx.init(params), "params": params})
  assert meta == {"step": 3}
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state)
  resumed_state, resumed_params = run(restored["opt_state"],
                                      restored["params"], inputs[3:])
  _assert_trees_identical(resumed_params, straight_params)
  _assert_trees_identical(resumed_state, straight_state)
