"""The training loop shared by the CLI, the notebooks and the benchmarks.

`train_and_evaluate(config)` reads top to bottom, in the sections of a Flax
example: input, devices, model and optimizer, update step, evaluation,
training loop, metrics. Optimizers are built by name from `OPTIMIZERS`, so a
new optimizer is one registry line and no change to the loop.

Data parallelism: the global batch is split over a 1-D mesh of the local
devices (axis name `"data"`) with `jax.shard_map`. Each device computes the
gradient of its own shard; the optimizer averages the gradients itself
(`sngm(axis_name=...)`; the optax baselines get
`sngm_optax.average_across_devices` chained in front), as it would under
`pmap`. On one device the mesh has one entry and the same code runs.

Batches have the shape `[num_microbatches, microbatch, ...]` plus a weight per
example: the step loops over the microbatches and accumulates the weighted
gradient sum, so a controller that grows the batch can feed a variable number
of fixed-shape microbatches (and pad with weight-0 examples) without
recompiling for every batch size.

Adaptive batch sizes (`Config.adaptive_batch`, AdAdaGrad): a batch-size test
(`sngm_optax.adaptive_batch_size`) sits in front of the optimizer, and each
step draws the test's `next_batch_size` examples from the `EpochSampler`. The
microbatch size is fixed for the run (`batch_size / num_microbatches`), the
batch is a whole number of microbatches, and their number is rounded up to a
power of two with weight-0 microbatches, so a growing batch compiles the step
once per power-of-two bucket. The test's statistics are the devices' own
gradients (`"per_device"`: only scalars are all-reduced) or the moments of
the microbatch gradients (`"microbatch"`, norm and coordinate tests).

Example:
  >>> from sngm_optax import data, train
  >>> config = train.Config(optimizer='sngm', learning_rate=0.2, epochs=3,
  ...                       batch_size=100, model='mlp', num_devices=1)
  >>> result = train.train_and_evaluate(
  ...     config, dataset=data.generate_mnist1d(1000), quiet=True)
  >>> result['steps'], result['final']['test_accuracy'] > 0.2
  (24, True)
"""

import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sngm_optax import data as data_lib
from sngm_optax import models
from sngm_optax.adadagrad import adadagrad
from sngm_optax.adadagrad import adadagrad_norm
from sngm_optax.adagrad_norm import adagrad_norm
from sngm_optax.batch_size import GradientMoments
from sngm_optax.batch_size import adaptive_batch_size
from sngm_optax.compression import dgc
from sngm_optax.compression import gmc
from sngm_optax.distributed import average_across_devices
from sngm_optax.distributed import per_device_state
from sngm_optax.sngm import sngm
from sngm_optax.trajectory import tr_adam, tr_sgd

AXIS = "data"


