"""Indices of the largest-magnitude entries of a vector: exact, approx, sampled.

The selection step of sparse communication (:func:`gmc`, :func:`dgc`): each
worker sends the `num_selected(d, density)` entries of largest magnitude.
Every method returns exactly `k` distinct int32 indices, so the exchanged
buffers have a static size.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sngm_optax import _checks

SELECTIONS = ("exact", "approx", "sampled")

# Threshold-by-sampling ('sampled'): the random sample holds about
# _SAMPLE_HITS entries above the true k-th largest magnitude, and the threshold
# is the sample's (_OVERSELECT * _SAMPLE_HITS)-th largest, so about
# _OVERSELECT * k entries pass it; fewer than k passing (which triggers the
# exact fallback) is then a ~3-sigma event. Passing entries are gathered by
# blocks of up to _MAX_BLOCK entries, at most _MAX_BLOCKS_PER_K * k blocks,
# which must be at most 1/8 of the vector for the shortcut to pay.
_SAMPLE_HITS = 32
_OVERSELECT = 1.5
_MAX_BLOCK = 16
_MAX_BLOCKS_PER_K = 3


def check_selection(selection: str) -> None:
  """Raises `ValueError` unless `selection` is one of `SELECTIONS`."""
  if selection not in SELECTIONS:
    raise ValueError(
        f"selection must be one of {SELECTIONS}, got {selection!r}"
    )


def num_selected(size: int, density: float) -> int:
  """Entries sent out of `size` at `density`: round(density·size), at least 1.

  Example:
    >>> from sngm_optax import num_selected
    >>> num_selected(106, 0.1), num_selected(3, 0.1), num_selected(8, 1.0)
    (11, 1, 8)
  """
  _checks.check_positive_int("size", size)
  _checks.check_range("density", density, 0.0, 1.0, low_inclusive=False)
  return min(size, max(1, int(round(density * size))))


class _SampledPlan(NamedTuple):
  samples: int  # sample size
  rank: int  # the threshold is the sample's rank-th largest magnitude
  block: int  # entries per candidate block
  max_blocks: int  # static number of gathered blocks


def _sampled_plan(size: int, k: int) -> _SampledPlan | None:
  """Static sizes for 'sampled' selection, or None where exact is as cheap."""
  samples = math.ceil(_SAMPLE_HITS * size / k)
  max_blocks = _MAX_BLOCKS_PER_K * k
  if 4 * samples > size or 8 * max_blocks > size:
    return None
  block = 1
  while 2 * block <= _MAX_BLOCK and 8 * max_blocks * 2 * block <= size:
    block *= 2
  return _SampledPlan(
      samples, round(_OVERSELECT * _SAMPLE_HITS), block, max_blocks
  )


def _top_k_from_sampled_threshold(magnitude, k, key, plan):
  """Top-k indices among the entries above a sampled threshold.

  Returns the indices and whether they are certainly the exact top k: that is
  when at least k entries pass the threshold (so the k largest all pass) and
  all blocks holding one were gathered.
  """
  size = magnitude.shape[0]
  sample = magnitude[jax.random.randint(key, (plan.samples,), 0, size)]
  threshold = lax.top_k(sample, plan.rank)[0][-1]
  # NaNs count as candidates so that they are sent, as `lax.top_k` would.
  is_candidate = (magnitude >= threshold) | jnp.isnan(magnitude)
  whole = (size // plan.block) * plan.block
  per_block = jnp.sum(
      is_candidate[:whole].reshape(-1, plan.block), axis=1, dtype=jnp.int32
  )
  if whole < size:
    per_block = jnp.append(per_block, jnp.sum(is_candidate[whole:]))
  # Padding points past the end, where magnitudes read as -inf.
  blocks = jnp.nonzero(
      per_block, size=plan.max_blocks, fill_value=per_block.shape[0]
  )[0]
  is_exact = (jnp.sum(per_block) >= k) & (
      jnp.count_nonzero(per_block) <= plan.max_blocks
  )
  positions = (blocks[:, None] * plan.block + jnp.arange(plan.block)).reshape(
      -1
  )
  values = jnp.where(
      positions < size, magnitude[jnp.minimum(positions, size - 1)], -jnp.inf
  )
  return positions[lax.top_k(values, k)[1]].astype(jnp.int32), is_exact


def _top_k_sampled(magnitude, k, key):
  """Exact top-k indices, usually found among sampled-threshold candidates."""
  plan = _sampled_plan(magnitude.shape[0], k)
  if plan is None:
    return lax.top_k(magnitude, k)[1]
  indices, is_exact = _top_k_from_sampled_threshold(magnitude, k, key, plan)
  return lax.cond(
      is_exact,
      lambda: indices,
      lambda: lax.top_k(magnitude, k)[1].astype(jnp.int32),
  )


def top_k_by_magnitude(
    vector: jax.Array,
    k: int,
    selection: str = "exact",
    key: jax.Array | None = None,
) -> jax.Array:
  """Indices (int32, shape `(k,)`) of the `k` entries of largest magnitude.

  Three algorithms, all returning exactly `k` distinct indices so that the
  exchanged buffers have a static size:

  - `'exact'`: `jax.lax.top_k` of `|vector|`.
  - `'approx'`: `jax.lax.approx_max_k` with recall target 0.95; only TPUs
    have an approximate kernel, CPUs and GPUs sort the whole vector (exact).
  - `'sampled'`: DGC's threshold by sampling. The magnitude threshold that
    about 1.5 k entries pass is estimated from a random sample of
    `32 · size / k` entries; the blocks of (up to 16) entries holding one
    are compacted into a static buffer of `3 k` blocks
    (`jnp.nonzero(..., size=)`) and the top k of those are taken. When fewer
    than k entries pass, or more than `3 k` blocks hold one, it falls back to
    `'exact'` under `jax.lax.cond`; so the result is always the exact top k,
    only the time differs. Below k = 128, or above a density of 1/24, the
    sampling does not pay and `'exact'` is used.

  On a 2-core CPU `'exact'` was the fastest or within noise of the fastest
  (see benchmarks/topk_selection.py), hence the default of :func:`gmc` and
  :func:`dgc`.

  Args:
    vector: a 1-D array.
    k: how many indices, in [1, vector.size].
    selection: `'exact'`, `'approx'` or `'sampled'`.
    key: PRNG key for `'sampled'` (a fixed key by default).

  Returns:
    An int32 array of `k` indices into `vector`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sngm_optax import top_k_by_magnitude
    >>> top_k_by_magnitude(jnp.array([0.1, -3.0, 2.0, 0.5]), 2)
    Array([1, 2], dtype=int32)
  """
  check_selection(selection)
  _checks.check_positive_int("k", k)
  if vector.ndim != 1 or not 1 <= k <= vector.shape[0]:
    raise ValueError(
        f"expected a 1-D vector and 1 <= k <= its size, got shape "
        f"{vector.shape} and k={k}"
    )
  # Exact in float32 and order-preserving; XLA's CPU top-k of bfloat16 is a
  # generic sort, ~30x slower (benchmarks/README.md).
  magnitude = jnp.abs(vector).astype(
      jnp.promote_types(vector.dtype, jnp.float32)
  )
  if k == vector.shape[0]:
    return jnp.arange(k, dtype=jnp.int32)
  if selection == "approx":
    return lax.approx_max_k(magnitude, k, recall_target=0.95)[1].astype(
        jnp.int32
    )
  if selection == "sampled":
    key = jax.random.key(0) if key is None else key
    return _top_k_sampled(magnitude, k, key)
  return lax.top_k(magnitude, k)[1].astype(jnp.int32)
