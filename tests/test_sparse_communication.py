"""GMC and DGC against a float64 NumPy simulation of K workers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import sngm_optax

K = 8  # workers = simulated devices (tests/conftest.py)
AXIS = "data"


# NumPy reference: K workers, each with its own memory, exact top-k.

def _flat(leaves):
  return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in leaves])


def _unflat(flat, like):
  out, offset = [], 0
  for x in like:
    out.append(flat[offset:offset + x.size].reshape(x.shape))
    offset += x.size
  return out


def _n_kept(size, density):
  return min(size, max(1, int(round(density * size))))


def _top_k_mask(v, density, sizes, per_layer):
  """Boolean mask of the largest |v| entries, over all of v or per leaf."""
  mask = np.zeros(v.shape, bool)
  groups = []
  offset = 0
  for size in (sizes if per_layer else [v.size]):
    groups.append((offset, size))
    offset += size
  for start, size in groups:
    part = np.abs(v[start:start + size])
    keep = np.argsort(-part, kind="stable")[:_n_kept(size, density)]
    mask[start + keep] = True
  return mask


def _at(density, t):
  """The density in force at step t: a number, or a list over steps."""
  return density[t] if isinstance(density, list) else density


def gmc_reference(grads, params, lrs, momentum, density, weight_decay=0.0,
                  per_layer=False):
  """Updates of GMC; grads[t][k] is worker k's list of leaves at step t."""
  sizes = [x.size for x in params]
  w = _flat(params)
  memory = np.zeros((K, w.size))
  previous = np.zeros(w.size)  # D_{t-1}
  updates = []
  for t, (step_grads, lr) in enumerate(zip(grads, lrs)):
    total = np.zeros(w.size)
    for k in range(K):
      g = _flat(step_grads[k]) + weight_decay * w
      v = memory[k] + lr * g / K + momentum / K * previous
      sent = np.where(_top_k_mask(v, _at(density, t), sizes, per_layer), v,
                      0.0)
      memory[k] = v - sent
      total += sent
    previous = total
    w = w - total
    updates.append(_unflat(-total, params))
  return updates, memory


def dgc_reference(grads, params, lrs, momentum, density, masking=True,
                  per_layer=False, weight_decay=0.0):
  sizes = [x.size for x in params]
  d = sum(sizes)
  trace = np.zeros((K, d))
  memory = np.zeros((K, d))
  updates = []
  w = _flat(params)
  for t, (step_grads, lr) in enumerate(zip(grads, lrs)):
    total = np.zeros(d)
    for k in range(K):
      trace[k] = momentum * trace[k] + _flat(step_grads[k])
      memory[k] = memory[k] + trace[k]
      mask = _top_k_mask(memory[k], _at(density, t), sizes, per_layer)
      total += np.where(mask, memory[k], 0.0)
      memory[k] = np.where(mask, 0.0, memory[k])
      if masking:
        trace[k] = np.where(mask, 0.0, trace[k])
    update = -lr * (total / K + weight_decay * w)  # decay outside the message
    w = w + update
    updates.append(_unflat(update, params))
  return updates, memory, trace


# Data: a small pytree and per-worker gradients with distinct magnitudes.

def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(6, 5)), dtype),
          "b": jnp.asarray(rng.normal(size=(7,)), dtype),
          "s": jnp.asarray(rng.normal(), dtype)}


def _worker_grads(params, steps, seed=1):
  """List over steps of pytrees whose leaves have a leading worker axis."""
  rng = np.random.default_rng(seed)
  return [jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=(K,) + p.shape), p.dtype), params)
          for _ in range(steps)]


def _as_reference_input(params, grads_seq):
  leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
  per_worker = [[[leaf[k] for leaf in leaves(g)] for k in range(K)]
                for g in grads_seq]
  return per_worker, leaves(params)


# Runners: the same loop under pmap and under shard_map.

def _run_pmap(tx, params, grads_seq, state=None):
  @functools.partial(jax.pmap, axis_name=AXIS)
  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return updates, state, optax.apply_updates(params, updates)

  replicated = jax.tree.map(lambda x: jnp.stack([x] * K), params)
  if state is None:
    state = jax.pmap(tx.init)(replicated)
  outputs = []
  for grads in grads_seq:
    updates, state, replicated = step(grads, state, replicated)
    for leaf in jax.tree.leaves(updates):  # identical on every worker
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    outputs.append(jax.tree.map(lambda x: x[0], updates))
  return outputs, state