# ----------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a run; override fields with `override`.

  Budgets are in epochs (samples seen / training-set size), so runs at
  different batch sizes see the same number of examples.
  """

  # Data: a user's .npz (keys x, y, x_test, y_test), or MNIST-1D generated
  # with `num_samples` examples (80% train, 20% test) and `data_seed`.
  data_path: str | None = None
  num_samples: int = data_lib.DEFAULT_NUM_SAMPLES
  data_seed: int = data_lib.DEFAULT_SEED
  cache_dir: str | None = None
  # Fraction of the training set held out for validation (0: none).
  val_fraction: float = 0.0
  model: str = "cnn"
  # Optimizer, looked up in OPTIMIZERS, with its peak learning rate.
  optimizer: str = "sngm"
  learning_rate: float = 0.4
  weight_decay: float = 1e-4
  # Extra keyword arguments for the optimizer factory (e.g. momentum).
  optimizer_kwargs: dict = dataclasses.field(default_factory=dict)
  # "warmup_cosine": linear warmup to the peak, cosine decay to 0.
  schedule: str = "warmup_cosine"
  warmup_epochs: float = 2.0
  batch_size: int = 4096
  # The batch is fed as num_microbatches x (batch_size / num_microbatches).
  num_microbatches: int = 1
  epochs: float = 30.0
  seed: int = 0
  # Devices to split the batch over; 0 means all local devices.
  num_devices: int = 0
  eval_batch_size: int = 4096
  # Stop after this many consecutive steps with a non-finite loss.
  max_nonfinite_steps: int = 5
  # Adaptive batch size: a test name from ADAPTIVE_TESTS puts that
  # batch-size test in front of the optimizer; `batch_size` is then the
  # initial batch size and the batch grows up to `max_batch_size`.
  adaptive_batch: str | None = None
  max_batch_size: int | None = None
  # Where the test's statistics come from: "per_device", "microbatch", or
  # "auto" (per_device on two or more devices, else microbatch).
  adaptive_statistics: str = "auto"

  def __post_init__(self):
    _check_positive_int("batch_size", self.batch_size)
    _check_positive_int("num_microbatches", self.num_microbatches)
    _check_positive_int("eval_batch_size", self.eval_batch_size)
    _check_positive_int("max_nonfinite_steps", self.max_nonfinite_steps)
    _check_positive_int("num_samples", self.num_samples)
    if not (isinstance(self.num_devices, int) and self.num_devices >= 0):
      raise ValueError(
          f"num_devices must be an integer >= 0, got {self.num_devices!r}")
    _check_real("epochs", self.epochs, 0.0, low_inclusive=False)
    _check_real("learning_rate", self.learning_rate, 0.0, low_inclusive=False)
    _check_real("weight_decay", self.weight_decay, 0.0)
    _check_real("warmup_epochs", self.warmup_epochs, 0.0)
    _check_real("val_fraction", self.val_fraction, 0.0, 1.0)
    if not isinstance(self.optimizer_kwargs, dict):
      raise ValueError("optimizer_kwargs must be a dict, got "
                       f"{self.optimizer_kwargs!r}")
    if self.batch_size % self.num_microbatches:
      raise ValueError(
          f"batch_size={self.batch_size} is not divisible by "
          f"num_microbatches={self.num_microbatches}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of "
                       f"{', '.join(sorted(OPTIMIZERS))}")
    if self.model not in models.MODELS:
      raise ValueError(f"unknown model {self.model!r}; choose one of "
                       f"{', '.join(sorted(models.MODELS))}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown schedule {self.schedule!r}; choose one of "
                       f"{', '.join(sorted(SCHEDULES))}")
    self._check_adaptive()

  def _check_adaptive(self):
    """Raises ValueError for an inconsistent adaptive-batch setting."""
    test = self.adaptive_batch
    if test is None:
      if self.optimizer in ADAPTIVE_OPTIMIZERS:
        raise ValueError(f"optimizer {self.optimizer!r} needs adaptive_batch "
                         f"(one of {', '.join(ADAPTIVE_TESTS)})")
      if self.max_batch_size is not None:
        raise ValueError("max_batch_size is only used with adaptive_batch")
      return
    if test not in ADAPTIVE_TESTS:
      raise ValueError(f"unknown adaptive_batch {test!r}; choose one of "
                       f"{', '.join(ADAPTIVE_TESTS)}")
    if test == "coordinate" and self.optimizer != "adadagrad":
      raise ValueError("adaptive_batch='coordinate' is AdaGrad's own test: "
                       "use it with optimizer 'adadagrad'")
    if self.max_batch_size is None:
      raise ValueError("adaptive_batch needs max_batch_size")
    _check_positive_int("max_batch_size", self.max_batch_size)
    microbatch = self.batch_size // self.num_microbatches
    if (self.max_batch_size < self.batch_size
        or self.max_batch_size % microbatch):
      raise ValueError(
          f"max_batch_size={self.max_batch_size} must be at least the initial "
          f"batch_size={self.batch_size} and a multiple of the microbatch "
          f"size {microbatch} (batch_size / num_microbatches)")
    if self.adaptive_statistics not in ("auto", "per_device", "microbatch"):
      raise ValueError("adaptive_statistics must be 'auto', 'per_device' or "
                       f"'microbatch', got {self.adaptive_statistics!r}")
    if (self.adaptive_statistics == "microbatch"
        and test not in ("norm", "coordinate")):
      raise ValueError(
          f"adaptive_batch={test!r} needs per-device statistics (the "
          "microbatch moments serve only the norm and coordinate tests)")


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_real(name: str, value: Any, low: float, high: float = math.inf,
                *, low_inclusive: bool = True) -> None:
  """Raises ValueError unless `value` is a finite number in [low, high)."""
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not (is_number and math.isfinite(value) and value < high
          and (value >= low if low_inclusive else value > low)):
    interval = (("[" if low_inclusive else "(") + f"{low:g}, {high:g})")
    raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def override(config: Config, assignments: list[str]) -> Config:
  """Returns `config` with `KEY=VALUE` strings applied (command-line style).

  Values are parsed as JSON when possible (numbers, `null`, `{...}` for
  dicts), else taken as strings.

  Example:
    >>> override(Config(), ['batch_size=128', 'optimizer=msgd']).batch_size
    128
  """
  fields = {field.name for field in dataclasses.fields(Config)}
  changes = {}
  for assignment in assignments:
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or key not in fields:
      raise ValueError(f"bad override {assignment!r}: expected KEY=VALUE with "
                       f"KEY one of {', '.join(sorted(fields))}")
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      value = text
    default = getattr(config, key)
    if isinstance(default, float) and isinstance(value, int):
      value = float(value)
    changes[key] = value
  return dataclasses.replace(config, **changes)


# ----------------------------------------------------------------------------
# Optimizers by name: factory(learning_rate, axis_name, weight_decay, **kw).
# Each receives per-device gradients and averages over `axis_name` itself.


def _matrices_only(params):
  """Mask selecting kernels (rank >= 2): biases get no weight decay."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _device_mean(axis_name, tx):
  if axis_name is None:
    return tx
  return optax.chain(average_across_devices(axis_name), tx)


