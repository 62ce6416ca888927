"""Tests of the harness models, and of sngm_optax transforms under flax.nnx."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sngm_optax.harness import data
from sngm_optax.harness import models
from sngm_optax import sngm


@pytest.mark.parametrize("name, num_params", [("cnn", 5210), ("mlp", 23050)])
def test_linen_models_map_signals_to_logits(name, num_params):
  model = models.make_model(name, num_classes=10)
  x = jnp.ones((3, 40))
  params = jax.jit(model.init)(jax.random.key(0), x)
  assert model.apply(params, x).shape == (3, 10)
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == num_params


def test_make_model_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown model 'vit'; choose one of"):
    models.make_model("vit")


def _flat_params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_nnx_optimizer_step_with_sngm_matches_the_formula():
  # First SNGM step from u_0 = 0: w <- w - lr * g / ||g||, with ||g|| the
  # global norm over every parameter; computed here in float64 NumPy.
  model = models.NnxMLP(num_features=40, num_classes=10, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, sngm(learning_rate=0.05), wrt=nnx.Param)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=16), jnp.int32)

  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  grads = nnx.grad(loss_fn)(model)
  before = [np.asarray(p, np.float64) for p in _flat_params(model)]
  flat_grads = [np.asarray(g, np.float64)
                for g in jax.tree.leaves(nnx.state(grads, nnx.Param))]
  norm = np.sqrt(sum(np.sum(g ** 2) for g in flat_grads))
  optimizer.update(model, grads)
  for old, grad, new in zip(before, flat_grads, _flat_params(model)):
    np.testing.assert_allclose(new, old - 0.05 * grad / norm, atol=1e-6)


def test_nnx_training_with_sngm_learns_mnist1d(tmp_path):
  dataset = data.load_mnist1d(1000, seed=0, cache_dir=tmp_path)
  model = models.NnxMLP(num_features=40, num_classes=10, rngs=nnx.Rngs(0))
  schedule = optax.cosine_decay_schedule(0.1, 60)
  optimizer = nnx.Optimizer(model, sngm(schedule, momentum=0.9),
                            wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  sampler = data.EpochSampler(dataset.num_train, seed=0)
  losses = []
  for _ in range(60):
    idx = sampler.next_batch(100)
    losses.append(float(train_step(model, optimizer, dataset.x[idx],
                                   dataset.y[idx])))
  accuracy = float(jnp.mean(
      jnp.argmax(model(dataset.x_test), -1) == dataset.y_test))
  assert np.mean(losses[-10:]) < losses[0] - 0.3
  assert accuracy > 0.3  # chance is 0.1
