"""GMC: global momentum compression for sparse data-parallel SGD."""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import optax
from jax import lax

from sngm_optax import _checks
from sngm_optax import _sparse_exchange
from sngm_optax._sngm import MaskOrFn
from sngm_optax._sparse_exchange import AxisName


class ScaleByGmcState(NamedTuple):
  """State of :func:`scale_by_gmc`."""

  count: jax.Array  # shape=(), dtype=jnp.int32; seeds 'sampled' selection
  memory: optax.Updates  # e_k, this worker's unsent residual
  global_update: optax.Updates  # the previous output, identical on all workers
  bytes_sent: jax.Array  # shape=(), float32; this worker's last message size


def scale_by_gmc(
    momentum: float = 0.9,
    density: float | optax.Schedule = 0.01,
    axis_name: AxisName | None = None,
    per_layer: bool = False,
    selection: str = "exact",
    exchange: str = "auto",
    accumulator_dtype: Any | None = None,
    density_levels: Sequence[float] | None = None,
    value_dtype: Any | None = None,
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
  int32 indices and values (rounded to `value_dtype`);
  `jax.lax.all_gather` delivers all of them to every worker, which adds
  them up in worker order, so :math:`U_t` is bitwise identical on all
  workers. Nothing is lost: :math:`s_k + e_k = v_k` exactly. With
  `density=1` the output is heavy-ball momentum of the mean update,
  :math:`U_t = \bar u + \beta U_{t-1}`.

  Place it after the learning rate (as :func:`gmc` does): the memory and the
  momentum then hold learning-rate scaled quantities, as in the paper, where
  :math:`-U_t = D_t = w_{t-1} - w_t`.

  Args:
    momentum: :math:`\beta`, in [0, 1).
    density: fraction of the entries each worker sends, in (0, 1]: a Python
      number, or an `optax.Schedule` of the step (a density warm-up) whose
      values are rounded up to `density_levels`.
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
    density_levels: with a `density` schedule, the static densities the
      message can have, in (0, 1]; the density in force at step t is the
      smallest level at or above `density(t)` (the largest level when
      `density(t)` is above them all). Each distinct top-k size is one
      branch of a `jax.lax.switch`: the step compiles once, whatever the
      schedule. Default: the powers of two 1, 1/2, ..., 2**-24 (so up to
      twice the scheduled density is sent; list the schedule's own values to
      send exactly them).
    value_dtype: dtype of the values sent, `'float32'`, `'bfloat16'` or
      `'float16'` (default: that of the update); the indices are int32.
      What rounding to it loses stays in the memory (float16 saturates at
      its largest finite value), so :math:`s_k + e_k = v_k` still holds.

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
  exchange_top_k = _sparse_exchange.sparse_exchange_step(
      density, axis_name, per_layer, selection, exchange, density_levels,
      value_dtype,
  )
  accumulator_dtype = _sparse_exchange.canonical_dtype(accumulator_dtype)

  def init_fn(params):
    return _sparse_exchange.init_exchange_state(
        ScaleByGmcState, params, accumulator_dtype, "scale_by_gmc"
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
    exchanged = exchange_top_k(v, state.count)
    new_state = ScaleByGmcState(
        count=optax.safe_increment(state.count),
        memory=_sparse_exchange.cast_like(exchanged.memory, state.memory),
        global_update=_sparse_exchange.cast_like(
            exchanged.total, state.global_update
        ),
        bytes_sent=exchanged.bytes_sent,
    )
    return _sparse_exchange.cast_like(exchanged.total, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gmc(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    density: float | optax.Schedule = 0.01,
    axis_name: AxisName | None = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: MaskOrFn = None,
    per_layer: bool = False,
    selection: str = "exact",
    exchange: str = "auto",
    accumulator_dtype: Any | None = None,
    density_levels: Sequence[float] | None = None,
    value_dtype: Any | None = None,
    local_clip_norm: float | None = None,
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
    density: fraction of the entries each worker sends, in (0, 1]: a Python
      number, or an `optax.Schedule` of the step for a density warm-up
      (e.g. 25 % -> 6.25 % -> 1.56 % -> 0.39 % -> 0.1 % over the first
      epochs, as DGC's authors); it fixes the message size, so with
      `optax.inject_hyperparams` list it in `static_args`.
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
    density_levels: with a `density` schedule, the static densities it is
      rounded up to, see :func:`scale_by_gmc`.
    value_dtype: dtype of the values sent (`'float32'`, `'bfloat16'`,
      `'float16'`; default: the params'), see :func:`scale_by_gmc`.
    local_clip_norm: DGC's local gradient clipping: each of the :math:`K`
      workers clips its own gradient to global norm
      `local_clip_norm / sqrt(K)` before anything else; None (default): off.

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
  chained = optax.chain(
      *_sparse_exchange.clip_worker_gradient(local_clip_norm, axis_name),
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
          density_levels=density_levels,
          value_dtype=value_dtype,
      ),
  )
  # The params check comes before add_decayed_weights reads params.
  return _checks.params_checked(chained, "gmc")
