"""Checks every optimizer of the package passes, as optax/contrib/_common_test.

Each entry is (name, factory, kwargs); a new optimizer is one more line.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sngm_optax

OPTIMIZERS = [
    ("sngm", sngm_optax.sngm, {"learning_rate": 0.05}),
    ("sngm_nesterov_wd", sngm_optax.sngm,
     {"learning_rate": 0.05, "nesterov": True, "weight_decay": 1e-4}),
    ("tr_sgd", sngm_optax.tr_sgd, {"learning_rate": 0.05}),
    ("tr_sgd_uncoupled_no_decay", sngm_optax.tr_sgd,
     {"learning_rate": 0.05, "couple_to_learning_rate": False,
      "inner_lr_decay": False, "inner_steps": 3}),
    ("tr_adam", sngm_optax.tr_adam, {"learning_rate": 0.1}),
]
IDS = [name for name, _, _ in OPTIMIZERS]
# optax.adam itself moves by ~7e-6 (relative) under inject_hyperparams, which
# turns b1 and b2 into float32 arrays.
INJECT_RTOL = {"tr_adam": 2e-5}


def _params(dtype=jnp.float32):
  return {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]], dtype),
          "b": [jnp.array([0.1, -0.1, 2.0], dtype)]}


def _grads(params):
  return jax.tree.map(lambda p: (2.0 * p + 0.3).astype(p.dtype), params)


def _quadratic(params):
  return sum(jnp.sum((p - 1.0) ** 2) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("name, factory, kwargs", OPTIMIZERS, ids=IDS)
def test_decreases_a_quadratic(name, factory, kwargs):
  kwargs = dict(kwargs, learning_rate=optax.cosine_decay_schedule(
      kwargs["learning_rate"], 300))
  tx = factory(**kwargs)
  params = _params()
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(_quadratic)(p), s, p))
  initial = _quadratic(params)
  for _ in range(300):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert _quadratic(params) < 0.05 * initial


@pytest.mark.parametrize("name, factory, kwargs", OPTIMIZERS, ids=IDS)
def test_accepts_extra_args(name, factory, kwargs):
  tx = factory(**kwargs)
  params = _params()
  updates, _ = tx.update(_grads(params), tx.init(params), params,
                         unused_extra_arg=jnp.ones(()))
  assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize("name, factory, kwargs", OPTIMIZERS, ids=IDS)
def test_inject_hyperparams_gives_the_same_update(name, factory, kwargs):
  params = _params()
  tx = factory(**kwargs)
  injected = optax.inject_hyperparams(factory)(**kwargs)
  state, injected_state = tx.init(params), injected.init(params)
  for _ in range(3):
    updates, state = jax.jit(tx.update)(_grads(params), state, params)
    injected_updates, injected_state = jax.jit(injected.update)(
        _grads(params), injected_state, params)
    rtol = INJECT_RTOL.get(name, 1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol),
                 updates, injected_updates)
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("name, factory, kwargs", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_preserves_dtypes_and_state_structure(name, factory, kwargs, dtype):
  tx = factory(**kwargs)
  params = _params(dtype)
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates, new_state = update(_grads(params), state, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype
  shapes = lambda t: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)),
                                  t)
  assert shapes(new_state) == shapes(state)
  update(_grads(params), new_state, params)
  assert update._cache_size() == 1  # the second step reuses the executable


@pytest.mark.parametrize("name, factory, kwargs", OPTIMIZERS, ids=IDS)
def test_multisteps_with_one_step_matches_the_optimizer(name, factory, kwargs):
  params = _params()
  tx = factory(**kwargs)
  wrapped = optax.MultiSteps(factory(**kwargs), every_k_schedule=1)
  state, wrapped_state = tx.init(params), wrapped.init(params)
  for _ in range(3):
    updates, state = tx.update(_grads(params), state, params)
    wrapped_updates, wrapped_state = wrapped.update(
        _grads(params), wrapped_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 updates, wrapped_updates)
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("name, factory, kwargs", OPTIMIZERS, ids=IDS)
def test_state_is_stable_under_lax_cond(name, factory, kwargs):
  tx = factory(**kwargs)
  params = _params()
  state = tx.init(params)

  @jax.jit
  def maybe_update(take_step, params, state):
    return jax.lax.cond(
        take_step,
        lambda s: tx.update(_grads(params), s, params)[1],
        lambda s: s,
        state,
    )

  maybe_update(True, params, state)  # fails to trace if shapes/dtypes drift
  maybe_update(False, params, state)
