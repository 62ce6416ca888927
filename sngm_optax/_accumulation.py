r"""Gradients of a growing batch, one fixed-shape microbatch at a time.

A batch whose size changes from step to step (:func:`adaptive_batch_size`)
is fed as a variable number of microbatches of one fixed shape: the jitted
:attr:`GradientAccumulator.add` compiles once, whatever the batch size, and
the loop calls it as many times as the batch has microbatches. The state
holds, in constant memory, what the step needs: the mean gradient and the
:class:`GradientMoments` of the microbatch mean gradients, the source of
statistics of the norm and coordinate-wise tests.

Each call of `add` may take several microbatches at once (a leading axis of
`c * microbatch_size` examples); they are processed one after the other with
`optax.microbatching.microbatch`, so memory stays that of one microbatch.
That split is column-major, as optax's: microbatch :math:`u` of a chunk holds
the examples :math:`u, u + c, u + 2c, \ldots` (the mean is the same either
way; the units of the moments are these strided subsets).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.microbatching

from sngm_optax import _checks
from sngm_optax._gradient_statistics import GradientMoments


class AccumulationState(NamedTuple):
  r"""What :func:`gradient_accumulator` has summed so far (float32).

  Attributes:
    grad_sum: :math:`\sum_i w_i \nabla \ell_i`, the weighted sum of the
      per-example gradients (a params-shaped pytree).
    weight_sum: :math:`\sum_i w_i`, the number of (real) examples.
    moments: the :class:`GradientMoments` of the microbatch mean gradients
      :math:`\bar g_u = \sum_{i \in u} w_i \nabla\ell_i / \sum_{i\in u} w_i`,
      one unit per microbatch with a positive weight.
  """

  grad_sum: Any
  weight_sum: jax.Array
  moments: GradientMoments


class GradientAccumulator(NamedTuple):
  """The three pure functions of :func:`gradient_accumulator`.

  Attributes:
    init: `init(params) -> AccumulationState`, all zeros.
    add: `add(state, params, batch, weights=None) -> state` (with
      `has_aux`: `-> (state, aux)`, the sum of the microbatches' `aux`);
      `batch` is a pytree whose leaves have a leading axis of
      `c * microbatch_size` examples (c >= 1 microbatches), `weights` an
      optional `[c * microbatch_size]` array of per-example weights (1 for a
      real example, 0 for padding; default all 1).
    result: `result(state) -> (mean_grads, moments)`: the mean gradient
      :math:`\\sum_i w_i \\nabla\\ell_i / \\sum_i w_i` and the moments to
      pass as `gradient_moments=` to :func:`adaptive_batch_size` (built with
      the same `microbatch_size`).
  """

  init: Callable[..., AccumulationState]
  add: Callable[..., AccumulationState]
  result: Callable[[AccumulationState], tuple[Any, GradientMoments]]


def _float32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def gradient_accumulator(
    loss_fn: Callable[..., Any],
    microbatch_size: int,
    *,
    has_aux: bool = False,
) -> GradientAccumulator:
  r"""Accumulates the mean gradient and its noise moments over microbatches.

  With per-example losses :math:`\ell_i`, weights :math:`w_i \in \{0, 1\}`
  and microbatches :math:`u` of `microbatch_size` examples:

  .. math::
    \bar g = \frac{\sum_i w_i \nabla \ell_i}{\sum_i w_i}, \qquad
    \bar g_u = \frac{\sum_{i \in u} w_i \nabla \ell_i}{\sum_{i \in u} w_i},
    \qquad
    \text{moments} = \Big(n, \sum_u \bar g_u, \sum_u \bar g_u^2\Big)

  over the :math:`n` microbatches with a positive weight, from which
  :func:`moment_statistics` estimates
  :math:`\mathrm{tr}(\Sigma) \approx \frac{m}{n-1}\sum_u \|\bar g_u -
  \bar g\|^2`. The batch size is the number of calls times their
  microbatches, so it may change every step while `add` compiles once (for
  its one input shape). Pad a partly filled *batch* with whole weight-0
  microbatches; a partly filled microbatch would count as a full unit of
  `microbatch_size` samples in the variance estimate.

  Args:
    loss_fn: `loss_fn(params, microbatch) -> losses`, the per-example losses
      (shape `[microbatch_size]`), or `(losses, aux)` with `has_aux`. The
      microbatch is `batch` with a leading axis of `microbatch_size`.
    microbatch_size: :math:`m`, the examples per microbatch (the unit of the
      statistics).
    has_aux: whether `loss_fn` returns `(losses, aux)`; `add` then also
      returns the sum of the `aux` of its microbatches (e.g. the number of
      correct predictions).

  Returns:
    A :class:`GradientAccumulator` `(init, add, result)` of pure functions
    (jit `add` once and call it per microbatch or chunk of microbatches).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import adaptive_batch_size, gradient_accumulator
    >>> loss = lambda w, batch: (batch['x'] @ w - batch['y']) ** 2
    >>> accumulator = gradient_accumulator(loss, microbatch_size=2)
    >>> add = jax.jit(accumulator.add)
    >>> params = jnp.zeros(2)
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    >>> batch = {'x': x, 'y': jnp.array([1.0, 2.0, 0.0, 1.0])}
    >>> state = accumulator.init(params)
    >>> for start in (0, 2):  # two microbatches, one compiled add
    ...   microbatch = jax.tree.map(lambda a: a[start:start + 2], batch)
    ...   state = add(state, params, microbatch)
    >>> mean, moments = accumulator.result(state)
    >>> mean, moments.count
    (Array([-1.5, -1. ], dtype=float32), Array(2, dtype=int32))
    >>> tx = adaptive_batch_size(1024, initial_batch_size=4, microbatch_size=2)
    >>> _, opt_state = tx.update(mean, tx.init(params), params,
    ...                          gradient_moments=moments)
  """
  microbatch_size = _checks.check_positive_int(
      "microbatch_size", microbatch_size
  )

  def init(params) -> AccumulationState:
    zeros = optax.tree.zeros_like(params, jnp.float32)
    return AccumulationState(
        grad_sum=zeros,
        weight_sum=jnp.zeros((), jnp.float32),
        moments=GradientMoments(jnp.zeros((), jnp.int32), zeros, zeros),
    )

  def unit(params, microbatch, weights):
    """One microbatch's increment of the state."""

    def weighted_loss(p):
      out = loss_fn(p, microbatch)
      losses, aux = out if has_aux else (out, None)
      return jnp.sum(weights * losses), aux

    (_, aux), grad = jax.value_and_grad(weighted_loss, has_aux=True)(params)
    grad = _float32(grad)
    weight = jnp.sum(weights)
    mean = optax.tree.scale(1.0 / jnp.maximum(weight, 1.0), grad)
    return AccumulationState(
        grad_sum=grad,
        weight_sum=weight,
        moments=GradientMoments(
            (weight > 0).astype(jnp.int32), mean,
            jax.tree.map(jnp.square, mean),
        ),
    ), aux

  sum_over_microbatches = optax.microbatching.microbatch(
      unit, argnums=(1, 2), microbatch_size=microbatch_size,
      accumulator=optax.microbatching.AccumulationType.SUM,
  )

  def add(state: AccumulationState, params, batch, weights=None):
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % microbatch_size:
      raise ValueError(
          f"the batch has {size} examples, not a multiple of "
          f"microbatch_size={microbatch_size}"
      )
    if weights is None:
      weights = jnp.ones(size, jnp.float32)
    increment, aux = sum_over_microbatches(
        params, batch, jnp.asarray(weights, jnp.float32)
    )
    state = jax.tree.map(jnp.add, state, increment)
    return (state, aux) if has_aux else state

  def result(state: AccumulationState):
    mean = optax.tree.scale(
        1.0 / jnp.maximum(state.weight_sum, 1.0), state.grad_sum
    )
    return mean, state.moments

  return GradientAccumulator(init, add, result)