def _sngm(learning_rate, axis_name, weight_decay=0.0, momentum=0.9, **kw):
  return sngm(learning_rate, momentum=momentum, weight_decay=weight_decay,
              weight_decay_mask=_matrices_only, axis_name=axis_name, **kw)


def _msgd(learning_rate, axis_name, weight_decay=0.0, momentum=0.9, **kw):
  return _device_mean(axis_name, optax.chain(
      optax.add_decayed_weights(weight_decay, _matrices_only),
      optax.sgd(learning_rate, momentum=momentum, **kw)))


def _sgd(learning_rate, axis_name, weight_decay=0.0, **kw):
  return _msgd(learning_rate, axis_name, weight_decay, momentum=0.0, **kw)


def _lars(learning_rate, axis_name, weight_decay=0.0, momentum=0.9, **kw):
  # Trust ratio on every leaf (optax's default), as LAMB: excluding biases
  # leaves them at the raw, large LARS learning rate.
  return _device_mean(axis_name, optax.lars(
      learning_rate, weight_decay=weight_decay, momentum=momentum,
      weight_decay_mask=_matrices_only, **kw))


def _lamb(learning_rate, axis_name, weight_decay=0.0, **kw):
  return _device_mean(axis_name, optax.lamb(
      learning_rate, weight_decay=weight_decay, mask=_matrices_only, **kw))


def _adamw(learning_rate, axis_name, weight_decay=0.0, **kw):
  return _device_mean(axis_name, optax.adamw(
      learning_rate, weight_decay=weight_decay, mask=_matrices_only, **kw))


def _adagrad(learning_rate, axis_name, weight_decay=0.0, **kw):
  return _device_mean(axis_name, optax.chain(
      optax.add_decayed_weights(weight_decay, _matrices_only),
      optax.adagrad(learning_rate, **kw)))


def _adagrad_norm(learning_rate, axis_name, weight_decay=0.0, **kw):
  return _device_mean(axis_name, optax.chain(
      optax.add_decayed_weights(weight_decay, _matrices_only),
      adagrad_norm(learning_rate, **kw)))


def _adaptive(library_optimizer):
  """Registry entry for AdAdaGrad(-Norm): L2 weight decay in front of the
  library optimizer, so the test and AdaGrad see the same gradient."""

  def factory(learning_rate, axis_name, weight_decay=0.0, **kw):
    return optax.chain(
        optax.add_decayed_weights(weight_decay, _matrices_only),
        library_optimizer(learning_rate, axis_name=axis_name, **kw))

  return factory


def _adam(learning_rate, axis_name, weight_decay=0.0, **kw):
  # Coupled L2 (as TR-Adam), not AdamW's decoupled decay.
  return _device_mean(axis_name, optax.chain(
      optax.add_decayed_weights(weight_decay, _matrices_only),
      optax.adam(learning_rate, **kw)))


# TR in the harness: the factory gets the learning rate as a schedule (with a
# warmup it is 0 at step 0, where the authors' default lambda_0 = 0.1 * eta_0
# would switch the pull off), so the default here is a constant lambda = 0.1
# (the authors' value at the initial LR; the pull then follows the schedule).
# Pass couple_to_learning_rate=True with an absolute strength for lambda_0.
def _tr_sgd(learning_rate, axis_name, weight_decay=0.0, momentum=0.9,
            strength=0.1, couple_to_learning_rate=False, **kw):
  return _device_mean(axis_name, tr_sgd(
      learning_rate, strength=strength, momentum=momentum,
      weight_decay=weight_decay, weight_decay_mask=_matrices_only,
      couple_to_learning_rate=couple_to_learning_rate, **kw))


def _tr_adam(learning_rate, axis_name, weight_decay=0.0, strength=0.1,
             couple_to_learning_rate=False, **kw):
  return _device_mean(axis_name, tr_adam(
      learning_rate, strength=strength, weight_decay=weight_decay,
      weight_decay_mask=_matrices_only,
      couple_to_learning_rate=couple_to_learning_rate, **kw))


def _gmc(learning_rate, axis_name, weight_decay=0.0, momentum=0.9,
         density=0.01, **kw):
  return gmc(learning_rate, momentum=momentum, density=density,
             axis_name=axis_name, weight_decay=weight_decay,
             weight_decay_mask=_matrices_only, **kw)


def _dgc(learning_rate, axis_name, weight_decay=0.0, momentum=0.9,
         density=0.01, **kw):
  return dgc(learning_rate, momentum=momentum, density=density,
             axis_name=axis_name, weight_decay=weight_decay,
             weight_decay_mask=_matrices_only, **kw)


