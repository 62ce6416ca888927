"""AdaGrad-Norm against a float64 NumPy reference and against optax.adagrad."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sngm_optax
from sngm_optax import adagrad_norm
from sngm_optax import scale_by_adagrad_norm

TARGETS = {
    "a": np.array([1.0, -2.0, 0.5]),
    "b": {"c": np.array([[0.3, -0.7], [2.0, 1.5]]), "d": np.array(-1.0)},
}
CURVATURES = {
    "a": np.array([1.0, 4.0, 0.5]),
    "b": {"c": np.array([[2.0, 1.0], [0.2, 3.0]]), "d": np.array(1.5)},
}


def noisy_quadratic_grad(params, noise):
  """Gradient of sum_j h_j (w_j - t_j)^2 / 2 plus a fixed per-step noise."""
  return jax.tree.map(
      lambda w, h, t, n: h * (w - t) + n, params, CURVATURES, TARGETS, noise
  )


def step_noise(step):
  rng = np.random.default_rng(step)
  return jax.tree.map(lambda t: 0.3 * rng.normal(size=np.shape(t)), TARGETS)


def reference_trajectory(schedule, initial_accumulator_value, eps, steps):
  """AdaGrad-Norm written out in float64 NumPy."""
  params = jax.tree.map(np.zeros_like, TARGETS)
  accumulator = initial_accumulator_value
  trajectory = []
  for step in range(steps):
    grads = noisy_quadratic_grad(params, step_noise(step))
    accumulator += sum(np.sum(g**2) for g in jax.tree.leaves(grads))
    rate = schedule(step) / np.sqrt(accumulator + eps)
    params = jax.tree.map(lambda w, g: w - rate * g, params, grads)
    trajectory.append(params)
  return trajectory, accumulator


@pytest.mark.parametrize("initial_accumulator_value,eps", [(0.1, 1e-7), (0.0, 0.0), (2.0, 0.5)])
def test_matches_numpy_reference_trajectory(initial_accumulator_value, eps):
  schedule = lambda step: 0.5 * 0.97**step
  steps = 40
  expected, expected_accumulator = reference_trajectory(
      schedule, initial_accumulator_value, eps, steps
  )

  tx = adagrad_norm(
      optax.exponential_decay(0.5, transition_steps=1, decay_rate=0.97),
      initial_accumulator_value=initial_accumulator_value,
      eps=eps,
  )
  params = jax.tree.map(lambda t: jnp.zeros(np.shape(t), jnp.float32), TARGETS)
  state = tx.init(params)

  @jax.jit
  def step(params, state, noise):
    grads = noisy_quadratic_grad(params, noise)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, step_noise(i))
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected[i])):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  accumulator = optax.tree.get(state, "sum_of_squared_norms")
  assert accumulator.dtype == jnp.float32
  np.testing.assert_allclose(accumulator, expected_accumulator, rtol=1e-5)


def test_scalar_parameter_is_adagrad():
  """With a single coordinate, AdaGrad-Norm and optax.adagrad coincide."""
  ours = adagrad_norm(0.3, initial_accumulator_value=0.2, eps=1e-6)
  theirs = optax.adagrad(0.3, initial_accumulator_value=0.2, eps=1e-6)
  params = jnp.array([2.0])
  ours_state, theirs_state = ours.init(params), theirs.init(params)
  for i in range(25):
    grads = jnp.array([np.sin(i) + 0.1 * i])
    ours_updates, ours_state = ours.update(grads, ours_state, params)
    theirs_updates, theirs_state = theirs.update(grads, theirs_state, params)
    np.testing.assert_allclose(ours_updates, theirs_updates, rtol=1e-6)


def test_step_is_scale_free_direction():
  """The update is the gradient times one shared scalar."""
  tx = scale_by_adagrad_norm(initial_accumulator_value=0.0, eps=0.0)
  grads = {"a": jnp.array([3.0]), "b": jnp.array([[4.0, 0.0]])}
  updates, state = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(updates["a"], [0.6])
  np.testing.assert_allclose(updates["b"], [[0.8, 0.0]])
  np.testing.assert_allclose(state.sum_of_squared_norms, 25.0)


def test_zero_accumulator_and_zero_gradient_give_zero_update():
  tx = scale_by_adagrad_norm(initial_accumulator_value=0.0, eps=0.0)
  updates, state = tx.update(jnp.zeros(3), tx.init(jnp.zeros(3)))
  np.testing.assert_array_equal(updates, np.zeros(3))
  assert float(state.sum_of_squared_norms) == 0.0


def test_low_precision_gradients_keep_dtype_and_float32_state():
  tx = scale_by_adagrad_norm(initial_accumulator_value=0.0, eps=0.0)
  grads = jnp.full((1000,), 1e-3, jnp.bfloat16)
  updates, state = tx.update(grads, tx.init(grads))
  assert updates.dtype == jnp.bfloat16
  assert state.sum_of_squared_norms.dtype == jnp.float32
  # ||g||^2 = 1000 * (bf16(1e-3))^2, accumulated in float32.
  value = float(jnp.asarray(1e-3, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(state.sum_of_squared_norms, 1000 * value**2, rtol=1e-5)
  np.testing.assert_allclose(
      updates.astype(jnp.float32), np.full(1000, 1 / np.sqrt(1000)), rtol=1e-2
  )


def test_inject_hyperparams_and_no_recompilation():
  tx = optax.inject_hyperparams(adagrad_norm)(learning_rate=0.1)
  params = jnp.ones(4)
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(params, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(3):
    params, state = step(params, state)
  state.hyperparams["learning_rate"] = jnp.zeros_like(
      state.hyperparams["learning_rate"]
  )
  frozen, _ = step(params, state)
  np.testing.assert_array_equal(frozen, params)
  assert len(traces) == 1


def test_exported():
  assert sngm_optax.adagrad_norm is adagrad_norm
  assert "ScaleByAdagradNormState" in sngm_optax.__all__


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"learning_rate": 0.1, "initial_accumulator_value": -1.0}, "initial_accumulator_value"),
        ({"learning_rate": 0.1, "eps": -1e-8}, "eps"),
        ({"learning_rate": 0.1, "eps": float("nan")}, "eps"),
    ],
)
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    adagrad_norm(**kwargs)
