"""The adaptive-batch training loop: sampler, compilations, convergence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sngm_optax as batch_size_lib
from sngm_optax.harness import data
from sngm_optax.harness import train
from sngm_optax.harness import config as config_lib
from sngm_optax.harness import models
from sngm_optax.harness import optimizers
from sngm_optax.harness import steps as steps_lib

NUM_TRAIN = 640
MICROBATCH = 16
MAX_BATCH = 64


@pytest.fixture(name="dataset", scope="module")
def fixture_dataset() -> data.Dataset:
  full = data.generate_mnist1d(800, seed=0)
  assert full.num_train == NUM_TRAIN
  return full


def _config(**changes) -> config_lib.Config:
  defaults = dict(model="mlp", optimizer="adadagrad_norm", learning_rate=2.0,
                  batch_size=MICROBATCH, epochs=10, num_devices=4,
                  schedule="constant", weight_decay=0.0,
                  adaptive_batch="norm", max_batch_size=MAX_BATCH,
                  optimizer_kwargs={"eta": 0.5})
  defaults.update(changes)
  return config_lib.Config(**defaults)


@pytest.fixture(name="run", scope="module")
def fixture_run(dataset):
  """One adaptive run, recording every index the sampler serves."""
  served = []
  original = data.EpochSampler.next_batch

  def recording(self, batch_size):
    indices = original(self, batch_size)
    served.append(indices)
    return indices

  train.build_program.cache_clear()  # count this run's compilations only
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(data.EpochSampler, "next_batch", recording)
    result = train.train_and_evaluate(_config(), dataset=dataset, quiet=True)
  return result, served


def test_growing_batch_serves_each_example_once_per_epoch(run):
  result, served = run
  sizes = result["batch_sizes"]
  assert [len(indices) for indices in served] == sizes
  everything = np.concatenate(served)
  assert len(everything) == 10 * NUM_TRAIN == result["samples_seen"]
  for epoch in range(10):
    chunk = everything[epoch * NUM_TRAIN:(epoch + 1) * NUM_TRAIN]
    np.testing.assert_array_equal(np.sort(chunk), np.arange(NUM_TRAIN))
  # The batch changed size inside an epoch (not only at its boundaries).
  ends = np.cumsum(sizes)
  first_epoch = [b for b, end in zip(sizes, ends) if end <= NUM_TRAIN]
  assert len(set(first_epoch)) >= 2, sizes


def test_growing_batch_compiles_once(run):
  result, _ = run
  sizes = result["batch_sizes"]
  assert all(size % MICROBATCH == 0 for size in sizes)
  assert len(set(sizes)) >= 3, sizes
  # gradient_accumulator's init, add and the optimizer step: once each,
  # whatever the batch sizes.
  assert result["train_step_compilations"] == 3


def test_learning_rate_is_scheduled_in_samples(dataset):
  # A growing batch and a fixed one on the same budget follow the same
  # curve: peak * warmup_cosine(samples seen), recorded in every entry.
  common = dict(schedule="warmup_cosine", warmup_epochs=1.0, epochs=3,
                learning_rate=0.5)
  runs = [train.train_and_evaluate(_config(**common), dataset=dataset,
                                   quiet=True),
          train.train_and_evaluate(
              _config(optimizer="adagrad_norm", adaptive_batch=None,
                      max_batch_size=None, optimizer_kwargs={}, **common),
              dataset=dataset, quiet=True)]
  budget = 3 * NUM_TRAIN
  reference = optax.warmup_cosine_decay_schedule(0.0, 0.5, NUM_TRAIN, budget)
  for result in runs:
    for record in result["history"]:
      np.testing.assert_allclose(
          record["learning_rate"], reference(record["samples_seen"]),
          rtol=1e-5, atol=1e-7)
  adaptive, fixed = runs
  assert adaptive["steps"] < fixed["steps"]
  assert adaptive["samples_seen"] == fixed["samples_seen"] == budget
  assert adaptive["final"]["learning_rate"] == fixed["final"]["learning_rate"]
  np.testing.assert_allclose(adaptive["history"][0]["learning_rate"],
                             fixed["history"][0]["learning_rate"], rtol=0.05)


def test_accumulating_step_is_the_fused_step(dataset):
  # The harness's gradient_accumulator path (one microbatch at a time) and
  # the fused step give the same update and the same suggestion.
  config = _config(adaptive_statistics="microbatch", num_devices=2,
                   max_batch_size=512)
  state_fused, metrics_fused = _step_once(config, dataset, 3 * MICROBATCH, 3)
  state_acc, metrics_acc = _step_once(config, dataset, 3 * MICROBATCH, 3,
                                      accumulate=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                       atol=1e-7),
               state_fused.params, state_acc.params)
  for key in ("loss", "accuracy", "next_batch_size", "noise_scale",
              "samples_seen"):
    np.testing.assert_allclose(metrics_fused[key], metrics_acc[key],
                               rtol=1e-4)


def test_short_adaptive_run_grows_the_batch_and_learns(run):
  result, _ = run
  sizes = result["batch_sizes"]
  assert sizes[0] == MICROBATCH and max(sizes) > 2 * MICROBATCH
  assert sizes == sorted(sizes[:-1]) + sizes[-1:]  # never shrinks (but the
  # last batch stops at the budget)
  # Chance is 0.1; this MLP on 640 examples reaches ~0.25-0.3.
  assert result["final"]["test_accuracy"] > 0.2
  assert len(result["noise_scales"]) == len(sizes)
  assert [h["batch_size"] for h in result["history"]][0] in sizes
  assert result["adaptive_statistics"] == "per_device"


def _step_once(config, dataset, num_real, slots, accumulate=False):
  """One train step on `num_real` examples fed in `slots` microbatches
  (with `accumulate`, by the harness's gradient_accumulator step)."""
  train.build_program.cache_clear()
  devices = tuple(jax.local_devices()[:config.num_devices])
  statistics = config.adaptive_statistics
  program = train.build_program(train.ProgramSpec(
      model=config.model, num_classes=dataset.num_classes,
      optimizer=config.optimizer,
      optimizer_kwargs=train.frozen_items({"eta": 0.5}), schedule="constant",
      total_samples=10, warmup_samples=0, devices=devices,
      adaptive=(config.adaptive_batch, config.max_batch_size,
                config.batch_size, MICROBATCH, statistics),
      growing_microbatch=MICROBATCH if accumulate else None))
  params = program.init_fn(jax.random.key(0), dataset.x[:1])["params"]
  state = train_state.TrainState.create(apply_fn=program.apply_fn,
                                        params=params, tx=program.tx)
  state = state.replace(opt_state=optax.tree.set(
      state.opt_state, learning_rate=jnp.asarray(0.5, jnp.float32)))
  state = jax.device_put(state, NamedSharding(program.mesh, P()))
  state = jax.tree.map(lambda leaf: leaf.copy(), state)
  count = num_real // MICROBATCH
  shape = (slots, MICROBATCH)
  x = np.zeros(shape + dataset.x.shape[1:], np.float32)
  y = np.zeros(shape, np.int32)
  weight = np.zeros(shape, np.float32)
  x[:count] = dataset.x[:num_real].reshape((count, MICROBATCH)
                                           + dataset.x.shape[1:])
  y[:count] = dataset.y[:num_real].reshape(count, MICROBATCH)
  weight[:count] = 1.0
  batch = {"x": x, "y": y, "weight": weight}
  if not accumulate:
    batch = jax.device_put(batch, NamedSharding(program.mesh,
                                                P(None, steps_lib.AXIS)))
  return program.train_step(state, batch)


def test_padding_microbatches_change_nothing(dataset):
  # (The microbatch mode's padding is checked against a reference below.)
  config = _config(adaptive_statistics="per_device")
  state_a, metrics_a = _step_once(config, dataset, 3 * MICROBATCH, 3)
  state_b, metrics_b = _step_once(config, dataset, 3 * MICROBATCH, 4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                       atol=1e-7),
               state_a.params, state_b.params)
  for key in ("loss", "next_batch_size", "noise_scale"):
    np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=1e-4)
  # The test saw the 48 real examples, not the 64 slots.
  assert int(optax.tree.get(state_b.opt_state, "batch_size")) == 48


