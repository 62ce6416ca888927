"""Tests of the harness models, and of sngm_optax transforms under flax.nnx."""

import functools

import flax.linen as nn
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


def _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "kernel, stride, padding, length, in_features, use_bias", [
        (5, 2, "SAME", 40, 1, True), (3, 2, "SAME", 11, 4, True),
        (4, 3, "SAME", 13, 2, True), (3, 1, "SAME", 9, 3, True),
        (3, 2, "VALID", 11, 3, True), (1, 1, "VALID", 6, 2, True),
        (1, 2, "SAME", 10, 3, False)])
def test_patch_conv_equals_flax_conv(kernel, stride, padding, length,
                                     in_features, use_bias):
  # Same parameters from the same key; same outputs and gradients (with
  # respect to the parameters and the input) to float32 rounding, in both
  # layouts. One jitted call computes everything (one compilation a case).
  flax_conv = nn.Conv(6, (kernel,), strides=(stride,), padding=padding,
                      use_bias=use_bias)
  convs = {layout: models.PatchConv(6, kernel, strides=stride,
                                    padding=padding, use_bias=use_bias,
                                    batch_minor=layout == "batch_minor")
           for layout in ("batch_major", "batch_minor")}
  x = jax.random.normal(jax.random.key(1), (5, length, in_features))
  to_minor = lambda a: jnp.transpose(a, (1, 2, 0))  # pylint: disable=unnecessary-lambda-assignment
  from_minor = lambda a: jnp.transpose(a, (2, 0, 1))  # pylint: disable=unnecessary-lambda-assignment

  @jax.jit
  def everything(x):
    params = flax_conv.init(jax.random.key(0), x)
    cotangent = jax.random.normal(jax.random.key(2),
                                  flax_conv.apply(params, x).shape)
    def value(apply, params, x):
      return jnp.sum(apply(params, x) * cotangent)
    applies = {
        "flax": flax_conv.apply, "batch_major": convs["batch_major"].apply,
        "batch_minor": lambda p, x: from_minor(
            convs["batch_minor"].apply(p, to_minor(x)))}
    return params, {
        "init": {"batch_major": convs["batch_major"].init(jax.random.key(0), x),
                 "batch_minor": convs["batch_minor"].init(jax.random.key(0),
                                                          to_minor(x))},
        "out": {name: apply(params, x) for name, apply in applies.items()},
        "grad": {name: jax.grad(functools.partial(value, apply), (0, 1))(
            params, x) for name, apply in applies.items()}}

  params, results = everything(x)
  for layout in convs:
    _assert_trees_close(results["init"][layout], params, rtol=0, atol=0)
    np.testing.assert_allclose(results["out"][layout], results["out"]["flax"],
                               rtol=1e-5, atol=1e-6)
    _assert_trees_close(results["grad"][layout], results["grad"]["flax"])


def test_patch_conv_rejects_what_it_does_not_compute():
  x = jnp.ones((2, 8, 3))
  with pytest.raises(ValueError, match="padding must be 'SAME' or 'VALID'"):
    models.PatchConv(4, 3, padding="CIRCULAR").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="1-D: kernel_size"):
    models.PatchConv(4, (3, 3)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"\[batch, length, features\]"):
    models.PatchConv(4, 3).init(jax.random.key(0), jnp.ones((8, 3)))


