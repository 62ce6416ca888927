"""Adaptive batch sizes (AdAdaGrad): gradient-noise tests and their controller.

A batch-size test compares the noise of the mini-batch gradient with its
signal and returns the smallest batch size :math:`b_{new}` that would make the
mini-batch gradient "accurate enough". Every test here is a function of a few
scalars, the :class:`GradientNoiseStatistics`, which can be computed from
three sources:

* per-example gradients (a leading batch axis), :func:`per_example_statistics`;
* K microbatch mean gradients, :func:`microbatch_statistics`;
* per-device mean gradients inside `pmap`/`shard_map`,
  :func:`per_device_statistics` (only the gradient and three or four scalars
  are all-reduced);

and, for the norm and coordinate-wise tests, from running sums of unit
gradients and their squares, :func:`moment_statistics` (constant memory, any
number of microbatches, e.g. from `optax.microbatching.micro_grad`).

:func:`adaptive_batch_size` puts a test in an `optax.chain`; its state holds
the batch size the training loop should use next.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sngm_optax import _checks
from sngm_optax._normalize import global_norm
from sngm_optax._normalize import sum_of_squares

AxisName = str | tuple[str, ...]

_HIGHEST = jax.lax.Precision.HIGHEST

TESTS = ("norm", "inner_product", "orthogonality", "augmented", "coordinate")


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


# ----------------------------------------------------------------------------
# Statistics from the three sources.


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
  estimate of the per-sample variance (exact when m = 1). Deviations are taken
  from the mean before squaring (no cancellation), and with `axis_name` the
  per-device sums are added with one `psum` of a few scalars.
  """
  leaves, treedef = jax.tree.flatten(units)
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
    _check_varying(units, axis_name)
  num_units = local_units * num_devices
  if num_units < 2:
    raise ValueError(
        "gradient-noise statistics need at least 2 examples, microbatches or "
        f"devices to estimate a variance; got {num_units}"
    )
  # Each leaf as a (units, size) float32 matrix. Sums over units are
  # matrix-vector products: XLA:CPU reduces a leading axis far more slowly.
  rows = [
      leaf.reshape(local_units, math.prod(leaf.shape[1:])).astype(jnp.float32)
      for leaf in leaves
  ]
  if mean is None:
    ones = jnp.ones(local_units, jnp.float32)
    sums = [jnp.matmul(ones, r, precision=_HIGHEST) for r in rows]
    if axis_name:
      sums = jax.lax.psum(sums, axis_name)
    means = [s / num_units for s in sums]
  else:
    means = [
        jnp.ravel(g).astype(jnp.float32) for g in treedef.flatten_up_to(mean)
    ]
  norm = global_norm(means)
  inverse_norm = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)

  squared = sum(jnp.sum(jnp.square(r - m), axis=1) for r, m in zip(rows, means))
  # <g_u - mean, mean / |mean|> = <g_u, mean> / |mean| - |mean|.
  along = (
      sum(jnp.matmul(r, m, precision=_HIGHEST) for r, m in zip(rows, means))
      * inverse_norm
      - norm
  )
  orthogonal = jnp.maximum(squared - jnp.square(along), 0.0)
  sums = [jnp.sum(squared), jnp.sum(jnp.square(along)), jnp.sum(orthogonal)]
  if preconditioner is not None:
    weights = [
        jnp.ravel(w).astype(jnp.float32)
        for w in treedef.flatten_up_to(preconditioner)
    ]
    sums.append(sum(
        jnp.sum(jnp.square(r - m) * w)
        for r, m, w in zip(rows, means, weights)
    ))
  sums = jnp.stack(sums)
  if axis_name:
    sums = jax.lax.psum(sums, axis_name)

  samples_per_unit = jnp.asarray(samples_per_unit, jnp.float32)
  scale = samples_per_unit / (num_units - 1)
  zero = jnp.zeros((), jnp.float32)
  if preconditioner is None:
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


# ----------------------------------------------------------------------------
# The tests: each returns b_new, the smallest batch size that passes.


def _required_batch_size(numerator, denominator, statistics):
  """`numerator / denominator`; at a zero denominator, inf if noisy else 0."""
  safe = jnp.where(denominator > 0, denominator, 1.0)
  at_zero = jnp.where(statistics.variance_trace > 0, jnp.inf, 0.0)
  return jnp.where(denominator > 0, numerator / safe, at_zero).astype(
      jnp.float32
  )


