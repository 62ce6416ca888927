"""The exchange step shared by GMC and DGC: send the top entries, sum them.

Each worker (a device along `axis_name` of `jax.pmap` or `jax.shard_map`)
sends only the `density · d` largest-magnitude entries of its vector, as
(int32 index, value) pairs exchanged with `jax.lax.all_gather`; what it does
not send stays in a per-worker error-feedback memory and is sent later.
This module also holds what :func:`scale_by_gmc` and :func:`scale_by_dgc`
check and set up in the same way: their arguments and their zero state.
"""

import functools
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
_MAX_ENTRIES = 2**31 - 1  # int32 indices must address every entry


class Exchanged(NamedTuple):
  """The result of :func:`exchange_top_k` on one worker."""

  total: Any  # the sum over workers of what each sent
  memory: Any  # what this worker did not send (v minus what it sent)
  sent_index: jax.Array | None  # flat positions sent, None when all are
  bytes_sent: jax.Array  # shape=(), float32; the size of this worker's message


def exchange_top_k(
    tree: Any,
    count: jax.Array,
    *,
    density: float,
    axis_name: AxisName,
    per_layer: bool,
    selection: str,
    exchange: str,
) -> Exchanged:
  r"""Sends the top entries of each worker's `tree`, sums what all sent.

  With worker :math:`k`'s vector :math:`v_k` (the leaves of `tree`,
  flattened into one vector of their common dtype):

  .. math::
    s_k = \operatorname{top}_k(v_k), \qquad
    \text{total} = \textstyle\sum_k s_k, \qquad
    \text{memory} = v_k - s_k

  where :math:`\operatorname{top}_k` keeps the `num_selected(d, density)`
  entries of largest magnitude over the whole pytree (or of each leaf, with
  `per_layer=True`) and zeros the rest. With `exchange='sparse'` each worker
  sends its :math:`s_k` as int32 indices and values; `jax.lax.all_gather`
  delivers all of them to every worker, which adds them up in worker order,
  so the total is bitwise identical on all workers. `'dense'` is a `psum` of
  the sparsified vectors; `'auto'` takes the smaller message.

  Args:
    tree: this worker's :math:`v_k`, a pytree of float arrays.
    count: the step number, which seeds `'sampled'` selection.
    density: fraction of the entries each worker sends, in (0, 1].
    axis_name: the `pmap`/`shard_map` axis (or axes) indexing the workers.
    per_layer: select `density` of each leaf instead of the whole pytree.
    selection: top-k algorithm, see :func:`top_k_by_magnitude`.
    exchange: `'auto'`, `'sparse'` or `'dense'`.

  Returns:
    An :class:`Exchanged`: the total and the memory as pytrees like `tree`,
    the flat positions this worker sent (None when it sent all of them) and
    the size of its message in bytes (`k·(4 + itemsize)` sparse,
    `d·itemsize` dense).

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
    return Exchanged(tree, tree, None, jnp.zeros([], jnp.float32))
  flat, leaves, treedef = _flatten(tree)
  if flat.shape[0] > _MAX_ENTRIES:
    raise ValueError(
        f"{flat.shape[0]} entries cannot be addressed by int32 indices; use "
        "per_layer=True with leaves below 2**31 entries"
    )
  key = jax.random.fold_in(jax.random.key(0), count)
  sent_index = _select(flat, leaves, density, per_layer, selection, key)
  if sent_index is None:
    memory = jnp.zeros_like(flat)
  else:
    memory = flat.at[sent_index].set(0, unique_indices=True)
  total, bytes_sent = _sum_over_workers(flat, sent_index, axis_name, exchange)
  return Exchanged(
      total=_unflatten(total, leaves, treedef),
      memory=_unflatten(memory, leaves, treedef),
      sent_index=sent_index,
      bytes_sent=jnp.asarray(bytes_sent, jnp.float32),
  )


def zero_sent(tree, sent_index):
  """Zeros the entries of `tree` at the flat positions that were sent."""
  if sent_index is None:
    return jax.tree.map(jnp.zeros_like, tree)
  flat, leaves, treedef = _flatten(tree)
  return _unflatten(
      flat.at[sent_index].set(0, unique_indices=True), leaves, treedef
  )


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


def _sum_over_workers(flat, sent_index, axis_name, exchange):
  """The sum over workers of what each sent, and this worker's bytes sent."""
  size = flat.shape[0]
  num_sent = size if sent_index is None else sent_index.shape[0]
  value_bytes = flat.dtype.itemsize
  sparse_bytes = num_sent * (_INDEX_BYTES + value_bytes)
  dense_bytes = size * value_bytes
  if exchange == "auto":
    exchange = "sparse" if sparse_bytes < dense_bytes else "dense"
  if exchange == "dense":
    return _dense_sum(flat, sent_index, axis_name), dense_bytes
  if sent_index is None:
    index = jnp.arange(size, dtype=jnp.int32)
  else:
    index = sent_index
  return _sparse_sum(flat, index, axis_name), sparse_bytes


def _dense_sum(flat, sent_index, axis_name):
  """`psum` of the vector that is `flat` at `sent_index` and zero elsewhere."""
  if sent_index is None:
    sent = flat
  else:
    sent = jnp.zeros_like(flat).at[sent_index].set(
        flat[sent_index], unique_indices=True
    )
  return lax.psum(sent, axis_name)


def _sparse_sum(flat, index, axis_name):
  """All-gathers every worker's (index, value) message and adds them up."""
  all_index, all_values = lax.all_gather(
      (index, flat[index]), axis_name, to="invarying"
  )

  # One scatter per worker, in worker order: within a worker the indices
  # are distinct, so the sum is deterministic and identical on all workers.
  def add_worker(i, total):
    return total.at[all_index[i]].add(all_values[i], unique_indices=True)

  return lax.fori_loop(
      0, all_index.shape[0], add_worker, jnp.zeros(flat.shape, flat.dtype)
  )


def _flatten(tree):
  leaves, treedef = jax.tree.flatten(tree)
  dtype = jnp.result_type(*leaves)
  flat = jnp.concatenate([leaf.reshape(-1).astype(dtype) for leaf in leaves])
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
    density: float,
    axis_name: AxisName | None,
    per_layer: bool,
    selection: str,
    exchange: str,
):
  """Checks the arguments; returns `exchange_top_k` bound to them.

  Raises `ValueError` naming the first invalid argument, when GMC or DGC is
  built rather than at the first step.

  Returns:
    A function `(tree, count) -> Exchanged`, see :func:`exchange_top_k`.
  """
  _check_exchange_args(density, axis_name, selection, exchange)
  return functools.partial(
      exchange_top_k,
      density=density,
      axis_name=axis_name,
      per_layer=per_layer,
      selection=selection,
      exchange=exchange,
  )


def _check_exchange_args(density, axis_name, selection, exchange):
  if callable(density) or isinstance(density, jax.Array):
    raise ValueError(
        "density must be a Python number: it fixes the (static) message size"
    )
  _checks.check_range("density", density, 0.0, 1.0, low_inclusive=False)
  if not axis_name:
    raise ValueError(
        "axis_name is required: the pmap/shard_map axis that indexes the"
        " workers"
    )
  _top_k.check_selection(selection)
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")


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
