"""The `resnet` and BatchNorm through the harness: steps, masks, optimizers.

What BatchNorm sees (steps.py's docstring): each device's slice of each
microbatch is one BatchNorm batch, the running averages are updated once per
microbatch in order (padding leaves them) and averaged over the devices at
the end of the step; evaluation uses the running averages.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sngm_optax.harness import config as config_lib
from sngm_optax.harness import data
from sngm_optax.harness import models
from sngm_optax.harness import optimizers
from sngm_optax.harness import steps as steps_lib
from sngm_optax.harness import train

TINY = {"width": 4}  # 4 and 16 channels: fast to compile
MICROBATCH = 8


@pytest.fixture(name="dataset", scope="module")
def fixture_dataset() -> data.Dataset:
  return data.generate_mnist1d(80, seed=0)  # 64 training examples


def test_resnet_default_size_and_batch_norm_modes():
  model = models.make_model("resnet")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 40)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == (
      19418)
  logits, updates = model.apply(variables, x, train=True,
                                mutable=["batch_stats"])
  assert logits.shape == (6, 10)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         updates["batch_stats"], variables["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # Evaluation mode: running averages, so an example's logits do not depend
  # on the rest of the batch.
  np.testing.assert_allclose(model.apply(variables, x)[:2],
                             model.apply(variables, x[:2]), rtol=1e-5,
                             atol=1e-6)


def _program(num_devices, model_kwargs=None, optimizer="msgd",
             growing_microbatch=None, adaptive=None):
  train.build_program.cache_clear()
  return train.build_program(train.ProgramSpec(
      model="resnet", num_classes=10, optimizer=optimizer,
      schedule="constant", total_samples=1000, warmup_samples=0,
      devices=tuple(jax.local_devices()[:num_devices]),
      model_kwargs=train.frozen_items(model_kwargs or TINY),
      adaptive=adaptive, growing_microbatch=growing_microbatch))


def _state(program, x, learning_rate=0.1):
  config = config_lib.Config(model="resnet", optimizer="msgd",
                             learning_rate=learning_rate, weight_decay=0.0,
                             num_devices=program.mesh.size)
  return train.initial_state(program, config, x[:1])


def _batch(dataset, slots, microbatch=MICROBATCH, real=None):
  """The first examples as `[slots, microbatch]`; slots past `real` are
  weight-0 padding."""
  real = slots if real is None else real
  shape = (slots, microbatch)
  x = np.zeros(shape + (40,), np.float32)
  y = np.zeros(shape, np.int32)
  weight = np.zeros(shape, np.float32)
  count = real * microbatch
  x[:real] = dataset.x[:count].reshape((real, microbatch, 40))
  y[:real] = dataset.y[:count].reshape((real, microbatch))
  weight[:real] = 1.0
  return {"x": x, "y": y, "weight": weight}


def _placed(program, batch):
  return jax.device_put(batch, NamedSharding(program.mesh,
                                             P(None, steps_lib.AXIS)))


def _stats_after(model, variables, shards):
  """The running averages after the model's train mode on each of `shards`
  in order, from `variables`."""
  stats = variables["batch_stats"]
  for shard in shards:
    _, updates = model.apply({"params": variables["params"],
                              "batch_stats": stats}, shard, train=True,
                             mutable=["batch_stats"])
    stats = updates["batch_stats"]
  return stats


def _assert_close(a, b, rtol=2e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def test_each_device_normalizes_its_shard_and_the_means_are_kept(dataset):
  program = _program(2)
  batch = _batch(dataset, 1, microbatch=16)
  state = _state(program, batch["x"][0])
  variables = _host({"params": state.params,
                     "batch_stats": state.batch_stats})
  new_state, _ = program.train_step(state, _placed(program, batch))
  model = models.make_model("resnet", **TINY)
  per_device = [_stats_after(model, variables, [batch["x"][0, :8]]),
                _stats_after(model, variables, [batch["x"][0, 8:]])]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *per_device)
  _assert_close(new_state.batch_stats, expected)
  # Not the statistics of the whole batch: the shards were normalized apart.
  whole = _stats_after(model, variables, [batch["x"][0]])
  differ = jax.tree.map(lambda a, b: not np.allclose(a, b, rtol=1e-3),
                        _host(new_state.batch_stats), whole)
  assert any(jax.tree.leaves(differ))


def test_cross_device_batch_norm_is_one_device_on_the_whole_batch(dataset):
  cross = dict(TINY, cross_device_batch_norm=True)
  batch = _batch(dataset, 1, microbatch=16)
  results = []
  for num_devices, kwargs in ((2, cross), (1, TINY)):
    program = _program(num_devices, kwargs)
    state = _state(program, batch["x"][0])
    results.append(_host(program.train_step(state,
                                            _placed(program, batch))[0]))
  (two, one) = results
  _assert_close(two.batch_stats, one.batch_stats)
  # The gradient flows through the statistics of both devices' examples.
  _assert_close(two.params, one.params, rtol=1e-4, atol=1e-6)


def test_microbatches_update_the_averages_in_order_padding_leaves_them(
    dataset):
  program = _program(1)
  batch = _batch(dataset, 3, real=2)  # two microbatches and one of padding
  state = _state(program, batch["x"][0])
  variables = _host({"params": state.params,
                     "batch_stats": state.batch_stats})
  fused, fused_metrics = program.train_step(state, _placed(program, batch))
  model = models.make_model("resnet", **TINY)
  _assert_close(fused.batch_stats,
                _stats_after(model, variables, batch["x"][:2]))

  # The accumulating step (adaptive batch) does the same.
  accumulating = _program(1, growing_microbatch=MICROBATCH)
  state = _state(accumulating, batch["x"][0])
  summed, summed_metrics = accumulating.train_step(state, batch)
  _assert_close(summed.batch_stats, fused.batch_stats)
  _assert_close(summed.params, fused.params)
  np.testing.assert_allclose(summed_metrics["loss"], fused_metrics["loss"],
                             rtol=1e-5)


def test_ghost_batch_norm_is_the_model_on_each_group_in_order(dataset):
  # Groups of 8 (the last one of 4) against the model without groups
  # applied to each group in turn, the running averages threaded through:
  # the same logits, gradient of the summed loss and running averages, in
  # the scanned formulation and in nn.Conv's loop over the groups. One stage
  # is enough for the groups, and quick to compile.
  small = dict(TINY, stages=1)
  ghosts = [models.make_model("resnet", ghost_batch_size=8, reference=r,
                              **small) for r in (False, True)]
  whole = models.make_model("resnet", ghost_batch_size=None, **small)
  x, y = jnp.asarray(dataset.x[:12]), jnp.asarray(dataset.y[:12])
  variables = whole.init(jax.random.key(0), x[:1])
  params = jax.tree.map(  # no zero scale, so every gradient is nonzero
      lambda p: p + 0.1 * jnp.asarray(np.random.default_rng(p.size).normal(
          size=p.shape), jnp.float32), variables["params"])

  def ghost_loss(params, ghost):
    logits, updates = ghost.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum(), (
        logits, updates["batch_stats"])

  def groups_loss(params):
    stats, total, logits = variables["batch_stats"], 0.0, []
    for group in (slice(0, 8), slice(8, 12)):
      out, updates = whole.apply({"params": params, "batch_stats": stats},
                                 x[group], train=True,
                                 mutable=["batch_stats"])
      stats = updates["batch_stats"]
      total += optax.softmax_cross_entropy_with_integer_labels(
          out, y[group]).sum()
      logits.append(out)
    return total, (jnp.concatenate(logits), stats)

  @jax.jit
  def everything(params):
    grad = functools.partial(jax.grad, has_aux=True)
    return ([grad(functools.partial(ghost_loss, ghost=g))(params)
             for g in ghosts], grad(groups_loss)(params),
            whole.apply({"params": params,
                         "batch_stats": variables["batch_stats"]}, x,
                        train=True, mutable=["batch_stats"])[0])

  ghosted, expected, whole_logits = everything(params)
  for result in ghosted:
    _assert_close(result, expected, rtol=1e-4, atol=1e-5)
  # Not the whole batch's statistics: the groups were normalized apart.
  assert not np.allclose(expected[1][0], whole_logits, rtol=1e-3)


def test_evaluation_uses_the_running_averages(dataset):
  program = _program(2)
  batch = _batch(dataset, 1, microbatch=16)
  state, _ = program.train_step(_state(program, batch["x"][0]),
                                _placed(program, batch))
  result = steps_lib.evaluate(program.eval_step, state.params,
                              dataset.x_test, dataset.y_test, chunk=8,
                              batch_stats=state.batch_stats)
  model = models.make_model("resnet", **TINY)
  logits = model.apply({"params": state.params,
                        "batch_stats": state.batch_stats}, dataset.x_test)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           dataset.y_test)
  np.testing.assert_allclose(result["loss"], float(jnp.mean(losses)),
                             rtol=1e-5)


# ----------------------------------------------------------------------------
# Masks.


def _resnet_params_and_grads():
  model = models.make_model("resnet", **TINY)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 40)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.5, variables["params"])  # nonzero
  grads = jax.tree.map(
      lambda p: jnp.asarray(np.random.default_rng(p.size).normal(
          size=p.shape), jnp.float32), params)
  return params, grads


def _split(tree):
  """(BatchNorm leaves, the others) as flat {path: leaf} dicts."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = {jax.tree_util.keystr(path): leaf for path, leaf in flat}
  norm = {k: v for k, v in names.items() if "BatchNorm" in k}
  return norm, {k: v for k, v in names.items() if k not in norm}


