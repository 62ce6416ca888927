"""The adaptive batch-size controller: a batch-size test in an optax chain.

:func:`adaptive_batch_size` gathers each step's gradient-noise statistics
from the source handed to `update` (:mod:`sngm_optax._gradient_statistics`),
runs the chosen test of :data:`BATCH_SIZE_TESTS`
(:mod:`sngm_optax._batch_size_tests`) and keeps in its state the batch size
the training loop should use next.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sngm_optax import _checks
from sngm_optax._batch_size_tests import BATCH_SIZE_TESTS
from sngm_optax._batch_size_tests import BatchSizeTest
from sngm_optax._batch_size_tests import next_batch_size
from sngm_optax._batch_size_tests import TESTS
from sngm_optax._gradient_statistics import _mean_and_norm_statistics
from sngm_optax._gradient_statistics import AxisName
from sngm_optax._gradient_statistics import GradientNoiseStatistics
from sngm_optax._gradient_statistics import microbatch_statistics
from sngm_optax._gradient_statistics import moment_statistics
from sngm_optax._gradient_statistics import per_device_statistics
from sngm_optax._gradient_statistics import per_example_statistics
from sngm_optax._noise_scale import _advance_noise_scale


class AdaptiveBatchSizeState(NamedTuple):
  r"""State of :func:`adaptive_batch_size`; plain arrays, checkpointable.

  Attributes:
    batch_size: int32, the batch size of the last step (the samples its
      statistics came from); `initial_batch_size` before the first step.
    next_batch_size: int32, the batch size the training loop should use next.
    test_statistic: float32, :math:`b_{new}` of the last step's test (+inf
      when the mean gradient was zero but noisy).
    noise_scale: float32, the EMA-smoothed gradient noise scale
      :math:`B_{simple} = \mathrm{tr}(\Sigma) / \|G\|^2`, as
      :func:`noise_scale_monitor` computes it.
    variance_trace_ema: float32, the bias-corrected EMA (decay
      `noise_scale_decay`) of :math:`\mathrm{tr}(\Sigma)`.
    sq_norm_ema: float32, the bias-corrected EMA of the unbiased estimate of
      :math:`\|G\|^2`.
    preconditioner_accumulator: for `test='coordinate'`, the copy of
      AdaGrad's accumulator :math:`v` (shaped like the params); otherwise
      `optax.EmptyState()`.
    num_steps: int32, the number of updates so far (the test runs after
      every `test_interval`-th).
    smoothed_statistics: with `smoothing`, a
      :class:`GradientNoiseStatistics` of the EMAs (not yet bias-corrected)
      of the statistics the test reads, with the unbiased
      :math:`\|G\|^2` estimate in `sq_norm`; otherwise
      `optax.EmptyState()`.
    smoothed_count: int32, the number of steps folded into the EMAs,
      `smoothed_statistics` and the noise scale's (steps with non-finite
      statistics are skipped); the bias correction is :math:`1 - \beta^{n}`.
  """

  batch_size: jax.Array
  next_batch_size: jax.Array
  test_statistic: jax.Array
  noise_scale: jax.Array
  variance_trace_ema: jax.Array
  sq_norm_ema: jax.Array
  preconditioner_accumulator: Any
  num_steps: jax.Array
  smoothed_statistics: Any
  smoothed_count: jax.Array


def _batch_size_test(test: str) -> BatchSizeTest:
  """The table's entry for `test`; raises for an unknown name."""
  if test not in TESTS:
    raise ValueError(f"test must be one of {TESTS}, got {test!r}")
  return BATCH_SIZE_TESTS[test]


def _check_batch_sizes(
    max_batch_size, initial_batch_size, batch_size_multiple, microbatch_size
) -> None:
  """Raises unless the batch sizes are positive integers that fit together.

  Traced values (from `optax.inject_hyperparams`) are not checked.
  """
  max_batch = _checks.check_positive_int("max_batch_size", max_batch_size)
  initial_batch = _checks.check_positive_int(
      "initial_batch_size", initial_batch_size
  )
  multiple = _checks.check_positive_int(
      "batch_size_multiple", batch_size_multiple
  )
  if microbatch_size is not None:
    _checks.check_positive_int("microbatch_size", microbatch_size)
  if None in (max_batch, initial_batch, multiple):
    return
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