# Batches below, at and above whole chunks of 8 (the last one padded).
@pytest.mark.parametrize("batch", [5, 16, 21])
def test_cnn_equals_the_flax_conv_cnn(batch):
  # The patch formulation in chunks against nn.Conv on the whole batch: the
  # same parameter tree and values, logits, and gradient of the loss.
  reference = models.CNN(reference=True)
  model = models.CNN(chunk_size=8)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 40)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  params = reference.init(jax.random.key(0), x[:1])
  _assert_trees_close(model.init(jax.random.key(0), x[:1]), params,
                      rtol=0, atol=0)

  @jax.jit
  def logits_and_grads(params):
    def loss(network, params):
      logits = network.apply(params, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return {name: (network.apply(params, x),
                   jax.grad(functools.partial(loss, network))(params))
            for name, network in (("patches", model), ("flax", reference))}

  results = logits_and_grads(params)
  np.testing.assert_allclose(results["patches"][0], results["flax"][0],
                             rtol=1e-5, atol=1e-5)
  _assert_trees_close(results["patches"][1], results["flax"][1],
                      rtol=1e-4, atol=1e-6)


def _perturbed(tree, key, scale):
  """`tree` plus noise, so that no leaf is a special value (BatchNorm's
  zero-initialized scales would zero the gradients of the residual
  branches)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype)
      for leaf, k in zip(leaves, keys)])


# The default size, and a deeper, narrower one: identity shortcuts (depth 2)
# and an odd length (stage 3: 5 -> 3).
@pytest.mark.parametrize("model_kwargs", [
    {}, {"width": 8, "depth": 2, "stages": 3, "widening": 2}])
def test_resnet_equals_the_flax_conv_resnet(model_kwargs):
  # PatchConvs on [length, channels, batch] against nn.Conv: the same
  # parameter and batch_stats trees and values from the same key; with the
  # same variables, the same train-mode logits and updated running
  # statistics, eval-mode logits and gradient of the train-mode loss.
  reference = models.ResNet(reference=True, **model_kwargs)
  model = models.ResNet(**model_kwargs)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(12, 40)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 12), jnp.int32)
  variables = reference.init(jax.random.key(0), x[:1])
  _assert_trees_close(model.init(jax.random.key(0), x[:1]), variables,
                      rtol=0, atol=0)
  params = _perturbed(variables["params"], jax.random.key(1), 0.3)
  stats = variables["batch_stats"]
  stats = {"train": stats, "eval": jax.tree.map(
      lambda s: jnp.abs(s), _perturbed(stats, jax.random.key(2), 0.5))}

  @jax.jit
  def everything(params, stats):
    def loss(network, params):
      logits, updates = network.apply(
          {"params": params, "batch_stats": stats["train"]}, x, train=True,
          mutable=["batch_stats"])
      return (optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), (logits, updates["batch_stats"]))
    results = {}
    for name, network in (("patches", model), ("flax", reference)):
      grads, (logits, new_stats) = jax.grad(
          functools.partial(loss, network), has_aux=True)(params)
      results[name] = {
          "train": logits, "batch_stats": new_stats, "grads": grads,
          "eval": network.apply({"params": params,
                                 "batch_stats": stats["eval"]}, x)}
    return results

  results = everything(params, stats)
  _assert_trees_close(results["patches"], results["flax"], rtol=1e-5,
                      atol=1e-5)


def test_resnet_cross_device_batch_norm_equals_the_flax_conv_resnet():
  # BatchNorm's axis_name in the batch-minor layout: the statistics of both
  # "devices" (a vmapped axis) as nn.Conv's model computes them.
  kwargs = dict(width=4, cross_device_batch_norm=True, axis_name="devices")
  reference = models.ResNet(reference=True, **kwargs)
  model = models.ResNet(**kwargs)
  x = jax.random.normal(jax.random.key(1), (2, 6, 40))
  variables = reference.init(jax.random.key(0), x[0, :1])
  variables = {"params": _perturbed(variables["params"], jax.random.key(2),
                                    0.3),
               "batch_stats": variables["batch_stats"]}

  @jax.jit
  def train_mode(x):
    return {name: jax.vmap(lambda x, network=network: network.apply(
        variables, x, train=True, mutable=["batch_stats"]),
                           axis_name="devices")(x)
            for name, network in (("patches", model), ("flax", reference))}

  results = train_mode(x)
  _assert_trees_close(results["patches"], results["flax"], rtol=1e-5,
                      atol=1e-5)
  # Normalized over both devices' examples: the same statistics on each.
  _assert_trees_close(*[jax.tree.map(lambda s, i=i: s[i],
                                     results["patches"][1])
                        for i in (0, 1)], rtol=0, atol=0)


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
