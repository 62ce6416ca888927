"""The batch-size tests' formulas, next_batch_size and the adaptive_batch_size
transform, checked against float64 NumPy references (batch_size_reference)."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import sngm_optax
from sngm_optax import adadagrad
from sngm_optax import adadagrad_norm
from sngm_optax import adagrad_norm
from sngm_optax import adaptive_batch_size
from sngm_optax import augmented_inner_product_test
from sngm_optax import coordinate_test
from sngm_optax import inner_product_test
from sngm_optax import next_batch_size
from sngm_optax import norm_test
from sngm_optax import orthogonality_test
from sngm_optax._batch_size_tests import BATCH_SIZE_TESTS

from batch_size_reference import (
    jitted_microbatch_statistics as microbatch_statistics,
    jitted_per_example_statistics as per_example_statistics,
    NUM_DEVICES,
    all_tests,
    flatten,
    pmapped,
    random_per_example,
    reference_tests,
    stats_close,
)


# ----------------------------------------------------------------------------
# The tests' formulas.


@pytest.mark.parametrize("eta,theta,nu", [(0.1, 0.1, 0.1), (0.3, 0.05, 0.7)])
def test_every_test_matches_reference(eta, theta, nu):
  grads = random_per_example(0, batch=16, mean_scale=0.5)
  weights = jax.tree.map(
      lambda g: jnp.asarray(
          np.random.default_rng(1).uniform(0.1, 2.0, g.shape[1:]), jnp.float32
      ),
      grads,
  )
  _, statistics = per_example_statistics(grads, preconditioner=weights)
  got = all_tests(statistics, eta, theta, nu)
  want = reference_tests(
      flatten(grads), eta, theta, nu, weights=flatten(weights, False)
  )
  for name in got:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, err_msg=name)
  np.testing.assert_allclose(statistics.num_samples, 16)
  # The noise splits into the part along the mean and the part orthogonal.
  np.testing.assert_allclose(
      statistics.directional_variance + statistics.orthogonal_variance,
      statistics.variance_trace,
      rtol=1e-5,
  )


def test_default_thresholds_are_one_tenth():
  _, statistics = per_example_statistics(random_per_example(2, batch=8))
  want = reference_tests(flatten(random_per_example(2, batch=8)), 0.1, 0.1, 0.1)
  np.testing.assert_allclose(norm_test(statistics), want["norm"], rtol=1e-4)
  np.testing.assert_allclose(
      inner_product_test(statistics), want["inner_product"], rtol=1e-4
  )
  np.testing.assert_allclose(
      orthogonality_test(statistics), want["orthogonality"], rtol=1e-4
  )
  np.testing.assert_allclose(
      augmented_inner_product_test(statistics), want["augmented"], rtol=1e-4
  )


def test_hand_computed_values():
  # g_1 = (1, 5), g_2 = (3, -5): mean (2, 0), Var = (2, 50).
  _, statistics = per_example_statistics(jnp.array([[1.0, 5.0], [3.0, -5.0]]))
  assert float(statistics.sq_norm) == 4.0
  assert float(statistics.variance_trace) == 52.0
  assert float(statistics.directional_variance) == 2.0
  assert float(statistics.orthogonal_variance) == 50.0
  assert float(norm_test(statistics, eta=1.0)) == 13.0
  assert float(inner_product_test(statistics, theta=1.0)) == 0.5
  assert float(orthogonality_test(statistics, nu=1.0)) == 12.5


def test_tests_are_scale_invariant_and_small_gradients_do_not_underflow():
  grads = random_per_example(3, batch=8)
  _, statistics = per_example_statistics(grads)
  tiny = jax.tree.map(lambda g: g * 1e-9, grads)
  _, tiny_statistics = per_example_statistics(tiny)
  # ||g||^4 of these gradients is ~1e-36: the inner-product test must not
  # form it.
  for test in (norm_test, inner_product_test, orthogonality_test):
    np.testing.assert_allclose(test(tiny_statistics), test(statistics), rtol=1e-3)


def test_coordinate_test_with_uniform_weights_is_norm_test():
  grads = random_per_example(4, batch=8)
  weights = jax.tree.map(lambda g: jnp.full(g.shape[1:], 3.0), grads)
  _, statistics = per_example_statistics(grads, preconditioner=weights)
  np.testing.assert_allclose(
      coordinate_test(statistics, 0.2), norm_test(statistics, 0.2), rtol=1e-5
  )


def test_zero_mean_gradient_gives_inf_when_noisy_and_zero_when_not():
  noisy = jnp.array([[1.0, -2.0], [-1.0, 2.0]])
  _, statistics = per_example_statistics(noisy, preconditioner=jnp.ones(2))
  for name, value in all_tests(statistics, 0.1, 0.1, 0.1).items():
    assert float(value) == math.inf, name
  _, statistics = per_example_statistics(
      jnp.zeros((4, 2)), preconditioner=jnp.ones(2)
  )
  for name, value in all_tests(statistics, 0.1, 0.1, 0.1).items():
    assert float(value) == 0.0, name


def test_table_says_what_each_test_reads():
  # adaptive_batch_size routes moments and the per-device norm path, and
  # skips steps with non-finite statistics, by `needs`: with every other
  # field NaN each test must still give the reference b_new.
  grads = random_per_example(5, batch=8, mean_scale=0.5)
  weights = jax.tree.map(lambda g: jnp.abs(g[0]) + 0.5, grads)
  _, statistics = per_example_statistics(grads, preconditioner=weights)
  thresholds = dict(eta=0.3, theta=0.2, nu=0.4)
  want = reference_tests(flatten(grads), **thresholds,
                         weights=flatten(weights, False))
  assert list(BATCH_SIZE_TESTS) == [
      "norm", "inner_product", "orthogonality", "augmented", "coordinate"]
  for name, spec in BATCH_SIZE_TESTS.items():
    only_needed = statistics._replace(**{
        field: jnp.float32(jnp.nan)
        for field in statistics._fields if field not in spec.needs
    })
    np.testing.assert_allclose(spec.run(only_needed, **thresholds),
                               want[name], rtol=1e-4, err_msg=name)
  inner = {n for n, t in BATCH_SIZE_TESTS.items() if t.needs_inner_products}
  assert inner == {"inner_product", "orthogonality", "augmented"}
  preconditioned = {
      n for n, t in BATCH_SIZE_TESTS.items() if t.needs_preconditioner}
  assert preconditioned == {"coordinate"}


# ----------------------------------------------------------------------------
# next_batch_size.


def reference_next(batch, test_batch, max_batch, multiple):
  cap = max_batch // multiple * multiple
  target = min(max(batch, test_batch), cap)
  return min(cap, math.ceil(math.ceil(target) / multiple) * multiple)


jitted_next_batch_size = jax.jit(next_batch_size)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    batch=st.integers(1, 5000),
    test_batch=st.one_of(
        st.floats(0, 1e12, allow_nan=False), st.just(math.inf)
    ),
    max_batch=st.integers(1, 5000),
    multiple=st.integers(1, 64),
)
def test_next_batch_size_property(batch, test_batch, max_batch, multiple):
  hypothesis.assume(max_batch >= multiple)
  got = int(jitted_next_batch_size(batch, test_batch, max_batch, multiple))
  cap = max_batch // multiple * multiple
  assert got <= max_batch
  assert got % multiple == 0
  if batch <= cap:
    assert got >= batch  # never shrinks
  if test_batch <= cap:
    # b_new is a float32 in the library.
    assert got == reference_next(
        batch, float(np.float32(test_batch)), max_batch, multiple
    )
  else:
    assert got == cap


def test_next_batch_size_examples():
  assert int(next_batch_size(32, 70.2, 1024)) == 71
  assert int(next_batch_size(32, 70.2, 1024, 16)) == 80
  assert int(next_batch_size(32, 3.0, 1024, 16)) == 32
  assert int(next_batch_size(32, math.inf, 1000, 16)) == 992  # round down
  assert int(next_batch_size(32, 1e30, 1024, 16)) == 1024
  assert int(next_batch_size(1000, 5000.0, 1024, 16)) == 1024


# ----------------------------------------------------------------------------
# The transform.


def make_step(tx, source="per_example"):
  traces = []

  @jax.jit
  def step(state, per_sample):
    traces.append(1)
    grads = per_sample.mean(0)
    kwargs = {f"{source}_grads": per_sample}
    updates, state = tx.update(grads, state, jnp.zeros_like(grads), **kwargs)
    return updates, state

  return step, traces


def test_transform_passes_updates_through_and_follows_the_test():
  tx = adaptive_batch_size(
      max_batch_size=4096, test="augmented", initial_batch_size=16,
      theta=0.3, nu=0.4,
  )
  state = tx.init(jnp.zeros(5))
  step, _ = make_step(tx)
  rng = np.random.default_rng(12)
  per_sample = jnp.asarray(rng.normal(0.5, 1.0, size=(16, 5)), jnp.float32)
  updates, state = step(state, per_sample)
  np.testing.assert_array_equal(updates, per_sample.mean(0))
  want = reference_tests(np.asarray(per_sample, np.float64), 0.1, 0.3, 0.4)
  np.testing.assert_allclose(state.test_statistic, want["augmented"], rtol=1e-4)
  assert int(state.batch_size) == 16
  assert int(state.next_batch_size) == reference_next(
      16, want["augmented"], 4096, 1
  )


def test_state_is_readable_checkpointable_and_stable():
  tx = adadagrad(0.1, max_batch_size=256, test="coordinate", initial_batch_size=8)
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  state = tx.init(params)
  assert int(optax.tree.get(state, "batch_size")) == 8
  assert int(optax.tree.get(state, "next_batch_size")) == 8
  assert optax.tree.get(state, "noise_scale").dtype == jnp.float32
  before = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  per_example = random_per_example(13, batch=8)
  per_example = {"a": per_example["deep"]["k"][:, :3], "b": per_example["w"][:, :2]}
  grads = jax.tree.map(lambda g: g.mean(0), per_example)
  update = jax.jit(tx.update)
  _, state = update(grads, state, params, per_example_grads=per_example)
  after = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  assert before == after
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  # Round trip through NumPy (what a checkpoint does) changes nothing.
  restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
  a, _ = update(grads, state, params, per_example_grads=per_example)
  b, _ = update(grads, restored, params, per_example_grads=per_example)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_batch_size_grows_never_shrinks_never_exceeds_cap_without_recompiling():
  tx = adaptive_batch_size(
      max_batch_size=640, initial_batch_size=32, batch_size_multiple=32
  )
  state = tx.init(jnp.zeros(4))
  step, traces = make_step(tx)
  rng = np.random.default_rng(14)
  history = [int(state.next_batch_size)]
  for i in range(30):
    # Signal shrinks and grows again: the suggestion must only ratchet up.
    mean = 2.0 * abs(np.cos(i / 5))
    per_sample = jnp.asarray(rng.normal(mean, 1.0, size=(32, 4)), jnp.float32)
    _, state = step(state, per_sample)
    history.append(int(state.next_batch_size))
  assert len(traces) == 1
  assert step._cache_size() == 1
  assert all(b <= 640 and b % 32 == 0 for b in history)
  assert all(later >= earlier for earlier, later in zip(history, history[1:]))
  assert history[-1] > history[0]


def test_zero_gradient_and_non_finite_statistics():
  tx = adaptive_batch_size(max_batch_size=512, initial_batch_size=8)
  state = tx.init(jnp.zeros(2))
  step, _ = make_step(tx)

  _, state = step(state, jnp.zeros((8, 2)))  # no signal, no noise
  assert int(state.next_batch_size) == 8
  assert float(state.test_statistic) == 0.0

  symmetric = jnp.array([[1.0, 0.0], [-1.0, 0.0]] * 4)  # no signal, noise
  _, state = step(state, symmetric)
  assert float(state.test_statistic) == math.inf
  assert int(state.next_batch_size) == 512
  assert float(state.noise_scale) == math.inf

  previous = state
  _, state = step(state, jnp.full((8, 2), jnp.nan))
  for field in ("next_batch_size", "test_statistic", "noise_scale",
                "variance_trace_ema", "sq_norm_ema"):
    np.testing.assert_array_equal(getattr(state, field), getattr(previous, field))
  assert not any(
      bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(state)
  )


def test_noise_scale_matches_reference_ema():
  decay = 0.8
  tx = adaptive_batch_size(
      max_batch_size=10**6, initial_batch_size=16, noise_scale_decay=decay
  )
  state = tx.init(jnp.zeros(3))
  step, _ = make_step(tx)
  rng = np.random.default_rng(15)
  trace_ema = sq_norm_ema = 0.0
  for n in range(1, 7):
    per_sample = rng.normal([1.0, -0.5, 2.0], [1.0, 3.0, 0.5], size=(16, 3))
    _, state = step(state, jnp.asarray(per_sample, jnp.float32))
    mean = per_sample.mean(0)
    trace = per_sample.var(0, ddof=1).sum()
    trace_ema = decay * trace_ema + (1 - decay) * trace
    sq_norm_ema = decay * sq_norm_ema + (1 - decay) * (mean @ mean - trace / 16)
    # The state keeps the bias-corrected EMAs; the correction cancels in
    # the noise scale.
    correction = 1 - decay**n
    np.testing.assert_allclose(
        state.variance_trace_ema, trace_ema / correction, rtol=1e-4
    )
    np.testing.assert_allclose(
        state.sq_norm_ema, sq_norm_ema / correction, rtol=1e-4
    )
    np.testing.assert_allclose(
        state.noise_scale, trace_ema / sq_norm_ema, rtol=1e-4
    )


def test_microbatch_and_per_device_modes_of_the_transform():
  microbatch_size = 4
  kwargs = dict(max_batch_size=4096, initial_batch_size=32, eta=0.2)
  per_example = random_per_example(16, batch=32)
  means = jax.tree.map(
      lambda g: g.reshape((8, microbatch_size) + g.shape[1:]).mean(1),
      per_example,
  )
  grads = jax.tree.map(lambda g: g.mean(0), per_example)
  _, want = microbatch_statistics(means, microbatch_size)
  want_test = norm_test(want, 0.2)

  tx = adaptive_batch_size(microbatch_size=microbatch_size, **kwargs)
  _, state = jax.jit(tx.update)(grads, tx.init(grads), microbatch_grads=means)
  np.testing.assert_allclose(state.test_statistic, want_test, rtol=1e-5)
  assert int(state.batch_size) == 32

  tx = adaptive_batch_size(axis_name="devices", **kwargs)

  def on_device(local_grads, state):
    return tx.update(local_grads, state)

  state = tx.init(grads)
  replicated = jax.tree.map(lambda x: jnp.stack([x] * NUM_DEVICES), state)
  updates, state = pmapped(on_device)(means, replicated)
  for got, mean in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got[3], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.test_statistic[0], want_test, rtol=1e-5)
  assert int(state.batch_size[0]) == 32

  mesh = jax.make_mesh(
      (NUM_DEVICES,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  sharded = jax.jit(jax.shard_map(
      lambda g, s: tx.update(jax.tree.map(lambda x: x[0], g), s)[1],
      mesh=mesh, in_specs=(P("devices"), P()), out_specs=P(),
  ))(means, tx.init(grads))
  stats_close(sharded, jax.tree.map(lambda x: x[0], state))

  # An explicit batch_size= overrides the suggestion: 8 devices x 8 samples.
  _, state2 = pmapped(lambda g, s: tx.update(g, s, batch_size=64))(
      means, replicated
  )
  np.testing.assert_allclose(state2.test_statistic[0], 2 * want_test, rtol=1e-5)
  assert int(state2.batch_size[0]) == 64


@pytest.mark.parametrize("noise", [1.0, 1e-2])
def test_per_device_norm_test_matches_numpy(noise):
  # The norm test's per-device path all-reduces ‖g_d‖² with the gradients
  # and subtracts ‖ḡ‖²: check it against the float64 formula, also when the
  # devices' gradients differ by 1 % (the subtraction cancels 4 digits).
  rng = np.random.default_rng(31)
  shapes = [(3, 5), (7,)]
  mean = [rng.normal(size=s) for s in shapes]
  grads = [mu + noise * rng.normal(size=(NUM_DEVICES,) + s)
           for mu, s in zip(mean, shapes)]
  flat = np.concatenate([g.reshape(NUM_DEVICES, -1) for g in grads], axis=1)
  batch, eta, per_device = 64, 0.2, 64 / NUM_DEVICES
  spread = np.sum((flat - flat.mean(0)) ** 2)
  trace = per_device / (NUM_DEVICES - 1) * spread
  want = trace / (eta**2 * np.sum(flat.mean(0) ** 2))

  tx = adaptive_batch_size(max_batch_size=4096, initial_batch_size=batch,
                           eta=eta, axis_name="devices")
  params = [jnp.zeros(s) for s in shapes]
  state = jax.tree.map(lambda x: jnp.stack([x] * NUM_DEVICES), tx.init(params))
  updates, state = pmapped(tx.update)(
      [jnp.asarray(g, jnp.float32) for g in grads], state)
  for got, g in zip(updates, grads):
    np.testing.assert_allclose(got[0], g.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      state.test_statistic[0], want, rtol=1e-4 if noise == 1.0 else 1e-2)


def replicated(tree):
  return jax.tree.map(lambda x: jnp.stack([x] * NUM_DEVICES), tree)


def device_means(seed, mean_scale=0.3):
  """Each device's mean gradient, (devices, ...) leaves, and as rows."""
  grads = random_per_example(seed, batch=NUM_DEVICES, mean_scale=mean_scale)
  return grads, flatten(grads)


