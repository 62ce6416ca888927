"""Batch-size tests: from gradient-noise statistics to the batch size needed.

A batch-size test compares the noise of the mini-batch gradient with its
signal and returns :math:`b_{new}`, the smallest batch size that would make
the mini-batch gradient "accurate enough"; :func:`next_batch_size` turns it
into the batch size of the next step. Each test is a function of a few
fields of :class:`GradientNoiseStatistics`; :data:`BATCH_SIZE_TESTS` names
each test and says which fields and thresholds it reads, so
:func:`adaptive_batch_size` can pick the statistics a test needs without
knowing the tests.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sngm_optax._gradient_statistics import GradientNoiseStatistics


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


_INNER_PRODUCT_FIELDS = ("directional_variance", "orthogonal_variance")
_PRECONDITIONED_FIELDS = (
    "preconditioned_variance_trace",
    "preconditioned_sq_norm",
)


class BatchSizeTest(NamedTuple):
  """A batch-size test, the statistics it reads and its thresholds.

  Attributes:
    fn: the test, `fn(statistics, **thresholds) -> b_new`.
    needs: the fields of :class:`GradientNoiseStatistics` that `fn` reads.
    thresholds: the names of `fn`'s threshold arguments (`'eta'`, `'theta'`,
      `'nu'`).
  """

  fn: Callable[..., jax.Array]
  needs: tuple[str, ...]
  thresholds: tuple[str, ...]

  @property
  def needs_inner_products(self) -> bool:
    """Whether it reads variances along or orthogonal to the mean gradient.

    Those need inner products between units, which running moments
    (:func:`moment_statistics`) and the per-device norm all-reduce lack.
    """
    return any(field in self.needs for field in _INNER_PRODUCT_FIELDS)

  @property
  def needs_preconditioner(self) -> bool:
    """Whether it reads the `preconditioned_*` statistics."""
    return any(field in self.needs for field in _PRECONDITIONED_FIELDS)

  def run(self, statistics: GradientNoiseStatistics, **thresholds):
    """:math:`b_{new}`, passing `fn` the thresholds it takes."""
    return self.fn(
        statistics, **{name: thresholds[name] for name in self.thresholds}
    )


# Every test also reads `variance_trace`: at a zero denominator it decides
# between +inf and 0.
BATCH_SIZE_TESTS = {
    "norm": BatchSizeTest(
        fn=norm_test,
        needs=("sq_norm", "variance_trace"),
        thresholds=("eta",),
    ),
    "inner_product": BatchSizeTest(
        fn=inner_product_test,
        needs=("sq_norm", "variance_trace", "directional_variance"),
        thresholds=("theta",),
    ),
    "orthogonality": BatchSizeTest(
        fn=orthogonality_test,
        needs=("sq_norm", "variance_trace", "orthogonal_variance"),
        thresholds=("nu",),
    ),
    "augmented": BatchSizeTest(
        fn=augmented_inner_product_test,
        needs=(
            "sq_norm",
            "variance_trace",
            "directional_variance",
            "orthogonal_variance",
        ),
        thresholds=("theta", "nu"),
    ),
    "coordinate": BatchSizeTest(
        fn=coordinate_test,
        needs=(
            "variance_trace",
            "preconditioned_variance_trace",
            "preconditioned_sq_norm",
        ),
        thresholds=("eta",),
    ),
}

TESTS = tuple(BATCH_SIZE_TESTS)
