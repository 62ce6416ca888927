"""Non-finite gradients: what each transform does with NaN/Inf.

Unwrapped, a NaN/Inf gradient reaches the update (never silent zeros).
Wrapped in `optax.apply_if_finite`, the step is skipped (zero update) and no
NaN enters any state: the state after [good, bad, good] equals the state
after [good, good].
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import sngm_optax

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
GOOD = jax.tree.map(lambda p: 0.5 * p + 0.1, PARAMS)
BAD_VALUES = [jnp.nan, jnp.inf, -jnp.inf]


def _bad(value):
  return {"w": GOOD["w"].at[1, 2].set(value), "b": GOOD["b"]}


def _microbatches(grads):
  # Two microbatch means whose average is `grads` (a NaN/Inf stays in both).
  return jax.tree.map(lambda g: jnp.stack([g + 0.05, g - 0.05]), grads)


OPTIMIZERS = {
    "sngm": (lambda: sngm_optax.sngm(0.1, weight_decay=1e-4), False),
    "adagrad_norm": (lambda: sngm_optax.adagrad_norm(0.1), False),
    "adadagrad_norm": (lambda: sngm_optax.adadagrad_norm(
        0.1, max_batch_size=1024, initial_batch_size=8, microbatch_size=4),
                       True),
    "adadagrad": (lambda: sngm_optax.adadagrad(
        0.1, max_batch_size=1024, initial_batch_size=8, microbatch_size=4,
        test="coordinate"), True),
    "tr_sgd": (lambda: sngm_optax.tr_sgd(0.1, inner_steps=3), False),
    "tr_adam": (lambda: sngm_optax.tr_adam(0.1, inner_steps=3), False),
}


def _step(tx, grads, state, params, statistics):
  extra = {"microbatch_grads": _microbatches(grads)} if statistics else {}
  return tx.update(grads, state, params, **extra)


def _assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64))), tree


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_unwrapped_non_finite_gradient_reaches_the_update(name):
  factory, statistics = OPTIMIZERS[name]
  tx = factory()
  state = tx.init(PARAMS)
  updates, _ = _step(tx, _bad(jnp.inf), state, PARAMS, statistics)
  assert not all(np.all(np.isfinite(np.asarray(u)))
                 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_apply_if_finite_skips_the_step_and_keeps_the_state(name, bad):
  factory, statistics = OPTIMIZERS[name]
  tx = optax.apply_if_finite(factory(), max_consecutive_errors=3)
  step = jax.jit(lambda g, s, p: _step(tx, g, s, p, statistics))
  state = tx.init(PARAMS)
  _, state = step(GOOD, state, PARAMS)
  skipped, state_after_bad = step(_bad(bad), state, PARAMS)
  for u in jax.tree.leaves(skipped):
    np.testing.assert_array_equal(u, 0.0)
  _assert_finite(state_after_bad.inner_state)
  assert int(state_after_bad.notfinite_count) == 1
  # The skipped step left the optimizer's own state untouched.
  jax.tree.map(np.testing.assert_array_equal, state_after_bad.inner_state,
               state.inner_state)
  expected, _ = step(GOOD, state, PARAMS)
  actual, final = step(GOOD, state_after_bad, PARAMS)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)
  _assert_finite(final.inner_state)


def test_sngm_infinite_gradient_gives_nan_not_zeros():
  tx = sngm_optax.sngm(0.1)
  updates, state = tx.update(_bad(jnp.inf), tx.init(PARAMS), PARAMS)
  for u in jax.tree.leaves(updates):
    assert np.all(np.isnan(np.asarray(u)))
  # The momentum buffer is NaN too: hence apply_if_finite.
  assert np.all(np.isnan(np.asarray(optax.tree.get(state, "trace")["w"])))


def test_sngm_finite_gradient_with_overflowing_norm_is_a_unit_step():
  # ‖g‖ = 3e38·√2 is beyond float32's range; g / ‖g‖ is still well defined.
  # The whole sngm chain too: XLA must not fold its scalar factors into one
  # (1/‖g‖ would be a subnormal, flushed to zero).
  for grads in ({"a": jnp.full(2, 3e38)}, {"a": jnp.array([1e38, 0.0])}):
    expected = np.asarray(grads["a"], np.float64)
    expected /= np.linalg.norm(expected)
    for tx, sign in ((sngm_optax.normalize_by_global_norm(), 1.0),
                     (sngm_optax.sngm(1.0, momentum=0.5), -1.0)):
      updates, _ = jax.jit(tx.update)(grads, tx.init(grads), grads)
      np.testing.assert_allclose(updates["a"], sign * expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["gmc", "dgc"])
def test_compression_under_pmap_with_apply_if_finite(name):
  n = jax.local_device_count()
  make = {"gmc": sngm_optax.gmc, "dgc": sngm_optax.dgc}[name]
  tx = optax.apply_if_finite(make(0.1, density=0.5, axis_name="i"),
                             max_consecutive_errors=3)
  params = {"w": jnp.ones(8)}
  grads = jnp.arange(n * 8, dtype=jnp.float32).reshape(n, 8) / 10.0
  good = {"w": grads}

  def global_if_finite(g):
    # A NaN on one device must skip the step on every device (the inner
    # update has collectives): make the non-finiteness global first.
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                for x in jax.tree.leaves(g)]))
    finite = lax.pmin(finite.astype(jnp.int32), "i") > 0
    return jax.tree.map(lambda x: jnp.where(finite, x, jnp.nan), g)

  step = jax.pmap(lambda g, s: tx.update(global_if_finite(g), s, params),
                  axis_name="i")
  state = jax.pmap(lambda _: tx.init(params))(jnp.arange(n))
  _, state = step(good, state)
  bad = {"w": grads.at[n - 1, 3].set(jnp.nan)}  # one device only
  skipped, state_after_bad = step(bad, state)
  np.testing.assert_array_equal(skipped["w"], 0.0)
  _assert_finite(state_after_bad.inner_state)
  jax.tree.map(np.testing.assert_array_equal, state_after_bad.inner_state,
               state.inner_state)
  expected, _ = step(good, state)
  actual, final = step(good, state_after_bad)
  np.testing.assert_array_equal(actual["w"], expected["w"])
  _assert_finite(final.inner_state)
