"""The three sources of per-sample gradient statistics agree: per-example,
microbatch and per-device (pmap and shard_map over 8 devices), and moments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import sngm_optax
from sngm_optax import adaptive_batch_size
from sngm_optax import add_gradient_moments
from sngm_optax import gradient_moments
from sngm_optax import moment_statistics
from sngm_optax import norm_test
from sngm_optax import per_device_statistics

from batch_size_reference import (
    jitted_microbatch_statistics as microbatch_statistics,
    jitted_per_example_statistics as per_example_statistics,
    NUM_DEVICES,
    all_tests,
    flatten,
    pmapped,
    random_per_example,
    reference_tests,
    shard_mapped,
    stats_close,
)


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


def test_shard_map_with_vma_checking_needs_per_device_gradients():
  """Under shard_map(check_vma=True) the gradient of replicated params is
  already summed over devices; the statistics refuse it, and accept the
  gradient with respect to params cast to device-varying."""
  rng = np.random.default_rng(23)
  inputs = jnp.asarray(rng.normal(size=(NUM_DEVICES * 4, 3)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(NUM_DEVICES * 4,)), jnp.float32)
  params = jnp.asarray([0.5, -1.0, 2.0])
  loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
  mesh = jax.make_mesh(
      (NUM_DEVICES,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,)
  )

  def statistics(cast):
    def on_shard(w, x, y):
      if cast:
        w = jax.lax.pcast(w, "devices", to="varying")
      grads = jax.grad(loss)(w, x, y)
      return per_device_statistics(grads, 4, "devices")[1]

    return jax.jit(jax.shard_map(
        on_shard, mesh=mesh, in_specs=(P(), P("devices"), P("devices")),
        out_specs=P(),
    ))(params, inputs, targets)

  with pytest.raises(ValueError, match="identical on all devices"):
    statistics(cast=False)
  device_grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(
      params, inputs.reshape(NUM_DEVICES, 4, 3), targets.reshape(NUM_DEVICES, 4)
  )
  _, want = microbatch_statistics(device_grads, 4)
  stats_close(statistics(cast=True), want, rtol=1e-4)


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