def test_microbatch_statistics_match_the_library_on_the_same_units(dataset):
  # The step's moments (one unit per device and microbatch) must give the
  # same suggestion as microbatch_statistics on independently computed
  # unit gradients, through the library's norm test (eta=0.5). Three real
  # microbatches and one of padding: the padding must not count as a unit.
  config = _config(adaptive_statistics="microbatch", num_devices=2,
                   max_batch_size=512)
  _, metrics = _step_once(config, dataset, 3 * MICROBATCH, 4)
  network = models.make_model("mlp", dataset.num_classes)
  params = network.init(jax.random.key(0), dataset.x[:1])["params"]

  def loss(p, x, y):
    logits = network.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  units = []
  x, y = dataset.x[:48], dataset.y[:48]
  for m in range(3):  # microbatch m, device d holds 8 contiguous examples
    for d in range(2):
      rows = slice(m * 16 + d * 8, m * 16 + d * 8 + 8)
      units.append(jax.grad(loss)(params, x[rows], y[rows]))
  stacked = jax.tree.map(lambda *u: jnp.stack(u), *units)
  _, statistics = batch_size_lib.microbatch_statistics(stacked, 8)
  assert int(statistics.num_samples) == 48
  expected = batch_size_lib.next_batch_size(
      48, batch_size_lib.norm_test(statistics, 0.5), 512, MICROBATCH)
  assert MICROBATCH < int(expected) < 512  # neither stuck nor capped
  assert int(metrics["next_batch_size"]) == int(expected)


