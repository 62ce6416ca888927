"""End-to-end tests of the training loop (sngm_optax.harness.train)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sngm_optax.harness import data
from sngm_optax.harness import models
from sngm_optax.harness import train
from sngm_optax.harness import config as config_lib
from sngm_optax.harness import optimizers
from sngm_optax.harness import steps as steps_lib


@pytest.fixture(name="dataset", scope="module")
def fixture_dataset(tmp_path_factory) -> data.Dataset:
  cache = tmp_path_factory.mktemp("cache")
  return data.load_mnist1d(2000, seed=0, cache_dir=cache)


def _config(**changes) -> config_lib.Config:
  defaults = dict(model="cnn", optimizer="sngm", learning_rate=0.2,
                  batch_size=96, epochs=5, warmup_epochs=0.5,
                  num_devices=1)
  defaults.update(changes)
  return config_lib.Config(**defaults)


def test_training_through_the_cli_loop_beats_chance_and_writes_json(
    dataset, tmp_path):
  config = _config(val_fraction=0.1)
  result = train.train_and_evaluate(config, tmp_path, dataset=dataset,
                                    quiet=True)
  history = result["history"]
  assert [round(h["epoch"]) for h in history] == [1, 2, 3, 4, 5]
  # 10 classes: chance is 10%. The CNN gets ~55-60% after 5 small epochs.
  assert history[-1]["test_accuracy"] > 0.4
  assert history[-1]["val_accuracy"] > 0.4
  assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.3
  assert result["num_train"] == 1440 and result["num_val"] == 160
  assert result["steps"] == int(np.ceil(5 * 1440 / 96))
  assert result["samples_seen"] == result["steps"] * 96
  written = json.loads((tmp_path / "metrics.json").read_text())
  assert written["final"]["test_accuracy"] == history[-1]["test_accuracy"]
  assert written["config"]["optimizer"] == "sngm"


def _test_losses(dataset, **changes):
  config = _config(model="mlp", epochs=1, batch_size=160, **changes)
  result = train.train_and_evaluate(config, dataset=dataset, quiet=True)
  return [h["test_loss"] for h in result["history"]], result


def test_eight_devices_and_microbatches_match_one_device(dataset):
  # The other optimizers' cross-device averaging is checked by
  # test_registry_optimizers_average_gradients_across_devices.
  assert jax.local_device_count() == 8  # from tests/conftest.py
  one, _ = _test_losses(dataset, num_devices=1, num_microbatches=1)
  eight, result = _test_losses(dataset, num_devices=8, num_microbatches=2)
  assert result["num_devices"] == 8
  np.testing.assert_allclose(eight, one, rtol=2e-4)


def test_train_step_equals_plain_sgd_and_ignores_zero_weight_examples():
  # Reference: optax.sgd with the mean-loss gradient of the real examples,
  # computed without shard_map or microbatches. Weight-0 examples (the
  # padding a growing batch will use) must not count.
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (steps_lib.AXIS,))
  model = models.make_model("mlp")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 64, 40)).astype(np.float32)
  y = rng.integers(0, 10, size=(2, 64)).astype(np.int32)
  weight = (rng.uniform(size=(2, 64)) < 0.7).astype(np.float32)
  real = weight.astype(bool)
  params = jax.jit(model.init)(jax.random.key(0), x[0])["params"]

  def mean_loss(p):
    logits = model.apply({"params": p}, x[real])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, y[real]).mean()

  grads = jax.jit(jax.grad(mean_loss))(params)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  expected_loss = jax.jit(mean_loss)(params)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=optimizers.make_optimizer("sgd", 0.1, axis_name=steps_lib.AXIS))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  new_state, metrics = steps_lib.make_train_step(mesh)(
      state, {"x": x, "y": y, "weight": weight})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               new_state.params, expected)
  np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)


def _sgd_config(**changes):
  defaults = dict(model="mlp", optimizer="sgd", weight_decay=0.0, epochs=1,
                  batch_size=400, learning_rate=0.3, warmup_epochs=0.5)
  defaults.update(changes)
  return _config(**defaults)


def test_injected_peak_learning_rate_matches_plain_optax(dataset):
  # The loop keeps the peak learning rate in the optimizer state so that a
  # grid compiles once. Reference: optax.sgd(warmup-cosine schedule) stepped
  # by hand on the batches the loop serves.
  before = train.build_program.cache_info()
  results = [train.train_and_evaluate(_sgd_config(learning_rate=lr),
                                      dataset=dataset, quiet=True)
             for lr in (0.05, 0.3)]
  assert train.build_program.cache_info().misses - before.misses <= 1
  expected = _plain_sgd_test_loss(dataset, 0.3, 0.0)
  np.testing.assert_allclose(results[1]["final"]["test_loss"], expected,
                             rtol=1e-4)
  assert abs(results[0]["final"]["test_loss"] - expected) > 1e-3


def _plain_sgd_test_loss(dataset, peak, weight_decay):
  """`_sgd_config`'s run by hand: optax.sgd after add_decayed_weights on the
  kernels, warmup-cosine schedule, on the batches the loop serves; returns
  the final test loss."""
  model = models.make_model("mlp")
  params = jax.jit(model.init)(jax.random.key(0), dataset.x[:1])["params"]
  # 1600 examples / 400 = 4 steps, warmup 0.5 epoch = 2 steps.
  tx = optax.chain(
      optax.add_decayed_weights(
          weight_decay, lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
      optax.sgd(optax.warmup_cosine_decay_schedule(0.0, peak, 2, 4, 0.0)))
  opt_state = tx.init(params)
  sampler = data.EpochSampler(dataset.num_train, seed=0)

  @jax.jit
  def sgd_step(params, opt_state, x, y):
    def mean_loss(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    updates, opt_state = tx.update(jax.grad(mean_loss)(params), opt_state,
                                   params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(4):
    idx = sampler.next_batch(400)
    params, opt_state = sgd_step(params, opt_state, dataset.x[idx],
                                 dataset.y[idx])
  logits = jax.jit(model.apply)({"params": params}, dataset.x_test)
  return float(optax.softmax_cross_entropy_with_integer_labels(
      logits, dataset.y_test).mean())


def test_learning_rate_and_weight_decay_share_one_compiled_step(dataset):
  # Both are values in the optimizer state: a (learning rate, weight decay)
  # grid builds one program and compiles its train step once, and the
  # weight decay still acts as optax's add_decayed_weights.
  train.build_program.cache_clear()
  trials = [(0.05, 0.0), (0.3, 0.2)]
  configs = [_sgd_config(learning_rate=lr, weight_decay=wd)
             for lr, wd in trials]
  results = [train.train_and_evaluate(config, dataset=dataset, quiet=True)
             for config in configs]
  assert train.build_program.cache_info().misses == 1
  program = train.build_program(train.ProgramSpec.from_config(
      configs[1], dataset.num_train, jax.local_devices()[:1],
      dataset.num_classes))
  assert train.build_program.cache_info().misses == 1  # the same program
  assert program.train_step._cache_size() == 1
  for (lr, wd), result in zip(trials, results):
    np.testing.assert_allclose(result["final"]["test_loss"],
                               _plain_sgd_test_loss(dataset, lr, wd),
                               rtol=1e-4)
  # The decay is large enough to matter at this tolerance.
  assert abs(results[1]["final"]["test_loss"]
             - _plain_sgd_test_loss(dataset, 0.3, 0.0)) > 1e-3


def test_program_spec_is_hashable_and_carries_model_kwargs(dataset):
  config = _sgd_config(model_kwargs={"hidden_sizes": [8]},
                       optimizer_kwargs={"nesterov": True},
                       optimizer="msgd")
  devices = jax.local_devices()[:1]
  spec = train.ProgramSpec.from_config(config, dataset.num_train, devices,
                                       dataset.num_classes)
  assert spec == train.ProgramSpec.from_config(
      config, dataset.num_train, devices, dataset.num_classes)
  assert hash(spec) == hash(dataclasses.replace(spec))
  assert spec.model_kwargs == (("hidden_sizes", (8,)),)
  assert spec.optimizer_kwargs == (("nesterov", True),)
  program = train.build_program(spec)
  params = program.init_fn(jax.random.key(0), dataset.x[:1])["params"]
  assert params["Dense_0"]["kernel"].shape == (40, 8)
  assert params["Dense_1"]["kernel"].shape == (8, dataset.num_classes)


def test_frozen_items_sorts_and_freezes_nested_values():
  frozen = train.frozen_items({"b": [1, [2]], "a": {"y": 1, "x": 2}})
  assert frozen == (("a", (("x", 2), ("y", 1))), ("b", (1, (2,))))
  hash(frozen)


def test_compile_time_is_reported_apart_from_run_time(dataset,
                                                     no_compilation_cache):
  # A second identical run reuses every compiled step: its compile time is
  # near 0 while the first run's is not.
  train.build_program.cache_clear()
  config = _sgd_config(batch_size=200)
  first, second = (train.train_and_evaluate(config, dataset=dataset,
                                            quiet=True) for _ in range(2))
  assert first["compile_time_s"] > 0.1
  assert second["compile_time_s"] < 0.05 * first["compile_time_s"]
  for result in (first, second):
    assert 0 <= result["compile_time_s"] <= result["wall_time_s"]
    assert result["run_time_s"] == pytest.approx(
        result["wall_time_s"] - result["compile_time_s"])


def test_non_finite_loss_stops_after_k_steps(dataset):
  # Step 1 has learning rate 0 (warmup), step 2 blows the weights up, the
  # losses of steps 3 and 4 are non-finite.
  config = _sgd_config(learning_rate=1e38, max_nonfinite_steps=2)
  with pytest.raises(steps_lib.NonFiniteLossError,
                     match="non-finite for 2 consecutive steps"):
    train.train_and_evaluate(config, dataset=dataset, quiet=True)


@pytest.mark.parametrize("changes, message", [
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(epochs=0.0), r"epochs must be in \(0, inf\)"),
    (dict(epochs="ten"), "epochs must be a real number"),
    (dict(learning_rate=-1.0), "learning_rate must be in"),
    (dict(learning_rate=float("nan")), "learning_rate must be in"),
    (dict(weight_decay=-1e-4), "weight_decay must be in"),
    (dict(optimizer_kwargs=[1]), "optimizer_kwargs must be a dict"),
    (dict(model_kwargs={1: 2}), "model_kwargs must be a dict"),
    (dict(model="mlp", model_kwargs={"width": 3}), "model 'mlp'.*width"),
    (dict(max_steps=-1), "max_steps must be an integer >= 0"),
    (dict(checkpoint_at_epoch_end="yes"), "checkpoint_at_epoch_end must be"),
    (dict(optimizer="adam2"), "unknown optimizer 'adam2'"),
    (dict(model="vit"), "unknown model 'vit'"),
    (dict(batch_size=100, num_microbatches=3), "not divisible by"),
    (dict(val_fraction=1.0), "val_fraction"),
])
def test_bad_configs_raise_value_error(changes, message):
  with pytest.raises(ValueError, match=message):
    _config(**changes)


@pytest.mark.parametrize("changes, message", [
    (dict(batch_size=4000), "larger than the training set"),
    (dict(num_devices=9), "only 8 local devices"),
    (dict(batch_size=100, num_devices=8), "not divisible by 8 devices"),
])
def test_configs_that_do_not_fit_raise_value_error(dataset, changes, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_config(**changes), dataset=dataset, quiet=True)


def test_override_parses_values_by_field():
  config = config_lib.override(config_lib.Config(), [
      "batch_size=128", "learning_rate=1", "optimizer=msgd",
      'optimizer_kwargs={"momentum": 0.5}', "data_path=null"])
  assert config.batch_size == 128 and config.optimizer == "msgd"
  assert isinstance(config.learning_rate, float)
  assert config.optimizer_kwargs == {"momentum": 0.5}
  with pytest.raises(ValueError, match="bad override 'colour=red'"):
    config_lib.override(config_lib.Config(), ["colour=red"])


@pytest.mark.parametrize(
    "name", sorted(set(optimizers.OPTIMIZERS) - set(optimizers.ADAPTIVE_OPTIMIZERS)))
def test_registry_optimizers_average_gradients_across_devices(name):
  # Each registered optimizer, fed per-device gradients under shard_map,
  # must equal the same optimizer fed the mean gradient without devices.
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (steps_lib.AXIS,))
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  per_device = jax.random.normal(jax.random.key(0), (8, 2, 3))
  grads = {"w": per_device, "b": per_device[:, 0]}
  mean = jax.tree.map(lambda g: g.mean(0), grads)
  # GMC/DGC need an axis: at density 1 their first step is momentum SGD's.
  sparse = name in optimizers.PER_DEVICE_STATE
  plain = optimizers.make_optimizer("msgd" if sparse else name, 0.1,
                               axis_name=None, weight_decay=0.01)
  expected, _ = plain.update(mean, plain.init(params), params)
  sharded_tx = optimizers.make_optimizer(name, 0.1, axis_name=steps_lib.AXIS,
                                    weight_decay=0.01,
                                    **({"density": 1.0} if sparse else {}))
  state = sharded_tx.init(params)

  def local(g):
    g = jax.tree.map(lambda a: a[0], g)
    return sharded_tx.update(g, state, params)[0]

  got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(steps_lib.AXIS),
                              out_specs=P(), check_vma=False))(grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               got, expected)


def test_make_optimizer_rejects_unknown_names_and_keywords():
  with pytest.raises(ValueError, match="choose one of adadagrad, "
                     "adadagrad_norm, adagrad, adagrad_norm, adam, adamw"):
    optimizers.make_optimizer("adagrad_normal", 0.1)
  with pytest.raises(ValueError, match="optimizer 'sngm'.*colour"):
    optimizers.make_optimizer("sngm", 0.1, colour=1)


def test_scanned_steps_give_the_per_step_run(dataset):
  # 1600 examples / 16 = 100 steps an epoch: three scans of 32 steps and 4
  # steps dispatched one by one up to the epoch's end, then 20 more steps.
  results = [train.train_and_evaluate(
      _config(model="mlp", optimizer="msgd", learning_rate=0.05,
              batch_size=16, epochs=1.2, warmup_epochs=0.0,
              steps_per_dispatch=k), dataset=dataset, quiet=True)
             for k in (1, 32)]
  per_step, scanned = ([[h[key] for h in r["history"]] for key in
                        ("train_loss", "test_loss", "steps")]
                       for r in results)
  assert per_step[2] == scanned[2] == [100, 120]
  np.testing.assert_allclose(scanned[:2], per_step[:2], rtol=1e-5)


@pytest.mark.parametrize("batch_size", [48, 1024])
def test_evals_per_epoch_adds_records_between_the_epochs_ends(
    dataset, batch_size):
  # 1600 training examples: quarters of 400 examples. B = 48 passes each
  # one (9 steps at 432, ...); B = 1024 passes two at once at 2048, which
  # records once.
  runs = [train.train_and_evaluate(
      _config(model="mlp", optimizer="msgd", learning_rate=0.05,
              batch_size=batch_size, epochs=2, warmup_epochs=0.0,
              evals_per_epoch=k), dataset=dataset, quiet=True)
          for k in (1, 4)]
  per_epoch, quarters = (run["history"] for run in runs)
  seen = [record["samples_seen"] for record in quarters]
  quarter = 400
  crossings = sorted({-(-n // batch_size) * batch_size
                      for n in range(quarter, 2 * 1600 + 1, quarter)})
  assert seen == crossings
  # The training is the same: the epoch ends' records agree.
  at_epoch_ends = [r for r in quarters
                   if r["samples_seen"] in {p["samples_seen"]
                                            for p in per_epoch}]
  assert len(at_epoch_ends) == len(per_epoch) == 2
  for mine, reference in zip(at_epoch_ends, per_epoch):
    assert mine["test_loss"] == pytest.approx(reference["test_loss"],
                                              rel=1e-5)


def test_steps_per_dispatch_scans_only_small_batches_on_cpu():
  choice = lambda platform="cpu", **changes: train.steps_per_dispatch(
      _config(**changes), platform)
  assert choice(batch_size=8) == train.STEPS_PER_SYNC
  assert choice(batch_size=16) == 1
  assert choice("gpu", batch_size=2) == 1
  assert choice(batch_size=2, steps_per_dispatch=8) == 8
  assert choice(batch_size=2, adaptive_batch="norm",
                max_batch_size=64) == 1
  assert choice(batch_size=2, batch_ramp="linear", max_batch_size=64) == 1
  with pytest.raises(ValueError, match="steps_per_dispatch"):
    _config(steps_per_dispatch=-1)
