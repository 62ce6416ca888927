"""Gradient-noise statistics of one mini-batch, from three sources.

Every batch-size test (:mod:`sngm_optax._batch_size_tests`) is a function of
a few scalars, the :class:`GradientNoiseStatistics`, which can be computed
from three sources:

* per-example gradients (a leading batch axis), :func:`per_example_statistics`;
* K microbatch mean gradients, :func:`microbatch_statistics`;
* per-device mean gradients inside `pmap`/`shard_map`,
  :func:`per_device_statistics` (only the gradient and three or four scalars
  are all-reduced);

and, for the norm and coordinate-wise tests, from running sums of unit
gradients and their squares, :func:`moment_statistics` (constant memory, any
number of microbatches, e.g. from `optax.microbatching.micro_grad`).
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sngm_optax._normalize import global_norm
from sngm_optax._normalize import sum_of_squares

AxisName = str | tuple[str, ...]

_HIGHEST = jax.lax.Precision.HIGHEST


class GradientNoiseStatistics(NamedTuple):
  r"""Per-sample gradient statistics of one mini-batch, as float32 scalars.

  With per-sample gradients :math:`g_i` (:math:`i = 1..b`), their mean
  :math:`\bar g`, the unit direction :math:`\hat g = \bar g / \|\bar g\|` and
  unbiased variances over :math:`i`:

  Attributes:
    num_samples: :math:`b`, the number of samples in the mini-batch.
    sq_norm: :math:`\|\bar g\|^2`.
    variance_trace: :math:`\sum_j \mathrm{Var}_i(g_{ij})`, the trace of the
      per-sample gradient covariance :math:`\mathrm{tr}(\Sigma)`.
    directional_variance: :math:`\mathrm{Var}_i(\langle g_i, \hat g\rangle)`,
      the variance along the mean gradient (0 when :math:`\bar g = 0`).
    orthogonal_variance: :math:`\sum_j \mathrm{Var}_i(o_{ij})` with
      :math:`o_i = g_i - \langle g_i, \hat g\rangle \hat g`; it equals
      `variance_trace - directional_variance`.
    preconditioned_variance_trace: :math:`\sum_j w_j \mathrm{Var}_i(g_{ij})`
      for diagonal preconditioner weights :math:`w` (0 without weights).
    preconditioned_sq_norm: :math:`\sum_j w_j \bar g_j^2` (0 without weights).
  """

  num_samples: jax.Array
  sq_norm: jax.Array
  variance_trace: jax.Array
  directional_variance: jax.Array
  orthogonal_variance: jax.Array
  preconditioned_variance_trace: jax.Array
  preconditioned_sq_norm: jax.Array


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # JAX before 0.10


def _check_varying(tree, axis_name: AxisName) -> None:
  """Raises if `tree` is typed as identical on all devices of `axis_name`.

  Under `jax.shard_map` with `check_vma=True` (the default), the gradient
  with respect to replicated (device-invariant) params is already summed over
  the devices: per-device statistics of it would see no variance at all.
  Under `pmap` or `check_vma=False` JAX does not track this and nothing is
  checked.
  """
  names = set(axis_name if isinstance(axis_name, tuple) else (axis_name,))
  cast = getattr(jax.lax, "pcast", None)
  probe = jnp.zeros((), jnp.float32)
  try:
    if cast is not None:
      probe = cast(probe, axis_name, to="varying")
    else:
      probe = jax.lax.pvary(probe, axis_name)
  except (AttributeError, TypeError, ValueError, NotImplementedError):
    return
  if not names <= _varying_axes(probe):
    return  # device variance is not tracked here
  if any(not names <= _varying_axes(x) for x in jax.tree.leaves(tree)):
    raise ValueError(
        f"the gradients are identical on all devices of {axis_name!r} (under "
        "shard_map with check_vma=True, the gradient of replicated params is "
        "already summed over devices). Differentiate with respect to "
        f"jax.lax.pcast(params, {axis_name!r}, to='varying') to get each "
        "device's own gradient, or use check_vma=False"
    )


def _unit_rows(leaves, axis_name: AxisName | None):
  """Each leaf of the stacked unit gradients as a (units, size) matrix.

  Returns the float32 matrices and the number of units of all devices;
  raises unless every leaf has the same leading axis and there are at least
  2 units in all.
  """
  if not leaves:
    raise ValueError("the gradient pytree has no leaves")
  local_units = leaves[0].shape[0] if leaves[0].ndim else 0
  if any(leaf.ndim == 0 or leaf.shape[0] != local_units for leaf in leaves):
    raise ValueError(
        "every leaf of the stacked gradients must have the same leading "
        f"(batch) axis; got shapes {[leaf.shape for leaf in leaves]}"
    )
  num_devices = jax.lax.axis_size(axis_name) if axis_name else 1
  if axis_name:
    _check_varying(leaves, axis_name)
  num_units = local_units * num_devices
  if num_units < 2:
    raise ValueError(
        "gradient-noise statistics need at least 2 examples, microbatches or "
        f"devices to estimate a variance; got {num_units}"
    )
  # Sums over units become matrix-vector products: XLA:CPU reduces a leading
  # axis far more slowly.
  rows = [
      leaf.reshape(local_units, math.prod(leaf.shape[1:])).astype(jnp.float32)
      for leaf in leaves
  ]
  return rows, num_units


def _mean_of_units(rows, num_units, axis_name: AxisName | None):
  """The mean unit gradient of all devices, one flat vector per leaf."""
  ones = jnp.ones(rows[0].shape[0], jnp.float32)
  sums = [jnp.matmul(ones, r, precision=_HIGHEST) for r in rows]
  if axis_name:
    sums = jax.lax.psum(sums, axis_name)
  return [s / num_units for s in sums]


def _deviation_sums(rows, means, norm, weights):
  r"""This device's sums over units of the squared deviations from the mean.

  With :math:`\delta_u = g_u - \bar g`: :math:`\sum_u \|\delta_u\|^2`,
  :math:`\sum_u \langle\delta_u, \hat g\rangle^2`, the orthogonal rest and,
  with `weights`, :math:`\sum_u \sum_j w_j \delta_{uj}^2`, stacked. The
  deviations are taken before squaring, so nothing cancels.
  """
  inverse_norm = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
  squared = sum(jnp.sum(jnp.square(r - m), axis=1) for r, m in zip(rows, means))
  # <g_u - mean, mean / |mean|> = <g_u, mean> / |mean| - |mean|. A sum,
  # not a matmul: explicit sharding refuses a contraction over a sharded
  # parameter axis without an output sharding.
  along = (
      sum(jnp.sum(r * m, axis=1) for r, m in zip(rows, means)) * inverse_norm
      - norm
  )
  orthogonal = jnp.maximum(squared - jnp.square(along), 0.0)
  sums = [jnp.sum(squared), jnp.sum(jnp.square(along)), jnp.sum(orthogonal)]
  if weights is not None:
    sums.append(sum(
        jnp.sum(jnp.square(r - m) * w)
        for r, m, w in zip(rows, means, weights)
    ))
  return jnp.stack(sums)


def _unit_statistics(
    units,
    samples_per_unit,
    axis_name: AxisName | None,
    preconditioner,
    mean=None,
):
  """Statistics from `n` unit gradients, each the mean of `m` samples.

  A unit is an example (m = 1), a microbatch or a device. Across all units of
  all devices, `trace = m / (n - 1) * sum_u ||g_u - mean||^2` and likewise for
  the other variances: a mean of `m` i.i.d. samples has `1/m` of their
  variance, so `m` times the unbiased variance of unit means is an unbiased
  estimate of the per-sample variance (exact when m = 1). With `axis_name`
  the per-device sums are added with one `psum` of a few scalars.
  """
  leaves, treedef = jax.tree.flatten(units)
  rows, num_units = _unit_rows(leaves, axis_name)
  if mean is None:
    means = _mean_of_units(rows, num_units, axis_name)
  else:
    means = [
        jnp.ravel(g).astype(jnp.float32) for g in treedef.flatten_up_to(mean)
    ]
  norm = global_norm(means)
  weights = None
  if preconditioner is not None:
    weights = [
        jnp.ravel(w).astype(jnp.float32)
        for w in treedef.flatten_up_to(preconditioner)
    ]
  sums = _deviation_sums(rows, means, norm, weights)
  if axis_name:
    sums = jax.lax.psum(sums, axis_name)

  samples_per_unit = jnp.asarray(samples_per_unit, jnp.float32)
  scale = samples_per_unit / (num_units - 1)
  zero = jnp.zeros((), jnp.float32)
  if weights is None:
    preconditioned_trace, preconditioned_sq_norm = zero, zero
  else:
    preconditioned_trace = scale * sums[3]
    preconditioned_sq_norm = sum(
        jnp.sum(jnp.square(m) * w) for m, w in zip(means, weights)
    )
  statistics = GradientNoiseStatistics(
      num_samples=samples_per_unit * num_units,
      sq_norm=jnp.square(norm),
      variance_trace=scale * sums[0],
      directional_variance=scale * sums[1],
      orthogonal_variance=scale * sums[2],
      preconditioned_variance_trace=preconditioned_trace,
      preconditioned_sq_norm=preconditioned_sq_norm,
  )
  mean = treedef.unflatten(
      [m.reshape(leaf.shape[1:]) for m, leaf in zip(means, leaves)]
  )
  return mean, statistics


def per_example_statistics(
    per_example_grads,
    *,
    axis_name: AxisName | None = None,
    preconditioner=None,
):
  r"""Gradient-noise statistics from per-example gradients.

  .. math::
    \bar g = \tfrac1b \textstyle\sum_i g_i, \quad
    \mathrm{tr}(\Sigma) = \tfrac{1}{b-1} \textstyle\sum_i \|g_i - \bar g\|^2,
    \quad \ldots \text{ (see } :class:`GradientNoiseStatistics` \text{)}

  The statistics are exact sample statistics (float32 accumulation). Inside
  `pmap`/`shard_map`, `axis_name` makes them those of the examples of all
  devices together: the gradient sum and three scalars are all-reduced.

  Args:
    per_example_grads: a gradient pytree whose leaves have a leading batch
      axis of size :math:`b \ge 2` (per device), e.g. from
      `jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)` or
      `optax.microbatching.micro_vmap`.
    axis_name: the mapped axis to pool the examples of all devices over.
    preconditioner: optional pytree of diagonal weights :math:`w` (shaped like
      one gradient) for the `preconditioned_*` statistics.

  Returns:
    `(mean_grads, statistics)`: the float32 mean gradient and a
    :class:`GradientNoiseStatistics`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sngm_optax import per_example_statistics
    >>> grads = {'w': jnp.array([[1.0, 0.0], [3.0, 0.0]])}  # 2 examples
    >>> mean, stats = per_example_statistics(grads)
    >>> mean['w'], stats.sq_norm, stats.variance_trace
    (Array([2., 0.], dtype=float32), Array(4., dtype=float32), Array(2., dtype=float32))
  """
  return _unit_statistics(per_example_grads, 1, axis_name, preconditioner)


def microbatch_statistics(
    microbatch_grads,
    microbatch_size,
    *,
    axis_name: AxisName | None = None,
    preconditioner=None,
):
  r"""Gradient-noise statistics estimated from K microbatch mean gradients.

  Each microbatch gradient :math:`g_k` is the mean of :math:`m` per-sample
  gradients, so :math:`\mathrm{Var}(g_k) = \mathrm{Var}_\text{sample} / m`
  and the per-sample variances are estimated as :math:`m` times the unbiased
  variance over microbatches:

  .. math::
    \mathrm{tr}(\Sigma) \approx \tfrac{m}{K-1} \textstyle\sum_k
      \|g_k - \bar g\|^2,
    \qquad b = K m

  (unbiased for i.i.d. samples, with :math:`K - 1` degrees of freedom instead
  of :math:`b - 1`). With :math:`m = 1` this is :func:`per_example_statistics`
  exactly. `axis_name` pools the microbatches of all devices.

  Args:
    microbatch_grads: a gradient pytree whose leaves have a leading axis of
      :math:`K \ge 2` microbatch mean gradients (per device).
    microbatch_size: :math:`m`, the number of samples in each microbatch.
    axis_name: the mapped axis to pool the microbatches of all devices over.
    preconditioner: optional pytree of diagonal weights (see
      :func:`per_example_statistics`).

  Returns:
    `(mean_grads, statistics)` as :func:`per_example_statistics`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sngm_optax import microbatch_statistics
    >>> grads = jnp.array([[1.0], [3.0]])  # 2 microbatches of 8 samples
    >>> _, stats = microbatch_statistics(grads, microbatch_size=8)
    >>> stats.num_samples, stats.variance_trace
    (Array(16., dtype=float32), Array(16., dtype=float32))
  """
  return _unit_statistics(
      microbatch_grads, microbatch_size, axis_name, preconditioner
  )


def per_device_statistics(
    grads,
    per_device_batch_size,
    axis_name: AxisName,
    *,
    preconditioner=None,
    mean_grads=None,
):
  r"""Gradient-noise statistics from the devices' own mean gradients.

  Call it inside `jax.pmap`/`jax.shard_map`, with each of the :math:`D`
  devices holding :math:`g_d`, the mean gradient of its :math:`m` samples
  (:math:`b = D m`). With :math:`\bar g` the mean over devices,
  :math:`\delta_d = g_d - \bar g` and :math:`\hat g = \bar g / \|\bar g\|`:

  .. math::
    \mathrm{tr}(\Sigma) &\approx \tfrac{m}{D-1} \textstyle\sum_d \|\delta_d\|^2
      = \tfrac{m D}{D-1}\,\big(\mathrm{mean}_d \|g_d\|^2 - \|\bar g\|^2\big) \\
    \mathrm{Var}_i(\langle g_i, \hat g\rangle) &\approx \tfrac{m}{D-1}
      \textstyle\sum_d \langle \delta_d, \hat g\rangle^2 \\
    \textstyle\sum_j \mathrm{Var}_i(o_{ij}) &\approx \tfrac{m}{D-1}
      \textstyle\sum_d \big(\|\delta_d\|^2 - \langle\delta_d,\hat g\rangle^2\big)
      \\
    \textstyle\sum_j w_j \mathrm{Var}_i(g_{ij}) &\approx \tfrac{m}{D-1}
      \textstyle\sum_d \sum_j w_j \delta_{dj}^2

  the microbatch estimator of :func:`microbatch_statistics` with the devices
  as microbatches. Each device reduces its own :math:`\delta_d` to three
  scalars (four with a preconditioner), so the only all-reduces are the
  gradient mean (which data-parallel training needs anyway) and one `psum`
  of those float32 scalars. All tests,
  orthogonality and coordinate-wise included, need nothing more: the
  orthogonal component of :math:`g_d` is determined by :math:`\|\delta_d\|^2`
  and :math:`\langle\delta_d, \hat g\rangle`, and the preconditioner weights
  are the same on every device. The estimate has :math:`D - 1` degrees of
  freedom; it needs :math:`D \ge 2`.

  Under `jax.shard_map` with `check_vma=True` (the default), the gradient of
  replicated params is already summed over the devices; differentiate with
  respect to `jax.lax.pcast(params, axis_name, to='varying')` to get each
  device's own gradient (a ValueError says so when the gradients are typed as
  device-invariant). Under `jax.pmap`, or `check_vma=False`, `jax.grad` of
  the local loss gives each device's own gradient.

  Args:
    grads: this device's mean gradient (a pytree).
    per_device_batch_size: :math:`m`, the number of samples behind `grads`.
    axis_name: the mapped axis (or axes) of the devices.
    preconditioner: optional pytree of diagonal weights (identical on all
      devices).
    mean_grads: :math:`\bar g` when the caller has already all-reduced it;
      by default it is computed here with one `psum`.

  Returns:
    `(mean_grads, statistics)` as :func:`per_example_statistics`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sngm_optax import per_device_statistics
    >>> n = jax.local_device_count()
    >>> stats_fn = jax.pmap(
    ...     lambda g: per_device_statistics(g, 4, 'batch')[1].num_samples,
    ...     axis_name='batch')
    >>> if n > 1:
    ...   assert int(stats_fn(jnp.ones((n, 3)))[0]) == 4 * n
  """
  if not axis_name:
    raise ValueError("axis_name must be a non-empty axis name")
  units = jax.tree.map(lambda g: g[None], grads)
  return _unit_statistics(
      units, per_device_batch_size, axis_name, preconditioner, mean=mean_grads
  )


def _mean_and_norm_statistics(grads, per_device_batch_size, axis_name):
  r"""The gradient mean and what the norm test needs, in one all-reduce.

  .. math::
    \mathrm{tr}(\Sigma) \approx \tfrac{m D}{D-1}\big(\mathrm{mean}_d
    \|g_d\|^2 - \|\bar g\|^2\big)

  as in :func:`per_device_statistics`, but :math:`\|g_d\|^2` needs no
  :math:`\bar g`, so it is all-reduced together with the gradients: no
  second collective, no second pass over them (measured in
  benchmarks/step_throughput.py). The cancellation costs about float32's
  epsilon times :math:`m\|\bar g\|^2 / \eta^2` samples in the test, far
  below one step of the batch size. The fields the norm test does not read
  are NaN.
  """
  num_devices = jax.lax.axis_size(axis_name)
  if num_devices < 2:
    raise ValueError(
        "per-device statistics need at least 2 devices to estimate a "
        f"variance; got {num_devices}"
    )
  _check_varying(grads, axis_name)
  device_sq_norm = sum_of_squares(jax.tree.leaves(grads))
  mean_grads, mean_device_sq_norm = jax.lax.pmean(
      (grads, device_sq_norm), axis_name
  )
  sq_norm = sum_of_squares(jax.tree.leaves(mean_grads))
  per_device_batch_size = jnp.asarray(per_device_batch_size, jnp.float32)
  spread = jnp.maximum(mean_device_sq_norm - sq_norm, 0.0)
  nan = jnp.full((), jnp.nan, jnp.float32)
  return mean_grads, GradientNoiseStatistics(
      num_samples=per_device_batch_size * num_devices,
      sq_norm=sq_norm,
      variance_trace=per_device_batch_size * num_devices
      / (num_devices - 1) * spread,
      directional_variance=nan,
      orthogonal_variance=nan,
      preconditioned_variance_trace=nan,
      preconditioned_sq_norm=nan,
  )


class GradientMoments(NamedTuple):
  r"""Running sums of unit gradients and of their squares, per coordinate.

  The constant-memory, any-count source: accumulate one unit gradient at a
  time (an example, or a microbatch mean of `m` samples) with
  :func:`gradient_moments` and `+` of the fields (:func:`add_gradient_moments`),
  e.g. inside a gradient-accumulation loop whose number of microbatches
  changes from step to step. All fields are sums, so `jax.lax.psum(moments,
  axis_name)` pools the units of all devices.

  Attributes:
    count: int32, the number of unit gradients summed.
    grad_sum: :math:`\sum_u g_u` (float32 pytree).
    sq_grad_sum: :math:`\sum_u g_u^2`, elementwise (float32 pytree).
  """

  count: jax.Array
  grad_sum: Any
  sq_grad_sum: Any


def gradient_moments(grads) -> GradientMoments:
  """The :class:`GradientMoments` of one unit gradient (count 1).

  Args:
    grads: one unit gradient (a pytree; an example's or a microbatch's mean).

  Returns:
    `GradientMoments(1, grads, grads**2)` in float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from sngm_optax import add_gradient_moments, gradient_moments
    >>> moments = add_gradient_moments(gradient_moments(jnp.array([1.0])),
    ...                                gradient_moments(jnp.array([3.0])))
    >>> moments.count, moments.grad_sum, moments.sq_grad_sum
    (Array(2, dtype=int32), Array([4.], dtype=float32), Array([10.], dtype=float32))
  """
  grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
  return GradientMoments(
      count=jnp.ones((), jnp.int32),
      grad_sum=grads,
      sq_grad_sum=jax.tree.map(jnp.square, grads),
  )


def add_gradient_moments(a: GradientMoments, b: GradientMoments):
  """The :class:`GradientMoments` of the units of `a` and `b` together.

  Args:
    a: moments of some units.
    b: moments of other units.

  Returns:
    Their field-wise sum.
  """
  return jax.tree.map(jnp.add, a, b)


def moment_statistics(
    moments: GradientMoments,
    samples_per_unit,
    *,
    axis_name: AxisName | None = None,
    preconditioner=None,
):
  r"""Gradient-noise statistics from :class:`GradientMoments`.

  With :math:`n` units of :math:`m` samples each,
  :math:`\bar g = \frac1n \sum_u g_u` and per coordinate
  :math:`s_j = \max(0, \sum_u g_{uj}^2 - n \bar g_j^2)
  = \sum_u (g_{uj} - \bar g_j)^2`:

  .. math::
    \mathrm{tr}(\Sigma) \approx \tfrac{m}{n-1} \textstyle\sum_j s_j, \qquad
    \textstyle\sum_j w_j \mathrm{Var}_i(g_{ij}) \approx
      \tfrac{m}{n-1} \sum_j w_j s_j

  the same estimates as :func:`per_example_statistics` (:math:`m = 1`) or
  :func:`microbatch_statistics`, but only for the norm and coordinate-wise
  tests: the moments hold no inner products between units, so
  `directional_variance` and `orthogonal_variance` are NaN. The squared
  deviations are formed from sums (float32 cancellation when the gradients'
  spread is below ~1e-3 of their mean, where the tests ask for no growth
  anyway). Fewer than 2 units give non-finite statistics, which
  :func:`adaptive_batch_size` skips. `optax.microbatching.micro_grad` with
  `accumulator=AccumulationType.SUM` and `transform_fn=lambda g: (g,
  jax.tree.map(jnp.square, g))` gives the per-example moments of a batch
  (:math:`m = 1`) in constant memory.

  Args:
    moments: the :class:`GradientMoments` of this device's units.
    samples_per_unit: :math:`m` (1 for per-example moments).
    axis_name: the mapped axis to pool the units of all devices over.
    preconditioner: optional pytree of diagonal weights :math:`w`.

  Returns:
    `(mean_grads, statistics)` as :func:`per_example_statistics`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sngm_optax import gradient_moments, moment_statistics
    >>> from sngm_optax import add_gradient_moments
    >>> moments = add_gradient_moments(gradient_moments(jnp.array([1.0, 0.0])),
    ...                                gradient_moments(jnp.array([3.0, 0.0])))
    >>> _, stats = moment_statistics(moments, samples_per_unit=1)
    >>> stats.sq_norm, stats.variance_trace
    (Array(4., dtype=float32), Array(2., dtype=float32))
  """
  if axis_name:
    _check_varying((moments.grad_sum, moments.sq_grad_sum), axis_name)
    moments = jax.lax.psum(moments, axis_name)
  count = jnp.asarray(moments.count, jnp.float32)
  mean = jax.tree.map(lambda s: s.astype(jnp.float32) / count, moments.grad_sum)
  deviations = jax.tree.map(
      lambda s2, g: jnp.maximum(s2.astype(jnp.float32) - count * g * g, 0.0),
      moments.sq_grad_sum,
      mean,
  )
  samples_per_unit = jnp.asarray(samples_per_unit, jnp.float32)
  scale = samples_per_unit / (count - 1)
  zero = jnp.zeros((), jnp.float32)
  nan = jnp.full((), jnp.nan, jnp.float32)
  preconditioned_trace, preconditioned_sq_norm = zero, zero
  if preconditioner is not None:
    weights = jax.tree.map(lambda w: w.astype(jnp.float32), preconditioner)
    preconditioned_trace = scale * sum(
        jnp.sum(d * w)
        for d, w in zip(jax.tree.leaves(deviations), jax.tree.leaves(weights))
    )
    preconditioned_sq_norm = sum(
        jnp.sum(g * g * w)
        for g, w in zip(jax.tree.leaves(mean), jax.tree.leaves(weights))
    )
  statistics = GradientNoiseStatistics(
      num_samples=samples_per_unit * count,
      sq_norm=jnp.square(global_norm(mean)),
      variance_trace=scale * sum(jnp.sum(d) for d in jax.tree.leaves(deviations)),
      directional_variance=nan,
      orthogonal_variance=nan,
      preconditioned_variance_trace=preconditioned_trace,
      preconditioned_sq_norm=preconditioned_sq_norm,
  )
  return mean, statistics