def _check_controller_options(
    max_growth_factor, smoothing, test_interval
) -> None:
  """Raises for a growth factor below 1, a smoothing factor outside [0, 1)
  or a test interval that is not a positive integer."""
  if max_growth_factor is not None:
    _checks.check_range("max_growth_factor", max_growth_factor, 1.0)
    if not callable(max_growth_factor) and not isinstance(
        max_growth_factor, jax.core.Tracer
    ) and not math.isfinite(float(max_growth_factor)):
      raise ValueError(
          "max_growth_factor must be a finite number >= 1 (None for no "
          f"limit), got {max_growth_factor!r}"
      )
  if smoothing is not None:
    _checks.check_momentum("smoothing", smoothing)
  _checks.check_positive_int("test_interval", test_interval)


def _check_hyperparameters(
    eta, theta, nu, noise_scale_decay, initial_accumulator_value, eps, axis_name
) -> None:
  """Raises for a bad threshold, decay, AdaGrad constant or axis name."""
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


def _initial_state(
    params, initial_batch_size, initial_accumulator_value, keep_accumulator,
    smoothed=False,
) -> AdaptiveBatchSizeState:
  """The state before the first step; AdaGrad's accumulator if kept."""
  _checks.check_float_params(params, "adaptive_batch_size")
  # A fresh buffer per field: a shared one could not be donated to a
  # jitted step (XLA refuses to donate the same buffer twice).
  def zero():
    return jnp.zeros((), jnp.float32)

  def initial():
    return jnp.array(initial_batch_size, jnp.int32)

  accumulator = optax.EmptyState()
  if keep_accumulator:
    accumulator = optax.tree.full_like(params, initial_accumulator_value)
  smoothed_statistics = optax.EmptyState()
  if smoothed:
    smoothed_statistics = GradientNoiseStatistics(
        *(zero() for _ in GradientNoiseStatistics._fields)
    )
  return AdaptiveBatchSizeState(
      batch_size=initial(),
      next_batch_size=initial(),
      test_statistic=zero(),
      noise_scale=zero(),
      variance_trace_ema=zero(),
      sq_norm_ema=zero(),
      preconditioner_accumulator=accumulator,
      num_steps=jnp.zeros((), jnp.int32),
      smoothed_statistics=smoothed_statistics,
      smoothed_count=jnp.zeros((), jnp.int32),
  )


# ----------------------------------------------------------------------------
# The steps of `update`.


def _per_example_source(grads, samples_per_unit, **kwargs):
  del samples_per_unit  # each unit is one example
  return per_example_statistics(grads, **kwargs)


# The per-sample sources `update` accepts, in the order its errors name them:
# each maps (value, microbatch_size, axis_name=, preconditioner=) to
# (mean, statistics).
_SOURCES = {
    "per_example_grads": _per_example_source,
    "microbatch_grads": microbatch_statistics,
    "gradient_moments": moment_statistics,
}

# What the noise scale and the next batch size read, whatever the test.
_ALWAYS_CHECKED = ("num_samples", "sq_norm", "variance_trace")


def _given_source(
    sources, test: str, spec: BatchSizeTest, axis_name, microbatch_size
) -> str | None:
  """The one source of statistics given to `update`, None for per-device.

  Raises for no source without `axis_name`, for two sources, and for a
  source the test or the settings cannot use.
  """
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
  if "gradient_moments" in given and spec.needs_inner_products:
    raise ValueError(
        f"test={test!r} needs inner products between units: pass "
        "per_example_grads= or microbatch_grads=, or use per-device "
        "statistics; gradient_moments= support the norm and coordinate tests"
    )
  return given[0] if given else None