def norm_test(statistics: GradientNoiseStatistics, eta=0.1) -> jax.Array:
  r"""The norm test: the batch size that makes the gradient error small.

  .. math::
    \frac{\mathbb{E}\|g_B - \nabla F\|^2}{1} =
    \frac{\sum_j \mathrm{Var}_i(g_{ij})}{b} \le \eta^2 \|\bar g\|^2
    \quad\Longrightarrow\quad
    b_{new} = \frac{\sum_j \mathrm{Var}_i(g_{ij})}{\eta^2 \|\bar g\|^2}

  When :math:`\|\bar g\| = 0` no batch passes unless the gradients have no
  variance: :math:`b_{new} = +\infty` if :math:`\mathrm{tr}(\Sigma) > 0`,
  else 0 (the same rule holds for every test).

  Args:
    statistics: a :class:`GradientNoiseStatistics`.
    eta: :math:`\eta > 0`, the allowed relative error (default 0.1).

  Returns:
    :math:`b_{new}`, a float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from sngm_optax import norm_test, per_example_statistics
    >>> _, stats = per_example_statistics(jnp.array([[1.0], [3.0]]))
    >>> norm_test(stats, eta=0.5)  # 2 / (0.25 * 4)
    Array(2., dtype=float32)

  References:
    Byrd, Chin, Nocedal, Wu, `Sample size selection in optimization methods
    for machine learning <https://doi.org/10.1007/s10107-012-0572-5>`_, 2012;
    Lau, Liu, Kolar, `AdAdaGrad: Adaptive Batch Size Schemes for Adaptive
    Gradient Methods <https://arxiv.org/abs/2402.11215>`_, 2024
  """
  return _required_batch_size(
      statistics.variance_trace,
      jnp.square(eta) * statistics.sq_norm,
      statistics,
  )


def inner_product_test(
    statistics: GradientNoiseStatistics, theta=0.1
) -> jax.Array:
  r"""The inner-product test: noise along the mean gradient only.

  .. math::
    b_{new} = \frac{\mathrm{Var}_i(\langle g_i, \bar g\rangle)}
                   {\theta^2 \|\bar g\|^4}
            = \frac{\mathrm{Var}_i(\langle g_i, \hat g\rangle)}
                   {\theta^2 \|\bar g\|^2}

  (computed in the second form, which cannot underflow as fourth powers do).

  Args:
    statistics: a :class:`GradientNoiseStatistics`.
    theta: :math:`\theta > 0` (default 0.1).

  Returns:
    :math:`b_{new}`, a float32 scalar (see :func:`norm_test` for
    :math:`\bar g = 0`).

  Example:
    >>> import jax.numpy as jnp
    >>> from sngm_optax import inner_product_test, per_example_statistics
    >>> _, stats = per_example_statistics(jnp.array([[1.0, 5.0], [3.0, -5.0]]))
    >>> inner_product_test(stats, theta=0.5)  # only the 1st coordinate counts
    Array(2., dtype=float32)

  References:
    Bollapragada, Byrd, Nocedal, `Adaptive sampling strategies for stochastic
    optimization <https://arxiv.org/abs/1710.11258>`_, 2018;
    Lau, Liu, Kolar, `AdAdaGrad <https://arxiv.org/abs/2402.11215>`_, 2024
  """
  return _required_batch_size(
      statistics.directional_variance,
      jnp.square(theta) * statistics.sq_norm,
      statistics,
  )


def orthogonality_test(
    statistics: GradientNoiseStatistics, nu=0.1
) -> jax.Array:
  r"""The orthogonality test: noise orthogonal to the mean gradient.

  .. math::
    o_i = g_i - \frac{\langle g_i, \bar g\rangle}{\|\bar g\|^2}\,\bar g,
    \qquad
    b_{new} = \frac{\sum_j \mathrm{Var}_i(o_{ij})}{\nu^2 \|\bar g\|^2}

  Args:
    statistics: a :class:`GradientNoiseStatistics`.
    nu: :math:`\nu > 0` (default 0.1).

  Returns:
    :math:`b_{new}`, a float32 scalar (see :func:`norm_test` for
    :math:`\bar g = 0`).

  Example:
    >>> import jax.numpy as jnp
    >>> from sngm_optax import orthogonality_test, per_example_statistics
    >>> _, stats = per_example_statistics(jnp.array([[1.0, 5.0], [3.0, -5.0]]))
    >>> orthogonality_test(stats, nu=1.0)  # 50 / 4
    Array(12.5, dtype=float32)

  References:
    Bollapragada, Byrd, Nocedal, `Adaptive sampling strategies for stochastic
    optimization <https://arxiv.org/abs/1710.11258>`_, 2018
  """
  return _required_batch_size(
      statistics.orthogonal_variance,
      jnp.square(nu) * statistics.sq_norm,
      statistics,
  )


