"""gradient_accumulator: the mean gradient and moments of a variable number of
fixed-shape microbatches, against per-example gradients written in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sngm_optax

MICROBATCH = 4


def squared_error(w, batch):
  return (batch["x"] @ w - batch["y"]) ** 2


def numpy_per_example_grads(w, x, y):
  """d/dw (x.w - y)^2 = 2 (x.w - y) x, one row per example."""
  return 2 * (x @ w - y)[:, None] * x


@pytest.fixture(name="accumulator", scope="module")
def fixture_accumulator():
  accumulator = sngm_optax.gradient_accumulator(squared_error, MICROBATCH)
  return accumulator, jax.jit(accumulator.add)


def test_mean_and_moments_match_numpy_and_padding_counts_nothing(accumulator):
  accumulator, add = accumulator
  rng = np.random.default_rng(0)
  w = rng.normal(size=3)
  x, y = rng.normal(size=(12, 3)), rng.normal(size=12)
  state = accumulator.init(jnp.zeros(3))
  for start in range(0, 12, MICROBATCH):
    batch = {"x": jnp.asarray(x[start:start + MICROBATCH], jnp.float32),
             "y": jnp.asarray(y[start:start + MICROBATCH], jnp.float32)}
    state = add(state, jnp.asarray(w, jnp.float32), batch)
  # A weight-0 (padding) microbatch adds nothing, not even to the count.
  state = add(state, jnp.asarray(w, jnp.float32),
              {"x": jnp.ones((MICROBATCH, 3)), "y": jnp.ones(MICROBATCH)},
              jnp.zeros(MICROBATCH))
  mean, moments = accumulator.result(state)
  grads = numpy_per_example_grads(w, x, y)
  units = grads.reshape(3, MICROBATCH, 3).mean(1)
  np.testing.assert_allclose(mean, grads.mean(0), rtol=1e-5, atol=1e-6)
  assert int(moments.count) == 3
  np.testing.assert_allclose(moments.grad_sum, units.sum(0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(moments.sq_grad_sum, (units**2).sum(0),
                             rtol=1e-5)
  assert float(state.weight_sum) == 12
  # The statistics the norm test reads: m times the variance of the units.
  _, stats = sngm_optax.moment_statistics(moments, MICROBATCH)
  np.testing.assert_allclose(
      stats.variance_trace, MICROBATCH * units.var(0, ddof=1).sum(),
      rtol=1e-4)


def test_any_number_of_microbatches_compiles_once(accumulator):
  accumulator, _ = accumulator
  traces = []

  def traced_add(*args):
    traces.append(1)
    return accumulator.add(*args)

  add = jax.jit(traced_add)
  params = jnp.zeros(3)
  chunk = {"x": jnp.ones((MICROBATCH, 3)), "y": jnp.ones(MICROBATCH)}
  for count in (1, 3, 2, 7):  # four batch sizes
    state = accumulator.init(params)
    for _ in range(count):
      state = add(state, params, chunk)
    assert int(accumulator.result(state)[1].count) == count
  assert len(traces) == 1 and add._cache_size() == 1


def test_a_chunk_of_microbatches_is_optax_microbatching_split(accumulator):
  accumulator, add = accumulator
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=3), jnp.float32)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=8), jnp.float32)
  together = add(accumulator.init(w), w, {"x": x, "y": y})
  apart = accumulator.init(w)
  # optax.microbatching splits a chunk column-major: microbatch u of c holds
  # the examples u, u + c, u + 2c, ...
  for start in (0, 1):
    apart = add(apart, w, {"x": x[start::2], "y": y[start::2]})
  for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(apart)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bad_arguments():
  with pytest.raises(ValueError, match="microbatch_size"):
    sngm_optax.gradient_accumulator(squared_error, 0)
  accumulator = sngm_optax.gradient_accumulator(squared_error, MICROBATCH)
  with pytest.raises(ValueError, match="microbatch_size=4"):
    accumulator.add(accumulator.init(jnp.zeros(3)), jnp.zeros(3),
                    {"x": jnp.ones((6, 3)), "y": jnp.ones(6)})