def _per_device_batch_size(state, batch_size, axis_name) -> jax.Array:
  """m, the samples behind each device's gradient: the step's batch over D.

  The step's batch is `batch_size=` if given, else the state's suggestion
  (the loop followed it).
  """
  step_batch = state.next_batch_size if batch_size is None else batch_size
  return jnp.asarray(step_batch, jnp.float32) / jax.lax.axis_size(axis_name)


def _updated_preconditioner(accumulator, mean_updates, eps):
  """AdaGrad's accumulator after this step and the coordinate test's weights.

  Exactly what `optax.scale_by_rss` accumulates and divides by this step.
  """
  accumulator = jax.tree.map(
      lambda v, g: v + jnp.square(g).astype(v.dtype), accumulator, mean_updates
  )
  weights = jax.tree.map(
      lambda v: jnp.where(
          v > 0, jax.lax.rsqrt(v.astype(jnp.float32) + eps), 0.0
      ),
      accumulator,
  )
  return accumulator, weights


def _gather_statistics(
    updates,
    state: AdaptiveBatchSizeState,
    source: str | None,
    source_value,
    batch_size,
    *,
    spec: BatchSizeTest,
    axis_name,
    microbatch_size,
    eps,
):
  """The mean gradient, the step's statistics and the preconditioner state.

  `source` None means per-device statistics of `updates`. A test that needs
  neither inner products nor a preconditioner (the norm test) then rides on
  the mean's all-reduce; every other test needs the mean first.
  """
  per_device = source is None
  if per_device:
    per_device_batch = _per_device_batch_size(state, batch_size, axis_name)
    if not (spec.needs_inner_products or spec.needs_preconditioner):
      mean_updates, statistics = _mean_and_norm_statistics(
          updates, per_device_batch, axis_name
      )
      return mean_updates, statistics, state.preconditioner_accumulator
  mean_updates = jax.lax.pmean(updates, axis_name) if axis_name else updates
  accumulator, weights = state.preconditioner_accumulator, None
  if spec.needs_preconditioner:
    accumulator, weights = _updated_preconditioner(
        accumulator, mean_updates, eps
    )
  if per_device:
    _, statistics = per_device_statistics(
        updates,
        per_device_batch,
        axis_name,
        preconditioner=weights,
        mean_grads=mean_updates,
    )
  else:
    _, statistics = _SOURCES[source](
        source_value,
        microbatch_size,
        axis_name=axis_name,
        preconditioner=weights,
    )
  return mean_updates, statistics, accumulator


def _finite_statistics(statistics: GradientNoiseStatistics, test_needs):
  """Whether the fields the test and the noise scale read are all finite.

  Moments and the per-device norm path leave the others NaN.
  """
  checked_fields = dict.fromkeys(_ALWAYS_CHECKED + tuple(test_needs))
  return jnp.all(jnp.isfinite(jnp.stack(
      [getattr(statistics, field) for field in checked_fields]
  )))


def _smooth_statistics(
    state: AdaptiveBatchSizeState,
    statistics: GradientNoiseStatistics,
    finite,
    *,
    test_needs,
    smoothing,
):
  r"""The EMAs after this step and the bias-corrected statistics.

  .. math::
    m_n = \beta\, m_{n-1} + (1 - \beta)\, x_n, \qquad
    \hat x_n = m_n / (1 - \beta^n)

  for each statistic :math:`x` the test reads, with :math:`\|\bar g\|^2`
  replaced by its unbiased estimate :math:`\|\bar g\|^2 -
  \mathrm{tr}(\Sigma)/b` (and the preconditioned one likewise). Fields the
  test does not read stay 0; a step with non-finite statistics is skipped.
  The state's `smoothed_count` already counts this step.
  """
  batch = statistics.num_samples
  unbiased = statistics._replace(
      sq_norm=statistics.sq_norm - statistics.variance_trace / batch,
      preconditioned_sq_norm=statistics.preconditioned_sq_norm
      - statistics.preconditioned_variance_trace / batch,
  )
  read = set(_ALWAYS_CHECKED + tuple(test_needs))
  decay = jnp.asarray(smoothing, jnp.float32)
  old = state.smoothed_statistics
  ema = GradientNoiseStatistics(*(
      jnp.where(finite, decay * o + (1 - decay) * x, o) if name in read else o
      for name, o, x in zip(GradientNoiseStatistics._fields, old, unbiased)
  ))
  count = state.smoothed_count
  correction = jnp.where(count > 0, 1 - decay ** count.astype(jnp.float32), 1)
  corrected = GradientNoiseStatistics(*(m / correction for m in ema))
  return ema, corrected


