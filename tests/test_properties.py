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
  # Few distinct shapes: eager JAX compiles each op once per shape and dtype,
  # and the properties are about nesting, dtypes and magnitudes, not sizes.
  shape = tuple(draw(st.lists(st.sampled_from([1, 3]), max_size=2)))
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


@settings(max_examples=40, deadline=None)
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


@settings(max_examples=40, deadline=None)
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


# --- Batch-size controller: never shrinks, never exceeds the cap.

_next_batch_size = jax.jit(sngm_optax.next_batch_size)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**20), st.integers(0, 12),
       st.one_of(st.floats(0.0, 1e30), st.sampled_from(
           [float("inf"), float("nan"), -1.0, 0.5])),
       st.integers(0, 2**20))
def test_next_batch_size_stays_between_current_and_cap(batch, log_multiple,
                                                       demand, headroom):
  multiple = 2**log_multiple
  cap = -(-batch // multiple) * multiple + headroom // multiple * multiple
  result = int(_next_batch_size(batch, demand, cap, multiple))
  assert batch <= result <= cap
  assert result % multiple == 0
  if np.isfinite(demand) and demand <= batch:
    assert result == -(-batch // multiple) * multiple


TESTS = ("norm", "inner_product", "orthogonality", "augmented",
         "coordinate")
_CONTROLLER_STEPS = {}


def _controller_step(test):
  # One compiled step per test: shapes are fixed, values and sizes are data.
  if test not in _CONTROLLER_STEPS:
    tx = sngm_optax.adaptive_batch_size(4096, test=test, initial_batch_size=8)

    def step(grads, per_example, current):
      state = tx.init(grads)
      state = state._replace(next_batch_size=current)
      _, state = tx.update(grads, state, per_example_grads=per_example)
      return state.next_batch_size

    _CONTROLLER_STEPS[test] = jax.jit(step)
  return _CONTROLLER_STEPS[test]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(TESTS), st.integers(-30, 30), st.integers(-30, 30),
       st.integers(0, 2**31 - 1), st.integers(1, 4096))
def test_batch_size_tests_never_shrink_or_exceed_the_cap(test, mean_exp,
                                                         noise_exp, seed,
                                                         current):
  rng = np.random.default_rng(seed)
  # 8 per-example gradients of a {w: 2x3, b: 3} model: mean + noise.
  shapes = {"w": (2, 3), "b": (3,)}
  per_example = {
      k: jnp.asarray(10.0**mean_exp * rng.standard_normal(s)
                     + 10.0**noise_exp * rng.standard_normal((8,) + s),
                     jnp.float32)
      for k, s in shapes.items()}
  grads = jax.tree.map(lambda g: jnp.mean(g, 0), per_example)
  result = int(_controller_step(test)(grads, per_example,
                                      jnp.int32(current)))
  assert current <= result <= 4096


# --- GMC: what is sent plus what is kept equals what came in.

_GMC_STEPS = {}
_WORKERS = 4


def _gmc_steps(density):
  if density not in _GMC_STEPS:
    tx = sngm_optax.scale_by_gmc(momentum=0.9, density=density,
                                 axis_name="i")
    step = jax.pmap(lambda g, s: tx.update(g, s), axis_name="i",
                    devices=jax.local_devices()[:_WORKERS])
    init = jax.pmap(tx.init, devices=jax.local_devices()[:_WORKERS])
    _GMC_STEPS[density] = (init, step)
  return _GMC_STEPS[density]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([0.01, 0.1, 0.3, 1.0]), st.integers(0, 2**31 - 1),
       st.integers(-20, 20))
def test_gmc_sent_plus_memory_equals_the_input(density, seed, exponent):
  init, step = _gmc_steps(density)
  rng = np.random.default_rng(seed)
  grads = {"a": rng.standard_normal((_WORKERS, 37)) * 10.0**exponent,
           "b": rng.standard_normal((_WORKERS, 5, 4)) * 10.0**exponent}
  grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
  state = init(jax.tree.map(jnp.zeros_like, grads))
  for _ in range(2):  # the second step starts from non-zero memory and D
    memory = jax.tree.map(np.asarray, state.memory)
    previous = jax.tree.map(np.asarray, state.global_update)
    sent, state = step(grads, state)
    for key in grads:
      # v_k = e_k + (g_k + β D) / K; Σ_k v_k = D_new + Σ_k e_k (float64).
      g = np.asarray(grads[key], np.float64)
      total_in = (np.sum(memory[key], 0, dtype=np.float64)
                  + np.mean(g, 0) + 0.9 * previous[key][0])
      total_out = (np.asarray(sent[key][0], np.float64)
                   + np.sum(np.asarray(state.memory[key], np.float64), 0))
      scale = np.max(np.abs(total_in)) + np.max(np.abs(g))
      np.testing.assert_allclose(total_out, total_in, rtol=0,
                                 atol=1e-5 * scale)
      # Every device holds the same global update.
      np.testing.assert_array_equal(sent[key][0], sent[key][-1])