@pytest.mark.parametrize("changes, message", [
    (dict(adaptive_batch="median"), "unknown adaptive_batch"),
    (dict(max_batch_size=None), "needs max_batch_size"),
    (dict(max_batch_size=8), "at least the initial"),
    (dict(max_batch_size=72), "multiple of the microbatch"),
    (dict(adaptive_batch="coordinate"), "use it with optimizer 'adadagrad'"),
    (dict(adaptive_batch=None), "needs adaptive_batch"),
    (dict(optimizer="sngm", adaptive_batch=None), "only used with"),
    (dict(adaptive_batch="augmented", adaptive_statistics="microbatch"),
     "needs per-device statistics"),
    (dict(adaptive_statistics="sometimes"), "unknown adaptive_statistics"),
])
def test_bad_adaptive_configs_raise(changes, message):
  with pytest.raises(ValueError, match=message):
    _config(**changes)


def test_one_device_has_no_per_device_statistics(dataset):
  # The inner-product test needs per-device statistics: refused on one
  # device before anything is compiled.
  with pytest.raises(ValueError, match="needs per-device statistics"):
    train.train_and_evaluate(
        _config(optimizer="sngm", adaptive_batch="inner_product",
                num_devices=1, optimizer_kwargs={}), dataset=dataset,
        quiet=True)
  with pytest.raises(ValueError, match="at least two units"):
    train.train_and_evaluate(_config(num_devices=1), dataset=dataset,
                             quiet=True)


def test_sngm_with_a_test_in_front_is_the_test_then_sngm():
  # make_adaptive_optimizer('sngm') = adaptive_batch_size (which averages
  # over the devices) chained with sngm without its own averaging.
  tx = optimizers.make_adaptive_optimizer(
      "sngm", 0.1, test="norm", max_batch_size=64, initial_batch_size=16,
      batch_size_multiple=16, microbatch_size=None, axis_name=None, eta=0.5)
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  state = tx.init(params)
  assert int(optax.tree.get(state, "next_batch_size")) == 16
  per_example = {"w": jax.random.normal(jax.random.key(1), (4, 2, 3)),
                 "b": jax.random.normal(jax.random.key(2), (4, 3))}
  mean = jax.tree.map(lambda g: g.mean(0), per_example)
  updates, state = tx.update(mean, state, params,
                             per_example_grads=per_example)
  reference = optimizers.make_optimizer("sngm", 0.1)
  expected, _ = reference.update(mean, reference.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               updates, expected)
  assert int(optax.tree.get(state, "batch_size")) == 4
