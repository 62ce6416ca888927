"""One process of the two-process test (tests/test_multihost.py).

  python tests/multihost_worker.py COORDINATOR_ADDRESS NUM_PROCESSES \
      PROCESS_ID LOCAL_DEVICES OUTPUT.npz

Each process joins `jax.distributed`, gets LOCAL_DEVICES CPU devices (CPU
collectives over gloo) and runs `run()` on the global mesh: SNGM and GMC under
`jax.shard_map`, and GMC under `jax.pmap`, on a fixed global batch of which
each device computes the gradient of its own shard. The test runs the same
`run()` in one process on as many devices and compares.

This is also the pattern for several machines: start the same script once per
host with that host's process id and the address of process 0.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

import sngm_optax

AXIS = "data"
STEPS = 3
GLOBAL_BATCH = 32


def _problem():
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(4, 8)) / 2, "b1": np.zeros(8),
            "w2": rng.normal(size=8) / 3, "b2": np.zeros(())}
  params = {k: v.astype(np.float32) for k, v in params.items()}
  x = rng.normal(size=(GLOBAL_BATCH, 4)).astype(np.float32)
  y = np.sin(x.sum(axis=1)).astype(np.float32)
  return params, (x, y)


def _loss(params, batch):
  x, y = batch
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def _global_array(value, mesh, spec):
  """A global jax.Array from a value every process knows in full."""
  value = np.asarray(value)
  return jax.make_array_from_callback(
      value.shape, jax.NamedSharding(mesh, spec), lambda index: value[index])


def _shard_map_run(tx, mesh, per_device_state):
  """Params after each step, and the final state, as NumPy arrays."""

  state_spec = P(AXIS) if per_device_state else P()
  if per_device_state:  # a leading worker axis, sharded over the mesh
    tx = sngm_optax.per_device_state(tx)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P(),
                     out_specs=state_spec)
  def init(params):
    return tx.init(params)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(), state_spec, P(AXIS)),
                     out_specs=(P(), state_spec))
  def step(params, state, batch):
    local = jax.lax.pcast(params, AXIS, to="varying")  # per-device gradients
    updates, state = tx.update(jax.grad(_loss)(local, batch), state, params)
    return optax.apply_updates(params, updates), state

  params, batch = _problem()
  params = jax.tree.map(lambda v: _global_array(v, mesh, P()), params)
  batch = jax.tree.map(lambda v: _global_array(v, mesh, P(AXIS)), batch)
  state = init(params)
  trajectory = []
  for _ in range(STEPS):
    params, state = step(params, state, batch)
    trajectory.append(multihost_utils.process_allgather(params, tiled=True))
  return trajectory, multihost_utils.process_allgather(state, tiled=True)


def _pmap_run(tx, devices):
  """GMC under pmap over `devices` (this process's devices, in global order)."""

  multi_process = jax.process_count() > 1

  @functools.partial(jax.pmap, axis_name=AXIS,
                     devices=None if multi_process else devices)
  def step(params, state, batch):
    updates, state = tx.update(jax.grad(_loss)(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  params, (x, y) = _problem()
  n_local = len(devices)
  first = jax.process_index() * n_local if multi_process else 0
  n_global = jax.device_count() if multi_process else n_local
  shard = GLOBAL_BATCH // n_global
  rows = slice(first * shard, (first + n_local) * shard)
  batch = (x[rows].reshape(n_local, shard, -1), y[rows].reshape(n_local, -1))
  params = jax.tree.map(lambda a: jnp.stack([a] * n_local), params)
  state = jax.pmap(tx.init, devices=None if multi_process else devices)(params)
  trajectory = []
  for _ in range(STEPS):
    params, state = step(params, state, batch)
    trajectory.append(jax.tree.map(lambda a: np.asarray(a)[0], params))
  return trajectory


def run(mesh):
  """SNGM and GMC data-parallel runs over the 1-D mesh axis 'data'."""

  results = {}
  sngm_trajectory, _ = _shard_map_run(
      sngm_optax.sngm(0.1, momentum=0.9, axis_name=AXIS), mesh,
      per_device_state=False)
  gmc = sngm_optax.gmc(0.1, momentum=0.9, density=0.1, axis_name=AXIS)
  gmc_trajectory, gmc_state = _shard_map_run(gmc, mesh, per_device_state=True)
  local_devices = [d for d in mesh.devices.flat
                   if d.process_index == jax.process_index()]
  gmc_pmap_trajectory = _pmap_run(gmc, local_devices)
  for name, trajectory in [("sngm", sngm_trajectory), ("gmc", gmc_trajectory),
                           ("gmc_pmap", gmc_pmap_trajectory)]:
    for t, params in enumerate(trajectory):
      for key, value in params.items():
        results[f"{name}/step{t}/{key}"] = np.asarray(value)
  for key, value in gmc_state[2].memory.items():  # one row per worker
    results[f"gmc/memory/{key}"] = np.asarray(value)
  return results


def main(argv):
  coordinator, num_processes, process_id, local_devices, output = argv[1:]
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", int(local_devices))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=int(num_processes),
      process_id=int(process_id), initialization_timeout=60)
  mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
  results = run(mesh)
  np.savez(output, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
