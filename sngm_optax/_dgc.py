"""DGC: Deep Gradient Compression, the sparse-communication baseline of GMC."""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sngm_optax import _checks
from sngm_optax import _sparse_exchange
from sngm_optax._sngm import MaskOrFn
from sngm_optax._sparse_exchange import AxisName


class ScaleByDgcState(NamedTuple):
  """State of :func:`scale_by_dgc`."""

  count: jax.Array  # shape=(), dtype=jnp.int32; seeds 'sampled' selection
  trace: optax.Updates  # u_k, this worker's local momentum
  memory: optax.Updates  # v_k, this worker's accumulated unsent velocity
  bytes_sent: jax.Array  # shape=(), float32; this worker's last message size


def scale_by_dgc(
    momentum: float = 0.9,
    density: float | optax.Schedule = 0.01,
    axis_name: AxisName | None = None,
    momentum_masking: bool = True,
    per_layer: bool = False,
    selection: str = "exact",
    exchange: str = "auto",
    accumulator_dtype: Any | None = None,
    density_levels: Sequence[float] | None = None,
    value_dtype: Any | None = None,
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

  The rest of DGC's recipe is in :func:`dgc`: density warm-up (a `density`
  schedule), local gradient clipping, weight decay outside the message and
  16-bit values.

  Args:
    momentum: :math:`\beta`, in [0, 1).
    density: fraction of the entries each worker sends, in (0, 1], or an
      `optax.Schedule` of the step, see :func:`scale_by_gmc`.
    axis_name: the `pmap`/`shard_map` axis (or axes) indexing the workers.
    momentum_masking: zero the local momentum at the sent coordinates.
    per_layer: keep `density` of each leaf rather than of the whole pytree.
    selection: top-k algorithm, see :func:`top_k_by_magnitude`.
    exchange: `'auto'`, `'sparse'` or `'dense'`, see :func:`scale_by_gmc`.
    accumulator_dtype: dtype of the momentum and accumulation (default: the
      params').
    density_levels: with a `density` schedule, the static densities it is
      rounded up to, see :func:`scale_by_gmc`.
    value_dtype: dtype of the values sent, see :func:`scale_by_gmc`.

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
  exchange_top_k = _sparse_exchange.sparse_exchange_step(
      density, axis_name, per_layer, selection, exchange, density_levels,
      value_dtype,
  )
  accumulator_dtype = _sparse_exchange.canonical_dtype(accumulator_dtype)

  def init_fn(params):
    return _sparse_exchange.init_exchange_state(
        ScaleByDgcState, params, accumulator_dtype, "scale_by_dgc"
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.check_params_match(updates, params, "scale_by_dgc")
    trace = jax.tree.map(lambda g, u: momentum * u + g, updates, state.trace)
    v = jax.tree.map(jnp.add, state.memory, trace)
    exchanged = exchange_top_k(v, state.count)
    if momentum_masking:
      trace = _sparse_exchange.zero_sent(trace, exchanged)
    num_workers = lax.axis_size(axis_name)
    mean = jax.tree.map(lambda s: s / num_workers, exchanged.total)
    new_state = ScaleByDgcState(
        count=optax.safe_increment(state.count),
        trace=_sparse_exchange.cast_like(trace, state.trace),
        memory=_sparse_exchange.cast_like(exchanged.memory, state.memory),
        bytes_sent=exchanged.bytes_sent,
    )
    return _sparse_exchange.cast_like(mean, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dgc(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    density: float | optax.Schedule = 0.01,
    axis_name: AxisName | None = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: MaskOrFn = None,
    momentum_masking: bool = True,
    per_layer: bool = False,
    selection: str = "exact",
    exchange: str = "auto",
    accumulator_dtype: Any | None = None,
    density_levels: Sequence[float] | None = None,
    value_dtype: Any | None = None,
    local_clip_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DGC: the Deep Gradient Compression baseline for :func:`gmc`.

  Each worker keeps its own momentum and sends the `density` largest entries
  of its accumulated momentum (:func:`scale_by_dgc`); the mean of what the
  workers sent, plus the weight decay, is scaled by the learning rate:

  .. math::
    w \leftarrow w - \eta_t \left(\tfrac{1}{K} \textstyle\sum_k s_k
      + \lambda w\right)

  This is DGC's whole recipe, as its authors train: momentum correction and
  momentum factor masking (:func:`scale_by_dgc`); density warm-up with a
  `density` schedule (e.g. 25 % -> 6.25 % -> 1.56 % -> 0.39 % -> 0.1 % over
  the first epochs); local gradient clipping (`local_clip_norm`); 16-bit
  values with int32 indices (`value_dtype`); and weight decay applied
  densely, outside the message and the momentum, as in the authors' code.

  Call `update` inside `jax.pmap` or `jax.shard_map` with each worker's own
  gradient. The returned update includes the learning rate and the sign,
  as `optax.sgd`'s.

  Args:
    learning_rate: :math:`\eta_t`, a non-negative scalar or an
      `optax.Schedule`.
    momentum: :math:`\beta`, in [0, 1).
    density: fraction of the entries each worker sends, in (0, 1], or an
      `optax.Schedule` of the step (density warm-up).
    axis_name: the `pmap`/`shard_map` axis (or axes) indexing the workers;
      required.
    weight_decay: weight decay :math:`\lambda` (scalar or schedule), added
      densely to the averaged sparse update, after the exchange.
    weight_decay_mask: which leaves to decay, as in `optax.add_decayed_weights`.
    momentum_masking: zero the local momentum where entries were sent.
    per_layer: keep `density` of each leaf rather than of the whole pytree.
    selection: top-k algorithm, see :func:`top_k_by_magnitude`.
    exchange: `'auto'`, `'sparse'` or `'dense'`, see :func:`scale_by_gmc`.
    accumulator_dtype: dtype of the momentum and accumulation.
    density_levels: with a `density` schedule, the static densities it is
      rounded up to, see :func:`scale_by_gmc`.
    value_dtype: dtype of the values sent, see :func:`scale_by_gmc`.
    local_clip_norm: each of the :math:`K` workers clips its own gradient to
      global norm `local_clip_norm / sqrt(K)`, as DGC does; None: off.

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
  chained = optax.chain(
      *_sparse_exchange.clip_worker_gradient(local_clip_norm, axis_name),
      scale_by_dgc(
          momentum=momentum,
          density=density,
          axis_name=axis_name,
          momentum_masking=momentum_masking,
          per_layer=per_layer,
          selection=selection,
          exchange=exchange,
          accumulator_dtype=accumulator_dtype,
          density_levels=density_levels,
          value_dtype=value_dtype,
      ),
      # Dense and after the exchange, as in the authors' code: the decay is
      # neither sent nor accumulated, and identical on every worker.
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  # The params check comes before add_decayed_weights reads params.
  return _checks.params_checked(chained, "dgc")
