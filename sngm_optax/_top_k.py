"""Indices of the largest-magnitude entries of a vector: exact, approx, sampled.

The selection step of sparse communication (:func:`gmc`, :func:`dgc`): each
worker sends the `num_selected(d, density)` entries of largest magnitude.
Every method returns exactly `k` distinct int32 indices, so the exchanged
buffers have a static size; 'exact' and 'sampled' return the same set.
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
# fallback), are ~4-sigma events. The candidates are compacted in one pass
# over the vector: a 32-bit word of candidate flags per 32 entries, then each
# buffer slot finds its word (prefix sums of the words' popcounts) and its bit.
_SAMPLE_HITS = 1024
_MAX_SAMPLES = 2**16  # a larger sample costs more than it saves (timed)
_MIN_HITS = 64
_WORD = 32  # entries per word of candidate flags


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
  buffer: int  # static number of candidates kept


def _sampled_plan(size: int, k: int) -> _SampledPlan | None:
  """Static sizes for 'sampled' selection, or None where exact is as cheap."""
  samples = min(math.ceil(_SAMPLE_HITS * size / k), _MAX_SAMPLES)
  hits = samples * k / size
  buffer = math.ceil(k * (1 + 8 / math.sqrt(hits)))
  if hits < _MIN_HITS or 8 * samples > size or 8 * buffer > size:
    return None
  return _SampledPlan(samples, round(hits + 4 * math.sqrt(hits)), buffer)


def _magnitude(vector):
  """|vector| in at least float32: exact and order-preserving.

  XLA's CPU top-k of bfloat16 is a generic sort, ~30x slower
  (benchmarks/README.md).
  """
  return jnp.abs(vector).astype(jnp.promote_types(vector.dtype, jnp.float32))


def _as_ordered_bits(magnitude):
  """The integer view of floats >= 0: increasing with them, NaN above inf.

  Every NaN maps to the bits of inf plus one; returns that view and the bits
  of inf.
  """
  width = magnitude.dtype.itemsize
  int_dtype = jnp.dtype(f"int{8 * width}")
  bits = lax.bitcast_convert_type(magnitude, int_dtype)
  infinity = lax.bitcast_convert_type(
      jnp.asarray(jnp.inf, magnitude.dtype), int_dtype)
  return jnp.minimum(bits, infinity + 1), infinity


def _kth_largest_bits(bits, rank, high):
  """The `rank`-th largest of integers in [0, `high`), by bisection.

  Entries below 0 (padding) are never counted; with fewer than `rank`
  entries >= 0 the result is 0.
  """

  def halve(_, bounds):
    # count(bits >= low) >= rank > count(bits >= high) throughout.
    low, high = bounds
    middle = low + (high - low) // 2
    enough = jnp.sum(bits >= middle, dtype=jnp.int32) >= rank
    return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

  low, _ = lax.fori_loop(0, 8 * bits.dtype.itemsize, halve,
                         (jnp.zeros((), bits.dtype), high))
  return low


def _kth_largest_magnitude_bits(vector, rank):
  """The ordered bits (see `_as_ordered_bits`) of the `rank`-th largest |entry|.

  By bisection over [0, inf] (a NaN counts as inf here) on the integer
  view of |v| (exact, denormals included: a float comparison would flush
  them to zero). Each step is one read-only pass over `vector`, counted
  through words of flags (XLA:CPU splits a plain sum over a large vector
  into a tree that materializes it). Unrolled: in a loop, XLA would hoist
  the integer view out, into a buffer of the vector's size.
  """
  def ordered_bits():
    return _as_ordered_bits(jnp.abs(vector))

  _, infinity = ordered_bits()
  low, high = jnp.zeros_like(infinity), infinity + 1
  for _ in range(8 * vector.dtype.itemsize):
    # count(bits >= low) >= rank > count(bits >= high) throughout.
    middle = low + (high - low) // 2
    count = jnp.sum(_popcount(_pack(ordered_bits()[0] >= middle)))
    enough = count >= rank
    low, high = jnp.where(enough, middle, low), jnp.where(enough, high, middle)
  return low


def _kth_largest(magnitude, rank):
  """The `rank`-th largest of nonnegative floats, by bisection on their bits.

  For floats >= 0 the integer view of the bits is increasing, so 8·itemsize
  halvings of the integer range find it exactly (a NaN counts as above
  every number; the result is then inf): 32 passes over a float32 sample,
  where XLA:CPU's sort or top-k of 64k entries takes ~50 ms.
  """
  bits, infinity = _as_ordered_bits(magnitude)
  return lax.bitcast_convert_type(
      _kth_largest_bits(bits, rank, infinity + 1), magnitude.dtype)


def _pack(flags):
  """Bit j of word w is `flags[32 w + j]`; the last word is padded with 0s.

  One pass over `flags` (a boolean expression, fused by XLA), d/32 words out.
  """
  size = flags.shape[0]
  whole = size // _WORD * _WORD
  bits = jnp.left_shift(jnp.uint32(1), jnp.arange(_WORD, dtype=jnp.uint32))

  def pack(part):
    return jnp.sum(jnp.where(part, bits[: part.shape[-1]], jnp.uint32(0)),
                   axis=-1, dtype=jnp.uint32)  # distinct bits: an or

  words = pack(flags[:whole].reshape(-1, _WORD))
  if whole < size:
    words = jnp.append(words, pack(flags[whole:]))
  return words


def _popcount(words):
  return lax.population_count(words).astype(jnp.int32)


def _set_bit(words, rank):
  """Position (uint32) of the `rank`-th (from 0) set bit of each word.

  A binary search on the popcounts of the lower bits; where a word has
  `rank` set bits or fewer, the result is 31.
  """
  bit = jnp.zeros(words.shape, jnp.uint32)
  for step in (16, 8, 4, 2, 1):
    below = _popcount(words & ((jnp.uint32(1) << (bit + step)) - 1))
    bit = jnp.where(below <= rank, bit + step, bit)
  return bit


def _compact(words, capacity):
  """Positions of the first `capacity` set bits of `words`, and their count.

  Slot s holds the s-th set bit in ascending order of position: its word is
  the last whose exclusive prefix count of set bits is <= s (a scatter of
  the d/32 prefix counts, then a prefix sum over the slots), its bit the
  (s - that count)-th set bit of the word. Slots past the count hold
  garbage; the caller masks them.
  """
  counts = _popcount(words)
  inclusive = jnp.cumsum(counts)
  exclusive = inclusive - counts
  word_of_slot = jnp.cumsum(
      jnp.zeros(capacity, jnp.int32).at[exclusive].add(1, mode="drop")
  ) - 1
  rank = jnp.arange(capacity, dtype=jnp.int32) - exclusive[word_of_slot]
  bit = _set_bit(words[word_of_slot], rank)
  return word_of_slot * _WORD + bit.astype(jnp.int32), inclusive[-1]


def _first_set_bits(words, count):
  """`words` with only their first `count` set bits (in position order)."""
  counts = _popcount(words)
  exclusive = jnp.cumsum(counts) - counts
  keep = jnp.clip(count - exclusive, 0, counts)  # set bits kept per word
  last = _set_bit(words, keep - 1)  # the last bit kept, where keep > 0
  # 2 << 31 is 0 in uint32, so the mask is then all ones.
  below_last = (jnp.uint32(2) << last) - 1
  return jnp.where(keep > 0, words & below_last, jnp.uint32(0))


def _top_k_by_bisection(vector, k):
  """The exact top k (ascending indices, ties to the lower index), no sort.

  The k-th largest magnitude by bisection (8·itemsize read-only passes over
  `vector`), then the entries above it and the first ties, compacted
  through words of flags: no buffer of the vector's size is needed. In the
  vector's own dtype, where |v| is exact.
  """
  if not jnp.issubdtype(vector.dtype, jnp.floating):
    vector = _magnitude(vector)
  kth = _kth_largest_magnitude_bits(vector, k)
  bits, _ = _as_ordered_bits(jnp.abs(vector))
  above = _pack(bits > kth)
  ties = _first_set_bits(_pack(bits == kth), k - jnp.sum(_popcount(above)))
  return _compact(above | ties, k)[0]


def _top_k_from_sampled_threshold(magnitude, k, key, plan):
  """Top-k indices among the entries above a sampled threshold.

  Returns the indices (ascending) and whether they are certainly the exact
  top k: that is when at least k entries pass the threshold (so the k
  largest all pass) and no more than the buffer holds.
  """
  size = magnitude.shape[0]
  bits, infinity = _as_ordered_bits(magnitude)
  sample = bits[jax.random.randint(key, (plan.samples,), 0, size)]
  threshold = _kth_largest_bits(sample, plan.rank, infinity + 2)
  positions, count = _compact(_pack(bits >= threshold), plan.buffer)
  is_exact = (count >= k) & (count <= plan.buffer)
  # The exact k-th largest of the candidates; padding reads as -1.
  candidates = jnp.where(
      jnp.arange(plan.buffer) < count,
      bits[jnp.clip(positions, 0, size - 1)],
      -1,
  )
  kth = _kth_largest_bits(candidates, k, infinity + 2)
  above, tied = candidates > kth, candidates == kth
  # Ties go to the lower index, as in `lax.top_k`: positions are ascending.
  taken = above | (
      tied & (jnp.cumsum(tied, dtype=jnp.int32) <= k - jnp.sum(above))
  )
  destination = jnp.where(taken, jnp.cumsum(taken, dtype=jnp.int32) - 1, k)
  indices = jnp.zeros(k, jnp.int32).at[destination].set(
      positions, mode="drop"
  )
  return indices, is_exact


def _top_k_sampled(vector, k, key):
  """Exact top-k indices, usually found among sampled-threshold candidates."""
  plan = _sampled_plan(vector.shape[0], k)
  if plan is None:
    return lax.top_k(_magnitude(vector), k)[1].astype(jnp.int32)
  indices, is_exact = _top_k_from_sampled_threshold(
      _magnitude(vector), k, key, plan
  )
  # The fallback takes `vector`, not its magnitude (an operand of the
  # conditional is materialized), and needs no buffer of its size.
  return lax.cond(
      is_exact, lambda _: indices, lambda v: _top_k_by_bisection(v, k), vector
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
    `k (1 + 4/√h)` entries pass, give or take `k/√h`. One pass over the
    vector packs a 32-bit word of flags (entry >= threshold) per 32
    entries; the candidates are compacted from the words into a static
    buffer of `k (1 + 8/√h)` (prefix sums of the words' popcounts, then
    the rank of each bit in its word), and the exact k-th largest of the
    buffer (again by bisection) picks the k sent, with no top-k or sort.
    When fewer than k entries pass, or more than the buffer holds (each a
    ~4-sigma event), it falls back under `jax.lax.cond` to an exact top k
    by bisection over the whole vector (32 read-only passes, no sort). So
    the result is always the exact top k: the same set as `'exact'`, ties
    to the lower index as in `lax.top_k`, in ascending order of index
    rather than of magnitude; only the time differs (~1.5 passes over the
    vector, against a sort of it). Where `h < 64`, or the sample or the
    buffer would exceed 1/8 of the vector, `'exact'` is used.

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
  if k == vector.shape[0]:
    return jnp.arange(k, dtype=jnp.int32)
  if selection == "approx":
    return lax.approx_max_k(
        _magnitude(vector), k, recall_target=0.95
    )[1].astype(jnp.int32)
  if selection == "sampled":
    key = jax.random.key(0) if key is None else key
    return _top_k_sampled(vector, k, key)
  return lax.top_k(_magnitude(vector), k)[1].astype(jnp.int32)
