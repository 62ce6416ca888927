"""The gradient-noise-scale monitor in the harness (`Config.monitor_noise_scale`,
`sngm_optax.harness.noise_scale`, `sngm-optax noise-scale`)."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from sngm_optax.harness import cli
from sngm_optax.harness import config as config_lib
from sngm_optax.harness import data
from sngm_optax.harness import models
from sngm_optax.harness import noise_scale
from sngm_optax.harness import sweep
from sngm_optax.harness import train
from sngm_optax.harness import trials

NUM_DEVICES = 8


@pytest.fixture(name="dataset", scope="module")
def fixture_dataset() -> data.Dataset:
  return data.generate_mnist1d(1000)  # 800 training examples


def _config(**changes) -> config_lib.Config:
  settings = dict(model="mlp", optimizer="sngm", learning_rate=0.2,
                  batch_size=160, epochs=1, warmup_epochs=0.2,
                  num_devices=NUM_DEVICES)
  settings.update(changes)
  return config_lib.Config(**settings)


# ----------------------------------------------------------------------------
# The monitor in the loop.


@pytest.mark.parametrize("optimizer", ["msgd", "sngm"])
def test_monitored_run_trains_as_the_unmonitored_one(optimizer, dataset):
  # The monitor's output is the device mean, the optimizer's own input.
  finals = {}
  for monitored in (False, True):
    config = _config(optimizer=optimizer, monitor_noise_scale=monitored)
    runs, state = trials.train_program([config], dataset, eval_every=5)
    finals[monitored] = jax.device_get(state.params), runs[0].curve
  (params, curve), (monitored_params, monitored_curve) = (finals[False],
                                                           finals[True])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               params, monitored_params)
  assert "noise_scale" not in curve[-1]
  assert monitored_curve[-1]["noise_scale"] > 0
  assert monitored_curve[-1]["test_loss"] == pytest.approx(
      curve[-1]["test_loss"], rel=1e-5)


def _device_gradients(config, dataset):
  """Each device's mean gradient at the initial params on its shard of the
  first batch, computed apart from the harness: the loop draws the batch
  from `EpochSampler(num_train, seed)` and `shard_map` splits it into
  `num_devices` contiguous slices (`P(None, AXIS)`)."""
  network = models.make_model(config.model, dataset.num_classes)
  params = network.init(jax.random.key(config.seed), dataset.x[:1])["params"]
  indices = data.EpochSampler(dataset.num_train,
                              seed=config.seed).next_batch(config.batch_size)
  x, y = dataset.x[indices], dataset.y[indices]

  def loss(params, x, y):
    logits = network.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  shard = config.batch_size // config.num_devices
  gradients = []
  for device in range(config.num_devices):
    part = slice(device * shard, (device + 1) * shard)
    grad = jax.grad(loss)(params, x[part], y[part])
    gradients.append(np.concatenate(
        [np.ravel(leaf) for leaf in jax.tree.leaves(grad)]).astype(np.float64))
  return np.stack(gradients), shard


def test_recorded_noise_scale_is_the_two_batch_estimate(dataset):
  # One step: the whole training set is the batch and one epoch.
  config = _config(batch_size=dataset.num_train, monitor_noise_scale=True)
  history = train.train_and_evaluate(config, dataset=dataset,
                                     quiet=True)["history"]
  assert [record["steps"] for record in history] == [1]

  gradients, b_small = _device_gradients(config, dataset)
  b_big = b_small * config.num_devices
  small_sq_norm = np.mean(np.sum(gradients**2, axis=1))  # |G_small|^2
  big_sq_norm = np.sum(gradients.mean(axis=0)**2)  # |G_big|^2
  sq_norm = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
  trace = (small_sq_norm - big_sq_norm) / (1 / b_small - 1 / b_big)
  # After one step the bias-corrected EMAs are the step's estimates.
  assert history[0]["noise_scale"] == pytest.approx(trace / sq_norm, rel=1e-4)

  # The trials' curve records the same value.
  runs, _ = trials.train_program([config], dataset, eval_every=1)
  assert runs[0].curve[0]["noise_scale"] == pytest.approx(
      history[0]["noise_scale"], rel=1e-5)


@pytest.mark.parametrize("changes, message", [
    (dict(adaptive_batch="norm", max_batch_size=320),
     "an adaptive_batch run reports its own noise_scale"),
    (dict(batch_ramp="linear", max_batch_size=320), "needs a fixed batch"),
    (dict(optimizer="gmc"), "optimizer 'gmc'"),
    (dict(optimizer="dgc"), "optimizer 'dgc'"),
])
def test_config_refuses_what_the_monitor_cannot_measure(changes, message):
  with pytest.raises(ValueError, match="monitor_noise_scale") as error:
    _config(monitor_noise_scale=True, **changes)
  assert message in str(error.value)
  _config(**changes)  # fine without the monitor


def test_stored_runs_keep_their_keys():
  # Off, the field is left out of a run's settings (sweep.KEY_UNLESS).
  assert "monitor_noise_scale" not in sweep.config_settings(_config())
  assert sweep.config_settings(_config(monitor_noise_scale=True))[
      "monitor_noise_scale"] is True


def test_one_device_is_refused(dataset):
  config = _config(monitor_noise_scale=True, num_devices=1)
  with pytest.raises(ValueError,
                     match="monitor_noise_scale needs at least 2 devices"):
    train.train_and_evaluate(config, dataset=dataset, quiet=True)
  with pytest.raises(ValueError, match="at least 2 devices"):
    noise_scale.measure(_config(num_devices=1), dataset)


# ----------------------------------------------------------------------------
# The batch sizes a noise scale suggests.


@pytest.mark.parametrize("value, expected", [
    (300.0, (256, 512)), (1000.0, (512, 1024)), (1024.0, (512, 2048)),
    (3.0, (2, 4)), (1.0, (1, 2)), (0.75, (1, 1)), (0.2, (1, 1)),
])
def test_suggested_batch_range_hand_values(value, expected):
  assert noise_scale.suggested_batch_range(value) == expected


@pytest.mark.parametrize("value", np.geomspace(1.0, 1e5, 37).tolist())
def test_suggested_batches_keep_steps_and_samples_within_3x(value):
  lo, hi = noise_scale.suggested_batch_range(value)
  assert lo < hi
  for batch in (lo, hi):
    steps, samples = 1 + value / batch, 1 + batch / value  # S/S_min, E/E_min
    assert steps <= 3 + 1e-12 and samples <= 3 + 1e-12
    assert math.log2(batch).is_integer()


@pytest.mark.parametrize("value", [0.0, -4.0, math.inf, math.nan])
def test_suggested_batch_range_needs_a_positive_finite_noise_scale(value):
  with pytest.raises(ValueError, match="noise_scale must be a positive"):
    noise_scale.suggested_batch_range(value)


def test_late_noise_scale_is_the_median_of_the_last_third():
  rows = [{"noise_scale": value} for value in (9.0, 1.0, 2.0, 3.0, 5.0, 4.0)]
  assert noise_scale.late_noise_scale(rows) == 4.5
  assert noise_scale.late_noise_scale(rows[:5]) == 4.0  # last 2 of 5
  assert noise_scale.late_noise_scale(rows[:1]) == 9.0
  assert noise_scale.late_noise_scale([]) is None


# ----------------------------------------------------------------------------
# The command line.


def test_cli_on_one_cpu_device_simulates_eight(tmp_path):
  # A fresh process whose XLA shows one CPU device: the command gives
  # itself 8 before JAX starts.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
             JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = tmp_path / "out"
  process = subprocess.run(
      [sys.executable, "-m", "sngm_optax.harness.cli", "noise-scale",
       "--model", "mlp", "--num-samples", "600", "--epochs", "3",
       "--batch-size", "96", "--lr", "0.2", "--quiet",
       "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
       "--plot", str(out / "noise_scale.png")],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert process.returncode == 0, process.stderr
  lines = process.stdout.strip().splitlines()
  assert lines[0].split() == ["epoch", "samples", "seen", "steps",
                              "B_simple", "test", "acc"]
  assert [line.split()[0] for line in lines[1:4]] == ["1.00", "2.00", "3.00"]
  assert lines[4].startswith("B_simple late in training (median of the "
                             "last 1 of 3 evaluations) is ")
  assert "suggested batch sizes" in lines[4] and "within 3x" in lines[4]
  result = json.loads((out / "noise_scale.json").read_text())
  assert result["num_devices"] == 8 and len(result["rows"]) == 3
  assert result["config"]["monitor_noise_scale"] is True
  lo, hi = result["suggested_batch_range"]
  assert f"suggested batch sizes {lo} to {hi}" in lines[4]
  assert (out / "noise_scale.png").stat().st_size > 0


def test_cli_asks_for_xla_flags_once_jax_has_started(tmp_path, capsys):
  # This process's JAX runs on 8 CPU devices (conftest); make sure it has
  # started, or the command would still set the count itself.
  assert jax.local_device_count() == NUM_DEVICES
  status = cli.main(["noise-scale", "--num-devices", "16", "--lr", "0.1",
                     "--num-samples", "300",
                     "--cache-dir", str(tmp_path / "cache")])
  err = capsys.readouterr().err
  assert status == 2
  assert ("XLA_FLAGS=--xla_force_host_platform_device_count=16 before "
          "Python starts") in err
  status = cli.main(["noise-scale", "--num-devices", "1", "--lr", "0.1",
                     "--model", "mlp", "--batch-size", "48",
                     "--num-samples", "300",
                     "--cache-dir", str(tmp_path / "cache")])
  err = capsys.readouterr().err
  assert status == 2 and "needs at least 2 devices, got 1" in err
