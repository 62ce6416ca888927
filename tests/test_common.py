"""Checks every optimizer of the package passes, as optax/contrib/_common_test.

The optimizers are the rows of tests/optimizers.py; a new one is one more row
there. Data-parallel rows run under `jax.pmap` (see `optimizers.Runner`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optimizers
import sngm_optax
from optimizers import OPTIMIZERS
from optimizers import Runner
from optimizers import grads as _grads
from optimizers import params as _params
from optimizers import rows

ALL = rows()
DATA_PARALLEL = rows(lambda row: row.axis)


def _quadratic(params):
  return sum(jnp.sum((p - 1.0) ** 2) for p in jax.tree.leaves(params))


def _assert_trees_close(actual, expected, rtol):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol),
               actual, expected)


NOT_TRANSFORMATIONS = {
    # Functions of data (statistics, tests, moments, sizes).
    "add_gradient_moments", "augmented_inner_product_test", "coordinate_test",
    "global_norm", "gradient_moments", "inner_product_test",
    "microbatch_statistics", "moment_statistics", "next_batch_size",
    "norm_test", "num_selected", "orthogonality_test",
    "per_device_statistics", "per_example_statistics", "top_k_by_magnitude",
    # Builds (init, add, result) functions for a user's loop, not a transform.
    "gradient_accumulator",
}


def test_every_public_transformation_is_in_the_table():
  functions = {name for name in sngm_optax.__all__
               if callable(getattr(sngm_optax, name)) and name[0].islower()}
  assert NOT_TRANSFORMATIONS <= functions
  covered = {name for row in OPTIMIZERS for name in row.public_names}
  assert covered == functions - NOT_TRANSFORMATIONS


@pytest.mark.parametrize("row", ALL)
def test_decreases_a_quadratic_with_a_schedule_and_extra_args(row):
  # As optax's contrib suite, the steps pass an argument no optimizer expects.
  tx = row.build(optax.cosine_decay_schedule(row.learning_rate, 300))
  params = _params()
  final = Runner(row, tx).minimize(_quadratic, params, 300,
                                   unused_extra_arg=jnp.ones(()))
  assert jax.tree.structure(final) == jax.tree.structure(params)
  assert _quadratic(final) < 0.05 * _quadratic(params)


@pytest.mark.parametrize("row", DATA_PARALLEL)
def test_every_device_gets_the_same_update(row):
  runner = optimizers.plain(row.name)
  params = _params()
  state = runner.init(params)
  for _ in range(2):
    updates, state = runner.update(_grads(params), state, params)
    for leaf in jax.tree.leaves(updates):
      for device_leaf in leaf[1:]:
        np.testing.assert_array_equal(device_leaf, leaf[0])
    params = optax.apply_updates(params, runner.first(updates))


@pytest.mark.parametrize("row", ALL)
def test_inject_hyperparams_gives_the_same_update(row):
  params = _params()
  plain = optimizers.plain(row.name)
  injected = Runner(row, row.build(inject=True))
  state, injected_state = plain.init(params), injected.init(params)
  for _ in range(3):
    updates, state = plain.update(_grads(params), state, params)
    injected_updates, injected_state = injected.update(
        _grads(params), injected_state, params)
    _assert_trees_close(updates, injected_updates, row.inject_rtol)
    params = optax.apply_updates(params, plain.first(updates))
  _assert_trees_close(injected_state.inner_state, state, row.inject_rtol)


@pytest.mark.parametrize("row", ALL)
def test_multisteps_with_one_step_matches_the_optimizer(row):
  params = _params()
  plain = optimizers.plain(row.name)
  wrapped = Runner(row, optax.MultiSteps(row.build(), every_k_schedule=1))
  state, wrapped_state = plain.init(params), wrapped.init(params)
  for _ in range(3):
    updates, state = plain.update(_grads(params), state, params)
    wrapped_updates, wrapped_state = wrapped.update(
        _grads(params), wrapped_state, params)
    _assert_trees_close(updates, wrapped_updates, 1e-6)
    params = optax.apply_updates(params, plain.first(updates))


def _mixed_params():
  # One leaf of each float dtype: each update and state buffer must keep its
  # own param's dtype.
  params = _params()
  return {"w": params["w"].astype(jnp.bfloat16),
          "b": [params["b"][0].astype(jnp.float16)],
          "c": jnp.array([0.7, -1.2], jnp.float32)}


@functools.cache
def _maybe_update(name):
  """Row `name`'s update under a traced lax.cond: take the step if |g| < 100.

  Both branches are traced, and lax.cond refuses them unless the update
  keeps the state's (and the updates') shapes and dtypes.
  """
  row = optimizers.BY_NAME[name]
  tx = row.build()

  def maybe_update(grads, state, params, **extra_args):
    take_step = jnp.max(jnp.abs(jax.tree.leaves(grads)[0])) < 100.0
    return jax.lax.cond(
        take_step,
        lambda s: tx.update(grads, s, params, **extra_args),
        lambda s: (grads, s),
        state,
    )

  return Runner(row, optax.GradientTransformationExtraArgs(tx.init,
                                                           maybe_update))


@pytest.mark.parametrize("row", ALL)
def test_state_is_stable_under_lax_cond(row):
  runner = _maybe_update(row.name)
  params = _mixed_params()
  state = runner.init(params)
  _, stepped = runner.update(_grads(params), state, params)
  big = jax.tree.map(lambda g: 1e3 * g, _grads(params))
  _, skipped = runner.update(big, state, params)
  jax.tree.map(np.testing.assert_array_equal, skipped, state)
  assert not jax.tree.leaves(state) or any(
      np.any(a != b) for a, b in zip(jax.tree.leaves(stepped),
                                     jax.tree.leaves(state)))


@pytest.mark.parametrize("row", ALL)
def test_preserves_dtypes_and_state_structure(row):
  runner = _maybe_update(row.name)  # (a step taken under lax.cond)
  params = _mixed_params()
  state = runner.init(params)
  updates, new_state = runner.update(_grads(params), state, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype
  shapes = lambda t: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)),
                                  t)
  assert shapes(new_state) == shapes(state)
  size = getattr(runner.jitted, "_cache_size", None)  # (pmap keeps none)
  compiled = size and size()
  runner.update(_grads(params), new_state, params)
  if size:
    assert size() == compiled  # the second step reuses the executable


# --- Abstract params and sharded params.

def _shape_dtype_structs(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@pytest.mark.parametrize("row", ALL)
def test_init_on_shape_dtype_structs(row):
  # Mixed dtypes: the state's buffers follow each param's dtype.
  params = {"w": jnp.ones((3, 2), jnp.float32),
            "b": [jnp.full(5, 0.5, jnp.bfloat16)]}
  tx = row.build()
  expected = tx.init(params)
  # As optax's own optimizers: init runs on abstract params, e.g. to size a
  # checkpoint or to lay out the state before the params exist, ...
  direct = tx.init(_shape_dtype_structs(params))
  assert jax.tree.structure(direct) == jax.tree.structure(expected)
  for actual, wanted in zip(jax.tree.leaves(direct),
                            jax.tree.leaves(expected)):
    assert actual.dtype == wanted.dtype
    np.testing.assert_array_equal(actual, wanted)
  # ... and under jax.eval_shape, which traces it.
  abstract = jax.eval_shape(tx.init, _shape_dtype_structs(params))
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert shapes(abstract) == shapes(expected)


@pytest.mark.parametrize("row", rows())
def test_state_sharding_is_the_same_after_init_and_update(row):
  # As optax/_src/sharding_test.py: explicit sharding over the 8 devices of
  # tests/conftest.py, one param sharded and one replicated. Data-parallel
  # rows only init here: their update runs inside pmap/shard_map, whose specs
  # give the state its sharding.
  if not hasattr(jax, "set_mesh"):
    pytest.skip("explicit sharding needs jax >= 0.7.2")
  mesh = jax.make_mesh((8,), ("x",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  shardings = {"w": NamedSharding(mesh, P("x", None)),
               "b": NamedSharding(mesh, P())}
  tx = row.build()
  with jax.set_mesh(mesh):
    params = {"w": jnp.ones((16, 4), out_sharding=shardings["w"]),
              "b": jnp.full(8, 0.5, out_sharding=shardings["b"])}
    grads = _grads(params)
    states = {"init": tx.init(params), "jit(init)": jax.jit(tx.init)(params)}
    if not row.axis:
      update = lambda g, s, p: tx.update(g, s, p, **row.extra_args(g))
      updates, states["update"] = update(grads, states["init"], params)
      jitted_updates, states["jit(update)"] = jax.jit(update)(
          grads, states["jit(init)"], params)
      for u, v, p in zip(*map(jax.tree.leaves,
                              (updates, jitted_updates, params))):
        assert u.sharding.is_equivalent_to(p.sharding, p.ndim)
        assert v.sharding.is_equivalent_to(p.sharding, p.ndim)

  by_shape = {p.shape: shardings[name] for name, p in params.items()}
  reference = jax.tree.leaves(states["init"])
  for leaf in reference:  # a params-shaped buffer is sharded as the param
    if leaf.shape in by_shape:
      assert leaf.sharding.is_equivalent_to(by_shape[leaf.shape], leaf.ndim)
  for name, state in states.items():
    assert jax.tree.structure(state) == jax.tree.structure(states["init"])
    for leaf, expected in zip(jax.tree.leaves(state), reference):
      assert leaf.sharding.is_equivalent_to(expected.sharding, leaf.ndim), (
          name, leaf.shape, leaf.sharding, expected.sharding)