@pytest.mark.parametrize(
    "test", ["inner_product", "orthogonality", "augmented", "coordinate"]
)
def test_per_device_transform_matches_numpy(test):
  # These tests' per-device path hands the mean gradient to
  # per_device_statistics with m = batch / D samples per device. Two steps:
  # the second one's batch is the first one's suggestion.
  eta, theta, nu, accumulator_value, eps = 0.3, 0.15, 0.4, 0.1, 1e-7
  tx = adaptive_batch_size(
      max_batch_size=10**6, test=test, initial_batch_size=64, eta=eta,
      theta=theta, nu=nu, batch_size_multiple=NUM_DEVICES,
      axis_name="devices", initial_accumulator_value=accumulator_value,
      eps=eps,
  )
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), device_means(0)[0])
  step = pmapped(tx.update)
  state = replicated(tx.init(params))
  accumulator = np.full(flatten(params, False).shape, accumulator_value)
  batch = 64
  for seed in (40, 41):
    grads, rows = device_means(seed)
    updates, state = step(grads, state)
    accumulator += rows.mean(0) ** 2
    want = reference_tests(
        rows, eta, theta, nu, weights=1 / np.sqrt(accumulator + eps),
        scale=batch / NUM_DEVICES,
    )[test]
    np.testing.assert_allclose(
        flatten(updates), np.tile(rows.mean(0), (NUM_DEVICES, 1)),
        rtol=1e-5, atol=1e-6,
    )
    np.testing.assert_allclose(state.test_statistic, [want] * NUM_DEVICES,
                               rtol=1e-4)
    np.testing.assert_array_equal(state.batch_size, batch)
    next_batch = reference_next(batch, want, 10**6, NUM_DEVICES)
    np.testing.assert_array_equal(state.next_batch_size, next_batch)
    assert next_batch > batch  # so the second step has a new m
    batch = next_batch