def _run_shard_map(tx, params, grads_seq, mesh=None, axis=AXIS,
                   check_vma=False):
  """The whole state has a leading worker axis, sharded over `axis`.

  With check_vma=False nothing needs to be declared replicated; the updates
  come back stacked, to check that every worker computed the same.
  """
  mesh = mesh or jax.make_mesh((K,), (AXIS,))
  tx = sngm_optax.per_device_state(tx)
  add_axis = lambda t: jax.tree.map(lambda x: x[None], t)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P(),
                     out_specs=P(axis), check_vma=check_vma)
  def init(params):
    return tx.init(params)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(axis), P(axis), P()),
                     out_specs=(P(axis), P(axis), P()), check_vma=check_vma)
  def step(grads, state, params):
    grads = jax.tree.map(lambda x: x[0], grads)  # this worker's gradient
    updates, state = tx.update(grads, state, params)
    return add_axis(updates), state, optax.apply_updates(params, updates)

  sharded = jax.NamedSharding(mesh, P(axis))
  params = jax.device_put(params, jax.NamedSharding(mesh, P()))
  state = init(params)
  outputs = []
  for grads in grads_seq:
    updates, state, params = step(jax.device_put(grads, sharded), state,
                                  params)
    updates = jax.tree.map(np.asarray, updates)
    for leaf in jax.tree.leaves(updates):  # identical on every worker
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    outputs.append(jax.tree.map(lambda x: x[0], updates))
  return outputs, jax.tree.map(np.asarray, state)


RUNNERS = {
    "pmap": _run_pmap,
    "shard_map": _run_shard_map,
    # The updates of GMC come from an all-gather, so JAX's replication check
    # also proves them identical on all workers.
    "shard_map_check_vma": functools.partial(_run_shard_map, check_vma=True),
}


def _assert_updates_close(actual, expected, rtol=1e-5, atol=1e-6):
  assert len(actual) == len(expected)
  for got, want in zip(actual, expected):
    for a, b in zip(jax.tree.leaves(got), want):
      np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol,
                                 atol=atol)


SCHEDULE = optax.piecewise_constant_schedule(0.1, {2: 0.5, 4: 3.0})
LRS = [float(SCHEDULE(t)) for t in range(5)]


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("density, per_layer", [(0.1, False), (0.05, True)])
def test_gmc_matches_the_k_worker_reference(runner, density, per_layer):
  params = _params()
  grads_seq = _worker_grads(params, 5)
  tx = sngm_optax.gmc(SCHEDULE, momentum=0.9, density=density,
                      axis_name=AXIS, weight_decay=0.01, per_layer=per_layer)
  actual, _ = RUNNERS[runner](tx, params, grads_seq)
  expected, _ = gmc_reference(*_as_reference_input(params, grads_seq), LRS,
                              0.9, density, weight_decay=0.01,
                              per_layer=per_layer)
  _assert_updates_close(actual, expected)


@pytest.mark.parametrize("runner, masking, density, per_layer", [
    ("pmap", True, 0.1, False),
    ("pmap", False, 0.3, True),
    ("shard_map", True, 0.3, True),
    ("shard_map", False, 0.1, False),
])
def test_dgc_matches_the_k_worker_reference(runner, masking, density,
                                            per_layer):
  params = _params()
  grads_seq = _worker_grads(params, 5)
  tx = sngm_optax.dgc(SCHEDULE, momentum=0.8, density=density, axis_name=AXIS,
                      momentum_masking=masking, per_layer=per_layer)
  actual, _ = RUNNERS[runner](tx, params, grads_seq)
  expected, _, _ = dgc_reference(*_as_reference_input(params, grads_seq), LRS,
                                 0.8, density, masking=masking,
                                 per_layer=per_layer)
  _assert_updates_close(actual, expected)


def test_gmc_final_memories_match_the_reference():
  params = _params()
  grads_seq = _worker_grads(params, 4)
  tx = sngm_optax.gmc(0.1, density=0.1, axis_name=AXIS)
  _, state = _run_shard_map(tx, params, grads_seq)
  _, memory = gmc_reference(*_as_reference_input(params, grads_seq),
                            [0.1] * 4, 0.9, 0.1)
  got = np.stack([_flat(jax.tree.leaves(jax.tree.map(lambda x: x[k],
                                                     state[2].memory)))
                  for k in range(K)])
  # The memory holds -lr * g (the learning rate is applied before GMC).
  np.testing.assert_allclose(got, -memory, rtol=1e-5, atol=1e-7)


