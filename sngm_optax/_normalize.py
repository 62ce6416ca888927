"""Normalization of gradients by their L2 norm, computed safely in float32.

Failure behaviour: a zero gradient gives a zero update; a gradient with any
NaN or Inf entry gives an all-NaN update (the state of `scale_by_sngm`'s
momentum would then become NaN: wrap the optimizer in
`optax.apply_if_finite` to skip such steps); finite gradients of any
magnitude, even with a norm beyond float32's range, give a unit-norm update.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sngm_optax import _checks

# Below this squared norm float32 squares may have underflowed (and above
# float32's max they have overflowed): the norm is then recomputed after
# dividing by the largest entry. The common case stays a single reduction.
_SMALLEST_SAFE_SQUARED_NORM = 1e-20

# The smallest normal float32 (~1.18e-38). A smaller eps would be a subnormal,
# which XLA flushes to zero on CPU and GPU, so `max(‖g‖, eps)` could be 0.
SMALLEST_NORMAL_FLOAT32 = float(np.finfo(np.float32).tiny)


def sum_of_squares(leaves, scale=None):
  """Σ g_j² over a list of arrays, accumulated in float32."""
  if any(leaf.dtype != jnp.float32 for leaf in leaves):
    # Else XLA shares the float32 conversion of e.g. bfloat16 leaves between
    # this reduction and the update that reads them too, and materializes a
    # float32 copy of the tree (~4x slower, see benchmarks/README.md).
    leaves = jax.lax.optimization_barrier(list(leaves))
  total = jnp.zeros((), jnp.float32)
  for leaf in leaves:
    leaf = leaf.astype(jnp.float32)
    if scale is not None:
      leaf = leaf / scale
    total += jnp.sum(jnp.square(leaf))
  return total


@jax.jit  # eagerly, `lax.cond` below would compile at every call
def global_norm(tree) -> jax.Array:
  r"""The L2 norm of a pytree, as one float32 scalar, without over/underflow.

  .. math::
    \|g\| = \sqrt{\textstyle\sum_{\text{leaves}} \sum_j g_j^2}

  Squares are accumulated in float32 whatever the leaves' dtype. When the sum
  overflows (entries above ~1e19) or is too small to be accurate (entries
  below ~1e-10), the norm is recomputed as `s * ‖g / s‖` with `s = max |g_j|`,
  so gradients of any finite magnitude get an accurate norm. A NaN or infinite
  entry gives a NaN norm.

  Args:
    tree: a pytree of arrays.

  Returns:
    A float32 scalar.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  squared = sum_of_squares(leaves)

  def rescaled_norm(_):
    scale = jnp.zeros((), jnp.float32)
    for leaf in leaves:
      scale = jnp.maximum(scale, jnp.max(jnp.abs(leaf.astype(jnp.float32))))
    safe_scale = jnp.where(scale > 0, scale, 1.0)
    return safe_scale * jnp.sqrt(sum_of_squares(leaves, safe_scale))

  needs_rescaling = (squared < _SMALLEST_SAFE_SQUARED_NORM) | ~jnp.isfinite(
      squared
  )
  return jax.lax.cond(
      needs_rescaling, rescaled_norm, lambda _: jnp.sqrt(squared), None
  )


# Above this norm 1/‖g‖ nears float32's subnormals, which XLA flushes to zero.
_LARGEST_SAFE_NORM = 2.0**64


@jax.jit  # eagerly, `lax.cond` below would compile at every call
def _normalize(tree, eps):
  """`g / max(‖g‖, eps)`, with one elementwise pass that XLA fuses downstream.

  Both scale factors are scalars: a `lax.cond` returning the whole tree would
  materialize the normalized gradient (measured 4.1x sgd(momentum) instead of
  1.2-1.5x on a 25M-parameter tree, benchmarks/README.md). For finite entries with
  a norm above 2^64 (even beyond float32's range, where `global_norm` is
  infinite) the entries are scaled by 2^-64 first (exact) and divided by the
  norm of the scaled tree, computed only then; entries small enough to
  underflow are negligible next to such a norm. A NaN/Inf entry gives a NaN
  norm, which fails the `> 2^64` test and keeps the update NaN.
  """
  norm = global_norm(tree)
  overflows = norm > _LARGEST_SAFE_NORM
  pre_scale = jnp.where(overflows, 1.0 / _LARGEST_SAFE_NORM, 1.0)
  divisor = jax.lax.cond(
      overflows,
      lambda: global_norm(jax.tree.map(lambda g: g * pre_scale, tree)),
      lambda: jnp.maximum(norm, eps),
  )
  # Two multiplies: their product, 1/‖g‖, may be a flushed subnormal.
  inverse = 1.0 / divisor
  return jax.tree.map(
      lambda g: (g.astype(jnp.float32) * pre_scale * inverse).astype(g.dtype),
      tree,
  )


def normalize_by_global_norm(
    eps: float = SMALLEST_NORMAL_FLOAT32,
    per_layer: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Divides the updates by their global L2 norm.

  .. math::
    g \leftarrow \frac{g}{\max(\|g\|, \epsilon)}

  The norm is taken over the whole pytree (all leaves together), as in SNGM;
  with `per_layer=True` each leaf is divided by its own norm instead. The norm
  is computed in float32 by :func:`global_norm`, so bfloat16/float16 updates
  and gradients of magnitude 1e-30 or 1e30 are normalized accurately. A zero
  gradient gives a zero update; a NaN or infinite gradient gives a NaN update
  (never silent zeros: an Inf entry makes the norm NaN, so `g / ‖g‖` is NaN
  everywhere and `optax.apply_if_finite` can skip the step). Finite entries
  whose norm exceeds float32's range (~3.4e38) still give a unit-norm update.

  Args:
    eps: lower bound on the divisor, at least float32's smallest normal
      number (~1.18e-38, the default): every gradient whose norm is above it
      gets a unit-norm update.
    per_layer: normalize each leaf by its own norm instead of the global one.

  Returns:
    An `optax.GradientTransformationExtraArgs` with empty state.

  Example:
    >>> import jax.numpy as jnp
    >>> from sngm_optax import normalize_by_global_norm
    >>> tx = normalize_by_global_norm()
    >>> updates, _ = tx.update({'w': jnp.array([3.0, 4.0])}, tx.init(None))
    >>> updates['w']
    Array([0.6, 0.8], dtype=float32)

  References:
    Zhao, Xie, Li, `Stochastic Normalized Gradient Descent with Momentum for
    Large-Batch Training <https://arxiv.org/abs/2007.13985>`_, 2020
  """
  _checks.check_range("eps", eps, SMALLEST_NORMAL_FLOAT32)

  def init_fn(params):
    _checks.check_float_params(params, "normalize_by_global_norm")
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.check_params_match(updates, params, "normalize_by_global_norm")
    if per_layer:
      return jax.tree.map(lambda u: _normalize(u, eps), updates), state
    return _normalize(updates, eps), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
