"""The gradient noise scale B_simple = tr(Σ)/|G|², measured while training.

:func:`noise_scale_monitor` estimates tr(Σ) and |G|² each step, from the
devices' own gradients or from per-example or microbatch gradients
(:mod:`sngm_optax._gradient_statistics`), and keeps bias-corrected EMAs of
both and their ratio. :func:`_advance_noise_scale` is that smoothing; the
adaptive batch-size controller reports its `noise_scale` with it too.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sngm_optax import _checks
from sngm_optax._gradient_statistics import _mean_and_norm_statistics
from sngm_optax._gradient_statistics import AxisName
from sngm_optax._gradient_statistics import GradientNoiseStatistics
from sngm_optax._gradient_statistics import microbatch_statistics
from sngm_optax._gradient_statistics import moment_statistics
from sngm_optax._gradient_statistics import per_example_statistics


class NoiseScaleMonitorState(NamedTuple):
  r"""State of :func:`noise_scale_monitor`; plain float32/int32 scalars.

  Attributes:
    noise_scale: :math:`B_{simple}`, the ratio of the two EMAs below (0
      before the first step; see :func:`noise_scale_monitor` for a
      non-positive :math:`|G|^2` EMA).
    variance_trace_ema: the bias-corrected EMA of the
      :math:`\mathrm{tr}(\Sigma)` estimates.
    sq_norm_ema: the bias-corrected EMA of the unbiased :math:`|G|^2`
      estimates.
    ema_count: int32, the number of steps folded into the EMAs (steps with
      non-finite statistics are skipped); the bias correction is
      :math:`1 - \beta^{n}`.
  """

  noise_scale: jax.Array
  variance_trace_ema: jax.Array
  sq_norm_ema: jax.Array
  ema_count: jax.Array


def _ratio(variance_trace_ema, sq_norm_ema):
  """tr(Σ)/|G|²; +inf for a non-positive |G|² with noise, 0 without noise."""
  safe = jnp.where(sq_norm_ema > 0, sq_norm_ema, 1.0)
  at_zero = jnp.where(variance_trace_ema > 0, jnp.inf, 0.0)
  return jnp.where(sq_norm_ema > 0, variance_trace_ema / safe, at_zero)


def _unbiased_sq_norm(statistics: GradientNoiseStatistics):
  """|G|² ≈ ‖ḡ‖² − tr(Σ)/b, the two-batch estimate (see the monitor)."""
  return statistics.sq_norm - statistics.variance_trace / statistics.num_samples


def _finite(statistics: GradientNoiseStatistics):
  """Whether the three statistics the noise scale reads are finite."""
  return jnp.all(jnp.isfinite(jnp.stack([
      statistics.num_samples, statistics.sq_norm, statistics.variance_trace
  ])))


def _advance_noise_scale(
    ema_count, variance_trace_ema, sq_norm_ema,
    statistics: GradientNoiseStatistics, finite, decay,
):
  r"""The bias-corrected EMAs of tr(Σ) and |G|² after one step, and their ratio.

  The EMAs are kept bias-corrected,
  :math:`\hat x_n = \hat x_{n-1} + \frac{1-\beta}{1-\beta^n}(x_n - \hat
  x_{n-1})`, which equals :math:`m_n / (1 - \beta^n)` for
  :math:`m_n = \beta m_{n-1} + (1 - \beta) x_n`, :math:`m_0 = 0`. A step
  whose statistics are not `finite` changes nothing.

  Returns:
    `(ema_count, variance_trace_ema, sq_norm_ema, noise_scale)`: int32 and
    three float32 scalars.
  """
  decay = jnp.asarray(decay, jnp.float32)
  count = ema_count + finite.astype(jnp.int32)
  weight = (1 - decay) / jnp.where(
      count > 0, 1 - decay ** count.astype(jnp.float32), 1.0
  )

  def advance(ema, estimate):
    ema = jnp.asarray(ema, jnp.float32)
    estimate = jnp.asarray(estimate, jnp.float32)
    return jnp.where(finite, ema + weight * (estimate - ema), ema)

  trace = advance(variance_trace_ema, statistics.variance_trace)
  sq_norm = advance(sq_norm_ema, _unbiased_sq_norm(statistics))
  noise_scale = _ratio(trace, sq_norm).astype(jnp.float32)
  return count, trace, sq_norm, noise_scale


def _source_statistics(name, value, per_device_batch_size, axis_name):
  """The statistics of `per_example_grads=`, `microbatch_grads=` or
  `gradient_moments=`; `per_device_batch_size` samples lie behind them."""
  if name == "gradient_moments":
    samples_per_unit = jnp.asarray(per_device_batch_size, jnp.float32) / (
        jnp.asarray(value.count, jnp.float32)
    )
    return moment_statistics(value, samples_per_unit, axis_name=axis_name)[1]
  leaves = jax.tree.leaves(value)
  units = leaves[0].shape[0] if leaves and leaves[0].ndim else 0
  concrete = _checks.check_positive_int(
      "per_device_batch_size", per_device_batch_size
  )
  if name == "per_example_grads":
    if concrete is not None and units != concrete:
      raise ValueError(
          f"per_example_grads has {units} examples but per_device_batch_size "
          f"is {concrete}: the per-example gradients must be those of the "
          "batch behind the updates"
      )
    return per_example_statistics(value, axis_name=axis_name)[1]
  if concrete is not None and (units < 1 or concrete % units):
    raise ValueError(
        f"microbatch_grads has {units} microbatches, which do not split "
        f"per_device_batch_size={concrete} into equal microbatches"
    )
  microbatch_size = jnp.asarray(per_device_batch_size, jnp.float32) / units
  return microbatch_statistics(value, microbatch_size, axis_name=axis_name)[1]


def noise_scale_monitor(
    per_device_batch_size: int,
    axis_name: AxisName | None = None,
    smoothing: float = 0.99,
) -> optax.GradientTransformationExtraArgs:
  r"""Measures the gradient noise scale :math:`B_{simple}` while training.

  McCandlish et al.'s simple noise scale,

  .. math::
    B_{simple} = \frac{\mathrm{tr}(\Sigma)}{|G|^2},

  with :math:`G` the true gradient and :math:`\Sigma` the per-sample
  gradient covariance, predicts the critical batch size: below it, doubling
  the batch about halves the steps to a target; far above it, a larger batch
  saves no steps. Each step gives two estimates from two batch sizes,
  :math:`B_{small}` and :math:`B_{big}`, whose mean gradients' squared norms
  have expectations :math:`\mathbb{E}|G_B|^2 = |G|^2 +
  \mathrm{tr}(\Sigma)/B`:

  .. math::
    |G|^2 &\approx \frac{B_{big}|G_{big}|^2 - B_{small}|G_{small}|^2}
      {B_{big} - B_{small}}, \qquad
    \mathrm{tr}(\Sigma) \approx \frac{|G_{small}|^2 - |G_{big}|^2}
      {1/B_{small} - 1/B_{big}}, \\
    B_{simple} &= \mathrm{EMA}_\beta[\mathrm{tr}(\Sigma)] \,/\,
      \mathrm{EMA}_\beta[|G|^2].

  With `axis_name` (inside `jax.pmap`/`jax.shard_map`), each of the
  :math:`D` devices holds :math:`g_d`, the mean gradient of its own
  :math:`m` = `per_device_batch_size` samples: :math:`B_{small} = m`,
  :math:`B_{big} = b = D m`, :math:`|G_{big}|^2 = \|\bar g\|^2` for the
  device mean :math:`\bar g`, and :math:`|G_{small}|^2 = \mathrm{mean}_d
  \|g_d\|^2`, one scalar all-reduced together with the gradient mean. The
  updates come out as that mean (as :func:`average_across_devices` gives),
  so the monitor can stand first in a chain in its place.

  Without `axis_name`, the statistics come from one keyword argument of
  `update`: `per_example_grads=` (a leading axis of the
  `per_device_batch_size` examples' gradients), `microbatch_grads=` (a
  leading axis of :math:`K` microbatch means, each of
  `per_device_batch_size / K` samples) or `gradient_moments=` (a
  :class:`GradientMoments` of the batch's units). Take those :math:`n`
  units, each the mean :math:`g_u` of :math:`m` samples, as the small
  batches and their mean :math:`\bar g` (:math:`b = n m` samples) as the big
  one. The two estimates are then the unbiased per-sample statistics of
  :class:`GradientNoiseStatistics`:

  .. math::
    \mathrm{tr}(\Sigma) &\approx
      \frac{\mathrm{mean}_u\|g_u\|^2 - \|\bar g\|^2}{1/m - 1/b}
      = \frac{m}{n-1}\sum_u \|g_u - \bar g\|^2 = \texttt{variance\_trace},
      \\
    |G|^2 &\approx \frac{b\|\bar g\|^2 - m\,\mathrm{mean}_u\|g_u\|^2}{b - m}
      = \|\bar g\|^2 - \frac{\mathrm{tr}(\Sigma)}{b},

  using :math:`\mathrm{mean}_u\|g_u\|^2 - \|\bar g\|^2 = \frac1n \sum_u
  \|g_u - \bar g\|^2` and :math:`b = nm`; the per-device case is the same
  with the devices as units. With `axis_name` and one of these keywords,
  the units of all devices are pooled instead.

  Both estimates are smoothed by EMAs with decay :math:`\beta` =
  `smoothing`, bias-corrected as Adam's moments are (:math:`\hat x_n = m_n /
  (1 - \beta^n)`, :math:`m_n = \beta m_{n-1} + (1 - \beta) x_n`); a step
  with non-finite statistics leaves them unchanged. The ratio is +inf while
  the :math:`|G|^2` EMA is not positive and :math:`\mathrm{tr}(\Sigma)` is
  (noise and no measurable signal: any batch is small), and 0 when both are
  0. Read it with `optax.tree.get(state, 'noise_scale')`.

  **Variance.** For Gaussian per-sample gradients :math:`g_i \sim
  \mathcal{N}(G, \Sigma)`, i.i.d., the :math:`n` units (devices,
  microbatches or examples) give

  .. math::
    \mathrm{Var}[\widehat{\mathrm{tr}\Sigma}] &=
      \frac{2\,\mathrm{tr}(\Sigma^2)}{n - 1}, \qquad
    \mathrm{Var}[\widehat{|G|^2}] = \frac{4\, G^\top \Sigma G}{b}
      + \frac{2\,\mathrm{tr}(\Sigma^2)}{b^2}\,\frac{n}{n-1}, \\
    \mathrm{Cov}[\widehat{\mathrm{tr}\Sigma}, \widehat{|G|^2}] &=
      -\frac{2\,\mathrm{tr}(\Sigma^2)}{(n-1)\, b}

  (:math:`\frac{m}{n-1}\sum_u\|g_u - \bar g\|^2` is a sum of
  :math:`\lambda_j \chi^2_{n-1}/(n-1)` over the eigenvalues
  :math:`\lambda_j` of :math:`\Sigma`, independent of :math:`\bar g \sim
  \mathcal{N}(G, \Sigma/b)`). The trace's error depends on the number of
  units, not on :math:`m`: with :math:`D = 8` devices one step's relative
  error is up to :math:`\sqrt{2/7} \approx 53\%`. Non-Gaussian gradients
  add a fourth-cumulant term of order :math:`1/b`. For steps with
  independent, identically distributed statistics the bias-corrected EMA
  after :math:`n` steps has variance

  .. math::
    \mathrm{Var}[\hat x_n] = \mathrm{Var}[x]\,\frac{(1 - \beta)(1 +
      \beta^n)}{(1 + \beta)(1 - \beta^n)} \;\to\;
      \mathrm{Var}[x]\,\frac{1 - \beta}{1 + \beta},

  1/199 of one step's at :math:`\beta = 0.99` (about 14x less standard
  deviation), at the price of a lag of about :math:`1/(1-\beta)` steps
  while :math:`G` and :math:`\Sigma` drift. To first order (while the
  standard deviation of :math:`\hat s` is well below :math:`s`) the ratio
  :math:`\hat t / \hat s` of the two EMAs has relative variance
  :math:`\mathrm{Var}[\hat t]/t^2 + \mathrm{Var}[\hat s]/s^2 -
  2\,\mathrm{Cov}[\hat t, \hat s]/(t s)` for :math:`t =
  \mathrm{tr}(\Sigma)`, :math:`s = |G|^2`, each term one step's times the
  factor above.

  Args:
    per_device_batch_size: the number of samples behind each device's
      gradient (behind the updates, without `axis_name`); a positive
      integer.
    axis_name: the `pmap`/`shard_map` axis (or axes) of the devices, or
      `None` to read per-example or microbatch statistics from `update`'s
      keyword arguments.
    smoothing: :math:`\beta \in [0, 1)`, the EMAs' decay (0.99: about the
      last 100 steps; 0 keeps the last step's estimates).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    :class:`NoiseScaleMonitorState`. With `axis_name` it returns the device
    mean of the updates, otherwise the updates unchanged.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import noise_scale_monitor
    >>> tx = optax.chain(noise_scale_monitor(per_device_batch_size=4),
    ...                  optax.sgd(0.1))
    >>> per_example = jnp.array([[3.0, 0.0], [1.0, 0.0], [2.0, 1.0], [2.0, -1.0]])
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = jax.jit(tx.update)(
    ...     per_example.mean(0), state, per_example_grads=per_example)
    >>> # tr(Σ) = 4/3, |G|² = 4 - (4/3)/4 = 11/3, B_simple = 4/11
    >>> round(float(optax.tree.get(state, 'noise_scale')), 4)
    0.3636

  References:
    McCandlish, Kaplan, Amodei et al., `An Empirical Model of Large-Batch
    Training <https://arxiv.org/abs/1812.06162>`_, 2018 (Appendix A.1: the
    two-batch estimators)
  """
  _checks.check_positive_int("per_device_batch_size", per_device_batch_size)
  _checks.check_axis_name("axis_name", axis_name, optional=True)
  _checks.check_momentum("smoothing", smoothing)

  def init_fn(params):
    _checks.check_float_params(params, "noise_scale_monitor")
    return NoiseScaleMonitorState(
        noise_scale=jnp.zeros((), jnp.float32),
        variance_trace_ema=jnp.zeros((), jnp.float32),
        sq_norm_ema=jnp.zeros((), jnp.float32),
        ema_count=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, *, per_example_grads=None,
                microbatch_grads=None, gradient_moments=None, **extra_args):
    del extra_args
    _checks.check_params_match(updates, params, "noise_scale_monitor")
    sources = dict(per_example_grads=per_example_grads,
                   microbatch_grads=microbatch_grads,
                   gradient_moments=gradient_moments)
    given = [name for name, value in sources.items() if value is not None]
    if len(given) > 1:
      raise ValueError(f"pass one source of statistics, not both of {given}")
    if given:
      statistics = _source_statistics(
          given[0], sources[given[0]], per_device_batch_size, axis_name
      )
      if axis_name:
        updates = jax.lax.pmean(updates, axis_name)
    elif axis_name:
      updates, statistics = _mean_and_norm_statistics(
          updates, per_device_batch_size, axis_name
      )
    else:
      raise ValueError(
          "noise_scale_monitor without axis_name needs per_example_grads=, "
          "microbatch_grads= or gradient_moments= in update()"
      )
    count, trace, sq_norm, noise_scale = _advance_noise_scale(
        state.ema_count, state.variance_trace_ema, state.sq_norm_ema,
        statistics, _finite(statistics), smoothing,
    )
    return updates, NoiseScaleMonitorState(
        noise_scale=noise_scale,
        variance_trace_ema=trace,
        sq_norm_ema=sq_norm,
        ema_count=count,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
