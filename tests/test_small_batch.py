"""The small-batch optimizers (adam, tr_sgd, tr_adam) in the harness registry."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sngm_optax.harness import data
from sngm_optax.harness import train
from sngm_optax.harness import config as config_lib
from sngm_optax.harness import optimizers
from trajectory_reference import reference


@pytest.fixture(name="dataset", scope="module")
def fixture_dataset() -> data.Dataset:
  return data.generate_mnist1d(500, seed=0)


@pytest.mark.parametrize("name, learning_rate", [
    ("adam", 3e-3), ("tr_sgd", 0.05), ("tr_adam", 3e-3)])
def test_registry_entry_trains_at_a_tiny_batch(dataset, name, learning_rate):
  # B = 4 split over 2 devices (per-device gradients averaged by the entry).
  config = config_lib.Config(optimizer=name, learning_rate=learning_rate,
                        batch_size=4, epochs=2, model="mlp", num_devices=2,
                        warmup_epochs=0.0)
  result = train.train_and_evaluate(config, dataset=dataset, quiet=True)
  history = result["history"]
  assert result["steps"] == 200
  assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.1
  assert history[-1]["test_loss"] < np.log(10.0)  # below chance's loss
  assert history[-1]["test_accuracy"] > 0.2      # chance is 0.1


def _run(tx, params, grads):
  state = tx.init(params)
  for grad in grads:
    updates, state = tx.update(grad, state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize("tr_name, plain_name", [
    ("tr_sgd", "msgd"), ("tr_adam", "adam")])
def test_tr_without_pull_and_decay_is_the_plain_entry(tr_name, plain_name):
  # strength 0 and no 1/(k+1) decay: TR-SGD is momentum SGD and TR-Adam is
  # Adam with coupled L2, both with biases undecayed.
  params = {"w": jnp.arange(6.0).reshape(2, 3) / 6, "b": jnp.ones(3)}
  keys = jax.random.split(jax.random.key(1), 12)
  grads = [{"w": jax.random.normal(k, (2, 3)), "b": jnp.full(3, 0.5)}
           for k in keys]
  schedule = optax.linear_schedule(0.1, 0.01, 12)
  tr = optimizers.make_optimizer(tr_name, schedule, weight_decay=0.1,
                            strength=0.0, inner_lr_decay=False)
  plain = optimizers.make_optimizer(plain_name, schedule, weight_decay=0.1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               _run(tr, params, grads), _run(plain, params, grads))


def test_tr_sgd_entry_first_window_matches_hand_computed_steps():
  # One parameter, constant gradient 1, lambda = 0.1 (the registry's coupled
  # default lambda_0 = 0.1 * lr at lr 1), momentum 0, no weight decay:
  # anchor 0 and w_{k+1} = w_k - (1 + 0.2 * w_k) / (k + 1).
  tx = optimizers.make_optimizer("tr_sgd", 1.0, momentum=0.0)
  params = {"w": jnp.zeros((1, 1))}
  got = _run(tx, params, [{"w": jnp.ones((1, 1))}] * 3)["w"]
  w = 0.0
  for k in range(3):
    w -= (1.0 + 0.2 * w) / (k + 1)
  np.testing.assert_allclose(got, [[w]], rtol=1e-6)


def test_step_schedule_drops_tenfold_at_half_and_three_quarters():
  # Peak 2 over 40 steps after a 4-step linear warm-up from 0.
  schedule = optimizers.SCHEDULES["step"](2.0, 40, 4)
  counts = [0, 2, 4, 19, 20, 29, 30, 39]
  np.testing.assert_allclose([float(schedule(c)) for c in counts],
                             [0, 1, 2, 2, 0.2, 0.2, 0.02, 0.02], rtol=1e-6)


@pytest.mark.parametrize("name", ["tr_sgd", "tr_adam"])
def test_tr_entry_defaults_are_the_authors(name):
  # The loop's learning rate (peak x unit "step" schedule with a 3-step
  # warm-up, so eta_0 = 0) and the harness's weight decay, with nothing
  # else given: the float64 reference with lambda_0 = 0.1 * peak, S = 10,
  # momentum 0.9 (b1 0.9, b2 0.999), L2 1e-4, the window restarted at each
  # 13-step epoch.
  peak = 0.1 if name == "tr_sgd" else 0.01
  unit = optimizers.SCHEDULES["step"](1.0, 30, 3)
  weight_decay = config_lib.Config().weight_decay
  tx = optimizers.make_optimizer(
      name, optimizers.PeakTimesSchedule(peak, unit),
      weight_decay=weight_decay, steps_per_epoch=13)
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(4, 2))  # a kernel: the mask decays it
  noise = (1.0 if name == "tr_sgd" else 0.05) * rng.normal(size=(30, 8))
  grad = lambda w, t: (w - 1.0) + noise[t]
  params = {"w": jnp.asarray(w0, jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(30):
    grads = {"w": jnp.asarray(grad(np.asarray(params["w"]).ravel(), t)
                              .reshape(4, 2), jnp.float32)}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  lr = lambda t: peak * min(t / 3, 1.0) * (1.0 if t < 15 else
                                           0.1 if t < 22.5 else 0.01)
  _, _, expected = reference(
      "sgd" if name == "tr_sgd" else "adam", w0.ravel(), grad, 30,
      lr_fn=lr, lam_fn=lambda t, eta: 0.1 * peak / eta if eta else 0.0,
      weight_decay=1e-4, steps_per_epoch=13)
  np.testing.assert_allclose(np.asarray(params["w"]).ravel(), expected,
                             rtol=2e-5, atol=2e-6)


def test_loop_passes_steps_per_epoch_to_tr_only():
  kwargs = lambda **changes: train._optimizer_kwargs(  # pylint: disable=protected-access
      config_lib.Config(batch_size=8, **changes), num_train=1000)
  assert kwargs(optimizer="tr_sgd") == {"steps_per_epoch": 125}
  assert kwargs(optimizer="tr_adam",
                optimizer_kwargs={"steps_per_epoch": None}) == {
                    "steps_per_epoch": None}  # straight through epochs
  assert kwargs(optimizer="msgd") == {}