OptimizerFactory = Callable[..., optax.GradientTransformation]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    # adadagrad(_norm) need the loop's batch-size arguments (max_batch_size,
    # test, ...): use them with Config.adaptive_batch.
    "adadagrad": _adaptive(adadagrad),
    "adadagrad_norm": _adaptive(adadagrad_norm),
    "adagrad": _adagrad,
    "adagrad_norm": _adagrad_norm,
    "adam": _adam,   # coupled L2 weight decay
    "adamw": _adamw,
    "dgc": _dgc,     # Deep Gradient Compression (sparse exchange)
    "gmc": _gmc,     # global momentum compression (sparse exchange)
    "lamb": _lamb,
    "lars": _lars,
    "msgd": _msgd,   # heavy-ball momentum SGD
    "sgd": _sgd,
    "sngm": _sngm,
    "tr_adam": _tr_adam,   # trajectory-regularized (small batches)
    "tr_sgd": _tr_sgd,
}

# Optimizers whose state differs between devices (error-feedback memory):
# their state gets a leading device axis, sharded over the mesh
# (`per_device_state`), while the params stay replicated.
PER_DEVICE_STATE = frozenset({"dgc", "gmc"})


# The optimizers that include the batch-size test themselves.
ADAPTIVE_OPTIMIZERS = ("adadagrad", "adadagrad_norm")
ADAPTIVE_TESTS = ("norm", "inner_product", "orthogonality", "augmented",
                  "coordinate")


def make_adaptive_optimizer(
    name: str, learning_rate: optax.ScalarOrSchedule, *, test: str,
    max_batch_size: int, initial_batch_size: int, batch_size_multiple: int,
    microbatch_size: int | None, axis_name: str | None,
    weight_decay: float = 0.0, **kwargs) -> optax.GradientTransformation:
  """The optimizer `name` with the batch-size `test` in front of it.

  `adadagrad` / `adadagrad_norm` are the library's AdAdaGrad(-Norm); any
  other registered optimizer gets `adaptive_batch_size(...)` chained in
  front, which also averages the gradient over `axis_name` (so the
  optimizer itself is built without it). E.g. `sngm` with the norm test is
  the two seeds combined.
  """
  batch_kwargs = dict(
      test=test, max_batch_size=max_batch_size,
      initial_batch_size=initial_batch_size,
      batch_size_multiple=batch_size_multiple,
      microbatch_size=microbatch_size)
  if name in ADAPTIVE_OPTIMIZERS:
    return make_optimizer(name, learning_rate, axis_name, weight_decay,
                          **batch_kwargs, **kwargs)
  # The tests' constants go to the test, the rest to the optimizer.
  for constant in ("eta", "theta", "nu"):
    if constant in kwargs:
      batch_kwargs[constant] = kwargs.pop(constant)
  return optax.chain(
      adaptive_batch_size(axis_name=axis_name, **batch_kwargs),
      make_optimizer(name, learning_rate, None, weight_decay, **kwargs))


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule,
                   axis_name: str | None = None, weight_decay: float = 0.0,
                   **kwargs) -> optax.GradientTransformation:
  """Builds the optimizer registered under `name` (see `OPTIMIZERS`)."""
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; choose one of "
                     f"{', '.join(sorted(OPTIMIZERS))}")
  try:
    return OPTIMIZERS[name](learning_rate, axis_name,
                            weight_decay=weight_decay, **kwargs)
  except TypeError as error:  # an unknown keyword in optimizer_kwargs
    raise ValueError(f"optimizer {name!r}: {error}") from None


def _warmup_cosine(peak, total_steps, warmup_steps):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=0.0)


def _constant(peak, total_steps, warmup_steps):
  del total_steps, warmup_steps
  return optax.constant_schedule(peak)


SCHEDULES = {"constant": _constant, "warmup_cosine": _warmup_cosine}


# ----------------------------------------------------------------------------
# Update and evaluation steps.


class NonFiniteLossError(FloatingPointError):
  """Raised when the loss stays NaN/Inf for `max_nonfinite_steps` steps."""


