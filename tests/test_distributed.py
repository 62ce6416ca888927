"""Device-count independence: the same global batch on 1, 2, 4 and 8 devices.

Each device computes the mean gradient of its shard of a fixed global batch of
32 examples; with `axis_name` the optimizer averages the shards' gradients, so
every data-parallel API and every device count must follow the trajectory of
plain `sngm` on the whole batch on one device.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import sngm_optax

AXIS = "data"
STEPS = 4
DEVICE_COUNTS = (1, 2, 4, 8)


def _loss(params, batch):
  x, y = batch
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def _problem():
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(4, 8)) / 2, "b1": np.zeros(8),
            "w2": rng.normal(size=8) / 3, "b2": np.zeros(())}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  x = rng.normal(size=(32, 4)).astype(np.float32)
  y = np.sin(x.sum(axis=1)).astype(np.float32)
  return params, (x, y)


def _single_device_trajectory(tx):
  params, batch = _problem()
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p, batch), s, p))
  trajectory = []
  for _ in range(STEPS):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    trajectory.append(params)
  return trajectory


def _pmap_trajectory(tx, n):
  params, (x, y) = _problem()

  @functools.partial(jax.pmap, axis_name=AXIS, devices=jax.devices()[:n])
  def step(params, state, batch):
    updates, state = tx.update(jax.grad(_loss)(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(lambda a: jnp.stack([a] * n), params)
  state = jax.pmap(tx.init, devices=jax.devices()[:n])(params)
  shards = (x.reshape(n, -1, 4), y.reshape(n, -1))
  trajectory = []
  for _ in range(STEPS):
    params, state = step(params, state, shards)
    for leaf in jax.tree.leaves(params):  # all devices hold the same params
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    trajectory.append(jax.tree.map(lambda a: a[0], params))
  return trajectory


def _shard_map_trajectory(tx, n, check_vma, per_device_state=False):
  """With per_device_state, the state has a leading axis sharded over AXIS."""
  params, batch = _problem()
  mesh = jax.make_mesh((n,), (AXIS,), devices=jax.devices()[:n])
  state_spec = P(AXIS) if per_device_state else P()
  if per_device_state:
    tx = sngm_optax.per_device_state(tx)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P(),
                     out_specs=state_spec, check_vma=check_vma)
  def init(params):
    return tx.init(params)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(), state_spec, P(AXIS)),
                     out_specs=(P(), state_spec), check_vma=check_vma)
  def step(params, state, batch):
    # With check_vma, the gradient of replicated params would be summed over
    # the mesh by JAX itself; marking them per-device keeps it local, as
    # under pmap, and the optimizer does the averaging.
    local = jax.lax.pcast(params, AXIS, to="varying") if check_vma else params
    updates, state = tx.update(jax.grad(_loss)(local, batch), state, params)
    return optax.apply_updates(params, updates), state

  params = jax.device_put(params, jax.NamedSharding(mesh, P()))
  state = init(params)
  batch = jax.device_put(batch, jax.NamedSharding(mesh, P(AXIS)))
  trajectory = []
  for _ in range(STEPS):
    params, state = step(params, state, batch)
    trajectory.append(params)
  return trajectory


def _jit_trajectory(tx, n):
  """No axis_name: jit over sharded inputs computes the global gradient."""
  params, batch = _problem()
  mesh = jax.make_mesh((n,), (AXIS,), devices=jax.devices()[:n])
  params = jax.device_put(params, jax.NamedSharding(mesh, P()))
  batch = jax.device_put(batch, jax.NamedSharding(mesh, P(AXIS)))
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    updates, state = tx.update(jax.grad(_loss)(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  trajectory = []
  for _ in range(STEPS):
    params, state = step(params, state, batch)
    trajectory.append(params)
  return trajectory


@functools.cache
def _expected(name):
  """The single-device, full-batch trajectory of the reference optimizer."""
  reference = dict(sngm=lambda: _sngm(axis_name=None),
                   momentum_sgd=lambda: optax.sgd(0.1, momentum=0.9))
  return _single_device_trajectory(reference[name]())


def _assert_same_trajectory(actual, expected):
  for got, want in zip(actual, expected, strict=True):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                 atol=1e-6)


def _sngm(axis_name):
  return sngm_optax.sngm(0.1, momentum=0.9, weight_decay=1e-3,
                         axis_name=axis_name)


RUNS = {
    "pmap": _pmap_trajectory,
    "shard_map": functools.partial(_shard_map_trajectory, check_vma=True),
    "shard_map_no_check_vma": functools.partial(_shard_map_trajectory,
                                                check_vma=False),
}


@pytest.mark.parametrize("n", DEVICE_COUNTS)
@pytest.mark.parametrize("api", list(RUNS))
def test_sngm_trajectory_does_not_depend_on_the_device_count(api, n):
  expected = _expected("sngm")
  _assert_same_trajectory(RUNS[api](_sngm(AXIS), n), expected)


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_sngm_under_jit_with_sharded_batch_needs_no_axis_name(n):
  expected = _expected("sngm")
  _assert_same_trajectory(_jit_trajectory(_sngm(axis_name=None), n), expected)


def test_the_device_count_matters_without_averaging():
  """Guards the tests above: without axis_name the shards disagree."""
  expected = _expected("sngm")
  with pytest.raises(AssertionError):
    _assert_same_trajectory(
        _shard_map_trajectory(_sngm(axis_name=None), 4, check_vma=False),
        expected)


@pytest.mark.parametrize("n", (2, 8))
@pytest.mark.parametrize("api", ["pmap", "shard_map"])
def test_gmc_at_density_one_does_not_depend_on_the_device_count(api, n):
  expected = _expected("momentum_sgd")
  tx = sngm_optax.gmc(0.1, momentum=0.9, density=1.0, axis_name=AXIS)
  runs = dict(pmap=_pmap_trajectory, shard_map=functools.partial(
      _shard_map_trajectory, check_vma=True, per_device_state=True))
  _assert_same_trajectory(runs[api](tx, n), expected)
