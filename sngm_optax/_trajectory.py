"""Trajectory regularization (TR) for training with very small batches."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sngm_optax import _checks

MaskOrFn = Any | Callable[[optax.Params], Any] | None

# The authors' default pull: lambda_0 = 0.1 * eta_0, i.e. lambda = 0.1 at the
# initial learning rate, for both TRSGD and TRAdam.
_DEFAULT_RELATIVE_STRENGTH = 0.1


class TrajectoryRegularizedState(NamedTuple):
  r"""State of :func:`trajectory_regularized`.

  Attributes:
    count: number of updates taken (int32), used to evaluate schedules.
    inner_step: position :math:`k \in [0, S)` in the current inner window
      (int32); the anchor is reset when it is 0.
    anchor: the params at the start of the current inner window,
      :math:`\tilde w` (same structure and dtypes as the params: one extra
      copy of the params in memory).
    inner_state: the state of the wrapped transformation; never reset.
  """

  count: jax.Array
  inner_step: jax.Array
  anchor: optax.Params
  inner_state: optax.OptState


def _value_at(hyperparameter: optax.ScalarOrSchedule, count: jax.Array):
  return hyperparameter(count) if callable(hyperparameter) else hyperparameter


def trajectory_regularized(
    inner: optax.GradientTransformation,
    strength: optax.ScalarOrSchedule,
    inner_steps: int = 10,
    inner_lr_decay: bool = True,
    learning_rate: optax.ScalarOrSchedule | None = None,
    steps_per_epoch: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Pulls the params toward an anchor that is reset every `inner_steps`.

  With :math:`k = t \bmod S` the position in the inner window of
  :math:`S` = `inner_steps` updates:

  .. math::
    \tilde w &\leftarrow w_t \quad \text{if } k = 0 \\
    g_t &\leftarrow g_t + \gamma_t (w_t - \tilde w), \qquad
      \gamma_t = 2 \lambda_t \\
    u_t &= \text{inner}(g_t) / (k + 1)

  The proximal term :math:`\lambda_t \|w - \tilde w\|^2` makes each inner
  window a strongly convex sub-problem, which damps the noise of very small
  batches. The decay :math:`1/(k+1)` (`inner_lr_decay`) multiplies the
  inner transformation's *output*, i.e. only the step size: momentum and Adam
  moments accumulate undecayed gradients, and the inner state (including
  Adam's bias-correction count) is never reset, as in the authors' code.

  The strength is :math:`\lambda_t` = `strength` when `learning_rate` is
  `None`. When the inner transformation's learning rate :math:`\eta_t` is
  given, the strength is coupled to it as in the authors' code,
  :math:`\lambda_t` = `strength` :math:`/ \eta_t` (`strength` is then their
  :math:`\lambda_0`), so the pull per step :math:`\eta_t \gamma_t` stays
  constant while the schedule decays (a zero learning rate gives no pull).

  With `steps_per_epoch` :math:`E`, the inner window also restarts at every
  epoch, as in the authors' code (a new window starts with each epoch's
  first batch):

  .. math::
    k = (t \bmod E) \bmod S,

  so an epoch whose length is not a multiple of :math:`S` ends with a short
  window. Without it, :math:`k = t \bmod S` runs straight through epochs.

  :math:`k` and :math:`t` count the updates actually applied: under
  `optax.MultiSteps` they advance once per accumulated step, and a step
  skipped by `optax.apply_if_finite` does not advance them.

  Args:
    inner: the transformation to regularize, with its learning rate included
      (e.g. `optax.sgd(0.1, momentum=0.9)`).
    strength: :math:`\lambda \ge 0` (or :math:`\lambda_0` when
      `learning_rate` is given), a scalar or an `optax.Schedule`.
    inner_steps: :math:`S \ge 1`, the number of updates between anchor
      resets.
    inner_lr_decay: divide the inner output by :math:`k + 1`.
    learning_rate: :math:`\eta_t` of `inner` (scalar or schedule), to couple
      the strength to it; `None` for a plain strength.
    steps_per_epoch: :math:`E \ge 1`, updates per epoch (a static int), to
      restart the inner window at each epoch; `None` counts straight through.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    :class:`TrajectoryRegularizedState`. Its `update` requires `params`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import trajectory_regularized
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = trajectory_regularized(optax.adam(0.1), strength=0.1)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(300):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 1e-2), int(state.inner_step)
    (True, 0)

  References:
    Zhang, Qu, Chen, Metaxas, `Taming the Noisy Gradient: Train Deep Neural
    Networks with Small Batch Sizes
    <https://doi.org/10.24963/ijcai.2019/604>`_, IJCAI 2019 (no arXiv
    version); code: https://github.com/huiqu18/TRAlgorithm
  """
  _checks.check_non_negative("strength", strength)
  _checks.check_positive_int("inner_steps", inner_steps)
  if steps_per_epoch is not None:
    _checks.check_positive_int("steps_per_epoch", steps_per_epoch)
  if learning_rate is not None:
    _checks.check_non_negative("learning_rate", learning_rate)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    _checks.check_float_params(params, "trajectory_regularized")
    return TrajectoryRegularizedState(
        count=jnp.zeros([], jnp.int32),
        inner_step=jnp.zeros([], jnp.int32),
        # Set to the params by the first update (k = 0).
        anchor=optax.tree.zeros_like(params),
        inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "trajectory_regularized needs the current params: call "
          "update(updates, state, params)."
      )
    _checks.check_params_match(updates, params, "trajectory_regularized")
    k = state.inner_step
    # A cond, not a select: between resets the (donated) anchor buffer
    # passes through instead of being rewritten every step.
    anchor = jax.lax.cond(k == 0, lambda: params, lambda: state.anchor)

    lam = jnp.asarray(_value_at(strength, state.count), jnp.float32)
    if learning_rate is not None:
      eta = jnp.asarray(_value_at(learning_rate, state.count), jnp.float32)
      positive = eta > 0
      lam = jnp.where(positive, lam / jnp.where(positive, eta, 1.0), 0.0)
    gamma = 2.0 * lam
    updates = jax.tree.map(
        lambda g, w, a: g + (gamma * (w - a)).astype(g.dtype),
        updates, params, anchor,
    )

    updates, inner_state = inner.update(
        updates, state.inner_state, params, **extra_args
    )
    if inner_lr_decay:
      decay = 1.0 / (k + 1).astype(jnp.float32)
      updates = jax.tree.map(lambda u: u * decay.astype(u.dtype), updates)

    window_ends = k + 1 >= inner_steps
    if steps_per_epoch is not None:
      # The next update is the first of an epoch (count + 1 = 0 mod E).
      epoch_ends = (state.count + 1) % steps_per_epoch == 0
      window_ends = window_ends | epoch_ends
    next_k = jnp.where(window_ends, 0, k + 1).astype(jnp.int32)
    return updates, TrajectoryRegularizedState(
        count=optax.safe_increment(state.count),
        inner_step=next_k,
        anchor=anchor,
        inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _default_strength(
    strength: optax.ScalarOrSchedule | None,
    learning_rate: optax.ScalarOrSchedule,
    couple_to_learning_rate: bool,
) -> optax.ScalarOrSchedule:
  """Returns the authors' default, lambda = 0.1 at the initial learning rate."""
  if strength is not None:
    return strength
  if not couple_to_learning_rate:
    return _DEFAULT_RELATIVE_STRENGTH
  initial_lr = learning_rate(0) if callable(learning_rate) else learning_rate
  if not isinstance(initial_lr, jax.core.Tracer) and float(initial_lr) == 0.0:
    raise ValueError(
        "strength must be given explicitly when the learning rate at step 0 "
        "is 0 (e.g. a warm-up schedule): the default is 0.1 * learning_rate(0)"
    )
  return _DEFAULT_RELATIVE_STRENGTH * initial_lr


def tr_sgd(
    learning_rate: optax.ScalarOrSchedule,
    strength: optax.ScalarOrSchedule | None = None,
    momentum: float = 0.9,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    inner_steps: int = 10,
    inner_lr_decay: bool = True,
    couple_to_learning_rate: bool = True,
    nesterov: bool = False,
    weight_decay_mask: MaskOrFn = None,
    accumulator_dtype: Any | None = None,
    steps_per_epoch: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Trajectory-regularized SGD with momentum (the authors' TRSGD).

  .. math::
    \tilde w &\leftarrow w_t \quad \text{if } k = 0 \\
    d_t &= g_t + 2 \lambda_t (w_t - \tilde w) + \mu w_t \\
    b_{t+1} &= \beta b_t + d_t \\
    w_{t+1} &= w_t - \frac{\eta_t}{k + 1} b_{t+1}

  with :math:`k = t \bmod S` (or :math:`(t \bmod E) \bmod S` with
  `steps_per_epoch` :math:`E`), :math:`\lambda_t = \lambda_0 / \eta_t` and
  :math:`b_0 = 0`: the proximal term, then coupled weight decay, then
  momentum, then the step (see :func:`trajectory_regularized`).

  Because of the :math:`1/(k+1)` decay the average step is
  :math:`\frac1S \sum_k \frac1{k+1}` (0.293 for S = 10) times that of SGD
  at the same learning rate; compare against SGD with a re-tuned learning
  rate.

  Args:
    learning_rate: :math:`\eta_t`, a non-negative scalar or schedule.
    strength: :math:`\lambda_0` when `couple_to_learning_rate`, else
      :math:`\lambda` (scalar or schedule, non-negative). The default is the
      authors': :math:`\lambda = 0.1` at the initial learning rate, i.e.
      :math:`\lambda_0 = 0.1\, \eta_0` (coupled) or :math:`\lambda = 0.1`.
      Under `optax.inject_hyperparams` the factory sees only the current
      learning rate, so pass `strength` explicitly there to keep
      :math:`\lambda_0` fixed.
    momentum: :math:`\beta`, in [0, 1).
    weight_decay: coupled weight decay :math:`\mu \ge 0` (scalar or
      schedule), added after the proximal term.
    inner_steps: :math:`S`, updates between anchor resets.
    inner_lr_decay: use the step size :math:`\eta_t / (k + 1)`.
    couple_to_learning_rate: :math:`\lambda_t = \lambda_0 / \eta_t` (the
      authors' choice) instead of :math:`\lambda_t` = `strength`.
    nesterov: use Nesterov momentum.
    weight_decay_mask: pytree of booleans (or a function of the params
      returning one) selecting the leaves to decay; `None` decays all.
    accumulator_dtype: dtype of the momentum buffer (default: the params').
    steps_per_epoch: updates per epoch, to restart the inner window at each
      epoch as the authors do (:math:`k = (t \bmod E) \bmod S`, see
      :func:`trajectory_regularized`); `None` counts straight through.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` requires `params`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import tr_sgd
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = tr_sgd(learning_rate=0.1)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 1e-3)
    True

  References:
    Zhang, Qu, Chen, Metaxas, `Taming the Noisy Gradient: Train Deep Neural
    Networks with Small Batch Sizes
    <https://doi.org/10.24963/ijcai.2019/604>`_, IJCAI 2019 (no arXiv
    version); code: https://github.com/huiqu18/TRAlgorithm
  """
  _checks.check_non_negative("learning_rate", learning_rate)
  _checks.check_momentum("momentum", momentum)
  _checks.check_non_negative("weight_decay", weight_decay)
  strength = _default_strength(strength, learning_rate, couple_to_learning_rate)
  inner = optax.chain(
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.trace(
          decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype
      ),
      optax.scale_by_learning_rate(learning_rate),
  )
  return trajectory_regularized(
      inner,
      strength=strength,
      inner_steps=inner_steps,
      inner_lr_decay=inner_lr_decay,
      learning_rate=learning_rate if couple_to_learning_rate else None,
      steps_per_epoch=steps_per_epoch,
  )


def tr_adam(
    learning_rate: optax.ScalarOrSchedule,
    strength: optax.ScalarOrSchedule | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    inner_steps: int = 10,
    inner_lr_decay: bool = True,
    couple_to_learning_rate: bool = True,
    weight_decay_mask: MaskOrFn = None,
    mu_dtype: Any | None = None,
    steps_per_epoch: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Trajectory-regularized Adam (the authors' TRAdam).

  .. math::
    \tilde w &\leftarrow w_t \quad \text{if } k = 0 \\
    d_t &= g_t + 2 \lambda_t (w_t - \tilde w) + \mu w_t \\
    m_{t+1} &= \beta_1 m_t + (1 - \beta_1) d_t, \quad
    v_{t+1} = \beta_2 v_t + (1 - \beta_2) d_t^2 \\
    w_{t+1} &= w_t - \frac{\eta_t}{k + 1}
      \frac{\hat m_{t+1}}{\sqrt{\hat v_{t+1}} + \epsilon}

  with :math:`k = t \bmod S`, :math:`\lambda_t = \lambda_0 / \eta_t` and
  bias-corrected :math:`\hat m, \hat v` whose count is never reset. The
  weight decay is coupled (L2 added to the gradient after the proximal term,
  as in the authors' code), not AdamW's. :math:`\epsilon` is added after bias
  correction (optax's convention); the authors' 2019 PyTorch Adam added it
  before, a difference of order :math:`\epsilon`.

  Args:
    learning_rate: :math:`\eta_t`, a non-negative scalar or schedule.
    strength: :math:`\lambda_0` when `couple_to_learning_rate`, else
      :math:`\lambda`; default :math:`\lambda = 0.1` at the initial learning
      rate, as in :func:`tr_sgd`.
    b1: :math:`\beta_1`, in [0, 1).
    b2: :math:`\beta_2`, in [0, 1).
    eps: :math:`\epsilon \ge 0`.
    weight_decay: coupled weight decay :math:`\mu \ge 0` (scalar or
      schedule); 1e-4 as in the authors' runs.
    inner_steps: :math:`S`, updates between anchor resets.
    inner_lr_decay: use the step size :math:`\eta_t / (k + 1)`.
    couple_to_learning_rate: :math:`\lambda_t = \lambda_0 / \eta_t` (the
      authors' choice) instead of :math:`\lambda_t` = `strength`.
    weight_decay_mask: pytree of booleans (or a function of the params
      returning one) selecting the leaves to decay; `None` decays all.
    mu_dtype: dtype of the first moment (default: the params').
    steps_per_epoch: updates per epoch, to restart the inner window at each
      epoch (see :func:`tr_sgd`); `None` counts straight through.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` requires `params`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import tr_adam
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = tr_adam(learning_rate=0.1, weight_decay=0.0)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(300):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 1e-2)
    True

  References:
    Zhang, Qu, Chen, Metaxas, `Taming the Noisy Gradient: Train Deep Neural
    Networks with Small Batch Sizes
    <https://doi.org/10.24963/ijcai.2019/604>`_, IJCAI 2019 (no arXiv
    version); code: https://github.com/huiqu18/TRAlgorithm
  """
  _checks.check_non_negative("learning_rate", learning_rate)
  _checks.check_momentum("b1", b1)
  _checks.check_momentum("b2", b2)
  _checks.check_non_negative("eps", eps)
  _checks.check_non_negative("weight_decay", weight_decay)
  strength = _default_strength(strength, learning_rate, couple_to_learning_rate)
  inner = optax.chain(
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
      optax.scale_by_learning_rate(learning_rate),
  )
  return trajectory_regularized(
      inner,
      strength=strength,
      inner_steps=inner_steps,
      inner_lr_decay=inner_lr_decay,
      learning_rate=learning_rate if couple_to_learning_rate else None,
      steps_per_epoch=steps_per_epoch,
  )