def make_train_step(mesh: jax.sharding.Mesh, per_device: bool = False,
                    adaptive_statistics: str | None = None):
  """Returns `train_step(state, batch) -> (state, metrics)`, jit-compiled.

  `batch` holds `x`, `y` and `weight` of shape `[num_microbatches,
  microbatch, ...]`, sharded over `mesh` along the microbatch axis. The
  state's buffers are donated. With `per_device`, the optimizer state has a
  leading device axis sharded over the mesh (see `per_device_state`), and
  the metrics include `bytes_sent`, the mean over workers of the optimizer
  state's `bytes_sent`. With
  `adaptive_statistics` (`"per_device"` or `"microbatch"`) the optimizer
  holds a batch-size test: its update gets the step's batch size
  (`batch_size=`) or the moments of the microbatch gradients
  (`gradient_moments=`, one unit per device and nonempty microbatch), and the
  metrics hold `next_batch_size` and `noise_scale`.
  """
  num_devices = mesh.size

  def local_step(state, opt_state, batch):
    state = state.replace(opt_state=opt_state)
    total_weight = jax.lax.psum(jnp.sum(batch["weight"]), AXIS)

    def weighted_loss(params, microbatch):
      logits = state.apply_fn({"params": params}, microbatch["x"])
      losses = optax.softmax_cross_entropy_with_integer_labels(
          logits, microbatch["y"])
      correct = jnp.argmax(logits, -1) == microbatch["y"]
      weight = microbatch["weight"]
      return jnp.sum(weight * losses), jnp.sum(weight * correct)

    # A Python loop over the (static, bucketed) number of microbatches, i.e.
    # a fully unrolled scan: XLA:CPU runs this model several times slower
    # inside lax.scan.
    grad_sum = optax.tree.zeros_like(state.params)
    loss_sum = correct = jnp.zeros(())
    moments = None
    if adaptive_statistics == "microbatch":
      zeros = optax.tree.zeros_like(state.params, jnp.float32)
      moments = GradientMoments(jnp.zeros((), jnp.int32), zeros, zeros)
    for index in range(batch["x"].shape[0]):
      microbatch = jax.tree.map(lambda array: array[index], batch)
      (loss, right), grad = jax.value_and_grad(weighted_loss, has_aux=True)(
          state.params, microbatch)
      grad_sum = optax.tree.add(grad_sum, grad)
      loss_sum, correct = loss_sum + loss, correct + right
      if moments is not None:
        # This device's slice of the microbatch is one unit; a weight-0
        # (padding) microbatch adds nothing, not even to the count.
        unit_weight = jnp.sum(microbatch["weight"])
        unit = optax.tree.scale(1.0 / jnp.maximum(unit_weight, 1.0), grad)
        moments = GradientMoments(
            moments.count + (unit_weight > 0).astype(jnp.int32),
            optax.tree.add(moments.grad_sum, unit),
            optax.tree.add(moments.sq_grad_sum,
                           jax.tree.map(jnp.square, unit)))
    # This device's share of the global mean-loss gradient, scaled so that
    # the optimizer's mean over devices is the global-batch gradient.
    grads = optax.tree.scale(num_devices / total_weight, grad_sum)
    extra_args = {}
    if adaptive_statistics == "per_device":
      extra_args["batch_size"] = jnp.round(total_weight).astype(jnp.int32)
    elif moments is not None:
      extra_args["gradient_moments"] = moments
    updates, opt_state = state.tx.update(grads, state.opt_state,
                                         state.params, **extra_args)
    state = state.replace(step=state.step + 1, opt_state=opt_state,
                          params=optax.apply_updates(state.params, updates))
    metrics = {
        "loss": jax.lax.psum(loss_sum, AXIS) / total_weight,
        "accuracy": jax.lax.psum(correct, AXIS) / total_weight,
    }
    if adaptive_statistics is not None:
      metrics["next_batch_size"] = optax.tree.get(opt_state,
                                                  "next_batch_size")
      metrics["noise_scale"] = optax.tree.get(opt_state, "noise_scale")
    if per_device:
      metrics["bytes_sent"] = jax.lax.pmean(
          jnp.sum(optax.tree.get(state.opt_state, "bytes_sent")), AXIS)
    return state.replace(opt_state=None), state.opt_state, metrics

  # check_vma=False keeps the pmap semantics: the gradient of replicated
  # params is per device, and the optimizer does the averaging.
  opt_spec = P(AXIS) if per_device else P()
  sharded = jax.shard_map(
      local_step, mesh=mesh, in_specs=(P(), opt_spec, P(None, AXIS)),
      out_specs=(P(), opt_spec, P()), check_vma=False)

  def train_step(state, batch):
    # The optimizer state travels apart so that it can have its own spec.
    rest, opt_state, metrics = sharded(
        state.replace(opt_state=None), state.opt_state, batch)
    return rest.replace(opt_state=opt_state), metrics

  return jax.jit(train_step, donate_argnums=(0,))


def make_eval_step(mesh: jax.sharding.Mesh, apply_fn: Callable):
  """Returns `eval_step(params, x, y, weight) -> (loss_sum, correct_sum)`."""

  def local_eval(params, x, y, weight):
    logits = apply_fn({"params": params}, x)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = jnp.argmax(logits, -1) == y
    return (jax.lax.psum(jnp.sum(weight * losses), AXIS),
            jax.lax.psum(jnp.sum(weight * correct), AXIS))

  return jax.jit(jax.shard_map(
      local_eval, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
      out_specs=(P(), P()), check_vma=False))


