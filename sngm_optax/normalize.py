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


def _sum_of_squares(leaves, scale=None):
  total = jnp.zeros((), jnp.float32)
  for leaf in leaves:
    leaf = leaf.astype(jnp.float32)
    if scale is not None:
      leaf = leaf / scale
    total += jnp.sum(jnp.square(leaf))
  return total


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
  squared = _sum_of_squares(leaves)

  def rescaled_norm(_):
    scale = jnp.zeros((), jnp.float32)
    for leaf in leaves:
      scale = jnp.maximum(scale, jnp.max(jnp.abs(leaf.astype(jnp.float32))))
    safe_scale = jnp.where(scale > 0, scale, 1.0)
    return safe_scale * jnp.sqrt(_sum_of_squares(leaves, safe_scale))

  needs_rescaling = (squared < _SMALLEST_SAFE_SQUARED_NORM) | ~jnp.isfinite(
      squared
  )
  return jax.lax.cond(
      needs_rescaling, rescaled_norm, lambda _: jnp.sqrt(squared), None
  )


def _normalize_overflowing(tree):
  """`g / ‖g‖` for finite entries with a norm above 2^64 (or float32's max).

  Dividing by such a norm would silently give zeros (`global_norm` is
  infinite beyond float32's range; a NaN/Inf entry gives NaN, which fails the
  `> 2^64` test and stays NaN). Scale by 2^-64 first (exact; a division by
  `max |g_j|` would become a multiplication by a subnormal, flushed to zero
  on CPU); entries small enough to underflow are negligible next to the norm.
  """
  # The barrier stops XLA from folding 2^-64 into 1/‖g‖ (a subnormal).
  scaled = jax.lax.optimization_barrier(
      jax.tree.map(lambda g: g.astype(jnp.float32) * 2.0**-64, tree))
  inverse = 1.0 / global_norm(scaled)
  return jax.tree.map(lambda g, s: (s * inverse).astype(g.dtype), tree, scaled)


def _scale_tree(tree, factor):
  return jax.tree.map(
      lambda g: (g.astype(jnp.float32) * factor).astype(g.dtype), tree
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

  def normalize(tree):
    norm = global_norm(tree)
    # Above 2^64, 1/‖g‖ nears float32's subnormals (flushed to zero): divide
    # a scaled-down copy instead.
    return jax.lax.cond(
        norm > 2.0**64,
        _normalize_overflowing,
        lambda t: _scale_tree(t, 1.0 / jnp.maximum(norm, eps)),
        tree,
    )

  def init_fn(params):
    _checks.check_float_params(params, "normalize_by_global_norm")
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.check_params_match(updates, params, "normalize_by_global_norm")
    if per_layer:
      return jax.tree.map(normalize, updates), state
    return normalize(updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
