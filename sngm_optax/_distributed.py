"""Cross-device helpers for data-parallel training (`pmap` / `shard_map`)."""

import jax
import optax

from sngm_optax import _checks


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
  _checks.check_axis_name("axis_name", axis_name)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return jax.lax.pmean(updates, axis_name), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn
  )


def per_device_state(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Gives each leaf of `inner`'s state a leading axis of size 1, for shard_map.

  Inside `jax.shard_map` each device sees its own block of every input, so a
  state that differs between devices (the error-feedback memory of
  :func:`gmc` and :func:`dgc`) must be sharded over the mesh axis, not
  replicated. With this wrapper the state seen from outside has a leading
  axis with one entry per device, to be passed with
  `PartitionSpec(axis_name)` as both in- and out-spec; `init` must then run
  inside the `shard_map` too. The updates are those of `inner`. Under
  `jax.pmap` the state is per device already and no wrapper is needed.

  Args:
    inner: the transformation whose state is per device.

  Returns:
    An `optax.GradientTransformationExtraArgs` with `inner`'s state
    structure, each leaf with an extra leading axis of size 1.

  Example:
    >>> import functools, jax, jax.numpy as jnp, optax
    >>> from jax.sharding import PartitionSpec as P
    >>> from sngm_optax import gmc, per_device_state
    >>> n = jax.device_count()
    >>> mesh = jax.make_mesh((n,), ('data',))
    >>> tx = per_device_state(gmc(0.1, density=0.5, axis_name='data'))
    >>> @jax.jit
    ... @functools.partial(jax.shard_map, mesh=mesh, in_specs=P(),
    ...                    out_specs=P('data'))
    ... def init(params):
    ...   return tx.init(params)
    >>> @jax.jit
    ... @functools.partial(jax.shard_map, mesh=mesh,
    ...                    in_specs=(P(), P('data'), P('data')),
    ...                    out_specs=(P(), P('data')))
    ... def step(params, state, x):
    ...   local = jax.lax.pcast(params, 'data', to='varying')
    ...   grads = jax.grad(lambda w: jnp.mean((w - x) ** 2))(local)
    ...   updates, state = tx.update(grads, state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> params = jnp.zeros(4)
    >>> state = init(params)
    >>> x = jax.device_put(jnp.ones((n, 4)), jax.NamedSharding(mesh, P('data')))
    >>> params, state = step(params, state, x)
    >>> optax.tree.get(state, 'memory').shape == (n, 4)  # one per device
    True
  """

  def add_axis(tree):
    return jax.tree.map(lambda x: x[None], tree)

  def init_fn(params):
    return add_axis(inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    state = jax.tree.map(lambda x: x[0], state)
    if isinstance(inner, optax.GradientTransformationExtraArgs):
      updates, state = inner.update(updates, state, params, **extra_args)
    else:
      updates, state = inner.update(updates, state, params)
    return updates, add_axis(state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