def evaluate(eval_step, params, x, y, chunk: int) -> dict:
  """Mean loss and accuracy over `(x, y)`, in padded chunks of `chunk`."""
  loss_sum, correct = 0.0, 0.0
  for start in range(0, len(y), chunk):
    xs, ys = x[start:start + chunk], y[start:start + chunk]
    pad = chunk - len(ys)
    weight = np.ones(chunk, np.float32)
    if pad:  # keep one compiled shape: pad with zero-weight examples
      xs = np.concatenate([xs, np.zeros((pad,) + xs.shape[1:], xs.dtype)])
      ys = np.concatenate([ys, np.zeros(pad, ys.dtype)])
      weight[chunk - pad:] = 0.0
    batch_loss, batch_correct = eval_step(params, xs, ys, weight)
    loss_sum += float(batch_loss)
    correct += float(batch_correct)
  return {"loss": loss_sum / len(y), "accuracy": correct / len(y)}


@dataclasses.dataclass(frozen=True)
class Program:
  """The compiled pieces of a run, shared by runs that differ only in the
  peak learning rate, the seeds and the data values."""

  mesh: jax.sharding.Mesh
  apply_fn: Callable
  init_fn: Callable
  tx: optax.GradientTransformation
  train_step: Callable
  eval_step: Callable


@functools.lru_cache(maxsize=8)
def build_program(model: str, num_classes: int, optimizer: str,
                  optimizer_kwargs_json: str, weight_decay: float,
                  schedule: str, total_steps: int, warmup_steps: int,
                  devices: tuple, adaptive: tuple | None = None) -> Program:
  """Builds (and caches) model, optimizer and jitted steps for a run.

  The peak learning rate is a hyperparameter in the optimizer state
  (`optax.inject_hyperparams`, initialized to 1; set it with
  `optax.tree.set(opt_state, learning_rate=...)`), so a learning-rate grid
  compiles its steps once. `adaptive` is `(test, max_batch_size,
  initial_batch_size, microbatch, statistics)` for an adaptive batch size.
  """
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  network = models.make_model(model, num_classes)
  unit_schedule = SCHEDULES[schedule](1.0, total_steps, warmup_steps)
  kwargs = json.loads(optimizer_kwargs_json)

  statistics = None
  if adaptive is not None:
    test, max_batch, initial_batch, microbatch, statistics = adaptive

  def optimizer_with_peak(learning_rate):
    scheduled = lambda count: learning_rate * unit_schedule(count)
    if adaptive is None:
      return make_optimizer(optimizer, scheduled, axis_name=AXIS,
                            weight_decay=weight_decay, **kwargs)
    return make_adaptive_optimizer(
        optimizer, scheduled, test=test, max_batch_size=max_batch,
        initial_batch_size=initial_batch, batch_size_multiple=microbatch,
        # A unit of the moments is one device's slice of a microbatch.
        microbatch_size=microbatch // len(devices), axis_name=AXIS,
        weight_decay=weight_decay, **kwargs)

  tx = optax.inject_hyperparams(optimizer_with_peak)(learning_rate=1.0)
  per_device = optimizer in PER_DEVICE_STATE
  if per_device:
    tx = per_device_state(tx)
  apply_fn = network.apply
  return Program(mesh=mesh, apply_fn=apply_fn, init_fn=jax.jit(network.init),
                 tx=tx, train_step=make_train_step(mesh, per_device,
                                                   statistics),
                 eval_step=make_eval_step(mesh, apply_fn))


# ----------------------------------------------------------------------------
# The loop.


def load_dataset(config: Config) -> data_lib.Dataset:
  """The dataset named by `config`: its .npz, else generated MNIST-1D."""
  if config.data_path:
    return data_lib.load_npz(config.data_path)
  return data_lib.load_mnist1d(config.num_samples, config.data_seed,
                               config.cache_dir)


def _progress_bar(total: int, quiet: bool, description: str):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  interactive = sys.stdout.isatty() and sys.stderr.isatty()
  return tqdm(total=total, desc=description, unit="step", leave=False,
              disable=quiet or not interactive, dynamic_ncols=True)