# Density 1: no compression.

def _averaged_run(tx, params, grads_seq):
  state = tx.init(params)
  outputs = []
  for grads in grads_seq:
    mean = jax.tree.map(
        lambda g: jnp.asarray(np.mean(np.asarray(g, np.float64), 0), g.dtype),
        grads)
    updates, state = tx.update(mean, state, params)
    params = optax.apply_updates(params, updates)
    outputs.append([np.asarray(u, np.float64)
                    for u in jax.tree.leaves(updates)])
  return outputs


@pytest.mark.parametrize("runner, exchange", [
    ("pmap", "auto"), ("shard_map", "sparse"), ("shard_map_check_vma", "dense"),
])
def test_gmc_at_density_one_is_momentum_sgd_on_the_mean_gradient(runner,
                                                                 exchange):
  params = _params()
  grads_seq = _worker_grads(params, 5)
  tx = sngm_optax.gmc(0.1, momentum=0.9, density=1.0, axis_name=AXIS,
                      exchange=exchange)
  actual, _ = RUNNERS[runner](tx, params, grads_seq)
  expected = _averaged_run(optax.sgd(0.1, momentum=0.9), params, grads_seq)
  _assert_updates_close(actual, expected, rtol=1e-6, atol=1e-7)


def test_gmc_at_density_one_with_a_schedule_is_momentum_of_scaled_updates():
  params = _params()
  grads_seq = _worker_grads(params, 5)
  tx = sngm_optax.gmc(SCHEDULE, momentum=0.9, density=1.0, axis_name=AXIS)
  actual, _ = _run_pmap(tx, params, grads_seq)
  expected = _averaged_run(
      optax.chain(optax.scale_by_learning_rate(SCHEDULE), optax.trace(0.9)),
      params, grads_seq)
  _assert_updates_close(actual, expected, rtol=1e-6, atol=1e-7)
  # ... which is not optax.sgd with the same schedule once the rate changes.
  sgd = _averaged_run(optax.sgd(SCHEDULE, momentum=0.9), params, grads_seq)
  assert not np.allclose(jax.tree.leaves(actual[3])[0], sgd[3][0], rtol=1e-3)


@pytest.mark.parametrize("masking, expected_tx", [
    (True, optax.sgd(0.1)),  # masking resets the momentum every step
    (False, optax.sgd(0.1, momentum=0.9)),
])
def test_dgc_at_density_one(masking, expected_tx):
  params = _params()
  grads_seq = _worker_grads(params, 5)
  tx = sngm_optax.dgc(0.1, momentum=0.9, density=1.0, axis_name=AXIS,
                      momentum_masking=masking, exchange="sparse")
  actual, _ = _run_pmap(tx, params, grads_seq)
  expected = _averaged_run(expected_tx, params, grads_seq)
  _assert_updates_close(actual, expected, rtol=1e-6, atol=1e-7)


# Error feedback: nothing is lost.

def test_gmc_sends_exactly_k_largest_and_keeps_the_rest():
  params = _params()
  density, momentum, lr = 0.1, 0.9, 0.1
  grads_seq = _worker_grads(params, 4)
  tx = sngm_optax.gmc(lr, momentum=momentum, density=density, axis_name=AXIS)
  _, state = _run_pmap(tx, params, grads_seq[:3])
  before = state[2]
  (last,), state = _run_pmap(tx, params, grads_seq[3:], state)
  after = state[2]
  d = sum(x.size for x in jax.tree.leaves(params))
  k = _n_kept(d, density)
  total = np.zeros(d)
  for worker in range(K):
    leaves = lambda t, i=worker: [x[i] for x in jax.tree.leaves(t)]
    memory = _flat(leaves(before.memory))
    previous = _flat(leaves(before.global_update))
    u = -lr * _flat(leaves(grads_seq[3]))
    v = memory + (u + momentum * previous) / K
    new_memory = _flat(leaves(after.memory))
    sent = new_memory == 0.0
    assert sent.sum() == k  # exactly k entries left this worker
    np.testing.assert_array_equal(sent, _top_k_mask(v, density, [d], False))
    np.testing.assert_allclose(new_memory[~sent], v[~sent], rtol=1e-6,
                               atol=1e-9)
    total += np.where(sent, v, 0.0)  # sent + new memory == v
  np.testing.assert_allclose(_flat(jax.tree.leaves(last)), total, rtol=1e-5,
                             atol=1e-7)
  for worker in range(K):  # the previous update is the same everywhere
    np.testing.assert_allclose(
        _flat([x[worker] for x in jax.tree.leaves(after.global_update)]),
        total, rtol=1e-5, atol=1e-7)


