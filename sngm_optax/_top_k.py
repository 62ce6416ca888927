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

# Threshold-by-sampling ('sampled'): a random sample of at most _MAX_SAMPLES
# entries, about `hits` = samples * k / size of them above the true k-th
# largest magnitude (_SAMPLE_HITS when the sample is not capped). The threshold
# is the sample's (hits + 4 sqrt(hits))-th largest, so the count passing it is
# k (1 + 4/sqrt(hits)), give or take k/sqrt(hits): fewer than k, or more than
# the buffer of k (1 + 8/sqrt(hits)) (either would trigger the exact
# fallback), are ~4-sigma events. The candidates are compacted in two
# stages: the blocks holding one (jnp.nonzero over size/block flags), then the
# candidates within those blocks, into the static buffer.
_SAMPLE_HITS = 1024
_MAX_SAMPLES = 2**16  # a larger sample costs more than it saves (timed)
_MIN_HITS = 64
_MAX_BLOCK = 16


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
  buffer: int  # static number of candidates kept (and of candidate blocks)
  block: int  # entries per block in the first compaction


def _sampled_plan(size: int, k: int) -> _SampledPlan | None:
  """Static sizes for 'sampled' selection, or None where exact is as cheap."""
  samples = min(math.ceil(_SAMPLE_HITS * size / k), _MAX_SAMPLES)
  hits = samples * k / size
  buffer = math.ceil(k * (1 + 8 / math.sqrt(hits)))
  if hits < _MIN_HITS or 8 * samples > size or 8 * buffer > size:
    return None
  block = 1
  while 2 * block <= _MAX_BLOCK and 8 * buffer * 2 * block <= size:
    block *= 2
  return _SampledPlan(
      samples, round(hits + 4 * math.sqrt(hits)), buffer, block
  )


def _compact(is_candidate, size, plan):
  """Positions of the first `plan.buffer` candidates; `size` pads the rest."""
  whole = (size // plan.block) * plan.block
  per_block = jnp.any(
      is_candidate[:whole].reshape(-1, plan.block), axis=1
  )
  if whole < size:
    per_block = jnp.append(per_block, jnp.any(is_candidate[whole:]))
  blocks = jnp.nonzero(
      per_block, size=plan.buffer, fill_value=per_block.shape[0]
  )[0]
  positions = (blocks[:, None] * plan.block + jnp.arange(plan.block)).reshape(
      -1
  )
  inside = positions < size
  positions = jnp.minimum(positions, size - 1)
  in_blocks = inside & is_candidate[positions]
  return jnp.where(
      jnp.arange(plan.buffer) < jnp.sum(in_blocks),
      positions[jnp.nonzero(in_blocks, size=plan.buffer, fill_value=0)[0]],
      size,
  )


def _kth_largest(magnitude, rank):
  """The `rank`-th largest of nonnegative floats, by bisection on their bits.

  For floats >= 0 the integer view of the bits is increasing, so 8·itemsize
  halvings of the integer range find it exactly (a NaN counts as above
  every number; the result is then inf): 32 passes over a float32 sample,
  where XLA:CPU's sort or top-k of 64k entries takes ~50 ms.
  """
  width = magnitude.dtype.itemsize
  bits = lax.bitcast_convert_type(magnitude, jnp.dtype(f"int{8 * width}"))
  infinity = lax.bitcast_convert_type(
      jnp.asarray(jnp.inf, magnitude.dtype), bits.dtype)

  def halve(_, bounds):
    # count(bits >= low) >= rank > count(bits >= high) throughout.
    low, high = bounds
    middle = low + (high - low) // 2
    enough = jnp.sum(bits >= middle) >= rank
    return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

  low, _ = lax.fori_loop(0, 8 * width, halve,
                         (jnp.zeros((), bits.dtype), infinity + 1))
  return lax.bitcast_convert_type(low, magnitude.dtype)


def _top_k_from_sampled_threshold(magnitude, k, key, plan):
  """Top-k indices among the entries above a sampled threshold.

  Returns the indices and whether they are certainly the exact top k: that is
  when at least k entries pass the threshold (so the k largest all pass) and
  no more than the buffer holds.
  """
  size = magnitude.shape[0]
  sample = magnitude[jax.random.randint(key, (plan.samples,), 0, size)]
  threshold = _kth_largest(sample, plan.rank)
  # NaNs count as candidates so that they are sent, as `lax.top_k` would.
  is_candidate = (magnitude >= threshold) | jnp.isnan(magnitude)
  count = jnp.sum(is_candidate, dtype=jnp.int32)
  is_exact = (count >= k) & (count <= plan.buffer)
  positions = _compact(is_candidate, size, plan)
  # Padding reads as -inf; positions are ascending, so ties go to the lower
  # index, as in `lax.top_k`.
  values = jnp.where(
      positions < size, magnitude[jnp.minimum(positions, size - 1)], -jnp.inf
  )
  return positions[lax.top_k(values, k)[1]].astype(jnp.int32), is_exact


def _top_k_sampled(magnitude, k, key):
  """Exact top-k indices, usually found among sampled-threshold candidates."""
  plan = _sampled_plan(magnitude.shape[0], k)
  if plan is None:
    return lax.top_k(magnitude, k)[1].astype(jnp.int32)
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
  - `'sampled'`: DGC's threshold by sampling, with an exact correction. A
    random sample of `m = min(1024 · size / k, 65536)` entries holds about
    `h = m · k / size` of the top k; its `(h + 4 √h)`-th largest magnitude
    (found by bisection on the bits, not by a sort) is a threshold that
    `k (1 + 4/√h)` entries pass, give or take `k/√h`. The candidates are
    compacted into a static buffer of `k (1 + 8/√h)`
    (`jnp.nonzero(..., size=)`, first over blocks of up to 16 entries, then
    within those blocks) and the top k of the buffer are taken. When fewer
    than k entries pass, or more than the buffer holds (each a ~4-sigma
    event), it falls back to `'exact'` under `jax.lax.cond`; so the result
    is always the exact top k (ties to the lower index, as `lax.top_k`),
    only the time differs. Where `h < 64`, or the sample or the buffer would
    exceed 1/8 of the vector, `'exact'` is used.

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
