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

import optimizers
import sngm_optax
from optimizers import AXIS
from optimizers import Runner
from optimizers import rows

PARAMS = optimizers.params()
GOOD = optimizers.grads(PARAMS)
BAD_VALUES = [jnp.nan, jnp.inf, -jnp.inf]
BAD_ENTRY = (1, 0)  # of "w", whose gradient there is positive (1.3)


def _bad(value):
  return {"w": GOOD["w"].at[BAD_ENTRY].set(value), "b": GOOD["b"]}


def _bad_step(runner, value, state):
  """A step whose gradient has one non-finite entry: `value`.

  For data-parallel rows, on the last device only (its factor of that entry
  is `value`; the entry's gradient is positive, so the product is `value`).
  """
  if not runner.row.axis:
    return runner.update(_bad(value), state, PARAMS)
  scale = runner.scale(GOOD)
  scale["w"] = scale["w"].at[(-1,) + BAD_ENTRY].set(value)
  return runner.update(GOOD, state, PARAMS, scale=scale)


def _assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64))), tree


@pytest.mark.parametrize("row", rows())
def test_unwrapped_non_finite_gradient_reaches_the_update(row):
  runner = optimizers.plain(row.name)
  updates, _ = _bad_step(runner, jnp.inf, runner.init(PARAMS))
  # Data parallel: on every device, though only one had the Inf.
  devices = range(optimizers.NUM_DEVICES) if row.axis else [None]
  for d in devices:
    leaves = [u if d is None else u[d] for u in jax.tree.leaves(updates)]
    assert not all(np.all(np.isfinite(np.asarray(u))) for u in leaves)


def _non_finite_on_every_device():
  """Makes all devices' gradients NaN where any device's is non-finite.

  A NaN on one device must skip the step on every device (the update has
  collectives): apply_if_finite must see the non-finiteness everywhere.
  """

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                for x in jax.tree.leaves(updates)]))
    finite = lax.pmin(finite.astype(jnp.int32), AXIS) > 0
    return jax.tree.map(lambda x: jnp.where(finite, x, jnp.nan),
                        updates), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update)


@pytest.mark.parametrize("row", rows())
def test_apply_if_finite_skips_the_step_and_keeps_the_state(row):
  guarded = optax.apply_if_finite(row.build(), max_consecutive_errors=3)
  if row.axis:
    runner = Runner(row, optax.chain(_non_finite_on_every_device(), guarded))
    guard = lambda state: state[1]
  else:
    runner = Runner(row, guarded)
    guard = lambda state: state
  _, state = runner.update(GOOD, runner.init(PARAMS), PARAMS)
  expected, _ = runner.update(GOOD, state, PARAMS)
  for bad in BAD_VALUES:
    skipped, state_after_bad = _bad_step(runner, bad, state)
    for u in jax.tree.leaves(skipped):
      np.testing.assert_array_equal(u, 0.0)
    _assert_finite(guard(state_after_bad).inner_state)
    np.testing.assert_array_equal(guard(state_after_bad).notfinite_count, 1)
    # The skipped step left the optimizer's own state untouched.
    jax.tree.map(np.testing.assert_array_equal,
                 guard(state_after_bad).inner_state, guard(state).inner_state)
    actual, final = runner.update(GOOD, state_after_bad, PARAMS)
    jax.tree.map(np.testing.assert_array_equal, actual, expected)
    _assert_finite(guard(final).inner_state)


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