def augmented_inner_product_test(
    statistics: GradientNoiseStatistics, theta=0.1, nu=0.1
) -> jax.Array:
  r"""The augmented inner-product test: the stricter of two tests.

  .. math::
    b_{new} = \max\big(b_{new}^{\text{inner product}}(\theta),\;
                       b_{new}^{\text{orthogonality}}(\nu)\big)

  Args:
    statistics: a :class:`GradientNoiseStatistics`.
    theta: :math:`\theta > 0` of :func:`inner_product_test` (default 0.1).
    nu: :math:`\nu > 0` of :func:`orthogonality_test` (default 0.1).

  Returns:
    :math:`b_{new}`, a float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from sngm_optax import augmented_inner_product_test
    >>> from sngm_optax import per_example_statistics
    >>> _, stats = per_example_statistics(jnp.array([[1.0, 5.0], [3.0, -5.0]]))
    >>> augmented_inner_product_test(stats, theta=0.5, nu=1.0)
    Array(12.5, dtype=float32)

  References:
    Bollapragada, Byrd, Nocedal, `Adaptive sampling strategies for stochastic
    optimization <https://arxiv.org/abs/1710.11258>`_, 2018
  """
  return jnp.maximum(
      inner_product_test(statistics, theta), orthogonality_test(statistics, nu)
  )


def coordinate_test(statistics: GradientNoiseStatistics, eta=0.1) -> jax.Array:
  r"""The coordinate-wise test: the norm test in AdaGrad's geometry.

  With AdaGrad's accumulator :math:`v` *after* this step's update
  (:math:`v_j = v_{0,j} + \sum_{s \le t} \bar g_{s,j}^2`, the one AdaGrad
  divides by) and weights :math:`w_j = 1/\sqrt{v_j + \epsilon}` (0 where
  :math:`v_j = 0`, as `optax.scale_by_rss`), the test asks that the
  preconditioned gradient error be small relative to the preconditioned
  gradient, :math:`\mathbb{E}\|g_B - \nabla F\|_w^2 \le \eta^2
  \|\nabla F\|_w^2` with :math:`\|x\|_w^2 = \sum_j w_j x_j^2`:

  .. math::
    \frac{1}{b}\sum_j \frac{\mathrm{Var}_i(g_{ij})}{\sqrt{v_j+\epsilon}}
      \le \eta^2 \sum_j \frac{\bar g_j^2}{\sqrt{v_j+\epsilon}}
    \quad\Longrightarrow\quad
    b_{new} = \frac{\sum_j w_j\,\mathrm{Var}_i(g_{ij})}
                   {\eta^2 \sum_j w_j\,\bar g_j^2}

  The statistics must have been computed with `preconditioner=w`
  (:func:`adaptive_batch_size` with `test='coordinate'` does this, keeping
  its own copy of AdaGrad's accumulator).

  Args:
    statistics: a :class:`GradientNoiseStatistics` with the
      `preconditioned_*` fields filled in.
    eta: :math:`\eta > 0` (default 0.1).

  Returns:
    :math:`b_{new}`, a float32 scalar (see :func:`norm_test` for
    :math:`\bar g = 0`).

  Example:
    >>> import jax.numpy as jnp
    >>> from sngm_optax import coordinate_test, per_example_statistics
    >>> grads = jnp.array([[1.0, 5.0], [3.0, -5.0]])
    >>> _, stats = per_example_statistics(grads, preconditioner=jnp.array([1.0, 0.0]))
    >>> coordinate_test(stats, eta=0.5)  # the 2nd coordinate has no weight
    Array(2., dtype=float32)

  References:
    Lau, Liu, Kolar, `AdAdaGrad: Adaptive Batch Size Schemes for Adaptive
    Gradient Methods <https://arxiv.org/abs/2402.11215>`_, 2024
  """
  return _required_batch_size(
      statistics.preconditioned_variance_trace,
      jnp.square(eta) * statistics.preconditioned_sq_norm,
      statistics,
  )