def train_and_evaluate(
    config: Config,
    workdir: str | os.PathLike | None = None,
    *,
    dataset: data_lib.Dataset | None = None,
    quiet: bool = False,
    log_epochs: bool = True,
) -> dict:
  """Trains `config.model` with `config.optimizer` and evaluates each epoch.

  Args:
    config: the run's `Config`.
    workdir: if given, `metrics.json` is written there.
    dataset: a `Dataset` to use instead of the one `config` names.
    quiet: no progress bar and no per-epoch lines (the bar is also off when
      stdout or stderr is not a terminal).
    log_epochs: print one line per epoch (unless `quiet`).

  Returns:
    A JSON-serializable dict: `config`, `history` (one entry per epoch with
    `epoch`, `samples_seen`, `steps`, `train_loss`, `test_loss`,
    `test_accuracy`, `wall_time_s`, and `val_*` with a validation split),
    `final` (the last entry), `steps`, `samples_seen`, `wall_time_s`.

  Raises:
    ValueError: the config does not fit the data or the devices.
    NonFiniteLossError: the loss was NaN/Inf for `max_nonfinite_steps`
      consecutive steps.
  """
  start_time = time.perf_counter()

  # --- Input.
  if dataset is None:
    dataset = load_dataset(config)
  validation = None
  if config.val_fraction > 0:
    dataset, validation = dataset.split_validation(config.val_fraction,
                                                   seed=config.data_seed)
  num_train = dataset.num_train
  if config.batch_size > num_train:
    raise ValueError(f"batch_size={config.batch_size} is larger than the "
                     f"training set ({num_train} examples)")
  sampler = data_lib.EpochSampler(num_train, seed=config.seed)
  adaptive = config.adaptive_batch is not None
  if adaptive and config.max_batch_size > num_train:
    raise ValueError(f"max_batch_size={config.max_batch_size} is larger than "
                     f"the training set ({num_train} examples)")
  # The budget is in samples. An adaptive run's step count is not known in
  # advance: its learning-rate schedule counts steps at the initial batch.
  budget = math.ceil(config.epochs * num_train)
  steps_per_epoch = num_train / config.batch_size
  total_steps = math.ceil(config.epochs * steps_per_epoch)

  # --- Devices: a 1-D mesh; the batch is split along it.
  available = jax.local_devices()
  num_devices = config.num_devices or len(available)
  if num_devices > len(available):
    raise ValueError(f"num_devices={num_devices} but only {len(available)} "
                     "local devices exist")
  microbatch = config.batch_size // config.num_microbatches
  if microbatch % num_devices:
    raise ValueError(
        f"the microbatch of {microbatch} examples (batch_size / "
        f"num_microbatches) is not divisible by {num_devices} devices")
  eval_chunk = -(-config.eval_batch_size // num_devices) * num_devices
  adaptive_key = None
  if adaptive:
    statistics = config.adaptive_statistics
    if statistics == "auto":
      statistics = "per_device" if num_devices > 1 else "microbatch"
    if statistics == "per_device" and num_devices < 2:
      raise ValueError("adaptive_statistics='per_device' needs at least 2 "
                       "devices; use 'microbatch'")
    if statistics == "microbatch" and config.adaptive_batch not in (
        "norm", "coordinate"):
      raise ValueError(
          f"adaptive_batch={config.adaptive_batch!r} needs per-device "
          "statistics, i.e. at least 2 devices")
    if statistics == "microbatch" and num_devices * config.num_microbatches < 2:
      raise ValueError(
          "adaptive_statistics='microbatch' needs at least two units a step: "
          "set num_microbatches >= 2 (or use 2+ devices)")
    adaptive_key = (config.adaptive_batch, config.max_batch_size,
                    config.batch_size, microbatch, statistics)

  # --- Model, optimizer and compiled steps (cached across a grid of peak
  # learning rates: the peak is a value in the optimizer state).
  warmup_steps = min(round(config.warmup_epochs * steps_per_epoch),
                     total_steps - 1)
  program = build_program(
      config.model, dataset.num_classes, config.optimizer,
      json.dumps(config.optimizer_kwargs, sort_keys=True),
      config.weight_decay, config.schedule, total_steps, warmup_steps,
      tuple(available[:num_devices]), adaptive_key)
  params = program.init_fn(jax.random.key(config.seed),
                           dataset.x[:1])["params"]
  state = train_state.TrainState.create(apply_fn=program.apply_fn,
                                        params=params, tx=program.tx)
  per_device = config.optimizer in PER_DEVICE_STATE
  # A per-device state has a leading axis of 1 (per_device_state): set the
  # peak with that shape, then give every device its own copy.
  learning_rate = jnp.full((1,) if per_device else (), config.learning_rate,
                           jnp.float32)
  state = state.replace(opt_state=optax.tree.set(
      state.opt_state, learning_rate=learning_rate))
  replicated = NamedSharding(program.mesh, P())
  if per_device:
    opt_state = jax.device_put(
        jax.tree.map(lambda x: jnp.repeat(x, num_devices, axis=0),
                     state.opt_state),
        NamedSharding(program.mesh, P(AXIS)))
    state = jax.device_put(state.replace(opt_state=None), replicated)
    state = state.replace(opt_state=opt_state)
  else:
    state = jax.device_put(state, replicated)
    # Leaves that share a buffer (the batch-size test's batch_size and
    # next_batch_size start as one array) must not be donated twice.
    state = jax.tree.map(lambda leaf: leaf.copy(), state)

  # --- Update and evaluation steps.
  train_step, eval_step = program.train_step, program.eval_step
  batch_sharding = NamedSharding(program.mesh, P(None, AXIS))

  def next_batch(batch_size):
    indices = sampler.next_batch(batch_size)
    count = batch_size // microbatch
    # Bucket the number of microbatches to a power of two (weight-0 padding)
    # so a growing batch compiles the step once per bucket.
    slots = 1 << (count - 1).bit_length() if adaptive else count
    shape = (count, microbatch)
    x = dataset.x[indices].reshape(shape + dataset.x.shape[1:])
    y = dataset.y[indices].reshape(shape)
    weight = np.ones(shape, np.float32)
    if slots > count:
      pad = ((0, slots - count), (0, 0))
      x = np.pad(x, pad + ((0, 0),) * (x.ndim - 2))
      y, weight = np.pad(y, pad), np.pad(weight, pad)
    return jax.device_put({"x": x, "y": y, "weight": weight}, batch_sharding)

  def run_evaluation(record):
    splits = [("test", dataset.x_test, dataset.y_test)]
    if validation is not None:
      splits.append(("val", *validation))
    for name, x, y in splits:
      result = evaluate(eval_step, state.params, x, y, eval_chunk)
      record[f"{name}_loss"] = result["loss"]
      record[f"{name}_accuracy"] = result["accuracy"]

  # --- Training loop.
  history = []
  bytes_sent = None  # per worker, last step (sparse-exchange optimizers)
  epoch_losses = []
  nonfinite_in_a_row = 0
  name = config.optimizer + (f"+{config.adaptive_batch}" if adaptive else "")
  bar = _progress_bar(budget if adaptive else total_steps, quiet, name)
  if adaptive:
    bar.unit = "sample"
  batch_size = config.batch_size
  batch_sizes, noise_scales = [], []
  step = 0
  done = False
  while not done:
    step += 1
    used = batch_size
    if adaptive:  # the last batch stops at the budget (whole microbatches)
      remaining = budget - sampler.samples_seen
      used = min(batch_size, -(-remaining // microbatch) * microbatch)
    state, metrics = train_step(state, next_batch(used))
    # One transfer a step: the loss, and the next batch size (an int32).
    metrics = jax.device_get(metrics)
    loss = float(metrics["loss"])
    if adaptive:
      batch_sizes.append(used)
      noise_scales.append(float(metrics["noise_scale"]))
      batch_size = int(metrics["next_batch_size"])
    if "bytes_sent" in metrics:
      bytes_sent = float(metrics["bytes_sent"])
    if math.isfinite(loss):
      nonfinite_in_a_row = 0
      epoch_losses.append(loss)
    else:
      nonfinite_in_a_row += 1
      if nonfinite_in_a_row >= config.max_nonfinite_steps:
        bar.close()
        raise NonFiniteLossError(
            f"{config.optimizer} lr={config.learning_rate:g}: the loss was "
            f"non-finite for {nonfinite_in_a_row} consecutive steps (at step "
            f"{step}); lower the learning rate")
    elapsed = time.perf_counter() - start_time
    bar.update(used if adaptive else 1)
    bar.set_postfix(B=used, loss=f"{loss:.3f}",
                    acc=f"{float(metrics['accuracy']):.3f}",
                    samples_per_s=f"{sampler.samples_seen / elapsed:.0f}",
                    refresh=False)

    done = (sampler.samples_seen >= budget if adaptive
            else step == total_steps)
    epoch = sampler.samples_seen // num_train
    if epoch > len(history) or done:
      record = {
          "epoch": sampler.samples_seen / num_train,
          "samples_seen": sampler.samples_seen,
          "steps": step,
          "batch_size": used,
          "train_loss": float(np.mean(epoch_losses)) if epoch_losses
                        else float("nan"),
      }
      if adaptive:
        record["next_batch_size"] = batch_size
        record["noise_scale"] = noise_scales[-1]
      run_evaluation(record)
      record["wall_time_s"] = time.perf_counter() - start_time
      history.append(record)
      epoch_losses = []
      if log_epochs and not quiet:
        line = (f"{name} B={used} "
                f"lr={config.learning_rate:g} epoch {record['epoch']:.2f}: "
                f"train loss {record['train_loss']:.4f}, test acc "
                f"{record['test_accuracy']:.4f}")
        if bar.disable:
          print(line, flush=True)
        else:
          bar.write(line)
  bar.close()

  # --- Metrics.
  result = {
      "config": dataclasses.asdict(config),
      "num_devices": num_devices,
      "num_train": num_train,
      "num_test": dataset.num_test,
      "num_val": 0 if validation is None else len(validation[1]),
      "steps": step,
      "samples_seen": sampler.samples_seen,
      "wall_time_s": time.perf_counter() - start_time,
      "history": history,
      "final": history[-1],
  }
  if adaptive:
    # Per step: the batch size it used and the noise scale after it.
    result["batch_sizes"] = batch_sizes
    result["noise_scales"] = noise_scales
    result["adaptive_statistics"] = adaptive_key[-1]
    result["train_step_compilations"] = train_step._cache_size()  # pylint: disable=protected-access
  if bytes_sent is not None:
    result["bytes_sent_per_step"] = bytes_sent
  if workdir is not None:
    write_json(pathlib.Path(workdir) / "metrics.json", result)
  return result


def write_json(path: pathlib.Path, payload: Any) -> None:
  """Writes `payload` as indented JSON, creating parent directories."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
