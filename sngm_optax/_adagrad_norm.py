"""AdaGrad-Norm: AdaGrad with one scalar step size for the whole model."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sngm_optax import _checks
from sngm_optax._normalize import global_norm


class ScaleByAdagradNormState(NamedTuple):
  """State of :func:`scale_by_adagrad_norm`."""

  sum_of_squared_norms: jax.Array  # b_t^2, a float32 scalar


def scale_by_adagrad_norm(
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
) -> optax.GradientTransformationExtraArgs:
  r"""Divides the updates by the root of the sum of all squared gradient norms.

  .. math::
    b_t^2 = b_{t-1}^2 + \|g_t\|^2, \qquad
    \text{update} = \frac{g_t}{\sqrt{b_t^2 + \epsilon}}

  with :math:`b_0^2` = `initial_accumulator_value` and :math:`\|\cdot\|` the
  global L2 norm over all leaves, accumulated in float32 by
  :func:`global_norm` whatever the gradient dtype. It is AdaGrad
  (:func:`optax.scale_by_rss`) with a single accumulator shared by every
  coordinate; `initial_accumulator_value` and `eps` mean what they mean there
  (a zero accumulator gives a zero update, never NaN). The learning rate is
  applied afterwards, e.g. by `optax.scale_by_learning_rate`.

  Args:
    initial_accumulator_value: :math:`b_0^2 \ge 0`, the accumulator's start.
    eps: :math:`\epsilon \ge 0`, added to the accumulator inside the root.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its state holds
    :math:`b_t^2` under the name `sum_of_squared_norms`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sngm_optax import scale_by_adagrad_norm
    >>> tx = scale_by_adagrad_norm(initial_accumulator_value=0.0, eps=0.0)
    >>> updates, state = tx.update(jnp.array([3.0, 4.0]), tx.init(None))
    >>> updates, state.sum_of_squared_norms
    (Array([0.6, 0.8], dtype=float32), Array(25., dtype=float32))

  References:
    Ward, Wu, Bottou, `AdaGrad stepsizes: sharp convergence over nonconvex
    landscapes <https://arxiv.org/abs/1806.01811>`_, 2018
  """
  _checks.check_non_negative(
      "initial_accumulator_value", initial_accumulator_value
  )
  _checks.check_non_negative("eps", eps)

  def init_fn(params):
    _checks.check_float_params(params, "scale_by_adagrad_norm")
    # jnp.array copies: an injected hyperparameter (optax.inject_hyperparams)
    # must not share its buffer with the state, which a step may donate.
    return ScaleByAdagradNormState(
        sum_of_squared_norms=jnp.array(initial_accumulator_value, jnp.float32)
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.check_params_match(updates, params, "scale_by_adagrad_norm")
    sum_of_squared_norms = (
        state.sum_of_squared_norms + jnp.square(global_norm(updates))
    )
    inverse_root = jnp.where(
        sum_of_squared_norms > 0,
        jax.lax.rsqrt(sum_of_squared_norms + jnp.asarray(eps, jnp.float32)),
        0.0,
    )
    updates = jax.tree.map(
        lambda g: (g.astype(jnp.float32) * inverse_root).astype(g.dtype),
        updates,
    )
    return updates, ScaleByAdagradNormState(sum_of_squared_norms)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adagrad_norm(
    learning_rate: optax.ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
) -> optax.GradientTransformationExtraArgs:
  r"""The AdaGrad-Norm optimizer: one adaptive step size for all coordinates.

  .. math::
    b_t^2 &= b_{t-1}^2 + \|g_t\|^2 \\
    w_{t+1} &= w_t - \eta_t \, \frac{g_t}{\sqrt{b_t^2 + \epsilon}}

  The step size decays with the accumulated squared gradient norms, so it
  adapts to the unknown smoothness and noise level of the loss (Ward et al.);
  AdAdaGrad-Norm (:func:`adadagrad_norm`) pairs it with a growing batch.
  Coordinate-wise AdaGrad is `optax.adagrad`.

  Args:
    learning_rate: :math:`\eta_t`, a non-negative scalar or an
      `optax.Schedule`.
    initial_accumulator_value: :math:`b_0^2 \ge 0` (as in `optax.adagrad`,
      the squared norm, not :math:`b_0`).
    eps: :math:`\epsilon \ge 0`, added to :math:`b_t^2` inside the root.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import adagrad_norm
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = adagrad_norm(learning_rate=1.0)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 1e-3)
    True

  References:
    Ward, Wu, Bottou, `AdaGrad stepsizes: sharp convergence over nonconvex
    landscapes <https://arxiv.org/abs/1806.01811>`_, 2018;
    Lau, Liu, Kolar, `AdAdaGrad: Adaptive Batch Size Schemes for Adaptive
    Gradient Methods <https://arxiv.org/abs/2402.11215>`_, 2024
  """
  _checks.check_non_negative("learning_rate", learning_rate)
  return optax.chain(
      scale_by_adagrad_norm(
          initial_accumulator_value=initial_accumulator_value, eps=eps
      ),
      optax.scale_by_learning_rate(learning_rate),
  )