def next_batch_size(
    batch_size,
    test_batch_size,
    max_batch_size,
    batch_size_multiple=1,
) -> jax.Array:
  r"""The next batch size: grow to the test's demand, never shrink, cap.

  .. math::
    b_{k+1} = \min\Big(\bar b,\; q \Big\lceil \frac{\lceil
      \max(b_k, b_{new}) \rceil}{q} \Big\rceil\Big),
    \qquad \bar b = q \lfloor b_{max} / q \rfloor

  with :math:`q` = `batch_size_multiple` (e.g. devices × microbatch size).
  Rounding goes up to a multiple of :math:`q`, but never above the largest
  multiple of :math:`q` that is at most `max_batch_size`, so the result never
  exceeds `max_batch_size` (:func:`adaptive_batch_size` requires
  `max_batch_size` to be a multiple of :math:`q`, so its cap is exactly
  `max_batch_size`). An infinite :math:`b_{new}` gives the cap, a NaN one
  keeps :math:`b_k` (rounded up to a multiple of :math:`q`). The result
  is at least :math:`b_k` whenever :math:`b_k` is at most the cap.

  Args:
    batch_size: :math:`b_k`, the current batch size.
    test_batch_size: :math:`b_{new}` from a test (float, may be inf).
    max_batch_size: :math:`b_{max}`.
    batch_size_multiple: :math:`q \ge 1`.

  Returns:
    :math:`b_{k+1}`, an int32 scalar.

  Example:
    >>> from sngm_optax import next_batch_size
    >>> next_batch_size(32, 70.2, max_batch_size=1024, batch_size_multiple=16)
    Array(80, dtype=int32)
  """
  multiple = jnp.asarray(batch_size_multiple, jnp.int32)
  cap = jnp.asarray(max_batch_size, jnp.int32) // multiple * multiple
  # fmax: a NaN test statistic (no usable signal) keeps the current size.
  target = jnp.fmax(
      jnp.asarray(batch_size, jnp.float32),
      jnp.asarray(test_batch_size, jnp.float32),
  )
  # Cap in float first, so a huge or infinite target cannot overflow int32.
  target = jnp.ceil(jnp.minimum(target, cap.astype(jnp.float32)))
  target = target.astype(jnp.int32)
  rounded = (target + multiple - 1) // multiple * multiple
  return jnp.minimum(rounded, cap)


# ----------------------------------------------------------------------------
# The transform.


class AdaptiveBatchSizeState(NamedTuple):
  r"""State of :func:`adaptive_batch_size`; plain arrays, checkpointable.

  Attributes:
    batch_size: int32, the batch size of the last step (the samples its
      statistics came from); `initial_batch_size` before the first step.
    next_batch_size: int32, the batch size the training loop should use next.
    test_statistic: float32, :math:`b_{new}` of the last step's test (+inf
      when the mean gradient was zero but noisy).
    noise_scale: float32, the EMA-smoothed gradient noise scale
      :math:`B_{simple} = \mathrm{tr}(\Sigma) / \|G\|^2`.
    variance_trace_ema: float32, EMA of :math:`\mathrm{tr}(\Sigma)`.
    sq_norm_ema: float32, EMA of the unbiased estimate of :math:`\|G\|^2`.
    preconditioner_accumulator: for `test='coordinate'`, the copy of
      AdaGrad's accumulator :math:`v` (shaped like the params); otherwise
      `optax.EmptyState()`.
  """

  batch_size: jax.Array
  next_batch_size: jax.Array
  test_statistic: jax.Array
  noise_scale: jax.Array
  variance_trace_ema: jax.Array
  sq_norm_ema: jax.Array
  preconditioner_accumulator: Any


def _noise_scale(variance_trace_ema, sq_norm_ema):
  safe = jnp.where(sq_norm_ema > 0, sq_norm_ema, 1.0)
  at_zero = jnp.where(variance_trace_ema > 0, jnp.inf, 0.0)
  return jnp.where(sq_norm_ema > 0, variance_trace_ema / safe, at_zero)