def test_dgc_masks_momentum_where_it_sent():
  params = _params()
  grads_seq = _worker_grads(params, 3)
  tx = sngm_optax.dgc(0.1, density=0.1, axis_name=AXIS)
  _, state = _run_pmap(tx, params, grads_seq)
  _, memory, trace = dgc_reference(*_as_reference_input(params, grads_seq),
                                   [0.1] * 3, 0.9, 0.1)
  dgc_state = state[0]
  for worker in range(K):
    got_memory = _flat([x[worker] for x in jax.tree.leaves(dgc_state.memory)])
    got_trace = _flat([x[worker] for x in jax.tree.leaves(dgc_state.trace)])
    np.testing.assert_allclose(got_memory, memory[worker], rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(got_trace, trace[worker], rtol=1e-5, atol=1e-7)
    assert np.all(got_trace[got_memory == 0.0] == 0.0)


# Bytes sent per worker per step.

BYTES_PARAMS = {"a": jnp.zeros(3), "b": jnp.zeros(3), "c": jnp.zeros((10, 10))}


@pytest.mark.parametrize("factory, kwargs, dtype, expected", [
    (sngm_optax.dgc, dict(density=0.1), jnp.float32, 88),
] + [(sngm_optax.gmc,) + case for case in [
    # d = 106 entries; global k = round(10.6) = 11 -> 11 * (4 + 4)
    (dict(density=0.1), jnp.float32, 88),
    # per leaf: 1 + 1 + 10 = 12 entries
    (dict(density=0.1, per_layer=True), jnp.float32, 96),
    # 64 * 8 > 106 * 4: 'auto' sends the dense vector
    (dict(density=0.6), jnp.float32, 424),
    (dict(density=1.0, exchange="sparse"), jnp.float32, 848),
    (dict(density=0.1), jnp.bfloat16, 66),  # 11 * (4 + 2)
    (dict(density=1.0), jnp.bfloat16, 212),
    (dict(density=0.1, value_dtype=jnp.bfloat16), jnp.float32, 66),
    (dict(density=0.1, value_dtype="float16"), jnp.float32, 66),
    (dict(density=1.0, value_dtype="float16"), jnp.float32, 212),
]])
def test_bytes_sent(factory, kwargs, dtype, expected):
  params = jax.tree.map(lambda x: (x + 1.0).astype(dtype), BYTES_PARAMS)
  tx = factory(0.1, axis_name=AXIS, **kwargs)
  replicated = jax.tree.map(lambda x: jnp.stack([x] * K), params)
  state = jax.pmap(tx.init)(replicated)
  assert np.all(optax.tree.get(state, "bytes_sent") == 0)
  _, state = jax.pmap(tx.update, axis_name=AXIS)(replicated, state, replicated)
  np.testing.assert_array_equal(optax.tree.get(state, "bytes_sent"),
                                [expected] * K)


# Hyperparameter validation.

FACTORIES = [sngm_optax.gmc, sngm_optax.dgc]


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("kwargs, name", [
    (dict(learning_rate=-0.1), "learning_rate"),
    (dict(density=0.0), "density"),
    (dict(density=1.5), "density"),
    (dict(density=-0.1), "density"),
    (dict(density=jnp.asarray(0.1)), "density"),
    (dict(density=0.1, density_levels=(0.1,)), "density_levels"),
    (dict(density=optax.constant_schedule(0.1), density_levels=(0.1, 0.0)),
     "density_levels"),
    (dict(density=optax.constant_schedule(0.1), density_levels=()),
     "density_levels"),
    (dict(value_dtype=jnp.int8), "value_dtype"),
    (dict(value_dtype="float64"), "value_dtype"),
    (dict(local_clip_norm=0.0), "local_clip_norm"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.1), "momentum"),
    (dict(axis_name=None), "axis_name"),
    (dict(axis_name=""), "axis_name"),
    (dict(selection="fast"), "selection"),
    (dict(exchange="allreduce"), "exchange"),
    (dict(weight_decay=-1.0), "weight_decay"),
])
def test_bad_hyperparameters_raise_naming_the_argument(factory, kwargs, name):
  arguments = dict(learning_rate=0.1, axis_name=AXIS)
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=name):
    factory(**arguments)