def _advance_state(
    state: AdaptiveBatchSizeState,
    statistics: GradientNoiseStatistics,
    test_batch,
    accumulator,
    finite,
    *,
    max_batch_size,
    batch_size_multiple,
    max_growth_factor=None,
    test_interval=1,
) -> AdaptiveBatchSizeState:
  """The state after a step whose test asked for `test_batch` samples.

  The suggestion and the test statistic keep their values unless the
  statistics are `finite` and this step runs the test (every
  `test_interval`-th). The noise scale was advanced before.
  The suggestion grows at most to `max_growth_factor` times this step's
  batch (then rounded up to a multiple of `batch_size_multiple`).
  """
  used_batch = jnp.round(statistics.num_samples).astype(jnp.int32)
  num_steps = optax.safe_increment(state.num_steps)
  target = test_batch
  if max_growth_factor is not None:
    target = jnp.minimum(
        target,
        jnp.asarray(max_growth_factor, jnp.float32)
        * used_batch.astype(jnp.float32),
    )
  proposed = jnp.maximum(
      state.next_batch_size,
      next_batch_size(used_batch, target, max_batch_size, batch_size_multiple),
  )
  run_test = finite
  if not (isinstance(test_interval, int) and test_interval == 1):
    run_test = finite & (num_steps % test_interval == 0)
  return state._replace(
      batch_size=used_batch,
      next_batch_size=jnp.where(run_test, proposed, state.next_batch_size),
      test_statistic=jnp.where(run_test, test_batch, state.test_statistic),
      preconditioner_accumulator=accumulator,
      num_steps=num_steps,
  )


