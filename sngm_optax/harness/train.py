"""The training loop shared by the CLI, the notebooks and the benchmarks.

`train_and_evaluate(config)` reads top to bottom in labelled sections, as
big_vision's `train.py` does: data, devices and batch schedule, model and
optimizer, train step, checkpoint restore, the loop (evaluation and
checkpoints inside it), metrics. Optimizers are built by name from
`optimizers.OPTIMIZERS`, so a new optimizer is one registry line and no
change to the loop; the steps themselves are in `steps`.

Adaptive batch sizes (`Config.adaptive_batch`, AdAdaGrad): a batch-size test
(`sngm_optax.adaptive_batch_size`) sits in front of the optimizer, and each
step draws the test's `next_batch_size` examples from the `EpochSampler`
(`batching.GrowingBatch`; a fixed batch is `batching.FixedBatch`, a ramp
`batching.RampBatch`). The microbatch size is fixed for the run
(`batch_size / num_microbatches`), the batch is a whole number of
microbatches, and they are fed one at a time to a jitted accumulation
(`sngm_optax.gradient_accumulator` in `steps.AccumulatingTrainStep`), so a
growing batch compiles its step once. The test's statistics are the
devices' own gradients (`"per_device"`: only scalars are all-reduced) or the
moments of the microbatch gradients (`"microbatch"`, norm and coordinate
tests).

A model with BatchNorm (the `resnet`) trains with a
`steps.BatchNormTrainState`: its running averages are updated by the train
step, averaged over the devices, evaluated with and checkpointed (see
`steps` for what BatchNorm sees with devices and microbatches).

What is compiled is keyed by a hashable `ProgramSpec` (model, optimizer,
schedule, budget, devices, batch settings): `build_program(spec)` caches it.
The peak learning rate and the weight decay are values in the optimizer
state, so a grid over them reuses one compiled step. The result reports the
seconds JAX spent compiling (`compile_time_s`, from `jax.monitoring`'s
compile events) apart from the rest (`run_time_s`).

Example:
  >>> from sngm_optax.harness import config as config_lib
  >>> from sngm_optax.harness import data, train
  >>> config = config_lib.Config(optimizer='sngm', learning_rate=0.2,
  ...                            epochs=3, batch_size=100, model='mlp',
  ...                            num_devices=1)
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

import sngm_optax
from sngm_optax.harness import batching
from sngm_optax.harness import checkpoint as checkpoint_lib
from sngm_optax.harness import data as data_lib
from sngm_optax.harness import models
from sngm_optax.harness import preemption
from sngm_optax.harness.config import AdaptiveBatch
from sngm_optax.harness.config import Config
from sngm_optax.harness.optimizers import EPOCH_AWARE
from sngm_optax.harness.optimizers import PER_DEVICE_STATE
from sngm_optax.harness.optimizers import PeakTimesSchedule
from sngm_optax.harness.optimizers import SCHEDULES
from sngm_optax.harness.optimizers import TRACEABLE_SCHEDULES
from sngm_optax.harness.optimizers import make_adaptive_optimizer
from sngm_optax.harness.optimizers import make_optimizer
from sngm_optax.harness.steps import AXIS
from sngm_optax.harness.steps import AccumulatingTrainStep
from sngm_optax.harness.steps import BatchNormTrainState
from sngm_optax.harness.steps import NonFiniteLossError
from sngm_optax.harness.steps import batch_stats_of
from sngm_optax.harness.steps import evaluate
from sngm_optax.harness.steps import make_eval_step
from sngm_optax.harness.steps import make_train_step


# JAX's compile phases (tracing to a jaxpr, lowering to MLIR, the backend's
# compilation), as named in jax/_src/dispatch.py. Tracing is timed only at
# the top level, so the phases do not nest and their durations add up.
COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})


class _CompileClock:
  """Seconds spent in `COMPILE_EVENTS` since import (all threads)."""

  def __init__(self):
    self.seconds = 0.0

  def __call__(self, event: str, duration_secs: float, **kwargs) -> None:
    del kwargs  # fun_name etc.
    if event in COMPILE_EVENTS:
      self.seconds += duration_secs


# One listener for the process, registered at import: listeners cannot be
# registered per run without piling up.
compile_clock = _CompileClock()
jax.monitoring.register_event_duration_secs_listener(compile_clock)


def frozen_items(mapping: dict) -> tuple:
  """`mapping` as a hashable tuple of `(key, value)` pairs sorted by key.

  Lists become tuples and nested dicts frozen items too, so that a spec
  holding keyword arguments can key a cache; `dict(frozen_items(d))` gives
  the top level back.

  Example:
    >>> frozen_items({"momentum": 0.9, "hidden_sizes": [64, 64]})
    (('hidden_sizes', (64, 64)), ('momentum', 0.9))
  """
  return tuple(sorted((key, _frozen(value)) for key, value in mapping.items()))


def _frozen(value: Any) -> Any:
  if isinstance(value, dict):
    return frozen_items(value)
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(item) for item in value)
  return value


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
  """What a compiled `Program` depends on: hashable, the key of
  `build_program`'s cache.

  The peak learning rate and the weight decay are not in it: they are
  values in the optimizer state (see `build_program`), so a grid over them
  compiles once.

  Attributes:
    model: a name in `models.MODELS`.
    model_kwargs: the model constructor's keyword arguments (`frozen_items`).
    num_classes: output logits.
    optimizer: a name in `optimizers.OPTIMIZERS`.
    optimizer_kwargs: the factory's keyword arguments (`frozen_items`).
    schedule: a name in `optimizers.SCHEDULES`.
    total_samples: the schedule's budget, in samples.
    warmup_samples: its warmup, in samples.
    devices: the mesh's devices, in order.
    adaptive: `Config.adaptive_settings` (or the same fields as a tuple):
      a batch-size test in front of the optimizer; None for none.
    growing_microbatch: the microbatch size of a batch that grows, fed one
      microbatch at a time (`steps.AccumulatingTrainStep`); None for a fixed
      batch, fed in one fused step.
    trials: the steps train trials side by side, a state with a leading
      trial axis mapped by `jax.vmap` (`"vmap"`) or an unrolled loop
      (`"unroll"`; see `steps.map_over_trials` and `trials`); None: one run.
    traced_schedule: the schedule's lengths are hyperparameters in the
      optimizer state too (`total_samples`, `warmup_samples`: trials of
      different decay lengths share the program; the spec's own are 0); a
      schedule of `optimizers.TRACEABLE_SCHEDULES` only.
    noise_scale_batch_size: with `Config.monitor_noise_scale`, the batch
      each device contributes to one update (`batch_size / len(devices)`),
      the small batch of `sngm_optax.noise_scale_monitor`, which then takes
      the device mean's place; None: no monitor.
  """

  model: str
  num_classes: int
  optimizer: str
  schedule: str
  total_samples: int
  warmup_samples: int
  devices: tuple
  model_kwargs: tuple = ()
  optimizer_kwargs: tuple = ()
  adaptive: AdaptiveBatch | None = None
  growing_microbatch: int | None = None
  trials: str | None = None
  traced_schedule: bool = False
  noise_scale_batch_size: int | None = None

  @classmethod
  def from_config(cls, config: Config, num_train: int, devices,
                  num_classes: int = data_lib.NUM_CLASSES) -> "ProgramSpec":
    """The spec of `config`'s run on `num_train` examples over `devices`."""
    budget, _, warmup_samples = _step_budget(config, num_train)
    return cls(
        model=config.model, num_classes=num_classes,
        optimizer=config.optimizer, schedule=config.schedule,
        total_samples=budget, warmup_samples=warmup_samples,
        devices=tuple(devices),
        model_kwargs=frozen_items(config.model_kwargs),
        optimizer_kwargs=frozen_items(_optimizer_kwargs(config, num_train)),
        adaptive=config.adaptive_settings(len(devices)),
        growing_microbatch=(None if config.fixed_batch
                            else config.microbatch_size),
        noise_scale_batch_size=(config.batch_size // len(devices)
                                if config.monitor_noise_scale else None))


@dataclasses.dataclass(frozen=True)
class Program:
  """The compiled pieces of a run, shared by runs that differ only in the
  peak learning rate, the weight decay, the seeds and the data values."""

  mesh: jax.sharding.Mesh
  apply_fn: Callable
  init_fn: Callable
  tx: optax.GradientTransformation
  train_step: Callable
  eval_step: Callable
  # The learning-rate schedule at peak 1, a function of samples seen (None
  # when its lengths are traced: `ProgramSpec.traced_schedule`).
  unit_schedule: Callable | None
  # K fixed-batch steps per dispatch (`lax.scan`); None for adaptive runs.
  scan_steps: Callable | None = None


# The optimizer-state hyperparameters `initial_state` sets from the config.
TRACED_HYPERPARAMS = ("learning_rate", "weight_decay")


@functools.lru_cache(maxsize=8)
def build_program(spec: ProgramSpec) -> Program:
  """Builds (and caches) model, optimizer and jitted steps for a run.

  The peak learning rate and the weight decay are hyperparameters in the
  optimizer state (`optax.inject_hyperparams`, initialized to 1 and 0; set
  them with `optax.tree.set(opt_state, learning_rate=..., weight_decay=...)`,
  as `initial_state` does), so a grid over them compiles its steps once. The
  schedule counts samples, not steps: its `total_samples` and
  `warmup_samples` are in samples, and it is evaluated at the hyperparameter
  `samples_seen` (the samples before the step), which the train step
  advances by each step's batch. With `spec.traced_schedule`, the lengths
  are the hyperparameters `total_samples` and `warmup_samples` too.

  With `spec.noise_scale_batch_size`, the optimizer is
  `optax.chain(sngm_optax.noise_scale_monitor(noise_scale_batch_size,
  axis_name=AXIS), <the registry optimizer without axis_name>)`: the monitor
  returns the device mean, so every registry optimizer (but those of
  `PER_DEVICE_STATE`) computes what it would on its own (SNGM's global norm
  is that of the mean, the same on every device), and the state's
  `noise_scale` is B_simple (the step's metrics report it).
  """
  devices = spec.devices
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  network = models.make_model(spec.model, spec.num_classes,
                              **dict(spec.model_kwargs))
  lengths = {}
  if spec.traced_schedule:
    if spec.schedule not in TRACEABLE_SCHEDULES:
      raise ValueError(f"schedule {spec.schedule!r} cannot take traced "
                       f"lengths; use one of {sorted(TRACEABLE_SCHEDULES)}")
    unit_schedule = None
    lengths = {"total_samples": 1.0, "warmup_samples": 0.0}
  else:
    unit_schedule = SCHEDULES[spec.schedule](1.0, spec.total_samples,
                                             spec.warmup_samples)
  optimizer, kwargs, adaptive = (spec.optimizer, dict(spec.optimizer_kwargs),
                                 spec.adaptive)
  monitor_batch = spec.noise_scale_batch_size

  statistics = None
  if adaptive is not None:
    test, max_batch, initial_batch, microbatch, statistics = adaptive

  def optimizer_with_peak(learning_rate, weight_decay, samples_seen,
                          total_samples=None, warmup_samples=None):
    # The schedule's value at the samples seen; it keeps its peak, from
    # which TR takes lambda_0 = 0.1 * peak.
    unit = unit_schedule or SCHEDULES[spec.schedule](1.0, total_samples,
                                                     warmup_samples)
    scheduled = PeakTimesSchedule(learning_rate,
                                  lambda count: unit(samples_seen))
    if adaptive is not None:
      return make_adaptive_optimizer(
          optimizer, scheduled, test=test, max_batch_size=max_batch,
          initial_batch_size=initial_batch, batch_size_multiple=microbatch,
          # A unit of the moments is one device's slice of a microbatch.
          microbatch_size=microbatch // len(devices), axis_name=AXIS,
          weight_decay=weight_decay, **kwargs)
    if monitor_batch is None:
      return make_optimizer(optimizer, scheduled, axis_name=AXIS,
                            weight_decay=weight_decay, **kwargs)
    # The monitor averages over the devices in the optimizer's place.
    return optax.chain(
        sngm_optax.noise_scale_monitor(monitor_batch, axis_name=AXIS),
        make_optimizer(optimizer, scheduled, axis_name=None,
                       weight_decay=weight_decay, **kwargs))

  tx = optax.inject_hyperparams(optimizer_with_peak)(
      learning_rate=1.0, weight_decay=0.0,
      samples_seen=jnp.zeros((), jnp.int32), **lengths)
  per_device = optimizer in PER_DEVICE_STATE
  if per_device:
    tx = sngm_optax.per_device_state(tx)
  apply_fn = network.apply
  growing_microbatch = spec.growing_microbatch
  if growing_microbatch is None:
    train_step = make_train_step(mesh, per_device, statistics,
                                 trials=spec.trials)
  else:
    train_step = AccumulatingTrainStep(mesh, growing_microbatch, per_device,
                                       statistics)
  return Program(mesh=mesh, apply_fn=apply_fn, init_fn=jax.jit(network.init),
                 tx=tx, train_step=train_step,
                 eval_step=make_eval_step(mesh, apply_fn, spec.trials),
                 unit_schedule=unit_schedule,
                 scan_steps=None if growing_microbatch or adaptive
                 else make_train_step(mesh, per_device, scan=True,
                                      trials=spec.trials))


# ----------------------------------------------------------------------------
# The loop's helpers.


def load_dataset(config: Config) -> data_lib.Dataset:
  """The dataset named by `config`: its .npz, else generated MNIST-1D."""
  if config.data_path:
    return data_lib.load_npz(config.data_path)
  return data_lib.load_mnist1d(config.num_samples, config.data_seed,
                               config.cache_dir)


def evaluation_splits(config: Config, dataset: data_lib.Dataset) -> tuple[
    data_lib.Dataset, list, tuple | None]:
  """`(training set, splits, validation)`: the training set less `config`'s
  validation split, the `(name, x, y)` splits evaluated (test, then val) and
  the validation `(x, y)` (None without one)."""
  splits, validation = [("test", dataset.x_test, dataset.y_test)], None
  if config.val_fraction > 0:
    dataset, validation = dataset.split_validation(config.val_fraction,
                                                   seed=config.data_seed)
    splits.append(("val", *validation))
  return dataset, splits, validation


def _step_budget(config: Config, num_train: int) -> tuple[int, int, int]:
  """The budget and the warmup in samples, and a fixed batch's step count.

  The learning-rate schedule counts samples (an adaptive run's step count
  is not known in advance), so it ends where the budget ends at any batch
  size.
  """
  budget = math.ceil(config.epochs * num_train)
  total_steps = math.ceil(config.epochs * num_train / config.batch_size)
  warmup_samples = min(round(config.warmup_epochs * num_train), budget - 1)
  return budget, total_steps, warmup_samples


def _check_fits_data(config: Config, num_train: int) -> None:
  """Raises ValueError for a batch larger than the training set."""
  if config.batch_size > num_train:
    raise ValueError(f"batch_size={config.batch_size} is larger than the "
                     f"training set ({num_train} examples)")
  if config.max_batch_size is not None and config.max_batch_size > num_train:
    raise ValueError(f"max_batch_size={config.max_batch_size} is larger than "
                     f"the training set ({num_train} examples)")


def _mesh_devices(config: Config) -> list:
  """The first `config.num_devices` local devices (0: all of them).

  Raises:
    ValueError: there are fewer local devices, the microbatch does not
      split evenly over them, or `monitor_noise_scale` has only one.
  """
  available = jax.local_devices()
  num_devices = config.num_devices or len(available)
  if num_devices > len(available):
    raise ValueError(f"num_devices={num_devices} but only {len(available)} "
                     "local devices exist")
  if config.microbatch_size % num_devices:
    raise ValueError(
        f"the microbatch of {config.microbatch_size} examples (batch_size / "
        f"num_microbatches) is not divisible by {num_devices} devices")
  if config.monitor_noise_scale and num_devices < 2:
    raise ValueError(
        f"monitor_noise_scale needs at least 2 devices, got {num_devices}: "
        "on one, the per-device batch (B_small) is the global one (B_big) "
        "and the two-batch estimate is undefined; on CPU, simulate devices "
        "with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return available[:num_devices]


def initial_state(program: Program, config: Config,
                  sample_input: np.ndarray) -> train_state.TrainState:
  """A new `TrainState` with the peak learning rate and the weight decay of
  `config` set in the optimizer state, placed on the mesh; a
  `steps.BatchNormTrainState` for a model with BatchNorm."""
  variables = program.init_fn(jax.random.key(config.seed), sample_input)
  if "batch_stats" in variables:
    state = BatchNormTrainState.create(
        apply_fn=program.apply_fn, params=variables["params"],
        tx=program.tx, batch_stats=variables["batch_stats"])
  else:
    state = train_state.TrainState.create(
        apply_fn=program.apply_fn, params=variables["params"], tx=program.tx)
  per_device = config.optimizer in PER_DEVICE_STATE
  # A per-device state has a leading axis of 1 (per_device_state): set the
  # values with that shape; _place_state gives every device its own copy.
  shape = (1,) if per_device else ()
  values = {name: jnp.full(shape, getattr(config, name), jnp.float32)
            for name in TRACED_HYPERPARAMS}
  state = state.replace(opt_state=optax.tree.set(state.opt_state, **values))
  return _place_state(state, program.mesh, per_device)


def _place_state(state: train_state.TrainState, mesh: jax.sharding.Mesh,
                 per_device: bool) -> train_state.TrainState:
  """Replicates `state` over `mesh`; a per-device optimizer state is instead
  repeated along its leading axis, one slice per device."""
  replicated = NamedSharding(mesh, P())
  if per_device:
    opt_state = jax.device_put(
        jax.tree.map(lambda x: jnp.repeat(x, mesh.size, axis=0),
                     state.opt_state),
        NamedSharding(mesh, P(AXIS)))
    state = jax.device_put(state.replace(opt_state=None), replicated)
    return state.replace(opt_state=opt_state)
  state = jax.device_put(state, replicated)
  # Leaves that share a buffer (the batch-size test's batch_size and
  # next_batch_size start as one array) must not be donated twice.
  return jax.tree.map(lambda leaf: leaf.copy(), state)


def _make_batch(dataset: data_lib.Dataset, indices: np.ndarray,
                microbatch_size: int, num_slots: int,
                sharding: NamedSharding | None) -> dict:
  """The examples at `indices` as `[num_slots, microbatch_size, ...]` arrays
  with a weight per example; slots past the examples are weight-0 padding.
  Placed with `sharding`, or host arrays if it is None."""
  count = len(indices) // microbatch_size
  shape = (count, microbatch_size)
  x = _rows(dataset.x, indices).reshape(shape + dataset.x.shape[1:])
  y = _rows(dataset.y, indices).reshape(shape)
  weight = np.ones(shape, np.float32)
  if num_slots > count:
    pad = ((0, num_slots - count), (0, 0))
    x = np.pad(x, pad + ((0, 0),) * (x.ndim - 2))
    y, weight = np.pad(y, pad), np.pad(weight, pad)
  batch = {"x": x, "y": y, "weight": weight}
  return batch if sharding is None else jax.device_put(batch, sharding)


# A fixed-batch run brings its metrics to the host once every this many
# steps (and at every epoch end, due checkpoint and stop), not every step:
# a host sync a step costs more than a tiny batch's step.
STEPS_PER_SYNC = 32
# Up to this batch size, K steps per dispatch (lax.scan) measured faster than
# one dispatch a step on CPU (at B = 8 a tie); at B = 16 and above, slower
# (benchmarks/README.md, harness_throughput).
SCAN_MAX_BATCH_SIZE = 8


def steps_per_dispatch(config: Config, platform: str) -> int:
  """`config.steps_per_dispatch`, or when 0 the measured choice: a scan of
  `STEPS_PER_SYNC` steps for batches up to `SCAN_MAX_BATCH_SIZE` on CPU,
  else one dispatch a step (adaptive runs always dispatch each step)."""
  if not config.fixed_batch:
    return 1
  if config.steps_per_dispatch:
    return config.steps_per_dispatch
  small = config.batch_size <= SCAN_MAX_BATCH_SIZE
  return STEPS_PER_SYNC if small and platform == "cpu" else 1


def _optimizer_kwargs(config: Config, num_train: int) -> dict:
  """`config.optimizer_kwargs`, plus `steps_per_epoch` for the optimizers
  that restart something each epoch (TR's inner window) in a fixed-batch
  run: `round(num_train / batch_size)`, exact when the batch divides the
  training set."""
  kwargs = dict(config.optimizer_kwargs)
  if config.optimizer in EPOCH_AWARE and config.fixed_batch:
    kwargs.setdefault("steps_per_epoch",
                      max(1, round(num_train / config.batch_size)))
  return kwargs


def _evaluation_index(config: Config, samples_seen: int,
                      num_train: int) -> int:
  """How many of the run's evaluation points (`config.evals_per_epoch` an
  epoch, at equal numbers of samples) `samples_seen` samples have passed."""
  return samples_seen * config.evals_per_epoch // num_train


def _steps_until_host(config: Config, step: int, total_steps: int,
                      samples_seen: int, num_train: int,
                      scan_steps: int) -> int:
  """Steps to run before the loop needs the host again: at most one scan
  (`scan_steps`) or else `STEPS_PER_SYNC`, ending at the next evaluation
  (an epoch's end, or `config.evals_per_epoch` an epoch), due checkpoint or
  stop; 1 in an adaptive run, whose next batch size depends on this step's
  metrics."""
  if not config.fixed_batch:
    return 1
  batch_size = config.batch_size
  limit = scan_steps if scan_steps > 1 else STEPS_PER_SYNC
  next_evaluation = -(-(_evaluation_index(config, samples_seen, num_train)
                        + 1) * num_train // config.evals_per_epoch)
  to_evaluation = -(-(next_evaluation - samples_seen) // batch_size)
  counts = [limit, total_steps - step, to_evaluation]
  every = config.checkpoint_every_steps
  if every:
    counts.append(every - step % every)
  if config.max_steps > step:
    counts.append(config.max_steps - step)
  return max(1, min(counts))


def _rows(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """`array[indices]`; `np.take` gathers rows ~5x faster than fancy indexing
  (14 -> 2.6 ms for 131k rows of 40 float32), which is host time the device
  waits for at large batches."""
  return np.take(array, indices, axis=0)


@jax.jit
def _stack(trees: list[dict]) -> dict:
  """The steps' metrics stacked along a new leading axis, on the device."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@jax.jit
def _unstack(batches: dict) -> list[dict]:
  """The per-step batches of a stacked chunk, sliced in one dispatch (each
  slice taken outside `jit` would be a dispatch of its own, per array)."""
  return [jax.tree.map(lambda array, index=index: array[index], batches)
          for index in range(batches["y"].shape[0])]


def _run_steps(program: Program, state, dataset: data_lib.Dataset,
               indices: np.ndarray, num_steps: int, microbatch_size: int,
               num_slots: int, scan_steps: int, sharding: NamedSharding,
               *step_args) -> tuple[Any, list[dict]]:
  """Runs `num_steps` steps on consecutive equal slices of `indices`, each
  fed in `num_slots` microbatches (one step's may be padded with weight-0
  ones; several steps' must fill them). Each step also gets `step_args`
  (vmapped trials' `active`).

  Several steps go to the device as one stacked chunk and run as one scan
  when `num_steps == scan_steps > 1`, else one dispatch a step on slices of
  it; either way the host does one transfer each way per chunk. Returns the
  state and each step's metrics on the host.
  """
  if num_steps == 1:  # e.g. an adaptive run's step, maybe padded
    state, metrics = program.train_step(state, _make_batch(
        dataset, indices, microbatch_size, num_slots, sharding), *step_args)
    return state, [jax.device_get(metrics)]
  shape = (num_steps, num_slots, microbatch_size)
  x = _rows(dataset.x, indices)
  chunk = jax.device_put(
      {"x": x.reshape(shape + x.shape[1:]),
       "y": _rows(dataset.y, indices).reshape(shape),
       "weight": np.ones(shape, np.float32)},
      NamedSharding(program.mesh, P(None, None, AXIS)))
  if num_steps == scan_steps > 1:
    state, metrics = program.scan_steps(state, chunk, *step_args)
  else:
    outputs = []
    for batch in _unstack(chunk):
      state, metrics = program.train_step(state, batch, *step_args)
      outputs.append(metrics)
    metrics = _stack(outputs)
  metrics = jax.device_get(metrics)  # a few arrays, not one per step
  return state, [{name: value[index] for name, value in metrics.items()}
                 for index in range(num_steps)]


def _observe_steps(config: Config, schedule: batching.BatchSchedule,
                   batch_size: int, step_metrics: list[dict], step: int,
                   nonfinite_in_a_row: int, epoch_losses: list[float],
                   bar) -> int:
  """Takes the metrics of steps `step + 1, step + 2, ...`: the schedule sees
  each, the finite losses join `epoch_losses`. Returns the number of
  non-finite losses in a row at the end.

  Raises:
    NonFiniteLossError: `config.max_nonfinite_steps` of them in a row.
  """
  for number, metrics in enumerate(step_metrics, start=step + 1):
    loss = float(metrics["loss"])
    schedule.observe(batch_size, metrics)
    nonfinite_in_a_row = 0 if math.isfinite(loss) else nonfinite_in_a_row + 1
    if not nonfinite_in_a_row:
      epoch_losses.append(loss)
    elif nonfinite_in_a_row >= config.max_nonfinite_steps:
      bar.close()
      raise _non_finite_error(config, nonfinite_in_a_row, number)
  return nonfinite_in_a_row


def _non_finite_error(config: Config, count: int,
                      step: int) -> NonFiniteLossError:
  return NonFiniteLossError(
      f"{config.optimizer} lr={config.learning_rate:g}: the loss was "
      f"non-finite for {count} consecutive steps (at step {step}); lower the "
      "learning rate")


def _record_epoch(samples_seen: int, num_train: int, step: int,
                  batch_size: int, losses: list[float],
                  schedule: batching.BatchSchedule,
                  learning_rate: float) -> dict:
  """An epoch's history record, but for evaluation and wall time."""
  return {
      "epoch": samples_seen / num_train,
      "samples_seen": samples_seen,
      "steps": step,
      "batch_size": batch_size,
      "learning_rate": learning_rate,
      "train_loss": float(np.mean(losses)) if losses else float("nan"),
      **schedule.record_fields(),
  }


def _evaluate_splits(eval_step: Callable, state, splits: list,
                     chunk: int) -> dict:
  """`{name}_loss` and `{name}_accuracy` for each `(name, x, y)` split, with
  the state's params (and BatchNorm running averages)."""
  record = {}
  for name, x, y in splits:
    result = evaluate(eval_step, state.params, x, y, chunk,
                      batch_stats_of(state))
    record[f"{name}_loss"] = result["loss"]
    record[f"{name}_accuracy"] = result["accuracy"]
  return record


def _open_checkpoints(config: Config) -> checkpoint_lib.LoopCheckpoints:
  """The loop's checkpoints (none saved when `config` names no directory)."""
  return checkpoint_lib.LoopCheckpoints(
      config.checkpoint_dir or None,
      every_steps=config.checkpoint_every_steps,
      at_epoch_end=config.checkpoint_at_epoch_end,
      keep=config.keep_checkpoints, config=dataclasses.asdict(config))


def _progress_bar(schedule: batching.BatchSchedule, steps: int, samples: int,
                  quiet: bool, description: str):
  """A bar in the schedule's units (steps or samples), started at `steps`
  steps and `samples` samples."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  interactive = sys.stdout.isatty() and sys.stderr.isatty()
  bar = tqdm(total=schedule.progress_total, desc=description,
             unit=schedule.progress_unit, leave=False,
             disable=quiet or not interactive, dynamic_ncols=True)
  bar.update(schedule.progress(steps, samples))
  return bar


def _show_step(bar, batch_size: int, metrics: dict,
               samples_per_s: float) -> None:
  bar.set_postfix(B=batch_size, loss=f"{float(metrics['loss']):.3f}",
                  acc=f"{float(metrics['accuracy']):.3f}",
                  samples_per_s=f"{samples_per_s:.0f}", refresh=False)


def _epoch_line(name: str, learning_rate: float, record: dict) -> str:
  return (f"{name} B={record['batch_size']} lr={learning_rate:g} epoch "
          f"{record['epoch']:.2f}: train loss {record['train_loss']:.4f}, "
          f"test acc {record['test_accuracy']:.4f}")


def _write_line(bar, line: str) -> None:
  """Prints `line` above the progress bar, or plainly when the bar is off."""
  if bar.disable:
    print(line, flush=True)
  else:
    bar.write(line)


# ----------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: Config, workdir: str | os.PathLike | None = None,
                       *, dataset: data_lib.Dataset | None = None,
                       quiet: bool = False, log_epochs: bool = True,
                       resume: bool = False) -> dict:
  """Trains `config.model` with `config.optimizer` and evaluates each epoch.

  Args:
    config: the run's `Config`.
    workdir: if given, `metrics.json` is written there.
    dataset: a `Dataset` to use instead of the one `config` names.
    quiet: no progress bar and no per-epoch lines (the bar is also off when
      stdout or stderr is not a terminal).
    log_epochs: print one line per epoch (unless `quiet`).
    resume: continue from the newest good checkpoint in
      `config.checkpoint_dir` (bit-identical to an uninterrupted run).

  Returns:
    A JSON-serializable dict: `config`, `history` (one entry per epoch,
    or `evals_per_epoch` an epoch, with `epoch`, `samples_seen`, `steps`,
    `batch_size`, `learning_rate` (the schedule's value at
    `samples_seen`), `train_loss`, `test_loss`,
    `test_accuracy`, `wall_time_s`, `val_*` with a validation split and
    `noise_scale` with `Config.monitor_noise_scale`),
    `final` (the last entry, None if stopped before the first epoch
    ended), `steps`, `samples_seen`, `wall_time_s`, `compile_time_s` (the
    part of it JAX spent tracing, lowering and compiling: 0 when every
    step was compiled by an earlier run), `run_time_s` (`wall_time_s -
    compile_time_s`), `interrupted` (stopped by `max_steps` or
    `preemption.StopOnSignal` before the end).

  Raises:
    ValueError: the config does not fit the data or the devices.
    NonFiniteLossError: the loss was NaN/Inf for `max_nonfinite_steps`
      consecutive steps.
    sngm_optax.harness.checkpoint.CheckpointError: `resume` found no checkpoint
      that restores, or one written with a different configuration.
  """
  start_time = time.perf_counter()
  compile_seconds_before = compile_clock.seconds

  # --- Data.
  dataset, splits, validation = evaluation_splits(
      config, load_dataset(config) if dataset is None else dataset)
  num_train = dataset.num_train
  _check_fits_data(config, num_train)
  sampler = data_lib.EpochSampler(num_train, seed=config.seed)
  budget, total_steps, _ = _step_budget(config, num_train)

  # --- Devices (a 1-D mesh; the batch is split along it); batch schedule.
  devices = _mesh_devices(config)
  adaptive = config.adaptive_settings(len(devices))
  schedule = batching.make_batch_schedule(
      adaptive, config.batch_size, config.microbatch_size, total_steps, budget,
      config.batch_ramp, config.max_batch_size)

  # --- Model and optimizer, with compiled steps cached across a grid of
  # peak learning rates and weight decays (values in the optimizer state).
  program = build_program(ProgramSpec.from_config(
      config, num_train, devices, dataset.num_classes))
  state = initial_state(program, config, dataset.x[:1])

  # --- Train step and evaluation.
  batch_sharding = NamedSharding(program.mesh, P(None, AXIS))
  if isinstance(program.train_step, AccumulatingTrainStep):
    batch_sharding = None  # it places each microbatch itself
  eval_chunk = -(-config.eval_batch_size // len(devices)) * len(devices)

  # --- Checkpoint: resume the state, the sampler, the schedule, the counters.
  step, history, epoch_losses, nonfinite_in_a_row = 0, [], [], 0
  checkpoints = _open_checkpoints(config)
  if resume:
    state, loop = checkpoints.restore(state)
    sampler = data_lib.EpochSampler(
        num_train, state=data_lib.SamplerState(**loop["sampler"]))
    schedule.load_state_dict(loop)
    step, history, epoch_losses, nonfinite_in_a_row = (
        loop["step"], loop["history"], loop["epoch_losses"],
        loop["nonfinite_in_a_row"])

  # --- Loop.
  name = "+".join(filter(None, (config.optimizer, config.adaptive_batch)))
  bar = _progress_bar(schedule, step, sampler.samples_seen, quiet, name)
  bytes_sent = None  # per worker, last step (sparse-exchange optimizers)
  bytes_sent_sum, bytes_sent_steps = 0.0, 0  # mean over this call's steps
  scan_steps = steps_per_dispatch(config, devices[0].platform)
  done = False
  while not done:
    batch_size = schedule.next_batch_size(sampler.samples_seen)
    seen_before = sampler.samples_seen
    num_steps = _steps_until_host(config, step, total_steps,
                                  sampler.samples_seen, num_train,
                                  scan_steps)
    state, step_metrics = _run_steps(
        program, state, dataset, sampler.next_batch(batch_size * num_steps),
        num_steps, config.microbatch_size, schedule.num_slots(batch_size),
        scan_steps, batch_sharding)
    nonfinite_in_a_row = _observe_steps(
        config, schedule, batch_size, step_metrics, step, nonfinite_in_a_row,
        epoch_losses, bar)
    step, metrics = step + num_steps, step_metrics[-1]
    if "bytes_sent" in metrics:
      bytes_sent = float(metrics["bytes_sent"])
      bytes_sent_sum += sum(float(each["bytes_sent"]) for each in step_metrics)
      bytes_sent_steps += num_steps
    bar.update(schedule.progress(num_steps, batch_size * num_steps))
    _show_step(bar, batch_size, metrics,
               sampler.samples_seen / (time.perf_counter() - start_time))

    # --- Evaluation, at each epoch's end (or evals_per_epoch an epoch).
    done = schedule.done(step, sampler.samples_seen)
    seen = sampler.samples_seen
    epoch_ended = done or seen // num_train > seen_before // num_train
    if done or (_evaluation_index(config, seen, num_train)
                > _evaluation_index(config, seen_before, num_train)):
      # The learning rate at the optimizer's own count of samples.
      record = _record_epoch(
          sampler.samples_seen, num_train, step, batch_size, epoch_losses,
          schedule, config.learning_rate
          * float(program.unit_schedule(metrics["samples_seen"])))
      if config.monitor_noise_scale:  # B_simple after the last step
        record["noise_scale"] = float(metrics["noise_scale"])
      record.update(_evaluate_splits(program.eval_step, state, splits,
                                     eval_chunk))
      record["wall_time_s"] = time.perf_counter() - start_time
      history.append(record)
      epoch_losses = []
      if log_epochs and not quiet:
        _write_line(bar, _epoch_line(name, config.learning_rate, record))

    # --- Checkpoint, when due; `max_steps` stops as a SIGTERM does.
    stop = (0 < config.max_steps <= step or preemption.requested()) and not done
    checkpoints.after_step(
        step, state, epoch_ended=epoch_ended, force=stop or done,
        sampler=dataclasses.asdict(sampler.state), history=history,
        epoch_losses=epoch_losses, nonfinite_in_a_row=nonfinite_in_a_row,
        **schedule.state_dict())
    if stop:
      break
  bar.close()
  checkpoints.close()

  # --- Metrics.
  wall_time = time.perf_counter() - start_time
  compile_time = compile_clock.seconds - compile_seconds_before
  result = {
      "config": dataclasses.asdict(config),
      "num_devices": len(devices),
      "num_train": num_train,
      "num_test": dataset.num_test,
      "num_val": 0 if validation is None else len(validation[1]),
      "steps": step,
      "total_steps": total_steps,
      "samples_seen": sampler.samples_seen,
      "wall_time_s": wall_time,
      "compile_time_s": compile_time,
      "run_time_s": wall_time - compile_time,
      "history": history,
      "final": history[-1] if history else None,
      "interrupted": not done,
      **schedule.result_fields(program.train_step),
  }
  if bytes_sent is not None:
    result["bytes_sent_per_step"] = bytes_sent
    # With a density warm-up the message shrinks over the run.
    result["bytes_sent_mean_per_step"] = bytes_sent_sum / bytes_sent_steps
  if workdir is not None:
    write_json(pathlib.Path(workdir) / "metrics.json", result)
  return result


def write_json(path: pathlib.Path, payload: Any) -> None:
  """Writes `payload` as indented JSON, creating parent directories."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