@pytest.mark.parametrize("factory", [sngm_optax.scale_by_gmc,
                                     sngm_optax.scale_by_dgc])
def test_blocks_require_an_axis_name(factory):
  with pytest.raises(ValueError, match="axis_name"):
    factory(density=0.1)


# GMC with each top-k selection.

def test_gmc_with_sampled_selection_on_a_large_leaf_matches_reference():
  # 20k entries at density 1% (the sampled path itself, on vectors of 1M,
  # is tested in test_top_k.py).
  params = [jnp.zeros(20_000)]
  grads_seq = _worker_grads(params, 2, seed=3)
  tx = sngm_optax.gmc(0.1, density=0.01, axis_name=AXIS, selection="sampled")
  actual, _ = _run_pmap(tx, params, grads_seq)
  expected, _ = gmc_reference(*_as_reference_input(params, grads_seq),
                              [0.1] * 2, 0.9, 0.01)
  _assert_updates_close(actual, expected)


@pytest.mark.parametrize("selection", ["approx", "sampled"])
def test_gmc_runs_with_every_selection(selection):
  params = _params()
  grads_seq = _worker_grads(params, 3)
  tx = sngm_optax.gmc(0.1, density=0.1, axis_name=AXIS, selection=selection)
  actual, _ = _run_pmap(tx, params, grads_seq)
  expected, _ = gmc_reference(*_as_reference_input(params, grads_seq),
                              [0.1] * 3, 0.9, 0.1)
  _assert_updates_close(actual, expected)


# optax conventions inside pmap.

@pytest.mark.parametrize("factory, dtype", [
    (sngm_optax.gmc, jnp.bfloat16), (sngm_optax.dgc, jnp.bfloat16),
    (sngm_optax.gmc, jnp.float32),
])
def test_dtypes_and_state_are_stable(factory, dtype):
  params = _params(dtype)
  tx = factory(0.1, density=0.2, axis_name=AXIS)
  replicated = jax.tree.map(lambda x: jnp.stack([x] * K), params)
  state = jax.pmap(tx.init)(replicated)
  step = jax.pmap(tx.update, axis_name=AXIS)
  updates, new_state = step(replicated, state, replicated)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert shapes(new_state) == shapes(state)


def test_accumulator_dtype():
  params = _params(jnp.bfloat16)
  tx = sngm_optax.gmc(0.1, density=0.2, axis_name=AXIS,
                      accumulator_dtype=jnp.float32)
  state = tx.init(params)
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves(optax.tree.get(state, "memory")))


def test_inject_hyperparams_with_static_density():
  params = _params()
  grads_seq = _worker_grads(params, 3)
  tx = optax.inject_hyperparams(sngm_optax.gmc, static_args=("density",))(
      learning_rate=0.1, momentum=0.9, density=0.1, axis_name=AXIS)
  actual, _ = _run_pmap(tx, params, grads_seq)
  expected, _ = gmc_reference(*_as_reference_input(params, grads_seq),
                              [0.1] * 3, 0.9, 0.1)
  _assert_updates_close(actual, expected)


def test_gmc_over_two_mesh_axes():
  params = _params()
  grads_seq = _worker_grads(params, 3)
  mesh = jax.make_mesh((2, 4), ("host", "device"))
  tx = sngm_optax.gmc(0.1, density=0.1, axis_name=("host", "device"))
  actual, _ = _run_shard_map(tx, params, grads_seq, mesh=mesh,
                             axis=("host", "device"))
  expected, _ = gmc_reference(*_as_reference_input(params, grads_seq),
                              [0.1] * 3, 0.9, 0.1)
  _assert_updates_close(actual, expected)


def test_multisteps_sends_once_per_accumulated_gradient():
  params = _params()
  grads_seq = _worker_grads(params, 4)
  tx = optax.MultiSteps(sngm_optax.gmc(0.1, density=0.1, axis_name=AXIS),
                        every_k_schedule=2)
  actual, _ = _run_pmap(tx, params, grads_seq)
  mean_of_pairs = [jax.tree.map(lambda a, b: (a + b) / 2, grads_seq[i],
                                grads_seq[i + 1]) for i in (0, 2)]
  expected, _ = gmc_reference(*_as_reference_input(params, mean_of_pairs),
                              [0.1] * 2, 0.9, 0.1)
  zeros = [np.zeros(x.shape) for x in jax.tree.leaves(params)]
  _assert_updates_close(actual, [zeros, expected[0], zeros, expected[1]])