def test_masks_leave_batch_norm_out_of_decay_and_trust_ratios():
  params, grads = _resnet_params_and_grads()
  mask = optimizers._outside_batch_norm(params)  # pylint: disable=protected-access
  norm, rest = _split(mask)
  assert norm and not any(norm.values()) and all(rest.values())
  decay = optimizers._matrices_only(params)  # pylint: disable=protected-access
  assert not any(_split(decay)[0].values())


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_batch_norm_gets_the_plain_update_under_lars_and_lamb(name):
  params, grads = _resnet_params_and_grads()
  learning_rate, weight_decay = 0.1, 0.01
  tx = optimizers.make_optimizer(name, learning_rate,
                                 weight_decay=weight_decay)
  updates, _ = tx.update(grads, tx.init(params), params)
  # The plain first step: momentum from 0 (LARS) or Adam's g / (|g| + eps)
  # (LAMB), without weight decay or trust ratio.
  plain = (optax.sgd(learning_rate, momentum=0.9) if name == "lars"
           else optax.adam(learning_rate, eps=1e-6))
  expected, _ = plain.update(grads, plain.init(params), params)
  norm_updates, rest_updates = _split(updates)
  norm_expected, rest_expected = _split(expected)
  for key, value in norm_updates.items():
    np.testing.assert_allclose(value, norm_expected[key], rtol=1e-6,
                               err_msg=key)
  # Every other leaf keeps its trust ratio (and the kernels their decay).
  for key, value in rest_updates.items():
    assert not np.allclose(value, rest_expected[key], rtol=1e-3), key


