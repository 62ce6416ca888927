"""The exchange step shared by GMC and DGC: send the top entries, sum them.

Each worker (a device along `axis_name` of `jax.pmap` or `jax.shard_map`)
sends only the `density · d` largest-magnitude entries of its vector, as
(int32 index, value) pairs exchanged with `jax.lax.all_gather`; what it does
not send stays in a per-worker error-feedback memory and is sent later.
This module also holds what :func:`scale_by_gmc` and :func:`scale_by_dgc`
check and set up in the same way: their arguments and their zero state.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sngm_optax import _checks
from sngm_optax import _top_k

AxisName = str | tuple[str, ...]

EXCHANGES = ("auto", "sparse", "dense")

_INDEX_BYTES = 4  # int32 indices
_MAX_UNROLLED_WORKERS = 64  # beyond, the K scatters run in a loop
_MAX_ENTRIES = 2**31 - 1  # int32 indices must address every entry
VALUE_DTYPES = ("float32", "bfloat16", "float16")
# A density schedule's float32 value may sit just above the level it names.
_LEVEL_RTOL = 1e-5
# Levels for a density schedule given without `density_levels`: 1, 1/2, 1/4...
_DEFAULT_LEVELS = tuple(2.0**-j for j in range(24, -1, -1))


class Exchanged(NamedTuple):
  """The result of :func:`exchange_top_k` on one worker."""

  total: Any  # the sum over workers of what each sent
  memory: Any  # what this worker did not send (v minus what it sent)
  sent_index: jax.Array | None  # flat positions sent; None when all were
  sent_mask: jax.Array | None  # with a density schedule: True where sent
  bytes_sent: jax.Array  # shape=(), float32; the size of this worker's message


def exchange_top_k(
    tree: Any,
    count: jax.Array,
    *,
    density: float | optax.Schedule,
    axis_name: AxisName,
    per_layer: bool,
    selection: str,
    exchange: str,
    density_levels: tuple[float, ...] | None = None,
    value_dtype: Any | None = None,
) -> Exchanged:
  r"""Sends the top entries of each worker's `tree`, sums what all sent.

  With worker :math:`k`'s vector :math:`v_k` (the leaves of `tree`,
  flattened into one vector of their common dtype) and :math:`q` the cast of
  the sent values to `value_dtype` and back:

  .. math::
    s_k = q(\operatorname{top}_k(v_k)), \qquad
    \text{total} = \textstyle\sum_k s_k, \qquad
    \text{memory} = v_k - s_k

  where :math:`\operatorname{top}_k` keeps the `num_selected(d, density)`
  entries of largest magnitude over the whole pytree (or of each leaf, with
  `per_layer=True`) and zeros the rest. Rounding to `value_dtype` is error
  feedback too: what the 16-bit value missed stays in the memory, so
  `total` and `memory` still add up to exactly `v` on each worker. With
  `exchange='sparse'` each worker sends its :math:`s_k` as int32 indices and
  values; `jax.lax.all_gather` delivers all of them to every worker, which
  adds them up in worker order, so the total is bitwise identical on all
  workers. `'dense'` is a `psum` of the sparsified vectors; `'auto'` takes
  the smaller message.

  With a schedule as `density`, the density in force at step `count` is the
  smallest of `density_levels` at or above `density(count)` (the largest
  level above them all); each distinct top-k size is one static branch of a
  `jax.lax.switch`, so the step compiles once for all of them.

  Args:
    tree: this worker's :math:`v_k`, a pytree of float arrays.
    count: the step number: the argument of a `density` schedule, and the
      seed of `'sampled'` selection.
    density: fraction of the entries each worker sends, in (0, 1], or an
      `optax.Schedule` of the step.
    axis_name: the `pmap`/`shard_map` axis (or axes) indexing the workers.
    per_layer: select `density` of each leaf instead of the whole pytree.
    selection: top-k algorithm, see :func:`top_k_by_magnitude`.
    exchange: `'auto'`, `'sparse'` or `'dense'`.
    density_levels: with a `density` schedule, the static densities sent at,
      in (0, 1].
    value_dtype: dtype of the values sent (default: that of `tree`).

  Returns:
    An :class:`Exchanged`: the total and the memory as pytrees like `tree`,
    which flat positions this worker sent, and the size of its message in
    bytes (`k·(4 + itemsize)` sparse, `d·itemsize` dense, with the itemsize
    of `value_dtype`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sngm_optax._sparse_exchange import exchange_top_k
    >>> n = jax.local_device_count()
    >>> v = jnp.tile(jnp.array([4.0, -1.0, 2.0, 0.5]), (n, 1))
    >>> step = jax.pmap(lambda v: exchange_top_k(
    ...     v, 0, density=0.5, axis_name='i', per_layer=False,
    ...     selection='exact', exchange='sparse'), axis_name='i')
    >>> out = step(v)
    >>> out.total[0] / n
    Array([4., 0., 2., 0.], dtype=float32)
    >>> out.memory[0]
    Array([ 0. , -1. ,  0. ,  0.5], dtype=float32)
    >>> out.bytes_sent[0]  # 2 int32 indices and 2 float32 values
    Array(16., dtype=float32)
  """
  if not jax.tree.leaves(tree):
    return Exchanged(tree, tree, None, None, jnp.zeros([], jnp.float32))
  flat, leaves, treedef = _flatten(tree)
  if flat.shape[0] > _MAX_ENTRIES:
    raise ValueError(
        f"{flat.shape[0]} entries cannot be addressed by int32 indices; use "
        "per_layer=True with leaves below 2**31 entries"
    )
  value_dtype = flat.dtype if value_dtype is None else value_dtype
  key = jax.random.fold_in(jax.random.key(0), count)
  exchange_at = functools.partial(
      _exchange_at, leaves=leaves, per_layer=per_layer, selection=selection,
      key=key, axis_name=axis_name, exchange=exchange,
      value_dtype=value_dtype,
  )
  sent_mask = None
  if callable(density):
    total, memory, sent_mask, bytes_sent = _exchange_at_scheduled_density(
        flat, count, density, density_levels, leaves, per_layer, exchange_at
    )
    sent_index = None
  else:
    total, memory, sent_index, bytes_sent = exchange_at(flat, density=density)
  return Exchanged(
      total=_unflatten(total, leaves, treedef),
      memory=_unflatten(memory, leaves, treedef),
      sent_index=sent_index,
      sent_mask=sent_mask,
      bytes_sent=jnp.asarray(bytes_sent, jnp.float32),
  )


def _exchange_at(flat, *, density, leaves, per_layer, selection, key,
                 axis_name, exchange, value_dtype):
  """Total, memory, sent positions and bytes at one static density."""
  sent_index = _select(flat, leaves, density, per_layer, selection, key)
  values = flat if sent_index is None else flat[sent_index]
  sent = _round_to(values, value_dtype)
  if sent_index is None:
    memory = flat - sent
  else:
    memory = flat.at[sent_index].set(values - sent, unique_indices=True)
  total, bytes_sent = _sum_over_workers(
      flat, sent_index, sent, value_dtype, axis_name, exchange
  )
  return total, memory, sent_index, bytes_sent


def _round_to(values, value_dtype):
  """`values` as sent in `value_dtype`, back in their own dtype.

  float16 saturates at its largest finite value instead of overflowing to
  inf; the rest of a larger entry stays in the memory.
  """
  if jnp.dtype(value_dtype) == values.dtype:
    return values
  largest = float(jnp.finfo(value_dtype).max)
  if largest < float(jnp.finfo(values.dtype).max):
    values = jnp.clip(values, -largest, largest)
  return values.astype(value_dtype).astype(values.dtype)


def _exchange_at_scheduled_density(flat, count, density, density_levels,
                                   leaves, per_layer, exchange_at):
  """`exchange_at` under `lax.switch` over the static sizes of the levels."""
  sizes, branch_of_level = [], []
  for level in density_levels:  # sorted ascending, see _check_density
    key = _selected_sizes(leaves, level, per_layer)
    if not sizes or sizes[-1][0] != key:
      sizes.append((key, level))
    branch_of_level.append(len(sizes) - 1)
  # The smallest level at or above density(count), with a relative
  # tolerance for the float32 rounding of the schedule's value.
  wanted = jnp.asarray(density(count), jnp.float32) * (1 - _LEVEL_RTOL)
  level = jnp.sum(jnp.asarray(density_levels[:-1], jnp.float32) < wanted)
  branch = jnp.asarray(branch_of_level, jnp.int32)[level]

  def at_level(level_density):
    def run(flat):
      total, memory, sent_index, bytes_sent = exchange_at(
          flat, density=level_density
      )
      if sent_index is None:
        mask = jnp.ones(flat.shape, bool)
      else:
        mask = jnp.zeros(flat.shape, bool).at[sent_index].set(
            True, unique_indices=True
        )
      return total, memory, mask, jnp.asarray(bytes_sent, jnp.float32)
    return run

  return lax.switch(branch, [at_level(lvl) for _, lvl in sizes], flat)


def _selected_sizes(leaves, density, per_layer):
  """The static top-k size(s) at `density`: what makes a distinct branch."""
  if per_layer:
    return tuple(_top_k.num_selected(x.size, density) for x in leaves)
  return _top_k.num_selected(sum(x.size for x in leaves), density)


def zero_sent(tree, exchanged: Exchanged):
  """Zeros the entries of `tree` at the flat positions that were sent."""
  if exchanged.sent_index is None and exchanged.sent_mask is None:
    return jax.tree.map(jnp.zeros_like, tree)
  if exchanged.sent_mask is not None:
    flat, leaves, treedef = _flatten(tree)
    flat = jnp.where(exchanged.sent_mask, 0, flat)
    return _unflatten(flat, leaves, treedef)
  # A bit per entry, set where sent, read leaf by leaf: no pass to flatten
  # `tree` and back (only the bitmap, d/32 words, is indexed).
  index = exchanged.sent_index
  leaves, treedef = jax.tree.flatten(tree)
  size = sum(leaf.size for leaf in leaves)
  words = jnp.zeros(-(-size // 32), jnp.uint32).at[index >> 5].add(
      jnp.uint32(1) << (index & 31).astype(jnp.uint32)
  )  # distinct indices: distinct bits, so the sum is their bitwise or
  out, offset = [], 0
  for leaf in leaves:
    position = offset + lax.iota(jnp.int32, leaf.size)
    is_sent = (words[position >> 5] >> (position & 31).astype(jnp.uint32)) & 1
    out.append(jnp.where(is_sent.reshape(leaf.shape) == 1,
                         jnp.zeros((), leaf.dtype), leaf))
    offset += leaf.size
  return jax.tree.unflatten(treedef, out)


def _select(flat, leaves, density, per_layer, selection, key):
  """Flat int32 positions of the entries to send, or None for all of them."""
  size = flat.shape[0]
  if not per_layer:
    k = _top_k.num_selected(size, density)
    if k == size:
      return None
    return _top_k.top_k_by_magnitude(flat, k, selection, key)
  if all(
      leaf.size == _top_k.num_selected(leaf.size, density) for leaf in leaves
  ):
    return None
  chunks, offset = [], 0
  for i, leaf in enumerate(leaves):
    k = _top_k.num_selected(leaf.size, density)
    chunk = _top_k.top_k_by_magnitude(
        leaf.reshape(-1), k, selection, jax.random.fold_in(key, i)
    )
    chunks.append(chunk + offset)
    offset += leaf.size
  return jnp.concatenate(chunks)


def _sum_over_workers(flat, sent_index, sent, value_dtype, axis_name,
                      exchange):
  """The sum over workers of what each sent, and this worker's bytes sent."""
  size = flat.shape[0]
  value_bytes = jnp.dtype(value_dtype).itemsize
  num_sent = size if sent_index is None else sent_index.shape[0]
  sparse_bytes = num_sent * (_INDEX_BYTES + value_bytes)
  dense_bytes = size * value_bytes
  if exchange == "auto":
    exchange = "sparse" if sparse_bytes < dense_bytes else "dense"
  if exchange == "dense":
    if sent_index is not None:
      sent = jnp.zeros_like(flat).at[sent_index].set(sent, unique_indices=True)
    return lax.psum(sent, axis_name), dense_bytes
  if sent_index is None:
    index = jnp.arange(size, dtype=jnp.int32)
  else:
    index = sent_index
  return _sparse_sum(index, sent, value_dtype, axis_name, size), sparse_bytes


def _sparse_sum(index, sent, value_dtype, axis_name, size):
  """All-gathers every worker's (index, value) message and adds them up."""
  # The values travel in value_dtype; `sent` is already rounded to it.
  all_index, all_values = lax.all_gather(
      (index, sent.astype(value_dtype)), axis_name, to="invarying"
  )
  all_values = all_values.astype(sent.dtype)
  # One scatter per worker, in worker order: within a worker the indices
  # are distinct, so the sum is deterministic and identical on all workers
  # on every backend (one scatter-add of all K·k entries would leave the
  # order of the additions to the backend: atomics on a GPU).
  def add_worker(i, total):
    return total.at[all_index[i]].add(all_values[i], unique_indices=True)

  total = jnp.zeros((size,), sent.dtype)
  num_workers = all_index.shape[0]
  if num_workers > _MAX_UNROLLED_WORKERS:
    return lax.fori_loop(0, num_workers, add_worker, total)
  # Unrolled, the scatters work in place in the total; a loop would carry
  # it in a buffer of its own (16 MB more for a 4M tree, which XLA:CPU
  # maps afresh at every step once its temporaries pass 32 MiB).
  for i in range(num_workers):
    total = add_worker(i, total)
  return total


def _flatten(tree):
  """The leaves of `tree` in one vector of their common dtype."""
  leaves, treedef = jax.tree.flatten(tree)
  dtype = jnp.result_type(*leaves)
  # Each leaf written in place into one buffer: XLA:CPU computes a leaf
  # given as an expression (v = e + ...) straight into it, where a
  # concatenate would first materialize every leaf (a pass and a
  # buffer of the vector's size more).
  flat = jnp.zeros(sum(leaf.size for leaf in leaves), dtype)
  offset = 0
  for leaf in leaves:
    flat = lax.dynamic_update_slice(
        flat, leaf.reshape(-1).astype(dtype), (offset,)
    )
    offset += leaf.size
  return flat, leaves, treedef


def _unflatten(flat, leaves, treedef):
  parts, offset = [], 0
  for leaf in leaves:
    parts.append(
        flat[offset : offset + leaf.size].reshape(leaf.shape).astype(leaf.dtype)
    )
    offset += leaf.size
  return jax.tree.unflatten(treedef, parts)


def sparse_exchange_step(
    density: float | optax.Schedule,
    axis_name: AxisName | None,
    per_layer: bool,
    selection: str,
    exchange: str,
    density_levels: Any = None,
    value_dtype: Any = None,
):
  """Checks the arguments; returns `exchange_top_k` bound to them.

  Raises `ValueError` naming the first invalid argument, when GMC or DGC is
  built rather than at the first step.

  Returns:
    A function `(tree, count) -> Exchanged`, see :func:`exchange_top_k`.
  """
  density_levels = _check_density(density, density_levels)
  _check_exchange_args(axis_name, selection, exchange)
  return functools.partial(
      exchange_top_k,
      density=density,
      axis_name=axis_name,
      per_layer=per_layer,
      selection=selection,
      exchange=exchange,
      density_levels=density_levels,
      value_dtype=check_value_dtype(value_dtype),
  )


def _check_density(density, density_levels):
  """The sorted levels of a density schedule (None for a fixed density)."""
  if isinstance(density, jax.Array):
    raise ValueError(
        "density must be a Python number or an optax.Schedule: it fixes the "
        "(static) message size; with optax.inject_hyperparams list it in "
        "static_args"
    )
  if not callable(density):
    _checks.check_range("density", density, 0.0, 1.0, low_inclusive=False)
    if density_levels is not None:
      raise ValueError(
          "density_levels is only for a density schedule; density is the "
          f"fixed {density!r}"
      )
    return None
  if density_levels is None:
    return _DEFAULT_LEVELS
  try:
    levels = sorted({float(level) for level in density_levels})
  except (TypeError, ValueError):
    raise ValueError(
        "density_levels must be a sequence of numbers in (0, 1], got "
        f"{density_levels!r}"
    ) from None
  if not levels:
    raise ValueError("density_levels must hold at least one density")
  for level in levels:
    _checks.check_range(
        "density_levels", level, 0.0, 1.0, low_inclusive=False
    )
  return tuple(levels)


def check_value_dtype(value_dtype):
  """The canonical `value_dtype` (None: the vector's own dtype)."""
  if value_dtype is None:
    return None
  try:
    name = jnp.dtype(value_dtype).name
  except TypeError:
    name = None
  if name not in VALUE_DTYPES:
    raise ValueError(
        f"value_dtype must be one of {VALUE_DTYPES} or None, got "
        f"{value_dtype!r}"
    )
  return jnp.dtype(name)


def _check_exchange_args(axis_name, selection, exchange):
  if not axis_name:
    raise ValueError(
        "axis_name is required: the pmap/shard_map axis that indexes the"
        " workers"
    )
  _top_k.check_selection(selection)
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")


def clip_worker_gradient(
    max_norm: float | None, axis_name: AxisName | None
) -> tuple[optax.GradientTransformation, ...]:
  r"""DGC's local gradient clipping: each worker clips its own gradient.

  With :math:`K` workers, worker :math:`k`'s gradient is scaled to global
  norm at most :math:`c / \sqrt{K}`, so that the sum of :math:`K`
  independent clipped gradients has norm about :math:`c`:
  :math:`g_k \leftarrow g_k \min(1, c / (\sqrt{K}\, \lVert g_k \rVert))`.
  Returns a tuple to unpack into `optax.chain`: empty when `max_norm` is
  None (off), so the chain's state does not change.
  """
  if max_norm is None:
    return ()
  _checks.check_positive("local_clip_norm", max_norm)

  def update_fn(updates, state, params=None):
    del params
    limit = max_norm / math.sqrt(lax.axis_size(axis_name))
    return optax.clip_by_global_norm(limit).update(updates, state)

  return (optax.GradientTransformation(lambda params: optax.EmptyState(),
                                       update_fn),)


def init_exchange_state(state_type, params, accumulator_dtype, caller):
  """A zero `state_type`: int32 `count`, float32 `bytes_sent`, and zeros.

  Every other field of `state_type` (memory, momentum) is a pytree of zeros
  like `params`, in `accumulator_dtype` (by default that of the params).
  """
  _checks.check_float_params(params, caller)
  accumulators = {
      field: optax.tree.zeros_like(params, dtype=accumulator_dtype)
      for field in state_type._fields
      if field not in ("count", "bytes_sent")
  }
  return state_type(
      count=jnp.zeros([], jnp.int32),
      bytes_sent=jnp.zeros([], jnp.float32),
      **accumulators,
  )


def canonical_dtype(dtype: Any | None) -> Any | None:
  return None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)


def cast_like(tree, like):
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)