def adaptive_batch_size(
    max_batch_size: int,
    test: str = "norm",
    initial_batch_size: int = 32,
    eta: float = 0.1,
    theta: float = 0.1,
    nu: float = 0.1,
    batch_size_multiple: int = 1,
    microbatch_size: int | None = None,
    axis_name: AxisName | None = None,
    noise_scale_decay: float = 0.95,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs a batch-size test each step and keeps the batch size to use next.

  Put it first in an `optax.chain`, in front of any optimizer. It passes the
  mean gradient through unchanged (with `axis_name`: replaces each device's
  gradient by the mean over devices, like :func:`average_across_devices`) and
  updates its state from the step's gradient-noise statistics:

  .. math::
    b_{new} &= \text{test}(\text{statistics}) \quad
      (\text{see } :func:`norm_test` \text{ and the other tests}) \\
    b_{k+1} &= \max\big(b_k^{suggested},\;
      \text{next\_batch\_size}(b_k, b_{new}, b_{max}, q)\big) \\
    B_{simple} &= \frac{\mathrm{EMA}_\beta[\mathrm{tr}(\Sigma)]}
      {\mathrm{EMA}_\beta[\|\bar g\|^2 - \mathrm{tr}(\Sigma)/b]}

  :math:`B_{simple}` is the gradient noise scale of McCandlish et al.,
  with :math:`\|\bar g\|^2 - \mathrm{tr}(\Sigma)/b` the unbiased estimate of
  :math:`\|G\|^2` and both EMAs started at 0 with decay :math:`\beta`; the
  EMAs' bias corrections cancel in the ratio. It is +inf while the estimated
  :math:`\|G\|^2` is not positive.

  The statistics come from the keyword arguments of `update` (one source a
  step):

  * `per_example_grads=`: pytree with a leading batch axis (exact);
  * `microbatch_grads=`: pytree with a leading axis of microbatch mean
    gradients of `microbatch_size` samples each (estimate);
  * `gradient_moments=`: a :class:`GradientMoments` (sums of unit gradients
    and of their squares, any number of units of `microbatch_size` samples,
    constant memory; norm and coordinate tests only);
  * none of these, with `axis_name` set: the devices' own gradients (`updates`)
    inside `pmap`/`shard_map` (estimate; the norm test all-reduces one
    scalar with the gradient mean, the other tests three or four scalars
    after it). The batch size of that step is the `batch_size=` keyword if
    given, else the state's `next_batch_size` (the loop followed the
    suggestion); each device's gradient is the mean of `batch_size / D`
    samples.

  With `axis_name` and per-example or microbatch gradients, the examples or
  microbatches of all devices are pooled (exact global statistics for
  per-example gradients). See :func:`per_example_statistics`,
  :func:`microbatch_statistics`, :func:`per_device_statistics` for the
  estimators. Steps with non-finite statistics leave the suggestion, the
  test statistic and the EMAs as they were. Inside `optax.MultiSteps` the
  test would only see the last mini-step's samples: pass
  `microbatch_grads=` instead. Everything is traced arrays: a growing batch size never
  recompiles the update.

  Args:
    max_batch_size: :math:`b_{max}`, the cap; a multiple of
      `batch_size_multiple`.
    test: one of `'norm'`, `'inner_product'`, `'orthogonality'`,
      `'augmented'` (augmented inner product) or `'coordinate'` (for
      AdaGrad; keeps a copy of AdaGrad's accumulator, one extra
      params-shaped buffer, and must sit right in front of `optax.adagrad`
      with the same `initial_accumulator_value` and `eps`).
    initial_batch_size: the batch size of the first step; a multiple of
      `batch_size_multiple`, at most `max_batch_size`.
    eta: :math:`\eta` of the norm and coordinate tests.
    theta: :math:`\theta` of the inner-product tests.
    nu: :math:`\nu` of the orthogonality and augmented tests.
    batch_size_multiple: :math:`q`; suggestions are rounded up to a multiple
      of it (e.g. devices × microbatch size).
    microbatch_size: samples per microbatch, needed for `microbatch_grads`
      and `gradient_moments` (1 for moments of per-example gradients).
    axis_name: the `pmap`/`shard_map` axis of the devices, or `None`.
    noise_scale_decay: :math:`\beta \in [0, 1)`, the EMA decay of the
      noise-scale estimate (0.95: about the last 20 steps).
    initial_accumulator_value: AdaGrad's :math:`v_0` (coordinate test only).
    eps: AdaGrad's :math:`\epsilon` (coordinate test only).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an
    :class:`AdaptiveBatchSizeState`; read the suggestion with
    `optax.tree.get(state, 'next_batch_size')`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import adaptive_batch_size
    >>> tx = optax.chain(adaptive_batch_size(max_batch_size=1024,
    ...                                      initial_batch_size=4),
    ...                  optax.sgd(0.1))
    >>> params = jnp.zeros(2)
    >>> per_example = jnp.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 1.0]])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(per_example.mean(0), state, params,
    ...                            per_example_grads=per_example)
    >>> int(optax.tree.get(state, 'next_batch_size'))  # (4/3) / (0.1**2 * 2)
    67

  References:
    Lau, Liu, Kolar, `AdAdaGrad: Adaptive Batch Size Schemes for Adaptive
    Gradient Methods <https://arxiv.org/abs/2402.11215>`_, 2024;
    McCandlish, Kaplan, Amodei, `An Empirical Model of Large-Batch Training
    <https://arxiv.org/abs/1812.06162>`_, 2018
  """
  if test not in TESTS:
    raise ValueError(f"test must be one of {TESTS}, got {test!r}")
  max_batch = _checks.check_positive_int("max_batch_size", max_batch_size)
  initial_batch = _checks.check_positive_int("initial_batch_size", initial_batch_size)
  multiple = _checks.check_positive_int("batch_size_multiple", batch_size_multiple)
  if microbatch_size is not None:
    _checks.check_positive_int("microbatch_size", microbatch_size)
  if None not in (max_batch, initial_batch, multiple):
    if max_batch % multiple:
      raise ValueError(
          f"max_batch_size must be a multiple of batch_size_multiple "
          f"({multiple}), got {max_batch}"
      )
    if initial_batch % multiple:
      raise ValueError(
          f"initial_batch_size must be a multiple of batch_size_multiple "
          f"({multiple}), got {initial_batch}"
      )
    if initial_batch > max_batch:
      raise ValueError(
          f"initial_batch_size must be at most max_batch_size ({max_batch}),"
          f" got {initial_batch}"
      )
  _checks.check_positive("eta", eta)
  _checks.check_positive("theta", theta)
  _checks.check_positive("nu", nu)
  _checks.check_momentum("noise_scale_decay", noise_scale_decay)
  _checks.check_non_negative(
      "initial_accumulator_value", initial_accumulator_value
  )
  _checks.check_non_negative("eps", eps)
  if axis_name is not None and not axis_name:
    raise ValueError("axis_name must be a non-empty axis name or None")
  coordinate = test == "coordinate"
  # The statistics the test and the noise scale read (moments leave the
  # others NaN).
  checked_fields = ("num_samples", "sq_norm", "variance_trace") + {
      "norm": (),
      "inner_product": ("directional_variance",),
      "orthogonality": ("orthogonal_variance",),
      "augmented": ("directional_variance", "orthogonal_variance"),
      "coordinate": ("preconditioned_variance_trace", "preconditioned_sq_norm"),
  }[test]

  def run_test(statistics):
    if test == "norm":
      return norm_test(statistics, eta)
    if test == "inner_product":
      return inner_product_test(statistics, theta)
    if test == "orthogonality":
      return orthogonality_test(statistics, nu)
    if test == "augmented":
      return augmented_inner_product_test(statistics, theta, nu)
    return coordinate_test(statistics, eta)

  def init_fn(params):
    _checks.check_float_params(params, "adaptive_batch_size")
    # A fresh buffer per field: a shared one could not be donated to a
    # jitted step (XLA refuses to donate the same buffer twice).
    def zero():
      return jnp.zeros((), jnp.float32)

    def initial():
      return jnp.array(initial_batch_size, jnp.int32)

    accumulator = optax.EmptyState()
    if coordinate:
      accumulator = optax.tree.full_like(params, initial_accumulator_value)
    return AdaptiveBatchSizeState(
        batch_size=initial(),
        next_batch_size=initial(),
        test_statistic=zero(),
        noise_scale=zero(),
        variance_trace_ema=zero(),
        sq_norm_ema=zero(),
        preconditioner_accumulator=accumulator,
    )

  def update_fn(
      updates,
      state,
      params=None,
      *,
      per_example_grads=None,
      microbatch_grads=None,
      gradient_moments=None,
      batch_size=None,
      **extra_args,
  ):
    del extra_args
    _checks.check_params_match(updates, params, "adaptive_batch_size")
    sources = {
        "per_example_grads": per_example_grads,
        "microbatch_grads": microbatch_grads,
        "gradient_moments": gradient_moments,
    }
    given = [name for name, value in sources.items() if value is not None]
    if len(given) > 1:
      raise ValueError(f"pass one source of statistics, not both of {given}")
    if not given and not axis_name:
      raise ValueError(
          "adaptive_batch_size needs per_example_grads=, microbatch_grads= or "
          "gradient_moments= in update(), or axis_name= for per-device "
          "statistics"
      )
    if given and given[0] != "per_example_grads" and microbatch_size is None:
      raise ValueError(
          f"{given[0]} needs adaptive_batch_size(microbatch_size=...) "
          "(1 for per-example moments)"
      )
    if gradient_moments is not None and test not in ("norm", "coordinate"):
      raise ValueError(
          f"test={test!r} needs inner products between units: pass "
          "per_example_grads= or microbatch_grads=, or use per-device "
          "statistics; gradient_moments= support the norm and coordinate tests"
      )
    per_device = axis_name and not given
    # The norm test needs no statistic of the mean: it rides on the mean's
    # all-reduce. The other per-device tests need the mean first.
    fused_norm_test = per_device and test == "norm"
    if per_device:
      step_batch = state.next_batch_size if batch_size is None else batch_size
      per_device_batch = jnp.asarray(step_batch, jnp.float32) / (
          jax.lax.axis_size(axis_name)
      )
    if fused_norm_test:
      mean_updates, statistics = _mean_and_norm_statistics(
          updates, per_device_batch, axis_name
      )
    else:
      mean_updates = (
          jax.lax.pmean(updates, axis_name) if axis_name else updates
      )

    weights = None
    accumulator = state.preconditioner_accumulator
    if coordinate:
      # Exactly what optax.scale_by_rss accumulates and divides by this step.
      accumulator = jax.tree.map(
          lambda v, g: v + jnp.square(g).astype(v.dtype),
          accumulator,
          mean_updates,
      )
      weights = jax.tree.map(
          lambda v: jnp.where(
              v > 0, jax.lax.rsqrt(v.astype(jnp.float32) + eps), 0.0
          ),
          accumulator,
      )

    if per_example_grads is not None:
      _, statistics = per_example_statistics(
          per_example_grads, axis_name=axis_name, preconditioner=weights
      )
    elif gradient_moments is not None:
      _, statistics = moment_statistics(
          gradient_moments,
          microbatch_size,
          axis_name=axis_name,
          preconditioner=weights,
      )
    elif microbatch_grads is not None:
      _, statistics = microbatch_statistics(
          microbatch_grads,
          microbatch_size,
          axis_name=axis_name,
          preconditioner=weights,
      )
    elif not fused_norm_test:
      _, statistics = per_device_statistics(
          updates,
          per_device_batch,
          axis_name,
          preconditioner=weights,
          mean_grads=mean_updates,
      )
    used_batch = jnp.round(statistics.num_samples).astype(jnp.int32)

    test_batch = run_test(statistics)
    finite = jnp.all(jnp.isfinite(jnp.stack(
        [getattr(statistics, field) for field in checked_fields]
    )))
    proposed = jnp.maximum(
        state.next_batch_size,
        next_batch_size(
            used_batch, test_batch, max_batch_size, batch_size_multiple
        ),
    )
    decay = jnp.asarray(noise_scale_decay, jnp.float32)
    trace_ema = decay * state.variance_trace_ema + (1 - decay) * (
        statistics.variance_trace
    )
    unbiased_sq_norm = (
        statistics.sq_norm - statistics.variance_trace / statistics.num_samples
    )
    sq_norm_ema = decay * state.sq_norm_ema + (1 - decay) * unbiased_sq_norm
    keep = lambda new, old: jnp.where(finite, new, old)
    trace_ema = keep(trace_ema, state.variance_trace_ema)
    sq_norm_ema = keep(sq_norm_ema, state.sq_norm_ema)
    new_state = AdaptiveBatchSizeState(
        batch_size=used_batch,
        next_batch_size=keep(proposed, state.next_batch_size),
        test_statistic=keep(test_batch, state.test_statistic),
        noise_scale=_noise_scale(trace_ema, sq_norm_ema).astype(jnp.float32),
        variance_trace_ema=trace_ema,
        sq_norm_ema=sq_norm_ema,
        preconditioner_accumulator=accumulator,
    )
    return mean_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
