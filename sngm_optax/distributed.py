"""Cross-device helpers for data-parallel training (`pmap` / `shard_map`)."""

import jax
import optax


def average_across_devices(
    axis_name: str | tuple[str, ...],
) -> optax.GradientTransformationExtraArgs:
  """Replaces each device's updates by their mean over `axis_name`.

  Use it inside `jax.pmap(..., axis_name=...)` or `jax.shard_map` over a mesh
  axis, in front of a transform that must see the global mini-batch gradient
  (for example a norm): with K devices each holding the gradient of its own
  shard of the batch, the result is the gradient of the whole batch.

  Under `jax.pmap` and `jax.shard_map(..., check_vma=False)` each device's
  gradient is its own, and this averages them. Under `jax.shard_map` with the
  default `check_vma=True`, JAX already *sums* the gradient of replicated
  params over the mesh axis, and `pmean` of that (device-invariant) value
  changes nothing: write the loss as `jax.lax.pmean(local_loss, axis_name)`
  there, so that the summed gradient is the global mean.

  Args:
    axis_name: the mapped axis (or axes) to average over.

  Returns:
    An `optax.GradientTransformationExtraArgs` with empty state.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import average_across_devices
    >>> tx = average_across_devices('batch')
    >>> step = jax.pmap(lambda g: tx.update(g, optax.EmptyState())[0],
    ...                 axis_name='batch')
    >>> n = jax.local_device_count()
    >>> float(step(jnp.arange(n, dtype=jnp.float32))[0]) == (n - 1) / 2
    True
  """
  if not axis_name:
    raise ValueError("axis_name must be a non-empty axis name")

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return jax.lax.pmean(updates, axis_name), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn
  )
