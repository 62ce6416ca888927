"""AdAdaGrad and AdAdaGrad-Norm: AdaGrad(-Norm) with a growing batch size."""

import optax

from sngm_optax import _checks
from sngm_optax._adagrad_norm import scale_by_adagrad_norm
from sngm_optax._adaptive_batch_size import adaptive_batch_size
from sngm_optax._gradient_statistics import AxisName


def adadagrad(
    learning_rate: optax.ScalarOrSchedule,
    max_batch_size: int,
    test: str = "norm",
    initial_batch_size: int = 32,
    eta: float = 0.1,
    theta: float = 0.1,
    nu: float = 0.1,
    batch_size_multiple: int = 1,
    microbatch_size: int | None = None,
    axis_name: AxisName | None = None,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    max_growth_factor: float | None = None,
    smoothing: float | None = None,
    test_interval: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""AdAdaGrad: coordinate-wise AdaGrad with an adaptive batch size.

  .. math::
    b_{k+1} &= \text{test}(\{g_i\}_{i \le b_k}) \quad
      (\text{see } :func:`adaptive_batch_size`) \\
    v_k &= v_{k-1} + \bar g_k^2, \qquad
    w_{k+1} = w_k - \eta_k \, \bar g_k / \sqrt{v_k + \epsilon}

  `optax.chain(adaptive_batch_size(...), optax.adagrad(...))`. Pass the
  per-sample statistics to `update` (`per_example_grads=` or
  `microbatch_grads=`, or set `axis_name`) and train the next step with
  `optax.tree.get(state, 'next_batch_size')` samples. With
  `test='coordinate'` the test is measured in AdaGrad's own geometry (see
  :func:`coordinate_test`); that test keeps a copy of AdaGrad's accumulator.

  Args:
    learning_rate: :math:`\eta_k`, a scalar or an `optax.Schedule`.
    max_batch_size: the cap on the batch size.
    test: `'norm'`, `'inner_product'`, `'orthogonality'`, `'augmented'` or
      `'coordinate'`.
    initial_batch_size: the batch size of the first step.
    eta: :math:`\eta` of the norm and coordinate tests (default 0.1).
    theta: :math:`\theta` of the inner-product tests (default 0.1).
    nu: :math:`\nu` of the orthogonality tests (default 0.1).
    batch_size_multiple: suggested sizes are multiples of it.
    microbatch_size: samples per microbatch for `microbatch_grads`.
    axis_name: `pmap`/`shard_map` axis of the devices; the gradients are
      averaged over it.
    initial_accumulator_value: AdaGrad's :math:`v_0`.
    eps: AdaGrad's :math:`\epsilon`.
    max_growth_factor: the most the batch grows per test (`None`: no
      limit); see :func:`adaptive_batch_size`.
    smoothing: run the test on bias-corrected EMAs of its statistics with
      this decay (`None`: the step's own statistics).
    test_interval: run the test after every k-th step.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import adadagrad
    >>> tx = adadagrad(0.1, max_batch_size=64, initial_batch_size=4)
    >>> params = jnp.zeros(2)
    >>> per_example = jnp.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 1.0]])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(per_example.mean(0), state, params,
    ...                            per_example_grads=per_example)
    >>> int(optax.tree.get(state, 'next_batch_size'))
    64

  References:
    Lau, Liu, Kolar, `AdAdaGrad: Adaptive Batch Size Schemes for Adaptive
    Gradient Methods <https://arxiv.org/abs/2402.11215>`_, 2024
  """
  _checks.check_non_negative("learning_rate", learning_rate)
  return optax.chain(
      adaptive_batch_size(
          max_batch_size,
          test=test,
          initial_batch_size=initial_batch_size,
          eta=eta,
          theta=theta,
          nu=nu,
          batch_size_multiple=batch_size_multiple,
          microbatch_size=microbatch_size,
          axis_name=axis_name,
          initial_accumulator_value=initial_accumulator_value,
          eps=eps,
          max_growth_factor=max_growth_factor,
          smoothing=smoothing,
          test_interval=test_interval,
      ),
      optax.adagrad(
          learning_rate,
          initial_accumulator_value=initial_accumulator_value,
          eps=eps,
      ),
  )


def adadagrad_norm(
    learning_rate: optax.ScalarOrSchedule,
    max_batch_size: int,
    test: str = "norm",
    initial_batch_size: int = 32,
    eta: float = 0.1,
    theta: float = 0.1,
    nu: float = 0.1,
    batch_size_multiple: int = 1,
    microbatch_size: int | None = None,
    axis_name: AxisName | None = None,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    max_growth_factor: float | None = None,
    smoothing: float | None = None,
    test_interval: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""AdAdaGrad-Norm: AdaGrad-Norm with an adaptive batch size.

  .. math::
    b_{k+1} &= \text{test}(\{g_i\}_{i \le b_k}) \quad
      (\text{see } :func:`adaptive_batch_size`) \\
    b_k^2 &= b_{k-1}^2 + \|\bar g_k\|^2, \qquad
    w_{k+1} = w_k - \eta_k \, \bar g_k / \sqrt{b_k^2 + \epsilon}

  `optax.chain(adaptive_batch_size(...), scale_by_adagrad_norm(...),
  optax.scale_by_learning_rate(...))`; used as :func:`adadagrad`. The
  coordinate-wise test is for AdaGrad's diagonal preconditioner; with
  AdaGrad-Norm's scalar one it *is* the norm test, so `test='coordinate'` is
  refused.

  Args:
    learning_rate: :math:`\eta_k`, a scalar or an `optax.Schedule`.
    max_batch_size: the cap on the batch size.
    test: `'norm'`, `'inner_product'`, `'orthogonality'` or `'augmented'`.
    initial_batch_size: the batch size of the first step.
    eta: :math:`\eta` of the norm test (default 0.1).
    theta: :math:`\theta` of the inner-product tests (default 0.1).
    nu: :math:`\nu` of the orthogonality tests (default 0.1).
    batch_size_multiple: suggested sizes are multiples of it.
    microbatch_size: samples per microbatch for `microbatch_grads`.
    axis_name: `pmap`/`shard_map` axis of the devices; the gradients are
      averaged over it.
    initial_accumulator_value: :math:`b_0^2` of AdaGrad-Norm.
    eps: :math:`\epsilon` of AdaGrad-Norm.
    max_growth_factor: the most the batch grows per test (`None`: no
      limit); see :func:`adaptive_batch_size`.
    smoothing: run the test on bias-corrected EMAs of its statistics with
      this decay (`None`: the step's own statistics).
    test_interval: run the test after every k-th step.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from sngm_optax import adadagrad_norm
    >>> tx = adadagrad_norm(1.0, max_batch_size=1024, initial_batch_size=4,
    ...                     initial_accumulator_value=0.0, eps=0.0)
    >>> params = jnp.zeros(2)
    >>> per_example = jnp.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 1.0]])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(per_example.mean(0), state, params,
    ...                            per_example_grads=per_example)
    >>> updates.round(4), int(optax.tree.get(state, 'next_batch_size'))
    (Array([-0.7071, -0.7071], dtype=float32), 67)

  References:
    Lau, Liu, Kolar, `AdAdaGrad: Adaptive Batch Size Schemes for Adaptive
    Gradient Methods <https://arxiv.org/abs/2402.11215>`_, 2024
  """
  _checks.check_non_negative("learning_rate", learning_rate)
  if test == "coordinate":
    raise ValueError(
        "test='coordinate' is for coordinate-wise AdaGrad (adadagrad); with "
        "AdaGrad-Norm it reduces to test='norm'"
    )
  return optax.chain(
      adaptive_batch_size(
          max_batch_size,
          test=test,
          initial_batch_size=initial_batch_size,
          eta=eta,
          theta=theta,
          nu=nu,
          batch_size_multiple=batch_size_multiple,
          microbatch_size=microbatch_size,
          axis_name=axis_name,
          max_growth_factor=max_growth_factor,
          smoothing=smoothing,
          test_interval=test_interval,
      ),
      scale_by_adagrad_norm(
          initial_accumulator_value=initial_accumulator_value, eps=eps
      ),
      optax.scale_by_learning_rate(learning_rate),
  )
