"""SNGM against a plain NumPy reference of the update formula."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import sngm_optax
from sngm_optax import sngm

LEAF_DTYPES = {"w": jnp.float32, "b": jnp.bfloat16, "h": jnp.float16}
# Relative error allowed per dtype after 50 steps (a few units in the last place).
FLOAT32_LEAVES = {k: jnp.float32 for k in LEAF_DTYPES}
DTYPE_RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2, jnp.float16: 4e-3}


def random_tree(seed, dtypes=None):
  """A nested pytree: dicts, a list and a tuple, leaves of several shapes."""
  rng = np.random.default_rng(seed)
  dtypes = dtypes or LEAF_DTYPES
  tree = {
      "dense": {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=(3,))},
      "blocks": [rng.normal(size=(2, 2, 2)), (rng.normal(size=()),)],
      "head": {"h": rng.normal(size=(4,))},
  }
  def cast(path, leaf):
    key = str(path[-1].key) if hasattr(path[-1], "key") else "w"
    return jnp.asarray(leaf, dtypes.get(key, jnp.float32))
  return jax.tree_util.tree_map_with_path(cast, tree)


def sngm_reference(
    grads_seq, params, lrs, momentum, nesterov=False, weight_decay=0.0,
    decay_mask=None, decoupled=False,
):
  """Float64 NumPy SNGM; momentum and params stored in the leaves' dtypes.

  `decoupled`: `w ← w − lr (u + λ w)` instead of decaying the gradient."""
  leaves, treedef = jax.tree.flatten(params)
  dtypes = [np.asarray(x).dtype for x in leaves]
  w = [np.asarray(x, np.float64) for x in leaves]
  u = [np.zeros_like(x) for x in w]
  mask = decay_mask or [True] * len(w)
  trajectory = []
  for grads, lr in zip(grads_seq, lrs):
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    # Gradients (and so the decayed gradient) are stored in the leaf dtype.
    coupled = 0.0 if decoupled else weight_decay
    g = [(gi + coupled * wi * mi).astype(d).astype(np.float64)
         for gi, wi, mi, d in zip(g, w, mask, dtypes)]
    norm = np.sqrt(sum(np.sum(gi**2) for gi in g))
    g = [gi / norm if norm > 0 else 0 * gi for gi in g]
    g = [gi.astype(d).astype(np.float64) for gi, d in zip(g, dtypes)]
    u = [(gi + momentum * ui).astype(d).astype(np.float64)
         for gi, ui, d in zip(g, u, dtypes)]
    step = [gi + momentum * ui if nesterov else ui for gi, ui in zip(g, u)]
    if decoupled:
      step = [si + weight_decay * wi * mi for si, wi, mi in zip(step, w, mask)]
    w = [(wi - lr * si).astype(d).astype(np.float64)
         for wi, si, d in zip(w, step, dtypes)]
    trajectory.append(w)
  return [jax.tree.unflatten(treedef, ws) for ws in trajectory]


def run_optimizer(tx, grads_seq, params):
  state = tx.init(params)
  update = jax.jit(tx.update)
  trajectory = []
  for grads in grads_seq:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(params)
  return trajectory


def assert_trees_close(actual, expected, rtol_by_dtype=DTYPE_RTOL, atol=0.0):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    rtol = rtol_by_dtype[jnp.dtype(a.dtype).type]
    scale = max(np.max(np.abs(e)), 1e-3)
    np.testing.assert_allclose(
        np.asarray(a, np.float64), e, rtol=0, atol=rtol * scale + atol
    )


def gradient_sequence(params, steps, seed=1):
  return [random_tree(seed + i, FLOAT32_LEAVES)
          for i in range(steps)]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_matches_numpy_reference_for_50_steps(nesterov, weight_decay):
  # optax adds the decay in the gradient's dtype (two bfloat16 roundings),
  # which moves the shared global norm; the decay case uses float32 leaves.
  params = random_tree(0, None if weight_decay == 0 else FLOAT32_LEAVES)
  grads_seq = [jax.tree.map(lambda g, p: g.astype(p.dtype), g, params)
               for g in gradient_sequence(params, 50)]
  schedule = optax.cosine_decay_schedule(0.05, 50)
  tx = sngm(schedule, momentum=0.9, nesterov=nesterov,
            weight_decay=weight_decay)
  actual = run_optimizer(tx, grads_seq, params)
  expected = sngm_reference(
      grads_seq, params, [float(schedule(i)) for i in range(50)], 0.9,
      nesterov=nesterov, weight_decay=weight_decay,
  )
  for a, e in zip(actual[::7], expected[::7]):
    assert_trees_close(a, e)
  assert_trees_close(actual[-1], expected[-1])


@pytest.mark.parametrize("nesterov", [False, True])
def test_decoupled_weight_decay_matches_numpy_reference(nesterov):
  params = random_tree(0, FLOAT32_LEAVES)
  grads_seq = gradient_sequence(params, 30)
  schedule = optax.cosine_decay_schedule(0.05, 30)
  # A large decay, so that adding it before the normalization would differ.
  tx = sngm(schedule, momentum=0.9, nesterov=nesterov, weight_decay=0.5,
            decoupled_weight_decay=True)
  lrs = [float(schedule(i)) for i in range(30)]
  actual = run_optimizer(tx, grads_seq, params)
  expected = sngm_reference(grads_seq, params, lrs, 0.9, nesterov=nesterov,
                            weight_decay=0.5, decoupled=True)
  for a, e in zip(actual[::7], expected[::7]):
    assert_trees_close(a, e)
  assert_trees_close(actual[-1], expected[-1])


def test_decoupled_weight_decay_with_mask_and_per_layer_norm():
  params = {"w": jnp.ones(3), "b": jnp.ones(2)}
  grads_seq = [{"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.3, 0.1])}
               ] * 4
  tx = sngm(0.1, weight_decay=0.5, weight_decay_mask={"w": True, "b": False},
            decoupled_weight_decay=True, per_layer=True)
  # Per leaf: u ← 0.9 u + g / ‖g_leaf‖; w ← w − 0.1 (u + 0.5 w) on w only.
  w = {k: np.ones_like(np.asarray(v), np.float64) for k, v in params.items()}
  u = {k: np.zeros_like(v) for k, v in w.items()}
  for grads in grads_seq:
    for k in w:
      g = np.asarray(grads[k], np.float64)
      u[k] = 0.9 * u[k] + g / np.linalg.norm(g)
      w[k] = w[k] - 0.1 * (u[k] + (0.5 * w[k] if k == "w" else 0.0))
  actual = run_optimizer(tx, grads_seq, params)[-1]
  for k in w:
    np.testing.assert_allclose(np.asarray(actual[k]), w[k], rtol=1e-5)


def test_weight_decay_mask_skips_masked_leaves():
  params = {"w": jnp.ones(3), "b": jnp.ones(2)}
  grads_seq = [{"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.3, 0.1])}
               ] * 5
  tx = sngm(0.1, weight_decay=0.5, weight_decay_mask={"w": True, "b": False})
  expected = sngm_reference(grads_seq, params, [0.1] * 5, 0.9,
                            weight_decay=0.5, decay_mask=[False, True])
  assert_trees_close(run_optimizer(tx, grads_seq, params)[-1], expected[-1])


def test_zero_momentum_is_normalized_gradient_descent():
  rng = np.random.default_rng(3)
  w = rng.normal(size=6)
  params = jnp.asarray(w, jnp.float32)
  tx = sngm(0.2, momentum=0.0)
  state = tx.init(params)
  for _ in range(10):
    g = 2 * (w - 1.0)  # gradient of ||w - 1||^2
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
    params = optax.apply_updates(params, updates)
    w = w - 0.2 * g / np.linalg.norm(g)
    np.testing.assert_allclose(params, w, rtol=1e-5, atol=1e-6)


def test_norm_is_global_not_per_leaf():
  grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
  tx = sngm(1.0, momentum=0.0)
  updates, _ = tx.update(grads, tx.init(grads), grads)
  np.testing.assert_allclose(updates["a"], [-0.6], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [-0.8], rtol=1e-6)
  per_layer = sngm(1.0, momentum=0.0, per_layer=True)
  updates, _ = per_layer.update(grads, per_layer.init(grads), grads)
  np.testing.assert_allclose(updates["a"], [-1.0], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [-1.0], rtol=1e-6)


def test_zero_gradient_gives_zero_step():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2, jnp.bfloat16)}
  tx = sngm(0.1)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params),
                             tx.init(params), params)
  for leaf in jax.tree.leaves((updates, state)):
    assert np.all(np.asarray(leaf, np.float32) == 0)


@pytest.mark.parametrize("scale", [1e-30, 1e-15, 1.0, 1e15, 1e30])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extreme_gradient_scales_give_unit_steps(scale, dtype):
  rng = np.random.default_rng(4)
  g = {"a": rng.normal(size=(50,)), "b": rng.normal(size=(4, 5))}
  grads = jax.tree.map(lambda x: jnp.asarray(x * scale, dtype), g)
  tx = sngm_optax.normalize_by_global_norm()
  updates, _ = tx.update(grads, tx.init(grads))
  g64 = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
  norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g64)))
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for u, x in zip(jax.tree.leaves(updates), jax.tree.leaves(g64)):
    assert u.dtype == dtype
    np.testing.assert_allclose(np.asarray(u, np.float64), x / norm, atol=tol)


def test_bfloat16_gradients_match_float32_update():
  rng = np.random.default_rng(5)
  g32 = {"a": jnp.asarray(rng.normal(size=(64,)), jnp.float32),
         "b": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}
  g16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), g32)
  tx = sngm(0.1)
  u32, _ = tx.update(g32, tx.init(g32), g32)
  u16, _ = tx.update(g16, tx.init(g16), g16)
  for a, b in zip(jax.tree.leaves(u16), jax.tree.leaves(u32)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=1e-2,
                               atol=1e-4)


def test_non_finite_gradient_gives_nan_update():
  grads = jnp.array([1.0, jnp.inf, 2.0])
  tx = sngm(0.1)
  updates, _ = tx.update(grads, tx.init(grads), grads)
  assert np.all(np.isnan(updates)), "an inf must not turn into silent zeros"


# Data parallel: a linear least-squares loss whose gradient is a batch mean.

def _loss(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _dataset(n=64, d=5, seed=6):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (x @ rng.normal(size=d) + 0.1 * rng.normal(size=n)).astype(np.float32)
  return x, y


def _single_device_run(steps, batch):
  params = {"w": jnp.zeros(batch[0].shape[1]), "b": jnp.zeros(())}
  tx = sngm(0.05, nesterov=True, weight_decay=1e-3)
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(jax.grad(_loss)(params, batch), state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_pmap_with_axis_name_equals_single_device_on_full_batch():
  n_dev = 8
  x, y = _dataset()
  tx = sngm(0.05, nesterov=True, weight_decay=1e-3, axis_name="batch")

  @functools.partial(jax.pmap, axis_name="batch")
  def step(params, state, batch):
    updates, state = tx.update(jax.grad(_loss)(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
  replicate = lambda t: jax.tree.map(lambda a: jnp.stack([a] * n_dev), t)
  params, state = replicate(params), replicate(tx.init(params))
  shards = (x.reshape(n_dev, -1, x.shape[1]), y.reshape(n_dev, -1))
  for _ in range(5):
    params, state = step(params, state, shards)
  expected = _single_device_run(5, (x, y))
  for leaf, exp in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    for device_copy in leaf:  # all devices agree and equal the full batch run
      np.testing.assert_allclose(device_copy, exp, rtol=1e-5, atol=1e-6)


def test_pmap_without_axis_name_differs():
  """Guards the test above: averaging is what makes the runs agree."""
  x, y = _dataset()
  tx = sngm(0.05)

  @functools.partial(jax.pmap, axis_name="batch")
  def step(params, state, batch):
    updates, state = tx.update(jax.grad(_loss)(params, batch), state, params)
    return optax.apply_updates(params, updates)

  params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
  replicate = lambda t: jax.tree.map(lambda a: jnp.stack([a] * 8), t)
  out = step(replicate(params), replicate(tx.init(params)),
             (x.reshape(8, -1, x.shape[1]), y.reshape(8, -1)))
  assert not np.allclose(out["w"][0], out["w"][1])


def _shard_map_step(tx, mesh, check_vma, loss):
  @jax.jit
  @functools.partial(
      jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("data")),
      out_specs=(P(), P()), check_vma=check_vma,
  )
  def step(params, state, batch):
    updates, state = tx.update(jax.grad(loss)(params, batch), state, params)
    return optax.apply_updates(params, updates), state
  return step


@pytest.mark.parametrize(
    "check_vma, loss",
    [
        # Per-device gradients, averaged by the transform (as under pmap).
        (False, _loss),
        # JAX sums the gradient of replicated params over the mesh axis;
        # averaging the loss makes that sum the global mean gradient.
        (True, lambda p, b: jax.lax.pmean(_loss(p, b), "data")),
    ],
)
def test_shard_map_with_axis_name_equals_single_device_on_full_batch(
    check_vma, loss
):
  x, y = _dataset()
  mesh = jax.make_mesh((8,), ("data",))
  tx = sngm(0.05, nesterov=True, weight_decay=1e-3, axis_name="data")
  step = _shard_map_step(tx, mesh, check_vma, loss)
  params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
  state = tx.init(params)
  batch = jax.device_put((x, y), jax.NamedSharding(mesh, P("data")))
  for _ in range(5):
    params, state = step(params, state, batch)
  expected = _single_device_run(5, (x, y))
  for leaf, exp in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(leaf, exp, rtol=1e-5, atol=1e-5)


# Composition with optax.

def test_chain_with_clipping_matches_reference():
  params = random_tree(7, FLOAT32_LEAVES)
  grads_seq = gradient_sequence(params, 5, seed=8)
  tx = optax.chain(optax.clip(0.5), sngm(0.1))
  clipped = [jax.tree.map(lambda g: jnp.clip(g, -0.5, 0.5), g)
             for g in grads_seq]
  expected = sngm_reference(clipped, params, [0.1] * 5, 0.9)
  assert_trees_close(run_optimizer(tx, grads_seq, params)[-1], expected[-1])


def test_inject_hyperparams_learning_rate_changes_between_steps():
  params = random_tree(9, FLOAT32_LEAVES)
  grads_seq = gradient_sequence(params, 6, seed=10)
  lrs = [0.1, 0.1, 0.02, 0.02, 0.3, 0.3]
  tx = optax.inject_hyperparams(sngm)(learning_rate=0.1, momentum=0.8)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for grads, lr in zip(grads_seq, lrs):
    state.hyperparams["learning_rate"] = jnp.asarray(lr)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  initial = random_tree(9, FLOAT32_LEAVES)
  expected = sngm_reference(grads_seq, initial, lrs, 0.8)
  assert_trees_close(params, expected[-1])
  assert update._cache_size() == 1


def test_multisteps_accumulates_then_applies_sngm_to_the_mean():
  params = jnp.array([1.0, -2.0, 3.0])
  grads_seq = [jnp.array([1.0, 0.0, 2.0]), jnp.array([3.0, 2.0, 0.0])] * 2
  tx = optax.MultiSteps(sngm(0.1), every_k_schedule=2)
  trajectory = run_optimizer(tx, grads_seq, params)
  mean_grads = [(grads_seq[0] + grads_seq[1]) / 2] * 2
  expected = sngm_reference(mean_grads, params, [0.1] * 2, 0.9)
  np.testing.assert_allclose(trajectory[0], params)  # no step yet
  np.testing.assert_allclose(trajectory[1], expected[0], rtol=1e-6)
  np.testing.assert_allclose(trajectory[3], expected[1], rtol=1e-6)


def test_apply_if_finite_skips_nan_steps_and_keeps_state_finite():
  params = jnp.array([1.0, 2.0])
  tx = optax.apply_if_finite(sngm(0.1), max_consecutive_errors=3)
  grads_seq = [jnp.array([1.0, 1.0]), jnp.array([jnp.nan, 1.0]),
               jnp.array([0.0, 2.0])]
  trajectory = run_optimizer(tx, grads_seq, params)
  expected = sngm_reference([grads_seq[0], grads_seq[2]], params, [0.1] * 2,
                            0.9)
  np.testing.assert_allclose(trajectory[1], trajectory[0])  # NaN step skipped
  np.testing.assert_allclose(trajectory[2], expected[1], rtol=1e-6)


def test_no_recompilation_on_later_steps():
  params = random_tree(11, FLOAT32_LEAVES)
  tx = sngm(optax.linear_schedule(0.1, 0.0, 10), weight_decay=1e-4)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for grads in gradient_sequence(params, 4, seed=12):
    params, state = step(params, state, grads)
  assert len(traces) == 1


# Convergence.

def test_reaches_minimum_of_quadratic():
  target = jnp.array([1.0, -2.0, 0.5, 3.0])
  loss = lambda w: jnp.sum((w - target) ** 2 * jnp.array([1.0, 10.0, 0.1, 2]))
  tx = sngm(optax.cosine_decay_schedule(0.1, 500), momentum=0.9)
  params = jnp.zeros(4)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  for _ in range(500):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params, target, atol=1e-2)


def test_makes_progress_on_rosenbrock():
  loss = lambda w: (1 - w[0]) ** 2 + 100 * (w[1] - w[0] ** 2) ** 2
  tx = sngm(optax.cosine_decay_schedule(0.01, 2000), momentum=0.9)
  params = jnp.array([-1.2, 1.0])
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  for _ in range(2000):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert loss(params) < 0.1 * loss(jnp.array([-1.2, 1.0]))
  assert np.linalg.norm(params - jnp.array([1.0, 1.0])) < 0.5


# Bad hyperparameters.

@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": 0.1, "momentum": 1.0}, "momentum"),
        ({"learning_rate": 0.1, "momentum": -0.1}, "momentum"),
        ({"learning_rate": 0.1, "weight_decay": -1e-4}, "weight_decay"),
        ({"learning_rate": 0.1, "decoupled_weight_decay": "yes"},
         "decoupled_weight_decay"),
        ({"learning_rate": 0.1, "eps": 0.0}, "eps"),
        ({"learning_rate": 0.1, "eps": -1e-8}, "eps"),
        ({"learning_rate": 0.1, "eps": 1e-40}, "eps"),  # a subnormal
        ({"learning_rate": jnp.ones(2)}, "learning_rate"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, argument):
  with pytest.raises(ValueError, match=argument):
    sngm(**kwargs)


def test_schedules_are_accepted_unchecked():
  sngm(optax.constant_schedule(0.1), weight_decay=optax.constant_schedule(0.0))
