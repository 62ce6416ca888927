"""noise_scale_monitor against known values: a synthetic gradient distribution
with known tr(Σ) and G, and a NumPy EMA with bias correction.

Per-sample gradients are g_i = G + ε_i, ε_i ~ N(0, diag(λ)), so
tr(Σ) = Σ_j λ_j and |G|² are known exactly. The tolerances are 5 standard
deviations of the smoothed estimates, from the Gaussian variances of the
two-batch estimators (n units of m samples, b = n m):

  Var[tr̂]  = 2 tr(Σ²) / (n − 1)
  Var[|Ĝ|²] = 4 GᵀΣG / b + 2 tr(Σ²) n / ((n − 1) b²)
  Cov      = −2 tr(Σ²) / ((n − 1) b)

times (1 − β)(1 + β^N) / ((1 + β)(1 − β^N)) for a bias-corrected EMA of N
independent steps. test_one_step_variance_is_the_stated_one checks these
variances themselves on the raw per-step estimates.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from sngm_optax import adaptive_batch_size
from sngm_optax import GradientMoments
from sngm_optax import noise_scale_monitor
from sngm_optax import NoiseScaleMonitorState

NUM_DEVICES = 8
DIM = 64
LAMBDA = np.linspace(0.5, 1.5, DIM)  # diagonal of Σ
TRACE = LAMBDA.sum()  # 64
G = np.sqrt(1.28 / DIM) * np.where(np.arange(DIM) % 2, 1.0, -1.0)
SQ_NORM = G @ G  # 1.28, so B_simple = 50
B_SIMPLE = TRACE / SQ_NORM
STEPS = 1500
DECAY = 0.99


def _per_sample(key, num_samples):
  """`num_samples` per-sample gradients G + N(0, diag(λ)), float32."""
  noise = jax.random.normal(key, (num_samples, DIM), jnp.float32)
  return jnp.asarray(G, jnp.float32) + noise * jnp.sqrt(
      jnp.asarray(LAMBDA, jnp.float32)
  )


def _ema_factor(decay, steps):
  """Var of a bias-corrected EMA of `steps` i.i.d. values, over Var of one."""
  return ((1 - decay) * (1 + decay**steps)) / (
      (1 + decay) * (1 - decay**steps)
  )


def _one_step_moments(num_units, batch):
  """(Var tr̂, Var |Ĝ|², Cov) of one step's two-batch estimates."""
  trace_sq = np.sum(LAMBDA**2)
  var_trace = 2 * trace_sq / (num_units - 1)
  var_sq_norm = 4 * (G * LAMBDA) @ G / batch + 2 * trace_sq * num_units / (
      (num_units - 1) * batch**2
  )
  covariance = -2 * trace_sq / ((num_units - 1) * batch)
  return var_trace, var_sq_norm, covariance


def _assert_matches_known_values(state, num_units, batch, decay=DECAY,
                                 steps=STEPS):
  var_trace, var_sq_norm, covariance = _one_step_moments(num_units, batch)
  factor = _ema_factor(decay, steps)
  sd_trace = math.sqrt(var_trace * factor)
  sd_sq_norm = math.sqrt(var_sq_norm * factor)
  relative_var_ratio = (
      var_trace / TRACE**2 + var_sq_norm / SQ_NORM**2
      - 2 * covariance / (TRACE * SQ_NORM)
  ) * factor
  sd_ratio = B_SIMPLE * math.sqrt(relative_var_ratio)
  assert int(state.ema_count) == steps
  assert abs(float(state.variance_trace_ema) - TRACE) < 5 * sd_trace, (
      float(state.variance_trace_ema), TRACE, sd_trace)
  assert abs(float(state.sq_norm_ema) - SQ_NORM) < 5 * sd_sq_norm, (
      float(state.sq_norm_ema), SQ_NORM, sd_sq_norm)
  assert abs(float(state.noise_scale) - B_SIMPLE) < 5 * sd_ratio, (
      float(state.noise_scale), B_SIMPLE, sd_ratio)
  # The tolerance is tight enough to mean something: a few percent.
  assert 5 * sd_ratio < 0.1 * B_SIMPLE


