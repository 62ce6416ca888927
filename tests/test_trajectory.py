"""Tests for trajectory regularization (TR): tr_sgd, tr_adam, the wrapper.

The reference (`trajectory_reference`) is a float64 NumPy transcription of
the authors' TRSGD / TRAdam step (github.com/huiqu18/TRAlgorithm), written
from the formulas, not from sngm_optax._trajectory.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from sngm_optax import tr_adam
from sngm_optax import tr_sgd
from sngm_optax import trajectory_regularized
from trajectory_reference import INNER_STEPS
from trajectory_reference import reference as _reference

DIM = 8
NUM_STEPS = 35  # three full inner windows and half of a fourth
LR_DROP_STEP = 15  # the schedule drops in the middle of the second window


def _initial_params():
  rng = np.random.default_rng(0)
  return {
      "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
      "w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
  }


def _problem(noise_scale):
  """A noisy quadratic: g(w, t) = h * (w - target) + noise_t (flat coords)."""
  rng = np.random.default_rng(1)
  h = rng.uniform(0.5, 2.0, size=DIM)
  target = rng.normal(size=DIM)
  noise = noise_scale * rng.normal(size=(4 * NUM_STEPS, DIM))
  return h, target, noise


def _step_lr(lr0):
  """Piecewise-constant learning rate, divided by 10 from LR_DROP_STEP on."""
  return lambda count: jnp.where(count < LR_DROP_STEP, lr0, 0.1 * lr0)


def _reference_lr(lr0, t):
  return lr0 if t < LR_DROP_STEP else 0.1 * lr0


def _run(tx, grad_fn, num_steps):
  """Runs tx under jit; returns (flat params before each step, flat anchors,
  flat final params, final state)."""
  params = _initial_params()
  _, unravel = ravel_pytree(params)

  def step(params, state, t):
    flat, _ = ravel_pytree(params)
    grads = unravel(grad_fn(flat, t).astype(jnp.float32))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step)
  state = tx.init(params)
  history, anchors = [], []
  for t in range(num_steps):
    history.append(np.asarray(ravel_pytree(params)[0]))
    params, state = step(params, state, t)
    anchors.append(np.asarray(ravel_pytree(state.anchor)[0]))
  return history, anchors, np.asarray(ravel_pytree(params)[0]), state


def _grad_fns(noise_scale):
  h, target, noise = _problem(noise_scale)

  def numpy_grad(w, t):
    return h * (w - target) + noise[t]

  h32, target32, noise32 = (jnp.asarray(a, jnp.float32)
                            for a in (h, target, noise))

  def jax_grad(w, t):
    return h32 * (w - target32) + noise32[t]

  return numpy_grad, jax_grad


def _assert_runs_match(run, reference, rtol, atol):
  history, anchors, final = run[:3]
  ref_history, ref_anchors, ref_final = reference
  for t in range(len(history)):
    np.testing.assert_allclose(
        history[t], ref_history[t], rtol=rtol, atol=atol, err_msg=f"step {t}"
    )
    np.testing.assert_allclose(
        anchors[t], ref_anchors[t], rtol=rtol, atol=atol,
        err_msg=f"anchor at step {t}",
    )
  np.testing.assert_allclose(final, ref_final, rtol=rtol, atol=atol)


def _w0():
  return np.asarray(ravel_pytree(_initial_params())[0], np.float64)


# --------------------------------------------------------------------------
# Side by side with the NumPy reference (3+ windows, LR drop, coupled strength)


@pytest.mark.parametrize("decay", [True, False])
def test_tr_sgd_matches_reference(decay):
  lr0, weight_decay = 0.1, 1e-2
  numpy_grad, jax_grad = _grad_fns(noise_scale=1.0)
  tx = tr_sgd(_step_lr(lr0), momentum=0.9, weight_decay=weight_decay,
              inner_lr_decay=decay)  # default strength: lambda_0 = 0.1 lr0
  lam0 = 0.1 * lr0
  reference = _reference(
      "sgd", _w0(), numpy_grad, NUM_STEPS,
      lr_fn=lambda t: _reference_lr(lr0, t),
      lam_fn=lambda t, lr: lam0 / lr,
      decay=decay, weight_decay=weight_decay, momentum=0.9,
  )
  _assert_runs_match(_run(tx, jax_grad, NUM_STEPS), reference,
                     rtol=2e-5, atol=2e-6)


def test_tr_adam_matches_reference():
  lr0, weight_decay = 0.01, 1e-2
  numpy_grad, jax_grad = _grad_fns(noise_scale=0.05)
  tx = tr_adam(_step_lr(lr0), weight_decay=weight_decay)
  lam0 = 0.1 * lr0
  reference = _reference(
      "adam", _w0(), numpy_grad, NUM_STEPS,
      lr_fn=lambda t: _reference_lr(lr0, t),
      lam_fn=lambda t, lr: lam0 / lr,
      weight_decay=weight_decay,
  )
  _assert_runs_match(_run(tx, jax_grad, NUM_STEPS), reference,
                     rtol=2e-5, atol=2e-6)


def test_tr_adam_close_to_authors_eps_placement():
  # The authors' PyTorch Adam adds eps before bias correction: a documented
  # deviation of order eps.
  lr0 = 0.01
  numpy_grad, jax_grad = _grad_fns(noise_scale=0.05)
  tx = tr_adam(_step_lr(lr0), weight_decay=1e-4)
  reference = _reference(
      "adam", _w0(), numpy_grad, NUM_STEPS,
      lr_fn=lambda t: _reference_lr(lr0, t),
      lam_fn=lambda t, lr: 0.1 * lr0 / lr,
      weight_decay=1e-4, eps_after_bias_correction=False,
  )
  _assert_runs_match(_run(tx, jax_grad, NUM_STEPS), reference,
                     rtol=1e-4, atol=1e-5)


def test_uncoupled_scheduled_strength_matches_reference():
  lr0 = 0.1
  numpy_grad, jax_grad = _grad_fns(noise_scale=1.0)
  strength = lambda count: 0.5 / (1.0 + count)  # a schedule of lambda itself
  tx = tr_sgd(_step_lr(lr0), strength=strength, weight_decay=0.0,
              couple_to_learning_rate=False)
  reference = _reference(
      "sgd", _w0(), numpy_grad, NUM_STEPS,
      lr_fn=lambda t: _reference_lr(lr0, t),
      lam_fn=lambda t, lr: 0.5 / (1.0 + t),
  )
  _assert_runs_match(_run(tx, jax_grad, NUM_STEPS), reference,
                     rtol=2e-5, atol=2e-6)


def test_wrapper_around_optax_sgd_matches_reference():
  lr0, lam0 = 0.1, 0.02
  numpy_grad, jax_grad = _grad_fns(noise_scale=1.0)
  lr = _step_lr(lr0)
  tx = trajectory_regularized(
      optax.sgd(lr, momentum=0.9), strength=lam0, inner_steps=7,
      learning_rate=lr,
  )
  reference = _reference(
      "sgd", _w0(), numpy_grad, NUM_STEPS,
      lr_fn=lambda t: _reference_lr(lr0, t),
      lam_fn=lambda t, lr: lam0 / lr, inner_steps=7,
  )
  _assert_runs_match(_run(tx, jax_grad, NUM_STEPS), reference,
                     rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_epoch_restart_matches_reference(kind):
  # 13 updates an epoch, S = 10: windows of 10, 3, 10, 3, 9 updates; the LR
  # drop at step 15 falls inside the second epoch's first window.
  lr0 = 0.1 if kind == "sgd" else 0.01
  numpy_grad, jax_grad = _grad_fns(noise_scale=1.0 if kind == "sgd" else 0.05)
  factory = tr_sgd if kind == "sgd" else tr_adam
  tx = factory(_step_lr(lr0), weight_decay=1e-4, steps_per_epoch=13)
  reference = _reference(
      kind, _w0(), numpy_grad, NUM_STEPS,
      lr_fn=lambda t: _reference_lr(lr0, t),
      lam_fn=lambda t, lr: 0.1 * lr0 / lr,
      weight_decay=1e-4, steps_per_epoch=13,
  )
  run = _run(tx, jax_grad, NUM_STEPS)
  _assert_runs_match(run, reference, rtol=2e-5, atol=2e-6)
  assert int(run[3].inner_step) == (NUM_STEPS % 13) % INNER_STEPS


@pytest.mark.parametrize("schedule", [
    optax.cosine_decay_schedule(0.1, decay_steps=40),
    # The harness's "step" decay: x0.1 at 50 % and 75 % of 40 steps.
    optax.piecewise_constant_schedule(0.1, {20: 0.1, 30: 0.1}),
])
def test_coupled_pull_stays_two_lambda0_while_the_lr_decays(schedule):
  # One gradient at step 0 (where k = 0: no pull) moves w off the anchor;
  # then zero gradients, no momentum, decay or weight decay, so each step is
  # the pull alone, w - a <- (1 - eta_t 2 lambda_t)(w - a), and coupling
  # (lambda_t = lambda_0 / eta_t) makes the factor 1 - 2 lambda_0 whatever
  # eta_t is.
  lam0 = 0.01
  tx = tr_sgd(schedule, strength=lam0, momentum=0.0, weight_decay=0.0,
              inner_lr_decay=False, inner_steps=1000)
  params = {"w": jnp.asarray([1.0, -2.0, 0.5])}
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  offsets = []
  for t in range(40):
    grad = {"w": jnp.asarray([5.0, -5.0, 10.0]) if t == 0 else jnp.zeros(3)}
    updates, state = step(grad, state, params)
    params = optax.apply_updates(params, updates)
    offsets.append(np.asarray(params["w"] - state.anchor["w"], np.float64))
  ratios = np.array(offsets[1:]) / np.array(offsets[:-1])
  np.testing.assert_allclose(ratios, 1 - 2 * lam0, rtol=1e-5)


def test_zero_learning_rate_gives_zero_step_not_nan():
  tx = tr_sgd(0.0, strength=0.01)
  params = _initial_params()
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    for leaf in jax.tree.leaves(updates):
      np.testing.assert_array_equal(leaf, 0.0)


def test_warmup_from_zero_needs_explicit_strength():
  warmup = optax.linear_schedule(0.0, 0.1, 100)
  with pytest.raises(ValueError, match="strength"):
    tr_sgd(warmup)
  tr_sgd(warmup, strength=0.01)  # explicit lambda_0 is fine


# --------------------------------------------------------------------------
# Equivalences with plain optax optimizers


def _assert_same_trajectory(tx_a, tx_b, num_steps=25):
  _, jax_grad = _grad_fns(noise_scale=1.0)
  for jit in (False, True):
    run_a = _run_plain(tx_a, jax_grad, num_steps, jit)
    run_b = _run_plain(tx_b, jax_grad, num_steps, jit)
    for t, (a, b) in enumerate(zip(run_a, run_b)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, err_msg=f"step {t}")
    if not jit:  # op by op the same float32 operations happen
      np.testing.assert_array_equal(run_a[-1], run_b[-1])


def _run_plain(tx, grad_fn, num_steps, jit):
  params = _initial_params()
  _, unravel = ravel_pytree(params)

  def step(params, state, t):
    grads = unravel(grad_fn(ravel_pytree(params)[0], t))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  state = tx.init(params)
  out = []
  for t in range(num_steps):
    params, state = step(params, state, t)
    out.append(np.asarray(ravel_pytree(params)[0]))
  return out


def test_zero_strength_no_decay_is_sgd_with_momentum():
  lr = _step_lr(0.1)
  _assert_same_trajectory(
      tr_sgd(lr, strength=0.0, inner_lr_decay=False, weight_decay=1e-2),
      optax.chain(optax.add_decayed_weights(1e-2),
                  optax.sgd(lr, momentum=0.9)),
  )


def test_zero_strength_no_decay_is_adam_with_l2():
  lr = _step_lr(0.01)
  _assert_same_trajectory(
      tr_adam(lr, strength=0.0, inner_lr_decay=False, weight_decay=1e-2),
      optax.chain(optax.add_decayed_weights(1e-2), optax.adam(lr)),
  )


def test_wrapper_with_zero_strength_no_decay_is_the_inner_optimizer():
  _assert_same_trajectory(
      trajectory_regularized(optax.adamw(0.01), strength=0.0,
                             inner_lr_decay=False),
      optax.adamw(0.01),
  )


def test_one_inner_step_means_no_pull_and_no_decay():
  # With S = 1 the anchor is the current point at every step.
  _assert_same_trajectory(
      tr_sgd(0.1, strength=0.5, inner_steps=1, weight_decay=0.0),
      optax.sgd(0.1, momentum=0.9),
  )


# --------------------------------------------------------------------------
# Anchor and inner state


@pytest.mark.parametrize("inner_steps", [1, 3, 10])
def test_anchor_resets_exactly_every_inner_steps(inner_steps):
  _, jax_grad = _grad_fns(noise_scale=1.0)
  tx = tr_sgd(0.1, inner_steps=inner_steps)
  np.testing.assert_array_equal(tx.init(_initial_params()).inner_step, 0)
  history, anchors, _, state = _run(tx, jax_grad, NUM_STEPS)
  for t in range(NUM_STEPS):
    window_start = t - t % inner_steps
    np.testing.assert_array_equal(anchors[t], history[window_start],
                                  err_msg=f"step {t}")
    if t % inner_steps:  # the params have moved away from the anchor
      assert np.abs(history[t] - anchors[t]).max() > 1e-4
  # The counters after NUM_STEPS updates.
  assert state.inner_step.dtype == jnp.int32
  assert state.count.dtype == jnp.int32
  assert int(state.inner_step) == NUM_STEPS % inner_steps
  assert int(state.count) == NUM_STEPS


def test_adam_state_is_never_reset():
  _, jax_grad = _grad_fns(noise_scale=0.05)
  tx = tr_adam(0.01)
  _, _, _, state = _run(tx, jax_grad, NUM_STEPS)
  adam_state = state.inner_state[1]
  assert int(adam_state.count) == NUM_STEPS
  # nu is an EMA over all 35 gradients, not only those of the last window.
  assert float(jnp.min(ravel_pytree(adam_state.nu)[0])) > 0.0


def test_momentum_is_not_reset_at_window_start():
  # A reset buffer at step INNER_STEPS would make that update -lr * d_t.
  _, jax_grad = _grad_fns(noise_scale=1.0)
  tx = tr_sgd(0.1, weight_decay=0.0)
  _, _, _, state = _run(tx, jax_grad, INNER_STEPS)
  params = _initial_params()
  trace_before = state.inner_state[1].trace
  grads = jax.tree.map(jnp.ones_like, params)
  _, state_after = tx.update(grads, state, params)
  expected = jax.tree.map(lambda m, g: 0.9 * m + g, trace_before, grads)
  chex.assert_trees_all_close(state_after.inner_state[1].trace, expected,
                              rtol=1e-6)


# --------------------------------------------------------------------------
# optax machinery


def test_jit_does_not_recompile():
  tx = tr_adam(_step_lr(0.01))
  params = _initial_params()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(12):  # across an anchor reset
    new_params, new_state = step(params, state)
    chex.assert_trees_all_equal_dtypes(new_state, state)
    chex.assert_trees_all_equal_shapes(new_state, state)
    params, state = new_params, new_state


def test_inject_hyperparams_learning_rate_change_keeps_coupling():
  lr0, lam0 = 0.1, 0.01
  numpy_grad, jax_grad = _grad_fns(noise_scale=1.0)
  tx = optax.inject_hyperparams(tr_sgd)(
      learning_rate=lr0, strength=lam0, weight_decay=0.0
  )
  params = _initial_params()
  _, unravel = ravel_pytree(params)

  @jax.jit
  def step(params, state, t):
    grads = unravel(jax_grad(ravel_pytree(params)[0], t))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for t in range(NUM_STEPS):
    if t == LR_DROP_STEP:  # a manual step schedule, as in the authors' code
      state.hyperparams["learning_rate"] = jnp.asarray(0.1 * lr0)
    params, state = step(params, state, t)
  _, _, ref_final = _reference(
      "sgd", _w0(), numpy_grad, NUM_STEPS,
      lr_fn=lambda t: _reference_lr(lr0, t),
      lam_fn=lambda t, lr: lam0 / lr,
  )
  np.testing.assert_allclose(ravel_pytree(params)[0], ref_final,
                             rtol=2e-5, atol=2e-6)


def test_multi_steps_regularizes_outer_steps():
  lr0, micro = 0.1, 2
  numpy_grad, jax_grad = _grad_fns(noise_scale=1.0)
  tx = optax.MultiSteps(tr_sgd(_step_lr(lr0), weight_decay=0.0),
                        every_k_schedule=micro)
  params = _initial_params()
  _, unravel = ravel_pytree(params)

  @jax.jit
  def step(params, state, t):
    grads = unravel(jax_grad(ravel_pytree(params)[0], t))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  outer = []
  for t in range(micro * NUM_STEPS):
    params, state = step(params, state, t)
    if t % micro == micro - 1:
      outer.append(np.asarray(ravel_pytree(params)[0]))
  assert int(state.inner_opt_state.inner_step) == NUM_STEPS % INNER_STEPS

  mean_grad = lambda w, j: np.mean(
      [numpy_grad(w, micro * j + i) for i in range(micro)], axis=0)
  history, _, final = _reference(
      "sgd", _w0(), mean_grad, NUM_STEPS,
      lr_fn=lambda t: _reference_lr(lr0, t), lam_fn=lambda t, lr: 0.01 / lr,
  )
  for j in range(NUM_STEPS - 1):
    np.testing.assert_allclose(outer[j], history[j + 1], rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(outer[-1], final, rtol=2e-5, atol=2e-6)


def test_apply_if_finite_skips_bad_step_without_advancing_window():
  lr0, bad_step = 0.1, 7
  numpy_grad, jax_grad = _grad_fns(noise_scale=1.0)
  tx = optax.apply_if_finite(tr_sgd(_step_lr(lr0), weight_decay=0.0),
                             max_consecutive_errors=3)
  params = _initial_params()
  _, unravel = ravel_pytree(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  num_calls = NUM_STEPS + 1
  for t in range(num_calls):
    noise_index = t if t < bad_step else t - 1
    grads = unravel(jax_grad(ravel_pytree(params)[0], noise_index))
    if t == bad_step:
      grads = jax.tree.map(lambda g: g * jnp.nan, grads)
      k_before = int(state.inner_state.inner_step)
    params, state = step(params, state, grads)
    if t == bad_step:
      assert int(state.inner_state.inner_step) == k_before
  assert int(state.total_notfinite) == 1
  _, _, ref_final = _reference(
      "sgd", _w0(), numpy_grad, NUM_STEPS,
      lr_fn=lambda t: _reference_lr(lr0, t), lam_fn=lambda t, lr: 0.01 / lr,
  )
  np.testing.assert_allclose(ravel_pytree(params)[0], ref_final,
                             rtol=2e-5, atol=2e-6)


def test_extra_args_are_accepted():
  tx = tr_sgd(0.1)
  params = _initial_params()
  updates, _ = tx.update(params, tx.init(params), params, loss=jnp.ones([]))
  chex.assert_trees_all_equal_structs(updates, params)


def test_bfloat16_params_keep_their_dtype():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _initial_params())
  for tx in (tr_sgd(0.1), tr_adam(0.01)):
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
      updates, new_state = tx.update(grads, state, params)
      chex.assert_trees_all_equal_dtypes(updates, params)
      chex.assert_trees_all_equal_dtypes(new_state, state)
      params = optax.apply_updates(params, updates)
      state = new_state


# --------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "factory",
    [
        lambda: tr_sgd(0.1),
        lambda: tr_adam(0.01),
        lambda: trajectory_regularized(optax.sgd(0.1), strength=0.1),
    ],
)
def test_update_without_params_raises(factory):
  tx = factory()
  params = _initial_params()
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state)


@pytest.mark.parametrize(
    "name, build",
    [
        ("strength", lambda: trajectory_regularized(optax.sgd(0.1), -0.1)),
        ("strength", lambda: tr_sgd(0.1, strength=-1.0)),
        ("strength", lambda: tr_adam(0.1, strength=float("nan"))),
        ("inner_steps", lambda: tr_sgd(0.1, inner_steps=0)),
        ("inner_steps", lambda: tr_adam(0.1, inner_steps=2.5)),
        ("inner_steps", lambda: trajectory_regularized(
            optax.sgd(0.1), 0.1, inner_steps=-3)),
        ("learning_rate", lambda: tr_sgd(-0.1)),
        ("learning_rate", lambda: tr_adam(-1e-3)),
        ("learning_rate", lambda: trajectory_regularized(
            optax.sgd(0.1), 0.1, learning_rate=-0.1)),
        ("momentum", lambda: tr_sgd(0.1, momentum=1.0)),
        ("momentum", lambda: tr_sgd(0.1, momentum=-0.5)),
        ("weight_decay", lambda: tr_sgd(0.1, weight_decay=-1e-4)),
        ("weight_decay", lambda: tr_adam(0.1, weight_decay=-1e-4)),
        ("b1", lambda: tr_adam(0.1, b1=1.0)),
        ("b2", lambda: tr_adam(0.1, b2=-0.1)),
        ("eps", lambda: tr_adam(0.1, eps=-1e-8)),
        ("steps_per_epoch", lambda: tr_sgd(0.1, steps_per_epoch=0)),
        ("steps_per_epoch", lambda: tr_adam(0.1, steps_per_epoch=2.5)),
    ],
)
def test_bad_hyperparameters_raise(name, build):
  with pytest.raises(ValueError, match=name):
    build()
