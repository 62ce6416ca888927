"""The one optimizer table of the test suites.

Every public transformation of `sngm_optax` is built by at least one row of
`OPTIMIZERS`: a factory of the learning rate, its other arguments, and what
its `update` needs (per-sample gradients, a device axis). The common,
non-finite, compilation and bad-input suites parametrize over this table; a
new optimizer is one more row here.

A building block without a learning rate (`scale_by_*`, ...) is tested as
optax composes it, followed by `optax.scale_by_learning_rate`
(`then_learning_rate`). Rows with `axis=True` are built with
`axis_name=AXIS` and run under `jax.pmap` on `NUM_DEVICES` devices, each with
its own gradient (`Runner` hides the difference from the suites).
"""

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sngm_optax as so

AXIS = "devices"
NUM_DEVICES = 4  # of the 8 simulated devices of tests/conftest.py
MICROBATCH_SIZE = 4


def then_learning_rate(block):
  """`block` followed by `optax.scale_by_learning_rate`, as an optimizer.

  The factory's signature is `block`'s with `learning_rate` in front, so that
  `optax.inject_hyperparams` injects the block's own arguments too.
  """

  def factory(learning_rate, *args, **kwargs):
    return optax.chain(block(*args, **kwargs),
                       optax.scale_by_learning_rate(learning_rate))

  signature = inspect.signature(block)
  learning_rate = inspect.Parameter(
      "learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD)
  factory.__signature__ = signature.replace(
      parameters=[learning_rate, *signature.parameters.values()])
  factory.__name__ = factory.__qualname__ = block.__name__
  return factory


def trajectory_regularized_adam(learning_rate, strength=0.01, inner_steps=3):
  """`trajectory_regularized` around `optax.adam`, strength coupled to it."""
  return so.trajectory_regularized(
      optax.adam(learning_rate), strength, inner_steps=inner_steps,
      learning_rate=learning_rate)


def per_device_sngm(learning_rate, momentum=0.9):
  """`sngm` in `per_device_state`: its state with a leading axis of 1."""
  return so.per_device_state(so.sngm(learning_rate, momentum=momentum))


def noise_scale_monitored_sgd(learning_rate, per_device_batch_size=4,
                              axis_name=None):
  """`noise_scale_monitor` in front of `optax.sgd`, which it passes the
  (device-mean) gradient."""
  return optax.chain(
      so.noise_scale_monitor(per_device_batch_size, axis_name=axis_name),
      optax.sgd(learning_rate))


class Optimizer(NamedTuple):
  """One row: `factory(learning_rate, **kwargs)` and what its update needs."""

  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  # A learning rate for which a cosine schedule from it minimizes the common
  # suite's quadratic in 300 steps.
  learning_rate: float = 0.1
  # The per-sample gradients `update` needs: 'microbatch_grads' (of
  # MICROBATCH_SIZE samples each) or 'per_example_grads'.
  statistics: str | None = None
  # Built with axis_name=AXIS: data parallel, runs inside jax.pmap only.
  axis: bool = False
  # Arguments `optax.inject_hyperparams` must keep static (they fix shapes).
  static_args: tuple[str, ...] = ()
  # optax.adam itself moves by ~7e-6 (relative) under inject_hyperparams,
  # which turns b1 and b2 into float32 arrays.
  inject_rtol: float = 1e-6
  # The public names the row exercises (default: the factory's name).
  covers: tuple[str, ...] = ()

  def build(self, learning_rate=None, inject=False):
    """The transformation; `learning_rate` (scalar or schedule) overrides."""
    factory = self.factory
    if inject:
      factory = optax.inject_hyperparams(factory, static_args=self.static_args)
    kwargs = dict(self.kwargs, axis_name=AXIS) if self.axis else self.kwargs
    if learning_rate is None:
      learning_rate = self.learning_rate
    return factory(learning_rate, **kwargs)

  def extra_args(self, grads):
    """The keyword arguments of `update` besides (updates, state, params)."""
    if self.statistics == "microbatch_grads":
      # Two microbatch means whose average is `grads` (NaN/Inf stay in both).
      return {"microbatch_grads": jax.tree.map(
          lambda g: jnp.stack([g * 0.5, g * 1.5]), grads)}
    if self.statistics == "per_example_grads":
      return {"per_example_grads": jax.tree.map(
          lambda g: jnp.stack([g * 0.5, g * 1.5, g * 0.75, g * 1.25]), grads)}
    return {}

  @property
  def public_names(self):
    return self.covers or (self.factory.__name__,)


MICROBATCHES = dict(microbatch_size=MICROBATCH_SIZE)

OPTIMIZERS = [
    # SNGM (a chain of average_across_devices, normalize_by_global_norm and
    # momentum).
    Optimizer("sngm", so.sngm, {}, learning_rate=0.05),
    Optimizer("sngm_nesterov_wd", so.sngm,
              {"nesterov": True, "weight_decay": 1e-4}, learning_rate=0.05),
    Optimizer("sngm_decoupled_per_layer", so.sngm,
              {"weight_decay": 1e-4, "decoupled_weight_decay": True,
               "per_layer": True}, learning_rate=0.05),
    Optimizer("scale_by_sngm", then_learning_rate(so.scale_by_sngm),
              {"momentum": 0.9}, learning_rate=0.05,
              covers=("scale_by_sngm", "normalize_by_global_norm")),
    # AdaGrad-Norm.
    Optimizer("adagrad_norm", so.adagrad_norm, {}, learning_rate=1.0),
    Optimizer("scale_by_adagrad_norm",
              then_learning_rate(so.scale_by_adagrad_norm), {},
              learning_rate=1.0),
    # AdAdaGrad: adaptive_batch_size in front of AdaGrad(-Norm).
    Optimizer("adadagrad", so.adadagrad,
              {"max_batch_size": 1024, "initial_batch_size": 4},
              learning_rate=1.0, statistics="per_example_grads",
              covers=("adadagrad", "adaptive_batch_size")),
    Optimizer("adadagrad_coordinate", so.adadagrad,
              {"max_batch_size": 1024, "initial_batch_size": 8,
               "test": "coordinate", **MICROBATCHES}, learning_rate=1.0,
              statistics="microbatch_grads"),
    Optimizer("adadagrad_norm", so.adadagrad_norm,
              {"max_batch_size": 1024, "initial_batch_size": 8,
               **MICROBATCHES}, learning_rate=1.0,
              statistics="microbatch_grads"),
    # Trajectory regularization.
    Optimizer("tr_sgd", so.tr_sgd, {}, learning_rate=0.05),
    Optimizer("tr_sgd_uncoupled_no_decay", so.tr_sgd,
              {"couple_to_learning_rate": False, "inner_lr_decay": False,
               "inner_steps": 3}, learning_rate=0.05),
    Optimizer("tr_adam", so.tr_adam, {"inner_steps": 3}, inject_rtol=2e-5),
    Optimizer("trajectory_regularized_adam", trajectory_regularized_adam, {},
              inject_rtol=2e-5, covers=("trajectory_regularized",)),
    # The gradient noise scale, measured in front of an optimizer: from the
    # per-example gradients, and from the devices' own gradients.
    Optimizer("noise_scale_monitor", noise_scale_monitored_sgd, {},
              statistics="per_example_grads",
              static_args=("per_device_batch_size",),
              covers=("noise_scale_monitor",)),
    Optimizer("noise_scale_monitor_per_device", noise_scale_monitored_sgd,
              {}, axis=True, static_args=("per_device_batch_size",),
              covers=("noise_scale_monitor",)),
    # The shard_map wrapper of per-device state (outside a map, a no-op).
    Optimizer("per_device_state", per_device_sngm, {}, learning_rate=0.05,
              covers=("per_device_state",)),
    # Data parallel: inside jax.pmap, each device with its own gradient.
    Optimizer("sngm_data_parallel", so.sngm, {}, learning_rate=0.05,
              axis=True, covers=("sngm", "average_across_devices")),
    Optimizer("adadagrad_norm_per_device", so.adadagrad_norm,
              {"max_batch_size": 4096, "initial_batch_size": 64,
               "batch_size_multiple": 8}, learning_rate=1.0, axis=True),
    Optimizer("gmc", so.gmc, {"density": 0.5, "weight_decay": 1e-4},
              learning_rate=0.05, axis=True, static_args=("density",)),
    Optimizer("dgc", so.dgc, {"density": 0.5, "weight_decay": 1e-4},
              learning_rate=0.05, axis=True, static_args=("density",)),
    Optimizer("scale_by_gmc", then_learning_rate(so.scale_by_gmc),
              {"density": 0.5}, learning_rate=0.05, axis=True,
              static_args=("density",)),
    Optimizer("scale_by_dgc", then_learning_rate(so.scale_by_dgc),
              {"density": 0.5}, learning_rate=0.05, axis=True,
              static_args=("density",)),
]
BY_NAME = {row.name: row for row in OPTIMIZERS}
assert len(BY_NAME) == len(OPTIMIZERS), "row names must be unique"


def rows(select=lambda row: True):
  """`pytest.param`s of the rows `select` keeps, with their names as ids."""
  return [pytest.param(row, id=row.name) for row in OPTIMIZERS if select(row)]


# What the suites feed every optimizer: two leaves of different shapes, one
# in a list.
def params(dtype=jnp.float32):
  return {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]], dtype),
          "b": [jnp.array([0.1, -0.1, 2.0], dtype)]}


