"""Sparse communication for data-parallel SGD: GMC and the DGC baseline.

Each worker (a device along `axis_name` of `jax.pmap` or `jax.shard_map`)
sends only the `density · d` largest-magnitude entries of its update, as
(int32 index, value) pairs exchanged with `jax.lax.all_gather`; what it does
not send stays in a per-worker error-feedback memory and is sent later.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sngm_optax import _checks
from sngm_optax._sngm import MaskOrFn

AxisName = str | tuple[str, ...]

SELECTIONS = ("exact", "approx", "sampled")
EXCHANGES = ("auto", "sparse", "dense")

_INDEX_BYTES = 4  # int32 indices
_MAX_ENTRIES = 2**31 - 1  # int32 indices must address every entry

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
  if selection not in SELECTIONS:
    raise ValueError(
        f"selection must be one of {SELECTIONS}, got {selection!r}"
    )
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


class _Exchanged(NamedTuple):
  memory: Any  # what this worker did not send (v minus what it sent)
  total: Any  # the sum over workers of what each sent
  sent_index: jax.Array | None  # flat positions sent, None when all are
  bytes_sent: int


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


def _select(flat, leaves, density, per_layer, selection, key):
  """Flat int32 positions of the entries to send, or None for all of them."""
  size = flat.shape[0]
  if not per_layer:
    k = num_selected(size, density)
    if k == size:
      return None
    return top_k_by_magnitude(flat, k, selection, key)
  if all(leaf.size == num_selected(leaf.size, density) for leaf in leaves):
    return None
  chunks, offset = [], 0
  for i, leaf in enumerate(leaves):
    k = num_selected(leaf.size, density)
    chunk = top_k_by_magnitude(
        leaf.reshape(-1), k, selection, jax.random.fold_in(key, i)
    )
    chunks.append(chunk + offset)
    offset += leaf.size
  return jnp.concatenate(chunks)


def _sparse_all_reduce(
    tree, *, density, axis_name, per_layer, selection, exchange, key
) -> _Exchanged:
  """Sends the top entries of `tree`, sums what all workers sent."""
  if not jax.tree.leaves(tree):
    return _Exchanged(tree, tree, None, 0)
  flat, leaves, treedef = _flatten(tree)
  size = flat.shape[0]
  if size > _MAX_ENTRIES:
    raise ValueError(
        f"{size} entries cannot be addressed by int32 indices; use "
        "per_layer=True with leaves below 2**31 entries"
    )
  index = _select(flat, leaves, density, per_layer, selection, key)
  num_sent = size if index is None else index.shape[0]
  value_bytes = flat.dtype.itemsize
  sparse_bytes = num_sent * (_INDEX_BYTES + value_bytes)
  dense_bytes = size * value_bytes
  if exchange == "auto":
    exchange = "sparse" if sparse_bytes < dense_bytes else "dense"

  if index is None:
    sent, memory = flat, jnp.zeros_like(flat)
    index = jnp.arange(size, dtype=jnp.int32)
    sent_index = None
  else:
    sent = jnp.zeros_like(flat).at[index].set(flat[index], unique_indices=True)
    memory = flat.at[index].set(0, unique_indices=True)
    sent_index = index

  if exchange == "dense":
    total = lax.psum(sent, axis_name)
    nbytes = dense_bytes
  else:
    all_index, all_values = lax.all_gather(
        (index, flat[index]), axis_name, to="invarying"
    )

    # One scatter per worker, in worker order: within a worker the indices
    # are distinct, so the sum is deterministic and identical on all workers.
    def add_worker(i, total):
      return total.at[all_index[i]].add(all_values[i], unique_indices=True)

    total = lax.fori_loop(
        0, all_index.shape[0], add_worker, jnp.zeros(size, flat.dtype)
    )
    nbytes = sparse_bytes
  return _Exchanged(
      memory=_unflatten(memory, leaves, treedef),
      total=_unflatten(total, leaves, treedef),
      sent_index=sent_index,
      bytes_sent=nbytes,
  )


def _zero_sent(tree, sent_index):
  """Zeros the entries of `tree` at the flat positions that were sent."""
  if sent_index is None:
    return jax.tree.map(jnp.zeros_like, tree)
  flat, leaves, treedef = _flatten(tree)
  return _unflatten(
      flat.at[sent_index].set(0, unique_indices=True), leaves, treedef
  )


def _check_compression_args(density, axis_name, selection, exchange):
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
  if selection not in SELECTIONS:
    raise ValueError(
        f"selection must be one of {SELECTIONS}, got {selection!r}"
    )
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")


def _canonical_dtype(dtype):
  return None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)


def _cast_like(tree, like):
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


class ScaleByGmcState(NamedTuple):
  """State of :func:`scale_by_gmc`."""

  count: jax.Array  # shape=(), dtype=jnp.int32; seeds 'sampled' selection
  memory: optax.Updates  # e_k, this worker's unsent residual
  global_update: optax.Updates  # the previous output, identical on all workers
  bytes_sent: jax.Array  # shape=(), float32; this worker's last message size


def scale_by_gmc(
    momentum: float = 0.9,
    density: float = 0.01,
    axis_name: AxisName | None = None,
    per_layer: bool = False,
    selection: str = "exact",
    exchange: str = "auto",
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Global momentum compression of each worker's learning-rate scaled update.

  With :math:`K` workers along `axis_name`, worker :math:`k`'s incoming
  update :math:`u_k`, its memory :math:`e_k` and the previous output
  :math:`U_{t-1}` (the same on every worker):

  .. math::
    v_k &= e_k + \tfrac{1}{K}\left(u_k + \beta\, U_{t-1}\right) \\
    s_k &= \operatorname{top}_k(v_k), \qquad e_k \leftarrow v_k - s_k \\
    U_t &= \textstyle\sum_k s_k

  where :math:`\operatorname{top}_k` keeps the `num_selected(d, density)`
  entries of largest magnitude over the whole pytree (or of each leaf, with
  `per_layer=True`) and zeros the rest. Each worker sends its :math:`s_k` as
  int32 indices and values; `jax.lax.all_gather` delivers all of them to
  every worker, which adds them up in worker order, so :math:`U_t` is
  bitwise identical on all workers. Nothing is lost: :math:`s_k + e_k = v_k`
  exactly. With `density=1` the output is heavy-ball momentum of the mean
  update, :math:`U_t = \bar u + \beta U_{t-1}`.

  Place it after the learning rate (as :func:`gmc` does): the memory and the
  momentum then hold learning-rate scaled quantities, as in the paper, where
  :math:`-U_t = D_t = w_{t-1} - w_t`.

  Args:
    momentum: :math:`\beta`, in [0, 1).
    density: fraction of the entries each worker sends, in (0, 1]; a Python
      number (the message size is static).
    axis_name: the `pmap`/`shard_map` axis (or axes) indexing the workers.
    per_layer: select `density` of each leaf instead of `density` of the
      whole pytree.
    selection: top-k algorithm, see :func:`top_k_by_magnitude`.
    exchange: `'sparse'` (all-gather of indices and values), `'dense'`
      (`psum` of the sparsified dense update) or `'auto'`: sparse when its
      message, `k·(4 + itemsize)` bytes, is smaller than the dense one,
      `d·itemsize` (i.e. density below about 1/2 in float32).
    accumulator_dtype: dtype of the memory and of the previous update; by
      default that of the params.

  Returns:
    An `optax.GradientTransformationExtraArgs`. Its state reports this
    worker's message size of the last step under `bytes_sent`
    (`optax.tree.get(state, 'bytes_sent')`).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import scale_by_gmc
    >>> tx = scale_by_gmc(momentum=0.9, density=0.5, axis_name='i')
    >>> n = jax.local_device_count()
    >>> updates = jnp.tile(jnp.array([4.0, -1.0, 2.0, 0.5]), (n, 1))
    >>> step = jax.pmap(lambda u: tx.update(u, tx.init(u)), axis_name='i')
    >>> out, state = step(updates)
    >>> out[0]
    Array([4., 0., 2., 0.], dtype=float32)
    >>> state.memory[0] * n
    Array([ 0. , -1. ,  0. ,  0.5], dtype=float32)

  References:
    Xie, Zhao, Li, Wang, Li, Chen, `Global Momentum Compression for Sparse
    Communication in Distributed SGD <https://arxiv.org/abs/1905.12948>`_,
    2019
  """
  _checks.check_momentum("momentum", momentum)
  _check_compression_args(density, axis_name, selection, exchange)
  accumulator_dtype = _canonical_dtype(accumulator_dtype)

  def init_fn(params):
    _checks.check_float_params(params, "scale_by_gmc")
    return ScaleByGmcState(
        count=jnp.zeros([], jnp.int32),
        memory=optax.tree.zeros_like(params, dtype=accumulator_dtype),
        global_update=optax.tree.zeros_like(params, dtype=accumulator_dtype),
        bytes_sent=jnp.zeros([], jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.check_params_match(updates, params, "scale_by_gmc")
    num_workers = lax.axis_size(axis_name)
    v = jax.tree.map(
        lambda e, u, previous: e + (u + momentum * previous) / num_workers,
        state.memory,
        updates,
        state.global_update,
    )
    exchanged = _sparse_all_reduce(
        v,
        density=density,
        axis_name=axis_name,
        per_layer=per_layer,
        selection=selection,
        exchange=exchange,
        key=jax.random.fold_in(jax.random.key(0), state.count),
    )
    new_state = ScaleByGmcState(
        count=optax.safe_increment(state.count),
        memory=_cast_like(exchanged.memory, state.memory),
        global_update=_cast_like(exchanged.total, state.global_update),
        bytes_sent=jnp.asarray(exchanged.bytes_sent, jnp.float32),
    )
    return _cast_like(exchanged.total, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gmc(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    density: float = 0.01,
    axis_name: AxisName | None = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: MaskOrFn = None,
    per_layer: bool = False,
    selection: str = "exact",
    exchange: str = "auto",
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GMC: data-parallel momentum SGD that sends ~`density` of each update.

  Call `update` inside `jax.pmap` or `jax.shard_map` with each worker's own
  mini-batch gradient :math:`g_k` (not averaged); with :math:`K` workers,
  memory :math:`e_k` and the previous global update :math:`D_{t-1}`:

  .. math::
    v_k &= e_k + \eta_t (g_k + \lambda w) / K + (\beta / K)\, D_{t-1} \\
    s_k &= \operatorname{top}_k(v_k), \qquad e_k \leftarrow v_k - s_k \\
    D_t &= \textstyle\sum_k s_k, \qquad w \leftarrow w - D_t

  The returned update is :math:`-D_t`: like `optax.sgd`, it already
  includes the learning rate and the sign, so apply it with
  `optax.apply_updates` and do not chain a learning rate after it. The
  learning rate is applied before compression because the memory and the
  global momentum hold learning-rate scaled quantities. With `density=1` GMC
  is momentum SGD on the averaged gradient, :math:`D_t = \eta_t \bar g +
  \beta D_{t-1}`: `optax.sgd(learning_rate, momentum)` for a constant rate,
  and `optax.chain(optax.scale_by_learning_rate(lr), optax.trace(momentum))`
  for a schedule.

  The memory is per worker: under `jax.pmap` that is automatic; under
  `jax.shard_map` wrap the optimizer in :func:`per_device_state` and pass
  its state with `PartitionSpec(axis_name)`. With `shard_map`'s default
  `check_vma=True`, take the gradient at
  `jax.lax.pcast(params, axis_name, to='varying')`: otherwise JAX already
  sums the gradients of replicated params densely across devices.

  Args:
    learning_rate: :math:`\eta_t`, a non-negative scalar or an
      `optax.Schedule`.
    momentum: :math:`\beta`, in [0, 1).
    density: fraction of the entries each worker sends, in (0, 1]; a Python
      number, since it fixes the message size (with
      `optax.inject_hyperparams`, list it in `static_args`).
    axis_name: the `pmap`/`shard_map` axis (or axes) indexing the workers;
      required.
    weight_decay: coupled weight decay :math:`\lambda \ge 0` (scalar or
      schedule).
    weight_decay_mask: which leaves to decay, as in `optax.add_decayed_weights`.
    per_layer: keep `density` of each leaf rather than of the whole pytree.
    selection: top-k algorithm, see :func:`top_k_by_magnitude`.
    exchange: `'auto'`, `'sparse'` or `'dense'`, see :func:`scale_by_gmc`.
    accumulator_dtype: dtype of the memory and previous update (default: the
      params').

  Returns:
    An `optax.GradientTransformationExtraArgs`; `optax.tree.get(state,
    'bytes_sent')` is the size of this worker's message in the last step
    (`8·k` bytes for k float32 values with int32 indices, `4·d` when dense).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import gmc
    >>> tx = gmc(0.1, momentum=0.5, density=0.5, axis_name='batch')
    >>> n = jax.local_device_count()
    >>> loss = lambda w, x: jnp.sum((w - x) ** 2)
    >>> def step(w, state, x):
    ...   updates, state = tx.update(jax.grad(loss)(w, x), state, w)
    ...   return optax.apply_updates(w, updates), state
    >>> step = jax.pmap(step, axis_name='batch')
    >>> w = jnp.zeros((n, 4))
    >>> state = jax.pmap(tx.init)(w)
    >>> for _ in range(100):
    ...   w, state = step(w, state, jnp.ones((n, 4)))
    >>> bool(jnp.allclose(w, 1.0, atol=1e-3))
    True

  References:
    Xie, Zhao, Li, Wang, Li, Chen, `Global Momentum Compression for Sparse
    Communication in Distributed SGD <https://arxiv.org/abs/1905.12948>`_,
    2019
  """
  _checks.check_non_negative("learning_rate", learning_rate)
  _checks.check_non_negative("weight_decay", weight_decay)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
      scale_by_gmc(
          momentum=momentum,
          density=density,
          axis_name=axis_name,
          per_layer=per_layer,
          selection=selection,
          exchange=exchange,
          accumulator_dtype=accumulator_dtype,
      ),
  )


class ScaleByDgcState(NamedTuple):
  """State of :func:`scale_by_dgc`."""

  count: jax.Array  # shape=(), dtype=jnp.int32; seeds 'sampled' selection
  trace: optax.Updates  # u_k, this worker's local momentum
  memory: optax.Updates  # v_k, this worker's accumulated unsent velocity
  bytes_sent: jax.Array  # shape=(), float32; this worker's last message size


def scale_by_dgc(
    momentum: float = 0.9,
    density: float = 0.01,
    axis_name: AxisName | None = None,
    momentum_masking: bool = True,
    per_layer: bool = False,
    selection: str = "exact",
    exchange: str = "auto",
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Deep Gradient Compression: local momentum, accumulation, sparse average.

  Worker :math:`k`, with local momentum :math:`u_k` and accumulation
  :math:`v_k` (both start at zero):

  .. math::
    u_k &\leftarrow \beta u_k + g_k, \qquad v_k \leftarrow v_k + u_k \\
    s_k &= \operatorname{top}_k(v_k), \qquad
    v_k \leftarrow v_k - s_k, \qquad
    u_k \leftarrow u_k \odot [s_k = 0] \\
    \text{update} &= \tfrac{1}{K} \textstyle\sum_k s_k

  The last step on :math:`u_k` is DGC's momentum factor masking (turn it off
  with `momentum_masking=False`). The learning rate is applied afterwards
  (see :func:`dgc`). The exchange is that of :func:`scale_by_gmc`.

  Note that with masking and `density=1` every coordinate is sent each step,
  so the momentum is reset each step and DGC reduces to plain SGD; without
  masking it is momentum SGD on the averaged gradient.

  Not implemented from the paper: the warm-up of the density (the state does
  not depend on `density`, so a run may switch between `dgc` instances of
  different densities, passing the state along) and local gradient clipping
  (chain `optax.clip_by_global_norm(c / sqrt(K))` in front: inside `pmap`
  it clips each worker's own gradient).

  Args:
    momentum: :math:`\beta`, in [0, 1).
    density: fraction of the entries each worker sends, in (0, 1].
    axis_name: the `pmap`/`shard_map` axis (or axes) indexing the workers.
    momentum_masking: zero the local momentum at the sent coordinates.
    per_layer: keep `density` of each leaf rather than of the whole pytree.
    selection: top-k algorithm, see :func:`top_k_by_magnitude`.
    exchange: `'auto'`, `'sparse'` or `'dense'`, see :func:`scale_by_gmc`.
    accumulator_dtype: dtype of the momentum and accumulation (default: the
      params').

  Returns:
    An `optax.GradientTransformationExtraArgs`; its state reports
    `bytes_sent` as :func:`scale_by_gmc`'s does.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sngm_optax import scale_by_dgc
    >>> tx = scale_by_dgc(momentum=0.9, density=0.25, axis_name='i')
    >>> n = jax.local_device_count()
    >>> grads = jnp.tile(jnp.array([4.0, -1.0, 2.0, 0.5]), (n, 1))
    >>> step = jax.pmap(lambda g: tx.update(g, tx.init(g)), axis_name='i')
    >>> out, state = step(grads)
    >>> out[0]
    Array([4., 0., 0., 0.], dtype=float32)
    >>> state.memory[0]  # v = u = g; the entry 4 was sent
    Array([ 0. , -1. ,  2. ,  0.5], dtype=float32)
    >>> state.trace[0]  # momentum masked where sent
    Array([ 0. , -1. ,  2. ,  0.5], dtype=float32)

  References:
    Lin, Han, Mao, Wang, Dally, `Deep Gradient Compression: Reducing the
    Communication Bandwidth for Distributed Training
    <https://arxiv.org/abs/1712.01887>`_, ICLR 2018
  """
  _checks.check_momentum("momentum", momentum)
  _check_compression_args(density, axis_name, selection, exchange)
  accumulator_dtype = _canonical_dtype(accumulator_dtype)

  def init_fn(params):
    _checks.check_float_params(params, "scale_by_dgc")
    return ScaleByDgcState(
        count=jnp.zeros([], jnp.int32),
        trace=optax.tree.zeros_like(params, dtype=accumulator_dtype),
        memory=optax.tree.zeros_like(params, dtype=accumulator_dtype),
        bytes_sent=jnp.zeros([], jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.check_params_match(updates, params, "scale_by_dgc")
    trace = jax.tree.map(lambda g, u: momentum * u + g, updates, state.trace)
    v = jax.tree.map(jnp.add, state.memory, trace)
    exchanged = _sparse_all_reduce(
        v,
        density=density,
        axis_name=axis_name,
        per_layer=per_layer,
        selection=selection,
        exchange=exchange,
        key=jax.random.fold_in(jax.random.key(0), state.count),
    )
    if momentum_masking:
      trace = _zero_sent(trace, exchanged.sent_index)
    num_workers = lax.axis_size(axis_name)
    mean = jax.tree.map(lambda s: s / num_workers, exchanged.total)
    new_state = ScaleByDgcState(
        count=optax.safe_increment(state.count),
        trace=_cast_like(trace, state.trace),
        memory=_cast_like(exchanged.memory, state.memory),
        bytes_sent=jnp.asarray(exchanged.bytes_sent, jnp.float32),
    )
    return _cast_like(mean, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dgc(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    density: float = 0.01,
    axis_name: AxisName | None = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: MaskOrFn = None,
    momentum_masking: bool = True,
    per_layer: bool = False,
    selection: str = "exact",
    exchange: str = "auto",
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DGC: the Deep Gradient Compression baseline for :func:`gmc`.

  Each worker keeps its own momentum and sends the `density` largest entries
  of its accumulated momentum (:func:`scale_by_dgc`); the mean of what the
  workers sent is scaled by the learning rate:

  .. math::
    w \leftarrow w - \eta_t \tfrac{1}{K} \textstyle\sum_k s_k

  Call `update` inside `jax.pmap` or `jax.shard_map` with each worker's own
  gradient. The returned update includes the learning rate and the sign,
  as `optax.sgd`'s.

  Args:
    learning_rate: :math:`\eta_t`, a non-negative scalar or an
      `optax.Schedule`.
    momentum: :math:`\beta`, in [0, 1).
    density: fraction of the entries each worker sends, in (0, 1].
    axis_name: the `pmap`/`shard_map` axis (or axes) indexing the workers;
      required.
    weight_decay: coupled weight decay (scalar or schedule), added to each
      worker's gradient.
    weight_decay_mask: which leaves to decay, as in `optax.add_decayed_weights`.
    momentum_masking: zero the local momentum where entries were sent.
    per_layer: keep `density` of each leaf rather than of the whole pytree.
    selection: top-k algorithm, see :func:`top_k_by_magnitude`.
    exchange: `'auto'`, `'sparse'` or `'dense'`, see :func:`scale_by_gmc`.
    accumulator_dtype: dtype of the momentum and accumulation.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `optax.tree.get(state,
    'bytes_sent')` is this worker's message size in the last step.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import dgc
    >>> tx = dgc(learning_rate=0.1, density=0.5, axis_name='batch')
    >>> n = jax.local_device_count()
    >>> loss = lambda w, x: jnp.sum((w - x) ** 2)
    >>> def step(w, state, x):
    ...   updates, state = tx.update(jax.grad(loss)(w, x), state, w)
    ...   return optax.apply_updates(w, updates), state
    >>> step = jax.pmap(step, axis_name='batch')
    >>> w = jnp.zeros((n, 4))
    >>> state = jax.pmap(tx.init)(w)
    >>> for _ in range(100):
    ...   w, state = step(w, state, jnp.ones((n, 4)))
    >>> bool(jnp.allclose(w, 1.0, atol=1e-3))
    True

  References:
    Lin, Han, Mao, Wang, Dally, `Deep Gradient Compression: Reducing the
    Communication Bandwidth for Distributed Training
    <https://arxiv.org/abs/1712.01887>`_, ICLR 2018
  """
  _checks.check_non_negative("learning_rate", learning_rate)
  _checks.check_non_negative("weight_decay", weight_decay)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      scale_by_dgc(
          momentum=momentum,
          density=density,
          axis_name=axis_name,
          momentum_masking=momentum_masking,
          per_layer=per_layer,
          selection=selection,
          exchange=exchange,
          accumulator_dtype=accumulator_dtype,
      ),
      optax.scale_by_learning_rate(learning_rate),
  )
