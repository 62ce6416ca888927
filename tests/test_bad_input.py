"""Bad input everywhere: one table of every public factory and each bad value.

Each row builds something from `sngm_optax.__all__` with one bad argument and
expects a `ValueError` whose message names the argument and the allowed range
(or the allowed choices).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sngm_optax as so
from optimizers import Runner
from optimizers import rows

NAN, INF = float("nan"), float("inf")

# (factory, fixed arguments, bad argument, bad values, expected message)
LR = dict(learning_rate=0.1)
LR_AXIS = dict(learning_rate=0.1, axis_name="i")
AXIS = dict(axis_name="i")
ADA = dict(learning_rate=0.1, max_batch_size=256)
ABS = dict(max_batch_size=256)
MOMENTUM = r"\[0, 1\)"
POSITIVE = r"\(0, inf\)"
NON_NEGATIVE = r"\[0, inf\)"
TINY = r"\[1.17549e-38, inf\)"  # float32's smallest normal: no subnormal eps
DENSITY = r"\(0, 1\]"
POS_INT = "positive integer"
GROWTH = r"\[1, inf\)"

TABLE = [
    # SNGM and normalization.
    (so.sngm, LR, "learning_rate", [-0.1, NAN, INF, -INF], NON_NEGATIVE),
    # float('0.1') and float(True) succeed: strings and booleans are refused
    # before any conversion (the other factories' rows are NOT_NUMBERS_TABLE).
    (so.sngm, LR, "learning_rate", ["0.1", True, np.True_], NON_NEGATIVE),
    (so.sngm, LR, "momentum", [-0.1, 1.0, NAN], MOMENTUM),
    (so.sngm, LR, "weight_decay", [-1e-4, NAN], NON_NEGATIVE),
    (so.sngm, LR, "eps", [0.0, -1.0, NAN], TINY),
    (so.scale_by_sngm, {}, "momentum", [-0.5, 1.5], MOMENTUM),
    (so.scale_by_sngm, {}, "eps", [0.0, -1e-3], TINY),
    (so.normalize_by_global_norm, {}, "eps", [0.0, 1e-40, -1.0, NAN], TINY),
    # AdaGrad-Norm.
    (so.adagrad_norm, LR, "learning_rate", [-1.0], NON_NEGATIVE),
    (so.adagrad_norm, LR, "initial_accumulator_value", [-0.1, NAN],
     NON_NEGATIVE),
    (so.adagrad_norm, LR, "eps", [-1.0, NAN], NON_NEGATIVE),
    (so.scale_by_adagrad_norm, {}, "initial_accumulator_value", [-1.0],
     NON_NEGATIVE),
    (so.scale_by_adagrad_norm, {}, "eps", [-1.0], NON_NEGATIVE),
    # Adaptive batch size and AdAdaGrad.
    (so.adaptive_batch_size, ABS, "max_batch_size", [0, -3, 2.5], POS_INT),
    (so.adaptive_batch_size, ABS, "initial_batch_size", [0, 1.5, 512],
     "initial_batch_size"),
    (so.adaptive_batch_size, ABS, "eta", [0.0, -1.0, NAN], POSITIVE),
    (so.adaptive_batch_size, ABS, "theta", [0.0, -1.0], POSITIVE),
    (so.adaptive_batch_size, ABS, "nu", [0.0, -1.0], POSITIVE),
    (so.adaptive_batch_size, ABS, "batch_size_multiple", [0, -1], POS_INT),
    (so.adaptive_batch_size, ABS, "microbatch_size", [0, -2], POS_INT),
    (so.adaptive_batch_size, ABS, "noise_scale_decay", [-0.1, 1.0, 2.0],
     MOMENTUM),
    (so.adaptive_batch_size, ABS, "test", ["bogus"], "test"),
    (so.adaptive_batch_size, ABS, "eps", [-1.0], NON_NEGATIVE),
    (so.adaptive_batch_size, ABS, "initial_accumulator_value", [-1.0],
     NON_NEGATIVE),
    (so.adaptive_batch_size, ABS, "max_growth_factor", [0.5, 0.0, NAN],
     GROWTH),
    (so.adaptive_batch_size, ABS, "smoothing", [-0.1, 1.0, NAN], MOMENTUM),
    (so.adaptive_batch_size, ABS, "test_interval", [0, -1, 2.5], POS_INT),
    (so.adadagrad, ADA, "max_growth_factor", [0.5], GROWTH),
    (so.adadagrad, ADA, "smoothing", [1.0], MOMENTUM),
    (so.adadagrad, ADA, "test_interval", [0], POS_INT),
    (so.adadagrad_norm, ADA, "max_growth_factor", [0.5], GROWTH),
    (so.adadagrad_norm, ADA, "smoothing", [1.0], MOMENTUM),
    (so.adadagrad_norm, ADA, "test_interval", [0], POS_INT),
    (so.gradient_accumulator, dict(loss_fn=lambda params, batch: batch),
     "microbatch_size", [0, -2, 1.5], POS_INT),
    (so.adadagrad, ADA, "learning_rate", [-1.0], NON_NEGATIVE),
    (so.adadagrad, ADA, "max_batch_size", [0], POS_INT),
    (so.adadagrad, ADA, "eta", [0.0], POSITIVE),
    (so.adadagrad, ADA, "test", ["bogus"], "test"),
    (so.adadagrad, ADA, "initial_accumulator_value", [-1.0], NON_NEGATIVE),
    (so.adadagrad, ADA, "eps", [-1.0], NON_NEGATIVE),
    (so.adadagrad, ADA, "theta", [0.0], POSITIVE),
    (so.adadagrad, ADA, "nu", [-1.0], POSITIVE),
    (so.adadagrad, ADA, "initial_batch_size", [0], POS_INT),
    (so.adadagrad, ADA, "batch_size_multiple", [0], POS_INT),
    (so.adadagrad_norm, ADA, "learning_rate", [-1.0], NON_NEGATIVE),
    (so.adadagrad_norm, ADA, "max_batch_size", [0], POS_INT),
    (so.adadagrad_norm, ADA, "theta", [-1.0], POSITIVE),
    (so.adadagrad_norm, ADA, "test", ["bogus"], "test"),
    (so.adadagrad_norm, ADA, "initial_accumulator_value", [-1.0],
     NON_NEGATIVE),
    (so.adadagrad_norm, ADA, "eta", [0.0], POSITIVE),
    (so.adadagrad_norm, ADA, "nu", [-1.0], POSITIVE),
    (so.adadagrad_norm, ADA, "eps", [-1.0], NON_NEGATIVE),
    (so.adadagrad_norm, ADA, "initial_batch_size", [0], POS_INT),
    (so.adadagrad_norm, ADA, "batch_size_multiple", [0], POS_INT),
    # Gradient noise scale.
    (so.noise_scale_monitor, dict(per_device_batch_size=8),
     "per_device_batch_size", [0, -4, 2.5], POS_INT),
    (so.noise_scale_monitor, dict(per_device_batch_size=8), "smoothing",
     [-0.1, 1.0, NAN], MOMENTUM),
    (so.noise_scale_monitor, dict(per_device_batch_size=8), "axis_name",
     ["", 3, ("i", "")], "axis_name"),
    # Trajectory regularization.
    (so.tr_sgd, LR, "learning_rate", [-1.0], NON_NEGATIVE),
    (so.tr_sgd, LR, "strength", [-1.0, NAN], NON_NEGATIVE),
    (so.tr_sgd, LR, "momentum", [1.0, -0.1], MOMENTUM),
    (so.tr_sgd, LR, "weight_decay", [-1.0], NON_NEGATIVE),
    (so.tr_sgd, LR, "inner_steps", [0, 2.5], POS_INT),
    (so.tr_adam, LR, "learning_rate", [-1.0], NON_NEGATIVE),
    (so.tr_adam, LR, "strength", [-1.0], NON_NEGATIVE),
    (so.tr_adam, LR, "b1", [1.0, -0.1], MOMENTUM),
    (so.tr_adam, LR, "b2", [1.0, -0.1], MOMENTUM),
    (so.tr_adam, LR, "eps", [-1.0], NON_NEGATIVE),
    (so.tr_adam, LR, "weight_decay", [-1.0], NON_NEGATIVE),
    (so.tr_adam, LR, "inner_steps", [0], POS_INT),
    (so.trajectory_regularized, dict(inner=optax.sgd(0.1), strength=0.1),
     "strength", [-1.0], NON_NEGATIVE),
    (so.trajectory_regularized, dict(inner=optax.sgd(0.1), strength=0.1),
     "inner_steps", [0, -1], POS_INT),
    (so.trajectory_regularized, dict(inner=optax.sgd(0.1), strength=0.1),
     "learning_rate", [-1.0], NON_NEGATIVE),
    # Compression.
    (so.gmc, LR_AXIS, "learning_rate", [-1.0], NON_NEGATIVE),
    (so.gmc, LR_AXIS, "momentum", [1.0, -0.1], MOMENTUM),
    (so.gmc, LR_AXIS, "density", [0.0, 1.5, NAN], DENSITY),
    (so.gmc, LR_AXIS, "weight_decay", [-1.0], NON_NEGATIVE),
    (so.gmc, LR_AXIS, "selection", ["bogus"], "selection"),
    (so.gmc, LR_AXIS, "exchange", ["bogus"], "exchange"),
    (so.dgc, LR_AXIS, "learning_rate", [-1.0], NON_NEGATIVE),
    (so.dgc, LR_AXIS, "momentum", [1.0], MOMENTUM),
    (so.dgc, LR_AXIS, "density", [0.0, 2.0], DENSITY),
    (so.dgc, LR_AXIS, "weight_decay", [-1.0], NON_NEGATIVE),
    (so.dgc, LR_AXIS, "selection", ["bogus"], "selection"),
    (so.dgc, LR_AXIS, "axis_name", [None], "axis_name"),
    (so.gmc, LR_AXIS, "axis_name", [None], "axis_name"),
    (so.scale_by_gmc, AXIS, "momentum", [1.0], MOMENTUM),
    (so.scale_by_gmc, AXIS, "density", [0.0], DENSITY),
    (so.scale_by_gmc, AXIS, "exchange", ["bogus"], "exchange"),
    (so.scale_by_dgc, AXIS, "momentum", [1.0], MOMENTUM),
    (so.scale_by_dgc, AXIS, "density", [-0.1], DENSITY),
    (so.scale_by_dgc, AXIS, "selection", ["bogus"], "selection"),
    (so.num_selected, dict(size=100), "density", [0.0, 1.5], DENSITY),
    (so.num_selected, dict(density=0.1), "size", [0, -1], POS_INT),
    (so.top_k_by_magnitude, dict(vector=jnp.ones(8)), "k",
     [0, 9, -1, "2", True, 2.5], "k"),
    (so.top_k_by_magnitude, dict(vector=jnp.ones(8), k=2), "selection",
     ["bogus"], "selection"),
    # Distributed helpers.
    (so.average_across_devices, {}, "axis_name", [None, 3, ""], "axis_name"),
]

# Infinity, a number as a string, and booleans, for every numeric
# hyperparameter above: each row's own message (the allowed range) applies.
NOT_NUMBERS = [INF, "0.1", True]
NUMERIC = (MOMENTUM, POSITIVE, NON_NEGATIVE, TINY, DENSITY, POS_INT, GROWTH)
NOT_NUMBERS_TABLE = list({
    (factory.__name__, name): (factory, fixed, name, NOT_NUMBERS, message)
    for factory, fixed, name, _, message in TABLE if message in NUMERIC
}.values())

ROWS = [pytest.param(factory, fixed, name, value, message,
                     id=f"{factory.__name__}-{name}={value!r}")
        for factory, fixed, name, values, message in TABLE + NOT_NUMBERS_TABLE
        for value in values]


@pytest.mark.parametrize("factory, fixed, name, value, message", ROWS)
def test_bad_hyperparameter_raises_value_error_naming_it(factory, fixed, name,
                                                         value, message):
  with pytest.raises(ValueError, match=name) as info:
    factory(**{**fixed, name: value})
  assert __import__("re").search(message, str(info.value)), str(info.value)


FACTORIES_WITHOUT_HYPERPARAMETERS = {
    # Functions of data (statistics, tests, moments): their inputs are arrays,
    # checked where they are used; per_device_state wraps a transformation.
    "add_gradient_moments", "augmented_inner_product_test", "coordinate_test",
    "global_norm", "gradient_moments", "inner_product_test",
    "microbatch_statistics", "moment_statistics", "next_batch_size",
    "norm_test", "orthogonality_test", "per_device_statistics",
    "per_example_statistics", "per_device_state",
}


@pytest.mark.parametrize("value", [
    0.1, 1, np.float32(0.1), np.int64(1), jnp.asarray(0.1),
    jnp.asarray(0.1, jnp.bfloat16), optax.constant_schedule(0.1)],
    ids=lambda value: type(value).__name__)
def test_numbers_arrays_and_schedules_pass(value):
  so.sngm(value, weight_decay=value)  # bfloat16: inject_hyperparams' dtype


def test_every_public_factory_is_in_the_table():
  covered = {factory.__name__ for factory, *_ in TABLE}
  functions = {name for name in so.__all__
               if callable(getattr(so, name)) and name[0].islower()}
  missing = functions - covered - FACTORIES_WITHOUT_HYPERPARAMETERS
  assert not missing, f"no bad-input rows for {sorted(missing)}"


def test_every_numeric_hyperparameter_is_in_the_table():
  # A parameter whose default is a number (not a bool) needs rows, and so
  # gets the NOT_NUMBERS rows too.
  covered = {(factory.__name__, name) for factory, _, name, *_ in TABLE}
  factories = {factory.__name__: factory for factory, *_ in TABLE}
  missing = [
      f"{factory_name}({name})"
      for factory_name, factory in sorted(factories.items())
      for name, parameter in inspect.signature(factory).parameters.items()
      if isinstance(parameter.default, (int, float))
      and not isinstance(parameter.default, bool)
      and (factory_name, name) not in covered]
  assert not missing, f"no bad-input rows for {missing}"


# --- Wrong pytrees and dtypes, for every row of tests/optimizers.py.

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}


@pytest.mark.parametrize("row", rows())
@pytest.mark.parametrize("params, match", [
    ({"w": jnp.ones((2, 3)), "c": jnp.zeros(3)},
     r"updates and params pytrees differ: updates have structure "
     r"PyTreeDef\(\{'b': \*, 'w': \*\}\), params have "
     r"PyTreeDef\(\{'c': \*, 'w': \*\}\)"),
    ({"w": jnp.ones((3, 2)), "b": jnp.zeros(3)},
     r"differ at \['w'\]: updates have shape \(2, 3\), params have \(3, 2\)"),
])
def test_params_that_do_not_match_the_updates_are_named(row, params, match):
  tx = row.build()
  runner = Runner(row, tx)
  state = runner.init(PARAMS)
  if not row.axis:
    with pytest.raises(ValueError, match=match):
      tx.update(PARAMS, state, params, **row.extra_args(PARAMS))
  # Also compiled (jit, or pmap for data-parallel rows): the check is on
  # static structure and shapes.
  with pytest.raises(ValueError, match=match):
    runner.update(PARAMS, state, params)


def test_matching_params_pass_and_cost_nothing_under_jit():
  tx = so.sngm(0.1)
  state = tx.init(PARAMS)
  lowered = jax.jit(tx.update).lower(PARAMS, state, PARAMS).as_text()
  assert "ValueError" not in lowered
  updates, _ = tx.update(PARAMS, state, PARAMS)
  assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


@pytest.mark.parametrize("row", rows())
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_params_are_refused_at_init(row, dtype):
  tx = row.build()
  params = {"w": jnp.ones((2, 3)), "n": jnp.zeros(3, dtype)}
  with pytest.raises(ValueError, match=r"params must be floating point, got "
                     rf"dtype {np.dtype(dtype).name} at \['n'\]"):
    tx.init(params)
