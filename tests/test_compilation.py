"""Compilation guards (not timings): each jitted update compiles once.

A new learning rate (`optax.inject_hyperparams`) or a new batch-size state
must be a new *value* of a traced array, never a new executable: a
recompilation per learning-rate grid point or per batch-size change would
cost seconds to minutes per step on a real model. Each case counts Python
traces of the step function and checks `jitted._cache_size()`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optimizers import AXIS
from optimizers import rows
from sngm_optax.harness import models
from sngm_optax.harness import train
from sngm_optax.harness import steps as steps_lib

def _params():
  return {"w": jnp.ones((4, 3), jnp.float32), "b": jnp.zeros(3, jnp.float32)}


def _grads(scale):
  rng = np.random.default_rng(int(scale * 100))
  return {"w": jnp.asarray(rng.normal(size=(4, 3)) * scale, jnp.float32),
          "b": jnp.asarray(rng.normal(size=3) * scale, jnp.float32)}


def _counting_step(row, tx):
  traces = []

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    traces.append(None)
    updates, state = tx.update(grads, state, params, **row.extra_args(grads))
    return optax.apply_updates(params, updates), state

  return step, traces


def _set_batch_size(state, value):
  # Two distinct buffers: the step donates the state.
  return optax.tree.set(state, next_batch_size=jnp.asarray(value, jnp.int32),
                        batch_size=jnp.asarray(value, jnp.int32))


# Single-device optimizers of tests/optimizers.py, their learning rate
# injected as a hyperparameter.
@pytest.mark.parametrize("row", rows(lambda row: not row.axis))
def test_update_compiles_once_across_learning_rates_and_batch_sizes(row):
  tx = row.build(learning_rate=0.1, inject=True)
  step, traces = _counting_step(row, tx)
  params = _params()
  state = tx.init(params)
  batch_state = "batch_size" in repr(state)
  for i, learning_rate in enumerate([0.1, 0.05, 0.0, 0.2]):
    state = optax.tree.set(
        state, learning_rate=jnp.asarray(learning_rate, jnp.float32))
    if batch_state:
      state = _set_batch_size(state, 4 * (i + 1))
    params, state = step(params, state, _grads(1.0 + i))
  jax.block_until_ready(params)
  assert len(traces) == 1, f"{row.name} traced {len(traces)} times"
  assert step._cache_size() == 1
  # The values did change: the injected rate is the last one set.
  np.testing.assert_allclose(
      optax.tree.get(state, "learning_rate"), 0.2, rtol=1e-6)


# Per-device optimizers of tests/optimizers.py: their update runs inside
# shard_map (check_vma=False, per-device gradients, as the harness does),
# with a device-varying batch.
@pytest.mark.parametrize("row", rows(lambda row: row.axis))
def test_per_device_update_compiles_once(row):
  devices = np.array(jax.local_devices()[:4])
  mesh = jax.sharding.Mesh(devices, (AXIS,))
  tx = row.build(learning_rate=0.1, inject=True)
  traces = []

  def local(params, state, grads, batch_size):
    traces.append(None)
    grads = jax.tree.map(lambda g: g[0], grads)  # this device's gradient
    updates, state = tx.update(grads, state, params, batch_size=batch_size,
                               **row.extra_args(grads))
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), P(AXIS), P()),
      out_specs=(P(), P()), check_vma=False))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(_params(), replicated)  # as the harness does
  # Per-device memory (GMC/DGC) is replicated here only to keep the test
  # small: its values are not checked, only the compilation count.
  state = jax.jit(jax.shard_map(
      tx.init, mesh=mesh, in_specs=P(), out_specs=P(),
      check_vma=False))(params)
  for i, learning_rate in enumerate([0.1, 0.02, 0.0, 0.25]):
    state = optax.tree.set(state, learning_rate=jax.device_put(
        jnp.asarray(learning_rate, jnp.float32), replicated))
    grads = jax.tree.map(
        lambda g: jnp.stack([g * (d + 1) for d in range(len(devices))]),
        _grads(1.0 + i))
    params, state = step(params, state, grads,
                         jnp.asarray(64 * (i + 1), jnp.int32))
  jax.block_until_ready(params)
  assert len(traces) == 1, f"{row.name} traced {len(traces)} times"
  assert step._cache_size() == 1


def test_harness_step_compiles_once_per_microbatch_bucket():
  # The harness grows the batch by feeding more fixed-shape microbatches:
  # one executable per distinct number of microbatches, reused when a
  # bucket comes back, whatever the learning rate and the data.
  program = train.build_program(train.ProgramSpec(
      model="mlp", num_classes=10, optimizer="sngm", schedule="constant",
      total_samples=100, warmup_samples=0,
      devices=tuple(jax.local_devices())))
  model = models.make_model("mlp")
  rng = np.random.default_rng(0)
  microbatch = 64  # divisible by the 8 devices of tests/conftest.py

  def batch(num_microbatches):
    return {
        "x": rng.normal(size=(num_microbatches, microbatch, 40)).astype(
            np.float32),
        "y": rng.integers(0, 10, (num_microbatches, microbatch)).astype(
            np.int32),
        "weight": np.ones((num_microbatches, microbatch), np.float32),
    }

  params = jax.jit(model.init)(jax.random.key(0), batch(1)["x"][0])["params"]
  state = train_state.TrainState.create(
      apply_fn=program.apply_fn, params=params, tx=program.tx)
  state = jax.device_put(state, NamedSharding(program.mesh, P()))
  train_step = steps_lib.make_train_step(program.mesh)
  buckets = [1, 2, 1, 2, 3]
  for i, num_microbatches in enumerate(buckets):
    state = state.replace(opt_state=optax.tree.set(
        state.opt_state,
        learning_rate=jnp.asarray(0.1 * (i + 1), jnp.float32)))
    state, metrics = train_step(state, batch(num_microbatches))
  assert np.isfinite(float(metrics["loss"]))
  assert train_step._cache_size() == len(set(buckets))