@pytest.mark.parametrize("source", ["per_example", "microbatch", "moments"])
def test_transform_pools_per_sample_sources_over_devices(source):
  # With axis_name, the examples, microbatches or moments of all devices
  # are pooled: the statistics are those of the 8 x 4 units together.
  units_per_device, microbatch_size = 4, 1 if source == "per_example" else 3
  units = random_per_example(42, batch=NUM_DEVICES * units_per_device,
                             mean_scale=0.5)
  split = jax.tree.map(
      lambda g: g.reshape((NUM_DEVICES, units_per_device) + g.shape[1:]),
      units,
  )
  local_means = jax.tree.map(lambda g: g.mean(1), split)
  test = "coordinate" if source == "moments" else "augmented"
  tx = adaptive_batch_size(
      max_batch_size=10**6, test=test, initial_batch_size=8, eta=0.3,
      theta=0.2, nu=0.4, microbatch_size=microbatch_size,
      axis_name="devices",
  )
  if source == "moments":
    def on_device(grads, state, stacked):
      rows = [jax.tree.map(lambda g, i=i: g[i], stacked)
              for i in range(units_per_device)]
      moments = sngm_optax.gradient_moments(rows[0])
      for row in rows[1:]:
        moments = sngm_optax.add_gradient_moments(
            moments, sngm_optax.gradient_moments(row))
      return tx.update(grads, state, gradient_moments=moments)
  else:
    def on_device(grads, state, stacked):
      return tx.update(grads, state, **{f"{source}_grads": stacked})

  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), units)
  updates, state = pmapped(on_device)(
      local_means, replicated(tx.init(params)), split)
  rows = flatten(units)
  mean = rows.mean(0)
  weights = 1 / np.sqrt(0.1 + mean**2 + 1e-7)
  want = reference_tests(rows, 0.3, 0.2, 0.4, weights=weights,
                         scale=microbatch_size)[test]
  np.testing.assert_allclose(flatten(updates), np.tile(mean, (NUM_DEVICES, 1)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.test_statistic, [want] * NUM_DEVICES,
                             rtol=1e-4)
  np.testing.assert_array_equal(
      state.batch_size, NUM_DEVICES * units_per_device * microbatch_size)


def test_per_device_transform_refuses_device_invariant_gradients():
  tx = adaptive_batch_size(max_batch_size=64, axis_name="devices")
  mesh = jax.make_mesh(
      (NUM_DEVICES,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  grads = jnp.ones(3)
  run = jax.jit(jax.shard_map(
      lambda g, s: tx.update(g, s)[1], mesh=mesh, in_specs=(P(), P()),
      out_specs=P()))
  with pytest.raises(ValueError, match="identical on all devices"):
    run(grads, tx.init(grads))


def test_inject_hyperparams_without_recompiling():
  tx = optax.inject_hyperparams(adaptive_batch_size)(
      max_batch_size=2048, initial_batch_size=16, eta=0.5
  )
  state = tx.init(jnp.zeros(5))
  step, traces = make_step(tx)
  rng = np.random.default_rng(17)
  per_sample = jnp.asarray(rng.normal(0.3, 1.0, size=(16, 5)), jnp.float32)
  _, loose = step(state, per_sample)
  state.hyperparams["eta"] = jnp.full_like(state.hyperparams["eta"], 0.05)
  _, strict = step(state, per_sample)
  assert len(traces) == 1
  loose_b = float(optax.tree.get(loose, "test_statistic"))
  strict_b = float(optax.tree.get(strict, "test_statistic"))
  np.testing.assert_allclose(strict_b, loose_b * 100, rtol=1e-4)
  assert int(optax.tree.get(strict, "next_batch_size")) > int(
      optax.tree.get(loose, "next_batch_size")
  )

  opt = optax.inject_hyperparams(adadagrad)(
      learning_rate=0.1, max_batch_size=512, initial_batch_size=16
  )
  opt_state = opt.init(jnp.zeros(5))
  _, opt_state = jax.jit(opt.update)(
      per_sample.mean(0), opt_state, jnp.zeros(5), per_example_grads=per_sample
  )
  assert int(optax.tree.get(opt_state, "next_batch_size")) >= 16


def test_adadagrad_updates_are_adagrad_and_coordinate_test_uses_its_accumulator():
  kwargs = dict(initial_accumulator_value=0.3, eps=1e-6)
  tx = adadagrad(0.1, max_batch_size=10**6, test="coordinate",
                 initial_batch_size=8, eta=0.25, **kwargs)
  reference = optax.adagrad(0.1, **kwargs)
  params = jnp.zeros(6)
  state, reference_state = tx.init(params), reference.init(params)
  update, reference_update = jax.jit(tx.update), jax.jit(reference.update)
  rng = np.random.default_rng(18)
  accumulator = np.full(6, 0.3)
  for _ in range(5):
    per_sample = rng.normal(rng.normal(size=6), 1.0, size=(8, 6))
    grads = jnp.asarray(per_sample.mean(0), jnp.float32)
    per_sample = jnp.asarray(per_sample, jnp.float32)
    updates, state = update(grads, state, params, per_example_grads=per_sample)
    want_updates, reference_state = reference_update(
        grads, reference_state, params
    )
    np.testing.assert_allclose(updates, want_updates, rtol=1e-6)
    accumulator += np.asarray(grads, np.float64) ** 2
    weights = 1 / np.sqrt(accumulator + 1e-6)
    want = reference_tests(
        np.asarray(per_sample, np.float64), 0.25, 0.1, 0.1, weights
    )
    np.testing.assert_allclose(
        optax.tree.get(state, "test_statistic"), want["coordinate"], rtol=1e-4
    )
    np.testing.assert_allclose(
        optax.tree.get(state, "preconditioner_accumulator"),
        optax.tree.get(reference_state, "sum_of_squares"),
        rtol=1e-6,
    )


def test_adadagrad_norm_updates_are_adagrad_norm():
  tx = adadagrad_norm(0.5, max_batch_size=1024, test="inner_product",
                      initial_batch_size=4)
  reference = adagrad_norm(0.5)
  params = jnp.zeros(3)
  state, reference_state = tx.init(params), reference.init(params)
  per_sample = jnp.array([[1.0, 2.0, 0.0], [1.5, 1.0, 0.5], [0.5, 2.5, -0.5],
                          [1.0, 2.0, 0.2]])
  grads = per_sample.mean(0)
  updates, state = jax.jit(tx.update)(
      grads, state, params, per_example_grads=per_sample
  )
  want, _ = jax.jit(reference.update)(grads, reference_state, params)
  np.testing.assert_allclose(updates, want, rtol=1e-6)
  inner = reference_tests(np.asarray(per_sample, np.float64), 0.1, 0.1, 0.1)
  np.testing.assert_allclose(
      optax.tree.get(state, "test_statistic"), inner["inner_product"], rtol=1e-4
  )


def test_inside_apply_if_finite():
  tx = optax.apply_if_finite(
      adadagrad_norm(0.1, max_batch_size=512, initial_batch_size=4), 3
  )
  params = jnp.zeros(2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  per_sample = jnp.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 1.0]])
  _, state = update(per_sample.mean(0), state, params,
                    per_example_grads=per_sample)
  grown = int(optax.tree.get(state, "next_batch_size"))
  assert grown == 67
  bad = per_sample.at[0, 0].set(jnp.inf)
  updates, state = update(bad.mean(0), state, params, per_example_grads=bad)
  np.testing.assert_array_equal(updates, jnp.zeros(2))
  assert int(optax.tree.get(state, "next_batch_size")) == grown
  assert int(state.notfinite_count) == 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("test", ["norm", "coordinate"])
def test_low_precision_params_and_state_stable_under_lax_cond(dtype, test):
  tx = adadagrad(0.1, max_batch_size=64, test=test, initial_batch_size=4)
  params = {"w": jnp.zeros((2, 2), dtype), "b": jnp.zeros(3, dtype)}
  per_example = {"w": jnp.arange(16.0).reshape(4, 2, 2).astype(dtype) / 8,
                 "b": -jnp.arange(12.0).reshape(4, 3).astype(dtype) / 4}
  grads = jax.tree.map(lambda g: g.mean(0), per_example)
  state = tx.init(params)

  @jax.jit
  def maybe_update(take_step, state):
    return jax.lax.cond(
        take_step,
        lambda s: tx.update(grads, s, params, per_example_grads=per_example),
        lambda s: (grads, s),
        state,
    )

  updates, new_state = maybe_update(True, state)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert shapes(new_state) == shapes(state)
  assert int(optax.tree.get(new_state, "next_batch_size")) > 4


# ----------------------------------------------------------------------------
# The controller's options (max_growth_factor, smoothing, test_interval).


def reference_controller(batches, *, initial, cap, multiple, eta,
                         growth=None, smoothing=None, interval=1):
  """The suggestions and test statistics of a run, in float64 NumPy.

  `batches(step, size)` draws the per-example gradients of a step; the loop
  follows the suggestion. Written from the definitions: the step's own
  tr(Sigma) and |mean|^2, or bias-corrected EMAs of tr(Sigma) and of the
  unbiased |G|^2 = |mean|^2 - tr(Sigma) / b.
  """
  size, ema_trace, ema_sq_norm, out, tested = initial, 0.0, 0.0, [], None
  for step in range(1, len(batches) + 1):
    samples = batches[step - 1][:size]
    mean = samples.mean(0)
    trace, sq_norm = samples.var(0, ddof=1).sum(), mean @ mean
    if smoothing is not None:
      ema_trace = smoothing * ema_trace + (1 - smoothing) * trace
      ema_sq_norm = smoothing * ema_sq_norm + (1 - smoothing) * (
          sq_norm - trace / size)
      correction = 1 - smoothing**step
      trace, sq_norm = ema_trace / correction, ema_sq_norm / correction
    if step % interval == 0:
      tested = trace / (eta**2 * sq_norm) if sq_norm > 0 else math.inf
      target = tested if growth is None else min(tested, growth * size)
      size = max(size, reference_next(size, target, cap, multiple))
    out.append((size, tested))
  return out


@pytest.mark.parametrize(
    "options",
    [
        {},  # the paper's rule
        {"max_growth_factor": 2.0},
        {"smoothing": 0.8},
        {"test_interval": 3},
        {"max_growth_factor": 1.5, "smoothing": 0.5, "test_interval": 2},
    ],
    ids=["paper", "growth", "smoothing", "interval", "all"],
)
def test_controller_options_match_numpy_reference(options):
  cap, multiple, initial, eta = 4096, 4, 8, 0.3
  rng = np.random.default_rng(40)
  # The signal fades, so the test asks for more and more samples.
  batches = [rng.normal([2.0 / (1 + t), -1.0 / (1 + t), 0.5], 1.0,
                        size=(cap, 3)) for t in range(9)]
  tx = adaptive_batch_size(cap, initial_batch_size=initial,
                           batch_size_multiple=multiple, eta=eta,
                           microbatch_size=1, **options)
  step = jax.jit(lambda state, moments, mean: tx.update(
      mean, state, jnp.zeros(3), gradient_moments=moments)[1])
  want = reference_controller(
      batches, initial=initial, cap=cap, multiple=multiple, eta=eta,
      growth=options.get("max_growth_factor"),
      smoothing=options.get("smoothing"),
      interval=options.get("test_interval", 1))
  state = tx.init(jnp.zeros(3))
  for batch, (size, tested) in zip(batches, want):
    samples = batch[:int(state.next_batch_size)]
    # Moments of per-example gradients: one fixed shape for every size.
    moments = sngm_optax.GradientMoments(
        jnp.asarray(len(samples), jnp.int32),
        jnp.asarray(samples.sum(0), jnp.float32),
        jnp.asarray((samples**2).sum(0), jnp.float32))
    state = step(state, moments, jnp.asarray(samples.mean(0), jnp.float32))
    assert int(state.next_batch_size) == size
    if tested is not None:
      np.testing.assert_allclose(state.test_statistic, tested, rtol=2e-3)
  assert step._cache_size() == 1
  assert want[-1][0] > initial


def test_growth_factor_and_interval_in_adadagrad_wrappers():
  per_example = jnp.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 1.0]])
  for tx in (adadagrad(0.1, max_batch_size=64, initial_batch_size=4,
                       max_growth_factor=2.0),
             adadagrad_norm(0.1, max_batch_size=64, initial_batch_size=4,
                            max_growth_factor=2.0, smoothing=0.0)):
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(per_example.mean(0), state, jnp.zeros(2),
                         per_example_grads=per_example)
    # Unlimited, the test would ask for 67 (the docstring example).
    assert int(optax.tree.get(state, "next_batch_size")) == 8
  tx = adadagrad(0.1, max_batch_size=64, initial_batch_size=4,
                 test_interval=2)
  state = tx.init(jnp.zeros(2))
  sizes = []
  for _ in range(2):
    _, state = tx.update(per_example.mean(0), state, jnp.zeros(2),
                         per_example_grads=per_example)
    sizes.append(int(optax.tree.get(state, "next_batch_size")))
  assert sizes == [4, 64]