# ----------------------------------------------------------------------------
# Per-device gradients: pmap and shard_map.

PER_DEVICE_BATCH = 16


def _per_device_run(device_index, *, steps=STEPS, decay=DECAY, trace=False):
  """`steps` monitor updates on this device's own mean gradients.

  Returns the final state, or with `trace` every step's state.
  """
  tx = noise_scale_monitor(PER_DEVICE_BATCH, axis_name="i", smoothing=decay)
  base = jax.random.key(0)

  def step(state, index):
    key = jax.random.fold_in(jax.random.fold_in(base, index), device_index)
    grads = _per_sample(key, PER_DEVICE_BATCH).mean(0)
    _, state = tx.update(grads, state)
    return state, state if trace else None

  state, history = jax.lax.scan(step, tx.init(jnp.zeros(DIM)),
                                jnp.arange(steps))
  return history if trace else state


def _pmapped(fn):
  return jax.pmap(fn, axis_name="i")(jnp.arange(NUM_DEVICES))


def _shard_mapped(fn, out_specs=P()):
  mesh = jax.make_mesh(
      (NUM_DEVICES,), ("i",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  return jax.jit(jax.shard_map(
      lambda index: fn(index[0]), mesh=mesh, in_specs=P("i"),
      out_specs=out_specs,
  ))(jnp.arange(NUM_DEVICES))


def _first_device(tree):
  return jax.tree.map(lambda x: x[0], tree)


@pytest.mark.parametrize("mapped", ["pmap", "shard_map"])
def test_per_device_estimates_converge_to_the_known_values(mapped):
  if mapped == "pmap":
    state = _first_device(_pmapped(_per_device_run))
  else:
    state = _shard_mapped(_per_device_run)
  _assert_matches_known_values(
      state, NUM_DEVICES, NUM_DEVICES * PER_DEVICE_BATCH
  )


def test_one_step_variance_is_the_stated_one():
  # smoothing=0: each step's state holds that step's own two estimates.
  history = _first_device(_pmapped(
      lambda i: _per_device_run(i, steps=2000, decay=0.0, trace=True)
  ))
  trace = np.asarray(history.variance_trace_ema, np.float64)
  sq_norm = np.asarray(history.sq_norm_ema, np.float64)
  var_trace, var_sq_norm, covariance = _one_step_moments(
      NUM_DEVICES, NUM_DEVICES * PER_DEVICE_BATCH
  )
  # Unbiased, and the variances within ~5 sd of a 2000-sample variance.
  assert abs(trace.mean() - TRACE) < 5 * math.sqrt(var_trace / 2000)
  assert abs(sq_norm.mean() - SQ_NORM) < 5 * math.sqrt(var_sq_norm / 2000)
  np.testing.assert_allclose(trace.var(), var_trace, rtol=0.2)
  np.testing.assert_allclose(sq_norm.var(), var_sq_norm, rtol=0.2)
  np.testing.assert_allclose(
      np.cov(trace, sq_norm)[0, 1], covariance, rtol=0.3
  )


@pytest.mark.parametrize("mapped", ["pmap", "shard_map"])
def test_updates_out_are_the_device_mean(mapped):
  rng = np.random.default_rng(3)
  grads = {"w": rng.normal(size=(NUM_DEVICES, 3, 2)).astype(np.float32),
           "b": rng.normal(size=(NUM_DEVICES, 5)).astype(np.float32)}
  tx = noise_scale_monitor(4, axis_name="i")

  def step(index):
    mine = jax.tree.map(lambda g: jnp.asarray(g)[index], grads)
    updates, state = tx.update(mine, tx.init(mine))
    return updates, state

  if mapped == "pmap":
    updates, state = _first_device(_pmapped(step))
  else:
    updates, state = _shard_mapped(step, out_specs=(P(), P()))
  for name, g in grads.items():
    np.testing.assert_allclose(updates[name], g.mean(0), rtol=1e-6, atol=1e-7)
  # One step: the EMAs are the step's own estimates, in float64 NumPy.
  flat = np.concatenate([grads["w"].reshape(NUM_DEVICES, -1), grads["b"]], 1)
  flat = flat.astype(np.float64)
  mean = flat.mean(0)
  small, big = (flat**2).sum(1).mean(), mean @ mean
  b_small, b_big = 4, 4 * NUM_DEVICES
  want_sq_norm = (b_big * big - b_small * small) / (b_big - b_small)
  want_trace = (small - big) / (1 / b_small - 1 / b_big)
  np.testing.assert_allclose(state.variance_trace_ema, want_trace, rtol=1e-5)
  np.testing.assert_allclose(state.sq_norm_ema, want_sq_norm, rtol=1e-4,
                             atol=1e-5)


# ----------------------------------------------------------------------------
# Without axis_name: per-example, microbatch and moment statistics.

BATCH = 128
MICROBATCHES = 16


def _source(per_sample, kind):
  if kind == "per_example_grads":
    return per_sample
  if kind == "microbatch_grads":
    return per_sample.reshape(MICROBATCHES, -1, DIM).mean(1)
  return GradientMoments(
      count=jnp.asarray(BATCH, jnp.int32),
      grad_sum=per_sample.sum(0),
      sq_grad_sum=jnp.square(per_sample).sum(0),
  )


@pytest.mark.parametrize(
    "kind", ["per_example_grads", "microbatch_grads", "gradient_moments"]
)
def test_single_device_estimates_converge_to_the_known_values(kind):
  tx = optax.chain(noise_scale_monitor(BATCH, smoothing=DECAY),
                   optax.sgd(0.0))

  def step(state, key):
    per_sample = _per_sample(key, BATCH)
    grads = per_sample.mean(0)
    updates, state = tx.update(grads, state, jnp.zeros(DIM),
                               **{kind: _source(per_sample, kind)})
    return state, None

  keys = jax.random.split(jax.random.key(1), STEPS)
  state, _ = jax.jit(lambda s: jax.lax.scan(step, s, keys))(
      tx.init(jnp.zeros(DIM)))
  monitor = state[0]
  units = MICROBATCHES if kind == "microbatch_grads" else BATCH
  _assert_matches_known_values(monitor, units, BATCH)


# ----------------------------------------------------------------------------
# The EMA with bias correction, against NumPy, for hand-made statistics.

# (mean, spread) of two per-example gradients [a + d, a - d] (one
# coordinate): tr(Σ) = 2 d², ‖ḡ‖² = a², the unbiased |G|² = a² − d².
SEQUENCE = [(0.0, 0.0), (0.0, 1.0), (math.nan, 1.0), (3.0, 1.0),
            (2.0, 0.5), (math.inf, 0.0), (1.0, 2.0), (0.5, 0.1), (2.5, 1.5)]


def _numpy_reference(decay):
  """Every step's (count, tr EMA, |G|² EMA, B_simple), float64."""
  count, m_trace, m_sq_norm, out = 0, 0.0, 0.0, []
  for a, d in SEQUENCE:
    trace, sq_norm = 2 * d * d, a * a - d * d
    if np.isfinite(trace) and np.isfinite(sq_norm):
      count += 1
      m_trace = decay * m_trace + (1 - decay) * trace
      m_sq_norm = decay * m_sq_norm + (1 - decay) * sq_norm
    correction = 1 - decay**count if count else 1.0
    trace_hat, sq_norm_hat = m_trace / correction, m_sq_norm / correction
    if sq_norm_hat > 0:
      ratio = trace_hat / sq_norm_hat
    else:
      ratio = math.inf if trace_hat > 0 else 0.0
    out.append((count, trace_hat, sq_norm_hat, ratio))
  return out


def _hand_made_batches():
  for a, d in SEQUENCE:
    yield jnp.asarray([[a + d], [a - d]], jnp.float32)


def _assert_close_to_reference(got, want):
  count, trace, sq_norm, ratio = want
  assert int(got[0]) == count
  np.testing.assert_allclose(got[1], trace, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[2], sq_norm, rtol=1e-5, atol=1e-6)
  if math.isfinite(ratio):
    np.testing.assert_allclose(got[3], ratio, rtol=1e-5, atol=1e-6)
  else:
    assert float(got[3]) == ratio


@pytest.mark.parametrize("decay", [0.0, 0.7, 0.99])
def test_bias_corrected_ema_matches_numpy(decay):
  tx = noise_scale_monitor(2, smoothing=decay)
  state = tx.init(jnp.zeros(1))
  update = jax.jit(tx.update)
  for per_example, want in zip(_hand_made_batches(), _numpy_reference(decay)):
    _, state = update(per_example.mean(0), state,
                      per_example_grads=per_example)
    _assert_close_to_reference(
        (state.ema_count, state.variance_trace_ema, state.sq_norm_ema,
         state.noise_scale), want)
    assert all(not np.isnan(x) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("decay", [0.5, 0.95])
def test_adaptive_batch_size_reports_the_same_noise_scale(decay):
  # One implementation: adaptive_batch_size's noise scale is this one too.
  tx = adaptive_batch_size(max_batch_size=1024, initial_batch_size=2,
                           noise_scale_decay=decay)
  state = tx.init(jnp.zeros(1))
  update = jax.jit(tx.update)
  for per_example, want in zip(_hand_made_batches(), _numpy_reference(decay)):
    _, state = update(per_example.mean(0), state,
                      per_example_grads=per_example)
    _assert_close_to_reference(
        (state.smoothed_count, state.variance_trace_ema, state.sq_norm_ema,
         state.noise_scale), want)


# ----------------------------------------------------------------------------
# optax conventions.


def test_jit_chain_state_dtypes_and_shapes_are_stable():
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2, jnp.bfloat16)}
  tx = optax.chain(noise_scale_monitor(4), optax.sgd(0.1))
  state = tx.init(params)
  assert isinstance(state[0], NoiseScaleMonitorState)
  before = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  assert [(x.shape, x.dtype) for x in state[0]] == [
      ((), jnp.float32), ((), jnp.float32), ((), jnp.float32),
      ((), jnp.int32)]
  rng = np.random.default_rng(5)
  per_example = {"w": jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.float32),
                 "b": jnp.asarray(rng.normal(size=(4, 2)), jnp.bfloat16)}
  grads = jax.tree.map(lambda g: g.mean(0), per_example)
  update = jax.jit(tx.update)
  for _ in range(3):
    updates, state = update(grads, state, params,
                            per_example_grads=per_example)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == before
  assert update._cache_size() == 1
  assert updates["b"].dtype == jnp.bfloat16
  np.testing.assert_allclose(updates["w"], -0.1 * grads["w"], rtol=1e-6)
  assert float(optax.tree.get(state, "noise_scale")) > 0
  assert int(optax.tree.get(state, "ema_count")) == 3
  # Under lax.cond (as apply_if_finite uses it) both branches agree in type.
  skipped = jax.lax.cond(False, lambda s: update(
      grads, s, params, per_example_grads=per_example)[1], lambda s: s, state)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), skipped) == before


def test_bad_calls_raise_value_errors():
  tx = noise_scale_monitor(4)
  state = tx.init(jnp.zeros(2))
  grads = jnp.zeros(2)
  with pytest.raises(ValueError, match="per_example_grads=, microbatch_grads="):
    tx.update(grads, state)
  with pytest.raises(ValueError, match="one source"):
    tx.update(grads, state, per_example_grads=jnp.ones((4, 2)),
              microbatch_grads=jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="per_device_batch_size is 4"):
    tx.update(grads, state, per_example_grads=jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="per_device_batch_size=4"):
    tx.update(grads, state, microbatch_grads=jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="updates and params"):
    tx.update(grads, state, jnp.zeros(3), per_example_grads=jnp.ones((4, 2)))
