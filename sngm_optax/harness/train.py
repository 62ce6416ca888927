"""The training loop shared by the CLI, the notebooks and the benchmarks.

`train_and_evaluate(config)` reads top to bottom, in the sections of a Flax
example: input, devices, model and optimizer, update step, evaluation,
training loop, metrics. Optimizers are built by name from
`optimizers.OPTIMIZERS`, so a new optimizer is one registry line and no
change to the loop; the steps themselves are in `steps`.

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
from sngm_optax.harness import checkpoint as checkpoint_lib
from sngm_optax.harness import data as data_lib
from sngm_optax.harness import models
from sngm_optax.harness.config import Config
from sngm_optax.harness.optimizers import PER_DEVICE_STATE
from sngm_optax.harness.optimizers import SCHEDULES
from sngm_optax.harness.optimizers import make_adaptive_optimizer
from sngm_optax.harness.optimizers import make_optimizer
from sngm_optax.harness.steps import AXIS
from sngm_optax.harness.steps import NonFiniteLossError
from sngm_optax.harness.steps import evaluate
from sngm_optax.harness.steps import make_eval_step
from sngm_optax.harness.steps import make_train_step


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
    tx = sngm_optax.per_device_state(tx)
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
    resume: bool = False,
) -> dict:
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
    A JSON-serializable dict: `config`, `history` (one entry per epoch with
    `epoch`, `samples_seen`, `steps`, `train_loss`, `test_loss`,
    `test_accuracy`, `wall_time_s`, and `val_*` with a validation split),
    `final` (the last entry, None if stopped before the first epoch
    ended), `steps`, `samples_seen`, `wall_time_s`, `interrupted` (stopped
    by `max_steps` before the end).

  Raises:
    ValueError: the config does not fit the data or the devices.
    NonFiniteLossError: the loss was NaN/Inf for `max_nonfinite_steps`
      consecutive steps.
    sngm_optax.harness.checkpoint.CheckpointError: `resume` found no checkpoint
      that restores, or one written with a different configuration.
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

  # --- Checkpoints: restore the state, the sampler and the loop counters.
  history, epoch_losses, nonfinite_in_a_row, start_step = [], [], 0, 0
  checkpoints = checkpoint_lib.LoopCheckpoints.for_config(config, resume)
  if resume:
    state, loop = checkpoints.restore(state)
    sampler = data_lib.EpochSampler(
        num_train, state=data_lib.SamplerState(**loop["sampler"]))
    start_step, history, epoch_losses, nonfinite_in_a_row = (
        loop["step"], loop["history"], loop["epoch_losses"],
        loop["nonfinite_in_a_row"])

  # --- Training loop.
  step = start_step
  bytes_sent = None  # per worker, last step (sparse-exchange optimizers)
  name = config.optimizer + (f"+{config.adaptive_batch}" if adaptive else "")
  bar = _progress_bar(budget if adaptive else total_steps, quiet, name)
  if adaptive:
    bar.unit = "sample"
  batch_size = config.batch_size
  batch_sizes, noise_scales = [], []
  if resume:
    batch_size = loop["batch_size"]
    batch_sizes, noise_scales = loop["batch_sizes"], loop["noise_scales"]
  bar.update(sampler.samples_seen if adaptive else start_step)
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
    epoch_ended = epoch > len(history) or done
    if epoch_ended:
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
    stop = 0 < config.max_steps <= step and not done
    if checkpoints is not None:
      checkpoints.after_step(
          step, state, epoch_ended=epoch_ended, force=stop or done,
          sampler=dataclasses.asdict(sampler.state), history=history,
          epoch_losses=epoch_losses, nonfinite_in_a_row=nonfinite_in_a_row,
          batch_size=batch_size, batch_sizes=batch_sizes,
          noise_scales=noise_scales)
    if stop:
      break
  bar.close()
  if checkpoints is not None:
    checkpoints.close()

  # --- Metrics.
  result = {
      "config": dataclasses.asdict(config),
      "num_devices": num_devices,
      "num_train": num_train,
      "num_test": dataset.num_test,
      "num_val": 0 if validation is None else len(validation[1]),
      "steps": step,
      "total_steps": total_steps,
      "samples_seen": sampler.samples_seen,
      "wall_time_s": time.perf_counter() - start_time,
      "history": history,
      "final": history[-1] if history else None,
      "interrupted": not done,
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
