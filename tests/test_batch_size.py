"""Batch-size tests, their statistics sources and the adaptive_batch_size transform.

Every formula is checked against a float64 NumPy implementation written from
the definitions (explicit per-sample variances, explicit orthogonal
components), not against the library's scalar shortcuts.
"""

import functools
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
from sngm_optax import add_gradient_moments
from sngm_optax import augmented_inner_product_test
from sngm_optax import coordinate_test
from sngm_optax import gradient_moments
from sngm_optax import inner_product_test
from sngm_optax import microbatch_statistics
from sngm_optax import moment_statistics
from sngm_optax import next_batch_size
from sngm_optax import norm_test
from sngm_optax import orthogonality_test
from sngm_optax import per_device_statistics
from sngm_optax import per_example_statistics

NUM_DEVICES = 8

# Jitted once per shape: op-by-op dispatch of these small reductions is slow.
per_example_statistics = jax.jit(
    per_example_statistics, static_argnames="axis_name"
)
microbatch_statistics = jax.jit(
    microbatch_statistics, static_argnames="axis_name"
)
SHAPES = {"w": (3, 2), "b": (2,), "deep": {"k": (4,)}}


# ----------------------------------------------------------------------------
# NumPy reference (float64), straight from the definitions.


def flatten(tree, batch_axis=True):
  leaves = jax.tree.leaves(tree)
  if batch_axis:
    return np.concatenate(
        [np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], 1
    )
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def reference_tests(samples, eta, theta, nu, weights=None, scale=1.0):
  """b_new of every test from rows `samples` (b x d); `scale` = m for means."""
  mean = samples.mean(0)
  sq_norm = mean @ mean
  variance = scale * samples.var(0, ddof=1)
  inner = samples @ mean
  inner_variance = scale * inner.var(ddof=1)
  orthogonal = samples - np.outer(inner, mean) / sq_norm
  orthogonal_variance = scale * orthogonal.var(0, ddof=1).sum()
  result = {
      "norm": variance.sum() / (eta**2 * sq_norm),
      "inner_product": inner_variance / (theta**2 * sq_norm**2),
      "orthogonality": orthogonal_variance / (nu**2 * sq_norm),
  }
  result["augmented"] = max(result["inner_product"], result["orthogonality"])
  if weights is not None:
    result["coordinate"] = (variance * weights).sum() / (
        eta**2 * (mean**2 * weights).sum()
    )
  result["trace"] = variance.sum()
  result["sq_norm"] = sq_norm
  return result


def random_per_example(seed, batch, mean_scale=1.0, noise=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda shape: jnp.asarray(
          mean_scale * rng.normal(size=shape)
          + noise * rng.normal(size=(batch,) + shape),
          jnp.float32,
      ),
      SHAPES,
      is_leaf=lambda x: isinstance(x, tuple),
  )


@jax.jit
def all_tests(statistics, eta, theta, nu):
  return {
      "norm": norm_test(statistics, eta),
      "inner_product": inner_product_test(statistics, theta),
      "orthogonality": orthogonality_test(statistics, nu),
      "augmented": augmented_inner_product_test(statistics, theta, nu),
      "coordinate": coordinate_test(statistics, eta),
  }


def stats_close(a, b, rtol=1e-5, atol=1e-6):
  for name, x, y in zip(a._fields, a, b):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)


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
# The three sources agree.


def test_microbatches_of_one_are_per_example_statistics():
  grads = random_per_example(5, batch=12)
  weights = jax.tree.map(lambda g: jnp.abs(g[0]) + 0.5, grads)
  mean_a, a = per_example_statistics(grads, preconditioner=weights)
  mean_b, b = microbatch_statistics(grads, 1, preconditioner=weights)
  stats_close(a, b, rtol=0, atol=0)
  for x, y in zip(jax.tree.leaves(mean_a), jax.tree.leaves(mean_b)):
    np.testing.assert_array_equal(x, y)