# ----------------------------------------------------------------------------
# The transform.


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
    max_growth_factor: float | None = None,
    smoothing: float | None = None,
    test_interval: int = 1,
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
  :math:`\|G\|^2` and both EMAs bias-corrected, with decay :math:`\beta` =
  `noise_scale_decay`: the same code as :func:`noise_scale_monitor`, whose
  docstring gives the estimators and their variance. The state keeps the
  corrected EMAs (`variance_trace_ema`, `sq_norm_ema`); the corrections
  cancel in the ratio. It is +inf while the estimated :math:`\|G\|^2` is
  not positive and :math:`\mathrm{tr}(\Sigma)` is, 0 when both are 0.

  The defaults are the paper's rule: the test on each step's own
  statistics, every step, with no limit on the growth. With the biased
  :math:`\|\bar g\|^2` the norm test's fixed point is
  :math:`b = (1/\eta^2 - 1) B_{simple}` (about :math:`99 B_{simple}` at
  :math:`\eta = 0.1`), and one noisy estimate from a small batch can ask for
  :math:`1/\eta^2` times the batch at once. Three options (beyond the paper)
  make the controller steadier:

  * `max_growth_factor` :math:`f`: the test's demand is capped at
    :math:`f b_k` before rounding,
    :math:`b_{k+1} = \max\big(b_k^{suggested}, \text{next\_batch\_size}
    (b_k, \min(b_{new}, f b_k), b_{max}, q)\big)`, so each test grows the
    batch at most :math:`f`-fold (then rounded up to a multiple of
    :math:`q`).
  * `smoothing` :math:`\beta`: the test reads bias-corrected EMAs of its
    statistics instead of the step's own estimate (McCandlish et al.,
    2018), with :math:`\|\bar g\|^2` replaced by the unbiased
    :math:`\|G\|^2` estimate :math:`\|\bar g\|^2 - \mathrm{tr}(\Sigma)/b`:
    :math:`\hat x_n = m_n / (1 - \beta^n)`,
    :math:`m_n = \beta m_{n-1} + (1 - \beta) x_n` for each statistic
    :math:`x`; e.g. the norm test becomes
    :math:`b_{new} = \widehat{\mathrm{tr}\Sigma} / (\eta^2
    \widehat{\|G\|^2})` (:math:`+\infty` while
    :math:`\widehat{\|G\|^2} \le 0`), whose fixed point is
    :math:`B_{simple} / \eta^2`. The EMAs advance every step. Every test
    is a ratio of two statistics with the same correction, so the
    correction cancels in :math:`b_{new}`; the state keeps the EMAs
    uncorrected (`smoothed_statistics`, with `smoothed_count` steps).
  * `test_interval` :math:`k`: the test runs after steps :math:`k, 2k,
    \ldots` only; in between the suggestion stays as it is.

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
    max_growth_factor: :math:`f \ge 1`, the most the batch grows per test;
      `None` (default) for no limit (the paper's rule).
    smoothing: :math:`\beta \in [0, 1)`, run the test on bias-corrected
      EMAs of its statistics with the unbiased :math:`\|G\|^2`; `None`
      (default) for the step's own statistics (the paper's rule).
    test_interval: :math:`k \ge 1`, run the test after every k-th step
      (default 1, every step).

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
  spec = _batch_size_test(test)
  _check_batch_sizes(
      max_batch_size, initial_batch_size, batch_size_multiple, microbatch_size
  )
  _check_hyperparameters(
      eta, theta, nu, noise_scale_decay, initial_accumulator_value, eps,
      axis_name,
  )
  _check_controller_options(max_growth_factor, smoothing, test_interval)

  def init_fn(params):
    return _initial_state(
        params, initial_batch_size, initial_accumulator_value,
        keep_accumulator=spec.needs_preconditioner,
        smoothed=smoothing is not None,
    )

  def update_fn(updates, state, params=None, *, per_example_grads=None,
                microbatch_grads=None, gradient_moments=None, batch_size=None,
                **extra_args):
    del extra_args
    _checks.check_params_match(updates, params, "adaptive_batch_size")
    sources = dict(per_example_grads=per_example_grads,
                   microbatch_grads=microbatch_grads,
                   gradient_moments=gradient_moments)
    source = _given_source(sources, test, spec, axis_name, microbatch_size)
    mean_updates, statistics, accumulator = _gather_statistics(
        updates, state, source, sources.get(source), batch_size, spec=spec,
        axis_name=axis_name, microbatch_size=microbatch_size, eps=eps,
    )
    finite = _finite_statistics(statistics, spec.needs)
    count, trace_ema, sq_norm_ema, noise_scale = _advance_noise_scale(
        state.smoothed_count, state.variance_trace_ema, state.sq_norm_ema,
        statistics, finite, noise_scale_decay,
    )
    state = state._replace(
        noise_scale=noise_scale, variance_trace_ema=trace_ema,
        sq_norm_ema=sq_norm_ema, smoothed_count=count,
    )
    test_input = statistics
    if smoothing is not None:
      ema, test_input = _smooth_statistics(
          state, statistics, finite, test_needs=spec.needs,
          smoothing=smoothing,
      )
      state = state._replace(smoothed_statistics=ema)
    test_batch = spec.run(test_input, eta=eta, theta=theta, nu=nu)
    new_state = _advance_state(
        state, statistics, test_batch, accumulator, finite,
        max_batch_size=max_batch_size, batch_size_multiple=batch_size_multiple,
        max_growth_factor=max_growth_factor, test_interval=test_interval,
    )
    return mean_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
