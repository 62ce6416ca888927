"""SNGM: stochastic normalized gradient descent with momentum."""

from typing import Any, Callable

import jax
import optax

from sngm_optax import _checks
from sngm_optax._distributed import average_across_devices
from sngm_optax._normalize import SMALLEST_NORMAL_FLOAT32
from sngm_optax._normalize import normalize_by_global_norm

MaskOrFn = Any | Callable[[optax.Params], Any] | None


def scale_by_sngm(
    momentum: float = 0.9,
    nesterov: bool = False,
    eps: float = SMALLEST_NORMAL_FLOAT32,
    per_layer: bool = False,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Normalizes the gradient, then accumulates heavy-ball momentum.

  .. math::
    u_{t+1} = \beta u_t + \frac{g_t}{\max(\|g_t\|, \epsilon)}, \qquad
    \text{update} = u_{t+1}
    \;\; (\text{Nesterov: } g_t / \|g_t\| + \beta u_{t+1})

  with :math:`u_0 = 0` and the norm taken over the whole pytree (see
  :func:`normalize_by_global_norm`). The learning rate is applied afterwards,
  e.g. by `optax.scale_by_learning_rate`.

  Args:
    momentum: the momentum coefficient :math:`\beta`, in [0, 1).
    nesterov: use Nesterov momentum.
    eps: lower bound on the norm used as divisor (at least ~1.18e-38).
    per_layer: normalize each leaf by its own norm instead of the global norm.
    accumulator_dtype: dtype of the momentum buffer; by default that of the
      params.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its state holds the momentum
    buffer under the name `trace` (`optax.tree.get(state, 'trace')`).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from sngm_optax import scale_by_sngm
    >>> tx = optax.chain(scale_by_sngm(momentum=0.9),
    ...                  optax.scale_by_learning_rate(0.1))
    >>> params = jnp.array([3.0, 4.0])
    >>> updates, state = tx.update(params, tx.init(params))
    >>> updates.round(4)
    Array([-0.06, -0.08], dtype=float32)

  References:
    Zhao, Xie, Li, `Stochastic Normalized Gradient Descent with Momentum for
    Large-Batch Training <https://arxiv.org/abs/2007.13985>`_, 2020
  """
  _checks.check_momentum("momentum", momentum)
  return optax.chain(
      normalize_by_global_norm(eps=eps, per_layer=per_layer),
      optax.trace(
          decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype
      ),
  )


def sngm(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: MaskOrFn = None,
    eps: float = SMALLEST_NORMAL_FLOAT32,
    axis_name: str | tuple[str, ...] | None = None,
    per_layer: bool = False,
    accumulator_dtype: Any | None = None,
    decoupled_weight_decay: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""The SNGM optimizer for large-batch training.

  .. math::
    g_t &\leftarrow \text{mean over devices}(g_t) + \lambda w_t \\
    u_{t+1} &= \beta u_t + g_t / \|g_t\| \\
    w_{t+1} &= w_t - \eta_t u_{t+1}

  With `decoupled_weight_decay=True` the decay is not part of the normalized
  gradient but added after the momentum, as `optax.adamw` does for Adam:

  .. math::
    u_{t+1} = \beta u_t + g_t / \|g_t\|, \qquad
    w_{t+1} = w_t - \eta_t (u_{t+1} + \lambda w_t)

  Coupled decay (the paper's) is normalized together with the gradient, so
  its share of the step grows as the loss gradient shrinks; decoupled decay
  shrinks the weights by the fixed factor :math:`1 - \eta_t \lambda` a step.

  Normalizing the mini-batch gradient by its global L2 norm lets SNGM take
  the same step length at any batch size, so a large batch can use a large
  learning rate without diverging. With `axis_name` the gradient is first
  averaged across devices (`jax.lax.pmean`), so that inside `jax.pmap` or
  `jax.shard_map` the norm is that of the global batch gradient.

  Args:
    learning_rate: :math:`\eta_t`, a non-negative scalar or an
      `optax.Schedule`.
    momentum: :math:`\beta`, in [0, 1).
    nesterov: use Nesterov momentum.
    weight_decay: weight decay :math:`\lambda \ge 0` (scalar or schedule);
      coupled (added to the gradient before normalization) unless
      `decoupled_weight_decay`.
    weight_decay_mask: pytree of booleans (or a function of the params
      returning one) selecting the leaves to decay, as in `optax.lars`;
      `None` decays every leaf.
    eps: lower bound on the gradient norm used as divisor (at least
      ~1.18e-38, float32's smallest normal number; the default).
    axis_name: the `pmap`/`shard_map` axis to average gradients over, or
      `None` when the gradient is already the global one.
    per_layer: normalize each leaf separately instead of globally.
    accumulator_dtype: dtype of the momentum buffer (default: the params').
    decoupled_weight_decay: add :math:`\lambda w_t` after normalization and
      momentum, scaled by the learning rate (AdamW style), instead of to the
      gradient before normalization (the paper's, the default).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import sngm
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = sngm(learning_rate=optax.cosine_decay_schedule(0.1, 200))
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 1e-2)
    True

  References:
    Zhao, Xie, Li, `Stochastic Normalized Gradient Descent with Momentum for
    Large-Batch Training <https://arxiv.org/abs/2007.13985>`_, 2020
  """
  _checks.check_non_negative("learning_rate", learning_rate)
  _checks.check_non_negative("weight_decay", weight_decay)
  _checks.check_range("eps", eps, SMALLEST_NORMAL_FLOAT32)
  if not isinstance(decoupled_weight_decay, bool):
    raise ValueError("decoupled_weight_decay must be True or False, got "
                     f"{decoupled_weight_decay!r}")
  decay = optax.add_decayed_weights(weight_decay, mask=weight_decay_mask)
  normalized_momentum = scale_by_sngm(
      momentum=momentum,
      nesterov=nesterov,
      eps=eps,
      per_layer=per_layer,
      accumulator_dtype=accumulator_dtype,
  )
  # Coupled: decay, then normalize; decoupled (AdamW): normalize, then decay.
  middle = ((normalized_momentum, decay) if decoupled_weight_decay
            else (decay, normalized_momentum))
  chained = optax.chain(
      average_across_devices(axis_name) if axis_name else optax.identity(),
      *middle,
      optax.scale_by_learning_rate(learning_rate),
  )
  # The params check comes before add_decayed_weights reads params.
  return _checks.params_checked(chained, "sngm")