@pytest.mark.parametrize("factory", FACTORIES)
def test_state_is_stable_under_lax_cond(factory):
  params = _params()
  tx = factory(0.1, density=0.1, axis_name=AXIS)
  replicated = jax.tree.map(lambda x: jnp.stack([x] * K), params)

  @functools.partial(jax.pmap, axis_name=AXIS)
  def maybe_update(take_step, params, state):
    return jax.lax.cond(take_step,
                        lambda s: tx.update(params, s, params)[1],
                        lambda s: s, state)

  state = jax.pmap(tx.init)(replicated)
  stepped = maybe_update(jnp.ones(K, bool), replicated, state)
  kept = maybe_update(jnp.zeros(K, bool), replicated, state)
  assert np.all(optax.tree.get(stepped, "bytes_sent") == 8 * 4)  # k = 4
  assert np.all(optax.tree.get(kept, "bytes_sent") == 0)


# DGC's recipe: density warm-up, 16-bit values, local clipping, weight decay.

WARM_UP = optax.piecewise_constant_schedule(0.5, {2: 0.5, 4: 0.4})
WARM_UP_LEVELS = (0.1, 0.25, 0.5)
WARM_UP_DENSITIES = [0.5, 0.5, 0.25, 0.25, 0.1]  # by hand, step 0 to 4


@pytest.mark.parametrize("factory, reference, per_layer", [
    (sngm_optax.gmc, gmc_reference, False),
    (sngm_optax.gmc, gmc_reference, True),
    (sngm_optax.dgc, dgc_reference, False),
])
def test_density_warm_up_matches_the_reference(factory, reference, per_layer):
  params = _params()
  grads_seq = _worker_grads(params, 5)
  tx = factory(0.1, density=WARM_UP, density_levels=WARM_UP_LEVELS,
               axis_name=AXIS, per_layer=per_layer)
  actual, _ = _run_pmap(tx, params, grads_seq)
  expected = reference(*_as_reference_input(params, grads_seq), [0.1] * 5,
                       0.9, WARM_UP_DENSITIES, per_layer=per_layer)[0]
  _assert_updates_close(actual, expected)


def test_a_schedule_between_levels_is_rounded_up_and_compiles_once():
  params = _params()  # d = 38
  grads_seq = _worker_grads(params, 6)
  schedule = optax.linear_schedule(0.6, 0.05, 5)  # 0.6, 0.49, ..., 0.05
  levels = (0.1, 0.3, 1.0)
  densities = [1.0, 1.0, 1.0, 0.3, 0.3, 0.1]  # smallest level >= schedule
  tx = sngm_optax.gmc(0.1, density=schedule, density_levels=levels,
                      axis_name=AXIS, exchange="sparse")
  traces = []

  @functools.partial(jax.pmap, axis_name=AXIS)
  def step(grads, state, params):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return updates, state, optax.apply_updates(params, updates)

  # Sharded as the step's outputs are (same axis name), so that only a new
  # top-k size could make it compile again.
  replicated = jax.pmap(lambda x: x, axis_name=AXIS)(
      jax.tree.map(lambda x: jnp.stack([x] * K), params))
  state = jax.pmap(tx.init, axis_name=AXIS)(replicated)
  outputs, bytes_sent = [], []
  for grads in grads_seq:
    updates, state, replicated = step(grads, state, replicated)
    outputs.append(jax.tree.map(lambda x: x[0], updates))
    bytes_sent.append(float(optax.tree.get(state, "bytes_sent")[0]))
  assert len(traces) == 1  # one compilation for the three sizes
  # The bytes follow the density in force: k·(4 + 4).
  assert bytes_sent == [8 * _n_kept(38, rho) for rho in densities]
  expected, _ = gmc_reference(*_as_reference_input(params, grads_seq),
                              [0.1] * 6, 0.9, densities)
  _assert_updates_close(outputs, expected)