def test_update_argument_errors():
  tx = adaptive_batch_size(max_batch_size=64, initial_batch_size=8)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(ValueError, match="per_example_grads"):
    tx.update(jnp.zeros(2), state)
  with pytest.raises(ValueError, match="not both"):
    tx.update(jnp.zeros(2), state, per_example_grads=jnp.ones((2, 2)),
              microbatch_grads=jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="microbatch_size"):
    tx.update(jnp.zeros(2), state, microbatch_grads=jnp.ones((2, 2)))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 64.0}, "max_batch_size"),
        ({"max_batch_size": 64, "initial_batch_size": 128}, "initial_batch_size"),
        ({"max_batch_size": 64, "initial_batch_size": 0}, "initial_batch_size"),
        ({"max_batch_size": 100, "batch_size_multiple": 16}, "max_batch_size"),
        ({"max_batch_size": 64, "batch_size_multiple": 16,
          "initial_batch_size": 24}, "initial_batch_size"),
        ({"max_batch_size": 64, "batch_size_multiple": 0}, "batch_size_multiple"),
        ({"max_batch_size": 64, "test": "variance"}, "test"),
        ({"max_batch_size": 64, "eta": 0.0}, "eta"),
        ({"max_batch_size": 64, "theta": -1.0}, "theta"),
        ({"max_batch_size": 64, "nu": float("nan")}, "nu"),
        ({"max_batch_size": 64, "noise_scale_decay": 1.0}, "noise_scale_decay"),
        ({"max_batch_size": 64, "microbatch_size": 0}, "microbatch_size"),
        ({"max_batch_size": 64, "axis_name": ""}, "axis_name"),
        ({"max_batch_size": 64, "eps": -1.0}, "eps"),
        ({"max_batch_size": 64, "max_growth_factor": 0.5},
         "max_growth_factor"),
        ({"max_batch_size": 64, "max_growth_factor": math.inf},
         "max_growth_factor"),
        ({"max_batch_size": 64, "smoothing": 1.0}, "smoothing"),
        ({"max_batch_size": 64, "smoothing": -0.1}, "smoothing"),
        ({"max_batch_size": 64, "test_interval": 0}, "test_interval"),
        ({"max_batch_size": 64, "test_interval": 1.5}, "test_interval"),
    ],
)
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    adaptive_batch_size(**kwargs)


def test_bad_optimizer_arguments():
  with pytest.raises(ValueError, match="learning_rate"):
    adadagrad(-1.0, max_batch_size=64)
  with pytest.raises(ValueError, match="coordinate"):
    adadagrad_norm(0.1, max_batch_size=64, test="coordinate")


def test_everything_is_exported():
  for name in ("adaptive_batch_size", "adadagrad", "adadagrad_norm",
               "GradientMoments", "gradient_moments", "add_gradient_moments",
               "moment_statistics",
               "norm_test", "inner_product_test", "orthogonality_test",
               "augmented_inner_product_test", "coordinate_test",
               "next_batch_size", "per_example_statistics",
               "microbatch_statistics", "per_device_statistics",
               "GradientNoiseStatistics", "AdaptiveBatchSizeState"):
    assert name in sngm_optax.__all__
    assert hasattr(sngm_optax, name)
  assert list(sngm_optax.__all__) == sorted(sngm_optax.__all__, key=str.lower)