def grads(params):
  return jax.tree.map(lambda p: (2.0 * p + 0.3).astype(p.dtype), params)


class Runner:
  """Runs `tx` of `row` jitted, or under `jax.pmap` for rows with an axis.

  The suites call `init(params)` and `update(grads, state, params)` with one
  copy of the params and of the gradient either way. For axis rows the state
  and the returned updates have a leading axis of NUM_DEVICES devices
  (`first` gives device 0's updates), and device d's gradient is `grads`
  times `scale(grads)`'s d-th entry: factors from 0.5 to 1.5, of mean 1.
  """

  def __init__(self, row, tx):
    self.row, self.tx = row, tx

    def update(scale, grads, state, params, **extra_args):
      if row.axis:
        grads = jax.tree.map(lambda g, s: (g * s).astype(g.dtype), grads,
                             scale)
      return tx.update(grads, state, params, **extra_args,
                       **row.extra_args(grads))

    self._update_fn = update
    if row.axis:
      self._devices = jax.local_devices()[:NUM_DEVICES]
      self._init = jax.pmap(lambda _, p: tx.init(p), devices=self._devices,
                            in_axes=(0, None))
      self.jitted = jax.pmap(update, axis_name=AXIS, devices=self._devices,
                             in_axes=(0, None, 0, None))
    else:
      self._init = lambda _, p: tx.init(p)
      self.jitted = jax.jit(update)

  def scale(self, grads):
    """Per device (a leading axis), the factors of each gradient entry."""
    if not self.row.axis:
      return jnp.ones(())
    factors = jnp.linspace(0.5, 1.5, NUM_DEVICES)
    return jax.tree.map(
        lambda g: jnp.broadcast_to(
            factors.reshape((-1,) + (1,) * g.ndim), (NUM_DEVICES,) + g.shape),
        grads)

  def init(self, params):
    return self._init(self.scale(params), params)

  def update(self, grads, state, params, scale=None):
    if scale is None:
      scale = self.scale(grads)
    return self.jitted(scale, grads, state, params)

  def first(self, updates):
    """Device 0's updates (on the host) for axis rows, else `updates`."""
    if self.row.axis:
      return jax.tree.map(lambda u: np.asarray(u[0]), updates)
    return updates

  def minimize(self, loss, params, steps, **extra_args):
    """The params after `steps` updates on `loss`, in one compiled loop."""

    def run(scale, params):
      def step(_, carry):
        params, state = carry
        updates, state = self._update_fn(
            scale, jax.grad(loss)(params), state, params, **extra_args)
        return optax.apply_updates(params, updates), state
      return jax.lax.fori_loop(0, steps, step, (params, self.tx.init(params)))

    if self.row.axis:
      run = jax.pmap(run, axis_name=AXIS, in_axes=(0, None),
                     devices=self._devices)
    else:
      run = jax.jit(run)
    params, _ = run(self.scale(params), params)
    return self.first(params)


@functools.cache
def plain(name):
  """The (cached) Runner of row `name`'s transformation with its defaults."""
  row = BY_NAME[name]
  return Runner(row, row.build())