def _dyadic_grads(params, steps):
  """Small integer gradients: every quantity below is exact in 16 bits."""
  rng = np.random.default_rng(5)
  return [jax.tree.map(lambda p: jnp.asarray(
      rng.integers(-2, 3, size=(K,) + p.shape), p.dtype), params)
          for _ in range(steps)]


@pytest.mark.parametrize("density, value_dtype", [
    (1.0, None),
    (optax.constant_schedule(1.0), "bfloat16"),  # default levels: 1, 1/2, ...
    (optax.constant_schedule(1.0), "float16"),
])
def test_density_one_is_momentum_sgd_exactly(density, value_dtype):
  params = jax.tree.map(jnp.zeros_like, _params())
  grads_seq = _dyadic_grads(params, 3)
  tx = sngm_optax.gmc(0.5, momentum=0.5, density=density, axis_name=AXIS,
                      value_dtype=value_dtype)
  actual, _ = _run_pmap(tx, params, grads_seq)
  expected = _averaged_run(optax.sgd(0.5, momentum=0.5), params, grads_seq)
  for got, want in zip(actual, expected):
    for a, b in zip(jax.tree.leaves(got), want):
      np.testing.assert_array_equal(np.asarray(a, np.float64), b)


@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16", "float16"])
def test_sent_plus_memory_is_the_input_in_every_value_dtype(value_dtype):
  from sngm_optax import _sparse_exchange  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  v = rng.normal(size=(K, 40)).astype(np.float32)
  v[:, 0] = 1e6  # beyond float16: saturates, the rest stays in memory
  exchange = jax.pmap(lambda v, count: _sparse_exchange.exchange_top_k(
      v, count, density=WARM_UP, density_levels=WARM_UP_LEVELS,
      axis_name=AXIS, per_layer=False, selection="exact", exchange="sparse",
      value_dtype=jnp.dtype(value_dtype)), axis_name=AXIS)
  for count, density in [(0, 0.5), (4, 0.1)]:
    out = exchange(v, jnp.full(K, count))
    total, memory = np.asarray(out.total), np.asarray(out.memory)
    sent = v - memory
    np.testing.assert_array_equal(sent + memory, v)
    want_sum = np.zeros(40, np.float32)
    for k in range(K):
      mask = _top_k_mask(v[k], density, [40], False)
      assert np.all(sent[k][~mask] == 0)
      largest = float(jnp.finfo(value_dtype).max)
      rounded = np.clip(v[k][mask], -largest, largest).astype(
          jnp.dtype(value_dtype))
      np.testing.assert_array_equal(sent[k][mask],
                                    rounded.astype(np.float32))
      want_sum += sent[k]
    np.testing.assert_array_equal(total[0], want_sum)
    np.testing.assert_array_equal(
        out.bytes_sent, _n_kept(40, density) * (4 + jnp.dtype(value_dtype)
                                                .itemsize))


def test_dgc_weight_decay_is_dense_outside_the_message():
  params = _params()
  grads_seq = _worker_grads(params, 4)
  tx = sngm_optax.dgc(0.1, density=0.1, axis_name=AXIS, weight_decay=0.3)
  actual, state = _run_pmap(tx, params, grads_seq)
  expected, memory, _ = dgc_reference(*_as_reference_input(params, grads_seq),
                                      [0.1] * 4, 0.9, 0.1, weight_decay=0.3)
  _assert_updates_close(actual, expected)
  got = _flat([x[3] for x in jax.tree.leaves(state[0].memory)])
  np.testing.assert_allclose(got, memory[3], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("factory, reference", [
    (sngm_optax.gmc, gmc_reference), (sngm_optax.dgc, dgc_reference)])
def test_local_clipping_clips_each_workers_gradient(factory, reference):
  params = _params()
  grads_seq = _worker_grads(params, 3)
  tx = factory(0.1, density=0.1, axis_name=AXIS, local_clip_norm=4.0)
  actual, _ = _run_pmap(tx, params, grads_seq)
  per_worker, leaves = _as_reference_input(params, grads_seq)
  limit = 4.0 / np.sqrt(K)  # DGC's threshold, scaled by K**-1/2
  clipped = []
  for step in per_worker:
    clipped.append([])
    for worker in step:
      norm = np.sqrt(sum(np.sum(g**2) for g in worker))
      assert norm > limit  # the clipping is active
      clipped[-1].append([g * limit / norm for g in worker])
  expected = reference(clipped, leaves, [0.1] * 3, 0.9, 0.1)[0]
  _assert_updates_close(actual, expected)