def test_microbatch_statistics_match_reference_formula():
  microbatch_size = 8
  per_example = random_per_example(6, batch=10 * microbatch_size)
  microbatch_means = jax.tree.map(
      lambda g: g.reshape((10, microbatch_size) + g.shape[1:]).mean(1),
      per_example,
  )
  _, statistics = microbatch_statistics(microbatch_means, microbatch_size)
  want = reference_tests(
      flatten(microbatch_means), 0.2, 0.3, 0.4, scale=microbatch_size
  )
  got = all_tests(statistics, 0.2, 0.3, 0.4)
  for name in ("norm", "inner_product", "orthogonality", "augmented"):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, err_msg=name)
  assert float(statistics.num_samples) == 80


def pmapped(fn):
  return jax.pmap(fn, axis_name="devices")


def shard_mapped(fn, in_specs=P("devices")):
  mesh = jax.make_mesh(
      (NUM_DEVICES,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  return jax.jit(
      jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P())
  )


def test_per_device_statistics_equal_microbatch_statistics():
  """Devices holding one microbatch mean each = the K-microbatch formula."""
  assert jax.device_count() == NUM_DEVICES
  per_device_batch = 4
  per_example = random_per_example(7, batch=NUM_DEVICES * per_device_batch)
  device_means = jax.tree.map(
      lambda g: g.reshape((NUM_DEVICES, per_device_batch) + g.shape[1:]).mean(1),
      per_example,
  )
  weights = jax.tree.map(lambda g: jnp.abs(g[0]) + 0.1, device_means)
  _, want = microbatch_statistics(
      device_means, per_device_batch, preconditioner=weights
  )

  def on_device(grads):
    return per_device_statistics(
        grads, per_device_batch, "devices", preconditioner=weights
    )[1]

  got = pmapped(on_device)(device_means)
  stats_close(jax.tree.map(lambda x: x[0], got), want)

  def on_shard(grads):
    grads = jax.tree.map(lambda g: g[0], grads)  # the shard's one row
    return on_device(grads)

  got = shard_mapped(on_shard)(device_means)
  stats_close(got, want)


def test_per_device_with_one_example_each_is_per_example():
  per_example = random_per_example(8, batch=NUM_DEVICES)
  _, want = per_example_statistics(per_example)
  got = pmapped(lambda g: per_device_statistics(g, 1, "devices")[1])(per_example)
  stats_close(jax.tree.map(lambda x: x[0], got), want)


@pytest.mark.parametrize("mapper", ["pmap", "shard_map"])
def test_per_example_pooled_across_devices_is_exact(mapper):
  per_device_batch = 3
  per_example = random_per_example(9, batch=NUM_DEVICES * per_device_batch)
  _, want = per_example_statistics(per_example)

  if mapper == "pmap":
    split = jax.tree.map(
        lambda g: g.reshape((NUM_DEVICES, per_device_batch) + g.shape[1:]),
        per_example,
    )
    got = pmapped(lambda g: per_example_statistics(g, axis_name="devices")[1])(split)
    got = jax.tree.map(lambda x: x[0], got)
  else:
    got = shard_mapped(lambda g: per_example_statistics(g, axis_name="devices")[1])(
        per_example
    )
  stats_close(got, want)


def gaussian_gradients(seed, batch, dim=64):
  """Per-sample gradients mu + L z with a known, anisotropic covariance."""
  rng = np.random.default_rng(seed)
  mu = rng.normal(size=dim) * 0.3
  factor = rng.normal(size=(dim, dim)) / np.sqrt(dim) * rng.uniform(
      0.5, 2.0, size=dim
  )
  samples = mu + rng.normal(size=(batch, dim)) @ factor.T
  return jnp.asarray(samples, jnp.float32)


def test_estimators_agree_within_sampling_tolerance():
  """Microbatch and per-device estimates of one batch vs its exact value.

  Relative standard errors (chi-square with K - 1 degrees of freedom, the
  trace averaging over 64 coordinates): microbatch K = 256: trace ~1.1%,
  directional ~9%; the tolerances are about 4 standard errors.
  """
  samples = gaussian_gradients(10, batch=4096)
  _, exact = per_example_statistics(samples)

  microbatch_size = 16
  means = samples.reshape(-1, microbatch_size, samples.shape[1]).mean(1)
  _, microbatch = microbatch_statistics(means, microbatch_size)
  np.testing.assert_allclose(microbatch.num_samples, 4096)
  np.testing.assert_allclose(microbatch.sq_norm, exact.sq_norm, rtol=1e-5)
  np.testing.assert_allclose(
      microbatch.variance_trace, exact.variance_trace, rtol=0.05
  )
  np.testing.assert_allclose(
      microbatch.directional_variance, exact.directional_variance, rtol=0.35
  )
  np.testing.assert_allclose(
      microbatch.orthogonal_variance, exact.orthogonal_variance, rtol=0.05
  )
  # The same microbatches spread over 8 devices (32 each), pooled.
  pooled = pmapped(
      lambda g: microbatch_statistics(g, microbatch_size, axis_name="devices")[1]
  )(means.reshape(NUM_DEVICES, -1, samples.shape[1]))
  stats_close(jax.tree.map(lambda x: x[0], pooled), microbatch, rtol=1e-4)


def test_per_device_estimator_is_unbiased():
  """With only D - 1 = 7 degrees of freedom a single per-device estimate is
  noisy; averaged over 200 independent batches it must match the exact
  per-example statistics (standard errors ~0.7% for the trace, ~7% along the
  mean; tolerances ~4 standard errors)."""
  replicas, per_device_batch = 200, 32
  samples = gaussian_gradients(11, batch=replicas * NUM_DEVICES * per_device_batch)
  samples = samples.reshape(replicas, NUM_DEVICES, per_device_batch, -1)

  def on_device(batch):  # batch: (replicas, per_device_batch, dim)
    def one_replica(local):
      return per_device_statistics(local.mean(0), per_device_batch, "devices")[1]

    return jax.vmap(one_replica)(batch)

  estimates = pmapped(on_device)(samples.transpose(1, 0, 2, 3))
  estimates = jax.tree.map(lambda x: x[0], estimates)
  exact = jax.jit(jax.vmap(
      lambda batch: per_example_statistics(batch.reshape(-1, batch.shape[-1]))[1]
  ))(samples)
  mean = lambda x: float(jnp.mean(x))
  np.testing.assert_allclose(
      mean(estimates.variance_trace), mean(exact.variance_trace), rtol=0.03
  )
  np.testing.assert_allclose(
      mean(estimates.directional_variance),
      mean(exact.directional_variance),
      rtol=0.3,
  )
  np.testing.assert_allclose(
      mean(estimates.orthogonal_variance),
      mean(exact.orthogonal_variance),
      rtol=0.03,
  )
  np.testing.assert_allclose(estimates.sq_norm, exact.sq_norm, rtol=1e-4)


def moments_of(stacked):
  """Streams the rows of `stacked` one at a time into GradientMoments."""
  rows = [jax.tree.map(lambda g, i=i: g[i], stacked)
          for i in range(jax.tree.leaves(stacked)[0].shape[0])]
  moments = gradient_moments(rows[0])
  for row in rows[1:]:
    moments = add_gradient_moments(moments, gradient_moments(row))
  return moments


MOMENT_FIELDS = ("num_samples", "sq_norm", "variance_trace",
                 "preconditioned_variance_trace", "preconditioned_sq_norm")


def test_moments_give_the_norm_and_coordinate_statistics():
  per_example = random_per_example(19, batch=12, mean_scale=0.5)
  weights = jax.tree.map(lambda g: jnp.abs(g[0]) + 0.2, per_example)
  mean_a, want = per_example_statistics(per_example, preconditioner=weights)
  mean_b, got = jax.jit(moment_statistics)(
      moments_of(per_example), 1, preconditioner=weights
  )
  for field in MOMENT_FIELDS:
    np.testing.assert_allclose(
        getattr(got, field), getattr(want, field), rtol=1e-5, err_msg=field
    )
  assert np.isnan(got.directional_variance) and np.isnan(got.orthogonal_variance)
  for x, y in zip(jax.tree.leaves(mean_a), jax.tree.leaves(mean_b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)

  # Microbatch means as units, and units pooled across devices by psum.
  means = jax.tree.map(lambda g: g.reshape((4, 3) + g.shape[1:]).mean(1),
                       per_example)
  _, want = microbatch_statistics(means, 3)
  _, got = moment_statistics(moments_of(means), 3)
  for field in MOMENT_FIELDS[:3]:
    np.testing.assert_allclose(getattr(got, field), getattr(want, field),
                               rtol=1e-5, err_msg=field)
  split = jax.tree.map(
      lambda g: g.reshape((NUM_DEVICES, 3) + g.shape[1:]),
      random_per_example(20, batch=NUM_DEVICES * 3),
  )
  _, want = per_example_statistics(
      jax.tree.map(lambda g: g.reshape((-1,) + g.shape[2:]), split)
  )
  got = pmapped(lambda g: moment_statistics(
      moments_of(g), 1, axis_name="devices")[1])(split)
  for field in MOMENT_FIELDS[:3]:
    np.testing.assert_allclose(getattr(got, field)[0], getattr(want, field),
                               rtol=1e-5, err_msg=field)


def test_moments_from_optax_micro_grad():
  """optax.microbatching.micro_grad streams per-example moments."""
  rng = np.random.default_rng(21)
  inputs = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
  params = {"w": jnp.asarray([0.5, -1.0, 2.0]), "b": jnp.asarray(0.3)}

  def loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

  (grad_sum, sq_grad_sum), _ = optax.microbatching.micro_grad(
      loss, batch_argnums=(1, 2), microbatch_size=4,
      accumulator=optax.microbatching.AccumulationType.SUM,
      transform_fn=lambda g: (g, jax.tree.map(jnp.square, g)),
  )(params, inputs, targets)
  moments = sngm_optax.GradientMoments(jnp.int32(16), grad_sum, sq_grad_sum)
  _, got = moment_statistics(moments, 1)

  per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(
      params, inputs[:, None], targets[:, None]
  )
  want = reference_tests(flatten(per_example), 0.1, 0.1, 0.1)
  np.testing.assert_allclose(got.variance_trace, want["trace"], rtol=1e-4)
  np.testing.assert_allclose(norm_test(got), want["norm"], rtol=1e-4)


def test_transform_with_moments_and_a_changing_number_of_microbatches():
  tx = adaptive_batch_size(max_batch_size=4096, initial_batch_size=8,
                           microbatch_size=4, eta=0.3)
  traces = []

  @jax.jit
  def step(state, moments):
    traces.append(1)
    mean = jax.tree.map(lambda s: s / moments.count, moments.grad_sum)
    return tx.update(mean, state, gradient_moments=moments)[1]

  state = tx.init(jnp.zeros(5))
  rng = np.random.default_rng(22)
  for num_microbatches in (2, 3, 5):
    means = jnp.asarray(rng.normal(0.4, 1.0, size=(num_microbatches, 5)),
                        jnp.float32)
    state = step(state, moments_of(means))
    _, want = microbatch_statistics(means, 4)
    np.testing.assert_allclose(state.test_statistic, norm_test(want, 0.3),
                               rtol=1e-4)
    assert int(state.batch_size) == 4 * num_microbatches
  assert len(traces) == 1  # the count is data, not shape

  previous = state
  state = step(state, gradient_moments(jnp.ones(5)))  # one unit: no variance
  np.testing.assert_array_equal(state.next_batch_size, previous.next_batch_size)
  np.testing.assert_array_equal(state.test_statistic, previous.test_statistic)
  assert not any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(state))

  inner = adaptive_batch_size(max_batch_size=64, test="inner_product",
                              microbatch_size=4, initial_batch_size=8)
  with pytest.raises(ValueError, match="inner products"):
    inner.update(jnp.zeros(5), inner.init(jnp.zeros(5)),
                 gradient_moments=moments_of(jnp.ones((2, 5))))


def test_too_few_units_raise():
  with pytest.raises(ValueError, match="at least 2"):
    per_example_statistics(jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="leading"):
    per_example_statistics({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))})


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
  for _ in range(6):
    per_sample = rng.normal([1.0, -0.5, 2.0], [1.0, 3.0, 0.5], size=(16, 3))
    _, state = step(state, jnp.asarray(per_sample, jnp.float32))
    mean = per_sample.mean(0)
    trace = per_sample.var(0, ddof=1).sum()
    trace_ema = decay * trace_ema + (1 - decay) * trace
    sq_norm_ema = decay * sq_norm_ema + (1 - decay) * (mean @ mean - trace / 16)
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
  assert list(sngm_optax.__all__) == sorted(sngm_optax.__all__)
