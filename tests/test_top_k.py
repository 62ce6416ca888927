"""top_k_by_magnitude: the exact top k from every selection (approx: 95 %)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sngm_optax
from sngm_optax import _top_k


def _n_kept(size, density):
  return min(size, max(1, int(round(density * size))))


def _sampled_top_k(vector, k):
  """The public 'sampled' selection, and whether its fallback was needed."""
  plan = _top_k._sampled_plan(vector.shape[0], k)
  assert plan is not None  # the sampled path is taken for these sizes

  @jax.jit
  def select(v):
    key = jax.random.key(0)
    _, is_exact = _top_k._top_k_from_sampled_threshold(
        jnp.abs(v), k, key, plan)
    return sngm_optax.top_k_by_magnitude(v, k, "sampled", key), is_exact

  indices, is_exact = select(jnp.asarray(vector))
  return np.asarray(indices), bool(is_exact)


@pytest.mark.parametrize("size, density, layered", [
    (1_000_000, 0.01, False),
    (1_000_003, 0.0085, True),  # not a multiple of the block; layered scales
])
def test_sampled_selection_is_the_exact_top_k(size, density, layered):
  rng = np.random.default_rng(0)
  vector = rng.normal(size=size).astype(np.float32)
  if layered:  # scales over 4 decades across 50 "layers", as a gradient tree
    vector *= np.repeat(10.0 ** rng.uniform(-2, 2, 50), -(-size // 50))[:size]
  k = _n_kept(size, density)
  indices, is_exact = _sampled_top_k(vector, k)
  assert is_exact  # found without the fallback
  assert len(set(indices.tolist())) == k  # the count is exact
  expected = np.argsort(-np.abs(vector), kind="stable")[:k]
  np.testing.assert_array_equal(np.sort(indices), np.sort(expected))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_kth_largest_by_bisection_matches_a_sort(dtype):
  rng = np.random.default_rng(3)
  values = np.abs(rng.standard_t(2, size=4099)).astype(dtype)
  values[:40] = 0.0  # ties, and zeros at the bottom
  values[40:60] = values[60]
  values[60] = np.inf
  kth = jax.jit(_top_k._kth_largest, static_argnums=1)
  for rank in (1, 2, 21, 98, 2000, 4059, 4060, 4099):
    assert kth(jnp.asarray(values), rank) == np.sort(values)[-rank], rank


def test_sampled_selection_falls_back_to_exact():
  # 9000 nonzeros out of 1M, k = 10000: the sampled threshold is 0, every
  # entry is a candidate, more than the buffer holds: the exact fallback.
  vector = np.zeros(1_000_000, np.float32)
  rng = np.random.default_rng(0)
  hot = rng.choice(vector.size, 9000, replace=False)
  vector[hot] = rng.normal(size=9000) + 10.0
  indices, is_exact = _sampled_top_k(vector, 10_000)
  assert not is_exact
  assert len(set(indices.tolist())) == 10_000
  assert set(hot.tolist()) <= set(indices.tolist())
  # The zeros sent besides are the lowest-indexed, as with lax.top_k.
  np.testing.assert_array_equal(np.sort(indices),
                                _reference_top_k(vector, 10_000))


def _reference_top_k(vector, k):
  """NumPy: the k largest |entries| (NaN above inf), ties to the lower index."""
  magnitude = np.abs(np.asarray(vector, np.float64))
  order = np.lexsort((np.arange(magnitude.size),
                      -np.nan_to_num(magnitude, nan=0.0, posinf=np.inf),
                      -np.isnan(magnitude).astype(int)))
  return np.sort(order[:k])


@pytest.mark.parametrize("size, ties", [(1000, False), (1003, True),
                                        (33, True)])
def test_exact_fallback_by_bisection_matches_a_sort(size, ties):
  # The fallback of 'sampled': ties (rounded entries, zeros), NaN and inf,
  # sizes that are not a multiple of the 32-entry words.
  rng = np.random.default_rng(size)
  vector = rng.normal(size=size).astype(np.float32)
  if ties:
    vector = np.round(vector, 1)
    vector[: size // 4] = 0.0
    vector[5], vector[9], vector[11] = np.nan, -np.inf, np.inf
  select = jax.jit(_top_k._top_k_by_bisection, static_argnums=1)
  for k in (1, size // 3, size - 1):
    np.testing.assert_array_equal(
        np.asarray(select(jnp.asarray(vector), k)),
        _reference_top_k(vector, k), err_msg=f"k={k}")


@pytest.mark.parametrize("selection", _top_k.SELECTIONS)
def test_every_selection_returns_k_distinct_large_indices(selection):
  vector = jnp.asarray(
      np.random.default_rng(2).normal(size=50_000).astype(np.float32))
  k = 500
  indices = np.asarray(jax.jit(
      lambda v: sngm_optax.top_k_by_magnitude(v, k, selection))(vector))
  assert indices.dtype == np.int32 and len(set(indices.tolist())) == k
  exact = set(np.argsort(-np.abs(np.asarray(vector)))[:k].tolist())
  assert len(exact & set(indices.tolist())) >= 0.95 * k


def test_top_k_by_magnitude_hand_example():
  v = jnp.array([0.5, -7.0, 3.0, 0.0, -2.0, 6.0])
  for selection in _top_k.SELECTIONS:
    got = sngm_optax.top_k_by_magnitude(v, 3, selection)
    assert sorted(np.asarray(got).tolist()) == [1, 2, 5]