def test_sngm_normalizes_by_the_global_norm_of_every_parameter():
  params, grads = _resnet_params_and_grads()
  learning_rate, weight_decay = 0.1, 0.01
  tx = optimizers.make_optimizer("sngm", learning_rate,
                                 weight_decay=weight_decay)
  updates, _ = tx.update(grads, tx.init(params), params)
  decayed = jax.tree.map(
      lambda g, p: g + weight_decay * p if p.ndim > 1 else g, grads, params)
  norm = optax.tree.norm(decayed)  # BatchNorm's gradients included
  _assert_close(updates, jax.tree.map(lambda g: -learning_rate * g / norm,
                                      decayed), rtol=1e-5)
  # A BatchNorm scale: its own gradient, no decay, the global norm.
  norm_updates, _ = _split(updates)
  norm_grads, _ = _split(grads)
  for key, value in norm_updates.items():
    np.testing.assert_allclose(value, -learning_rate * norm_grads[key] / norm,
                               rtol=1e-5)


# ----------------------------------------------------------------------------
# Every optimizer, and adaptive batch, trains the resnet.


def _short_run(dataset, **changes):
  settings = dict(model="resnet", model_kwargs=TINY, learning_rate=0.05,
                  batch_size=32, epochs=1, warmup_epochs=0, num_devices=2,
                  schedule="constant")
  settings.update(changes)
  return train.train_and_evaluate(config_lib.Config(**settings),
                                  dataset=dataset, quiet=True)


@pytest.mark.parametrize("optimizer", sorted(optimizers.OPTIMIZERS))
def test_every_optimizer_trains_the_resnet(dataset, optimizer):
  changes = {}
  if optimizer in optimizers.ADAPTIVE_OPTIMIZERS:
    changes = dict(adaptive_batch="norm", batch_size=16, max_batch_size=32)
  result = _short_run(dataset, optimizer=optimizer, **changes)
  assert result["steps"] >= 2
  assert np.isfinite(result["final"]["train_loss"])
  assert np.isfinite(result["final"]["test_loss"])


@pytest.mark.parametrize("statistics", ["per_device", "microbatch"])
def test_adaptive_batch_trains_the_resnet(dataset, statistics):
  result = _short_run(dataset, optimizer="sngm", adaptive_batch="norm",
                      adaptive_statistics=statistics, batch_size=16,
                      max_batch_size=32, epochs=2)
  assert result["train_step_compilations"] == 3
  assert np.isfinite(result["final"]["test_loss"])
