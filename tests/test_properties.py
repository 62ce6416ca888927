"""Property tests over random pytrees: shapes, nesting, dtypes, magnitudes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings, strategies as st

import sngm_optax

# Exponent ranges a dtype can hold without overflow or flushing to zero.
EXPONENTS = {jnp.float32: (-30, 30), jnp.bfloat16: (-30, 30),
             jnp.float16: (-3, 3)}
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


@st.composite
def leaves(draw, dtype):
  shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
  low, high = EXPONENTS[dtype]
  exponent = draw(st.integers(low, high))
  seed = draw(st.integers(0, 2**31 - 1))
  values = np.random.default_rng(seed).standard_normal(shape) * 10.0**exponent
  return jnp.asarray(values, dtype)


@st.composite
def pytrees(draw):
  dtype = draw(st.sampled_from(list(EXPONENTS)))
  leaf = leaves(dtype)
  tree = draw(st.recursive(
      leaf,
      lambda children: st.one_of(
          st.lists(children, min_size=1, max_size=3),
          st.dictionaries(st.text("abc", min_size=1, max_size=2), children,
                          min_size=1, max_size=3)),
      max_leaves=6))
  return tree, dtype


def norm64(tree):
  return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                     for x in jax.tree.leaves(tree)))


@settings(max_examples=60, deadline=None)
@given(pytrees())
def test_normalized_update_has_unit_norm_or_is_zero(tree_and_dtype):
  tree, dtype = tree_and_dtype
  tx = sngm_optax.normalize_by_global_norm()
  updates, _ = tx.update(tree, tx.init(tree))
  assert jax.tree.structure(updates) == jax.tree.structure(tree)
  for u in jax.tree.leaves(updates):
    assert u.dtype == dtype and np.all(np.isfinite(np.asarray(u, np.float32)))
  if norm64(tree) == 0:
    assert norm64(updates) == 0
  else:
    np.testing.assert_allclose(norm64(updates), 1.0, rtol=RTOL[dtype] * 4)


@settings(max_examples=60, deadline=None)
@given(pytrees())
def test_global_norm_matches_float64(tree_and_dtype):
  tree, dtype = tree_and_dtype
  np.testing.assert_allclose(float(sngm_optax.global_norm(tree)), norm64(tree),
                             rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(pytrees(), st.floats(0.0, 0.99), st.booleans())
def test_sngm_equals_reference(tree_and_dtype, momentum, nesterov):
  grads, dtype = tree_and_dtype
  params = jax.tree.map(jnp.zeros_like, grads)
  tx = sngm_optax.sngm(0.1, momentum=momentum, nesterov=nesterov)
  state = tx.init(params)
  g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  direction = [x / norm64(grads) for x in g]
  u = [np.zeros_like(x) for x in g]
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    u = [d + momentum * ui for d, ui in zip(direction, u)]
    expected = [-0.1 * (d + momentum * ui if nesterov else ui)
                for d, ui in zip(direction, u)]
    # Relative to the whole update: the momentum buffer is stored in the leaf
    # dtype, and entries far below the update's scale may flush to zero.
    atol = 4 * RTOL[dtype] * max(np.max(np.abs(e)) for e in expected)
    for actual, exp in zip(jax.tree.leaves(updates), expected):
      np.testing.assert_allclose(np.asarray(actual, np.float64), exp,
                                 atol=atol)


def test_apply_if_finite_keeps_state_finite_with_any_non_finite_value():
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  tx = optax.apply_if_finite(sngm_optax.sngm(0.1), max_consecutive_errors=10)
  state = tx.init(params)
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    grads = {"a": jnp.array([1.0, bad, 0.0]), "b": jnp.ones((2, 2))}
    updates, state = tx.update(grads, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    for leaf in jax.tree.leaves(state):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
