"""Vmapped trials: the trials of one (optimizer, batch) point as one program.

A search at one point (Shallue et al. 2019: the same number of quasi-random
trials at every batch size) trains trials that differ only in values the
harness traces: the peak learning rate and the weight decay (hyperparameters
in the optimizer state, see `train.build_program`) and, with a schedule of
`optimizers.TRACEABLE_SCHEDULES` (`warmup_linear`, `constant`), the
schedule's length (`Config.epochs`, the length of the linear decay, and
`warmup_epochs`). `train_trials` trains such trials as one compiled program:

- The trial axis is the leading axis of every leaf of the train state
  (params, optimizer state with its hyperparameters, step; a model's
  `batch_stats` would get it too), and the step maps over it inside the
  `shard_map` data parallelism (`steps.make_train_step(trials=...)`), by
  `jax.vmap` or by an unrolled loop (`steps.map_over_trials`;
  `default_trial_map`: unrolled on CPU, where vmapped convolutions are
  slow grouped ones). One step computes every trial's gradient on the same
  batch, so every trial sees the same batches in the same order (the order
  of `Config.seed`, as a single run of that seed draws them): a fair
  search, and one seed per program.
- Each trial keeps its own bookkeeping on the host: the validation curve
  every `eval_every` steps (and at its last step), its steps to a declared
  `target` (the first evaluation at or above it), and its status. A trial
  stops counting when it is done: at its own last step (its `epochs`, or
  the step budget `max_steps`), or when its loss has been non-finite for
  `Config.max_nonfinite_steps` steps in a row (the single loop's rule:
  `diverged`). The step takes a `[trials]` mask `active` and leaves an
  inactive trial's state unchanged (`jnp.where`), so a diverged or finished
  trial is frozen while the others go on; it is still computed (vmap), and
  NaNs stay in its own lane. With `early_stop`, the program stops at the
  first evaluation where every trial still training has reached the target.
- The output is one `sweep.Run` per trial, with its Config's settings
  (`trial_settings`) plus the trial options (`eval_every`, `step_budget`,
  `target`, `early_stop`), so the engine's `RunStore` keys it like a single
  run of that Config. `final` holds the last evaluation, `steps`,
  `samples_seen`, `steps_to_target` and `samples_to_target` (None when not
  reached); `curve` every evaluation. The program's run time and compile
  time are split equally among its trials (a masked trial costs a step as
  much as a running one); `extra["program"]` keeps the totals.

Trials whose Configs differ in anything else (seed, batch size, optimizer,
the length of a schedule that cannot be traced) train as separate programs.
Only a fixed batch with a replicated optimizer state is supported (adaptive
batches and the sparse-exchange optimizers train one by one).

Example:
  >>> from sngm_optax.harness import config as config_lib
  >>> from sngm_optax.harness import data, trials
  >>> base = config_lib.Config(optimizer='msgd', model='mlp', epochs=2,
  ...                          batch_size=100, schedule='warmup_linear',
  ...                          warmup_epochs=0.2, num_devices=1)
  >>> runs = trials.train_trials(
  ...     base, [{'learning_rate': 0.05}, {'learning_rate': 0.1}],
  ...     data.generate_mnist1d(1000), eval_every=4, target=0.3)
  >>> [run.final['steps'] for run in runs], len(runs[0].curve)
  ([16, 16], 4)
"""

import dataclasses
import math
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sngm_optax.harness import batching
from sngm_optax.harness import data as data_lib
from sngm_optax.harness import sweep
from sngm_optax.harness import train
from sngm_optax.harness.config import Config
from sngm_optax.harness.optimizers import PER_DEVICE_STATE
from sngm_optax.harness.optimizers import SCHEDULES
from sngm_optax.harness.optimizers import TRACEABLE_SCHEDULES
from sngm_optax.harness.steps import AXIS

# Config fields that may differ between the trials of one program; the
# schedule's lengths only with a schedule of TRACEABLE_SCHEDULES.
TRACED_FIELDS = ("learning_rate", "weight_decay")
LENGTH_FIELDS = ("epochs", "warmup_epochs")
# `train_trials`'s options that are in a trial's settings (`trial_settings`);
# the others (warmup_fraction: already in the Config; trial_map,
# trials_per_program, quiet: the same results) are not.
SETTINGS_OPTIONS = ("eval_every", "max_steps", "target", "early_stop",
                    "test_every_eval")


def default_trial_map(platform: str) -> str:
  """`"unroll"` on CPU, else `"vmap"` (`steps.map_over_trials`).

  On XLA:CPU a convolution vmapped over its kernel runs as a grouped
  convolution: on 2 shared cores, 8 vmapped CNN trials ran at 0.29-0.66x
  the speed of the same trials one by one (B = 64, 1,024, 8,192;
  benchmarks/vmapped_trials.py), unrolled ones at 0.72-1.23x; one trial
  per program (`trials_per_program=1`) at 1.0-1.3x, compiling once (2-4 s
  against 33-38 s for the 8 single runs). The run time is compute-bound
  there, so a program of many trials saves compilations and host work,
  not arithmetic. GPUs and TPUs batch the vmapped kernels natively (not
  measured here).
  """
  return "unroll" if platform == "cpu" else "vmap"


def trial_config(base: Config, point: Mapping[str, Any],
                 warmup_fraction: float | None = None) -> Config:
  """`base` with the trial's `point` (Config fields); with
  `warmup_fraction`, the warm-up is that fraction of the trial's `epochs`
  (`warmup_epochs = warmup_fraction * epochs`)."""
  config = dataclasses.replace(base, **point)
  if warmup_fraction is not None:
    config = dataclasses.replace(
        config, warmup_epochs=warmup_fraction * config.epochs)
  return config


def trial_settings(config: Config, *, eval_every: int, max_steps: int = 0,
                   target: float | None = None, early_stop: bool = False,
                   test_every_eval: bool = True) -> dict:
  """A trial's run settings: `sweep.config_settings(config)` plus what a
  trial adds to it (a step budget, the evaluation interval, the target,
  whether the program stops early and, when not, whether every evaluation
  covers the test split), each of which changes its record."""
  settings = {**sweep.config_settings(config), "eval_every": eval_every,
              "step_budget": max_steps, "target": target,
              "early_stop": early_stop}
  if not test_every_eval:
    settings["test_every_eval"] = False
  return settings


def _program_key(config: Config) -> str:
  """What the trials of one program share: the Config but its traced
  fields."""
  shared = dict.fromkeys(TRACED_FIELDS, None)
  if config.schedule in TRACEABLE_SCHEDULES:
    shared.update(dict.fromkeys(LENGTH_FIELDS, None))
  return sweep.canonical_json({**dataclasses.asdict(config), **shared})


def train_trials(base_config: Config, points: Sequence[Mapping[str, Any]],
                 dataset: data_lib.Dataset, *, eval_every: int,
                 target: float | None = None, max_steps: int = 0,
                 early_stop: bool = False, test_every_eval: bool = True,
                 warmup_fraction: float | None = None,
                 trial_map: str = "auto", trials_per_program: int = 0,
                 quiet: bool = True) -> list[sweep.Run]:
  """Trains the trials `points` of `base_config`, vmapped, one `Run` each.

  Args:
    base_config: the settings the trials share (a fixed batch).
    points: each trial's Config fields (e.g. `learning_rate`,
      `weight_decay`, `epochs`); trials that differ only in
      `TRACED_FIELDS` (and `LENGTH_FIELDS` with a traceable schedule) train
      as one program, the others in programs of their own.
    dataset: the data (the validation split is `base_config`'s).
    eval_every: evaluate every this many steps (and at each trial's end).
    target: the validation accuracy (test accuracy without a validation
      split) whose first evaluation at or above it is the steps to target.
    max_steps: each trial's step budget (0: its epochs only).
    early_stop: stop a program at the first evaluation where every trial
      still training has reached `target`.
    test_every_eval: evaluate the test split at every evaluation; if False
      and there is a validation split, only at each trial's last record
      (the validation split alone decides the target, at a fraction of
      the cost of evaluating both).
    warmup_fraction: `trial_config`'s.
    trial_map: how the step maps over the trials, `"vmap"`, `"unroll"` or
      `"auto"` (`default_trial_map`); it does not change the results (to
      float32 rounding), so it is not in the runs' settings.
    trials_per_program: at most this many trials in one program (0: all
      that can share one). Programs of the same size compile once: with 1,
      the trials train one by one but share a compilation across learning
      rates, weight decays and decay lengths.
    quiet: no line per evaluation.

  Returns:
    One `sweep.Run` per point, in order (see the module docstring).

  Raises:
    ValueError: an adaptive batch or a per-device optimizer state, a batch
      larger than the data, `eval_every < 1`, `early_stop` without target.
  """
  if eval_every < 1:
    raise ValueError(f"eval_every must be >= 1, got {eval_every!r}")
  if early_stop and target is None:
    raise ValueError("early_stop needs a target")
  options = dict(eval_every=eval_every, max_steps=max_steps, target=target,
                 early_stop=early_stop, test_every_eval=test_every_eval,
                 trial_map=trial_map)
  configs = [trial_config(base_config, point, warmup_fraction)
             for point in points]
  groups: dict[str, list[int]] = {}
  for index, config in enumerate(configs):
    groups.setdefault(_program_key(config), []).append(index)
  runs: list[sweep.Run | None] = [None] * len(configs)
  size = trials_per_program or len(configs)
  chunks = [group[start:start + size] for group in groups.values()
            for start in range(0, len(group), size)]
  for indices in chunks:
    group_runs, _ = train_program([configs[i] for i in indices], dataset,
                                  quiet=quiet, **options)
    for index, run in zip(indices, group_runs):
      runs[index] = run
  return runs


def _stacked_initial_state(program: train.Program, configs: list[Config],
                           lengths: list[tuple[int, int]], sample_input,
                           traced_schedule: bool):
  """The trials' initial states stacked on a leading axis, replicated."""
  states = []
  for config, (total, warmup) in zip(configs, lengths):
    state = train.initial_state(program, config, sample_input)
    if traced_schedule:
      state = state.replace(opt_state=optax.tree.set(
          state.opt_state, total_samples=jnp.float32(total),
          warmup_samples=jnp.float32(warmup)))
    states.append(state)
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
  return jax.device_put(stacked, NamedSharding(program.mesh, P()))


def _target_metric(record: Mapping[str, Any]) -> float:
  accuracy = record.get("val_accuracy")
  return record["test_accuracy"] if accuracy is None else accuracy


def _check_one_program(configs: list[Config]) -> Config:
  """The first config, once the trials can share one program.

  Raises:
    ValueError: they differ in more than the traced fields, or they grow
      their batch or keep a per-device optimizer state.
  """
  config = configs[0]
  if len({_program_key(c) for c in configs}) > 1:
    raise ValueError("these trials differ in more than "
                     f"{TRACED_FIELDS + LENGTH_FIELDS}: use train_trials")
  if not config.fixed_batch:
    raise ValueError("vmapped trials need a fixed batch: train adaptive "
                     "runs one by one")
  if config.optimizer in PER_DEVICE_STATE:
    raise ValueError(f"optimizer {config.optimizer!r} keeps a per-device "
                     "state: train its trials one by one")
  return config


def train_program(configs: Sequence[Config], dataset: data_lib.Dataset, *,
                  eval_every: int, max_steps: int = 0,
                  target: float | None = None, early_stop: bool = False,
                  test_every_eval: bool = True, trial_map: str = "auto",
                  quiet: bool = True) -> tuple[list[sweep.Run], Any]:
  """`train_trials` of Configs that share one program (differ only in the
  traced fields), with the trials' final `TrainState` (stacked).

  Raises:
    ValueError: the configs do not share a program; see `train_trials`.
  """
  start_time = time.perf_counter()
  compile_seconds_before = train.compile_clock.seconds
  configs = list(configs)
  config = _check_one_program(configs)

  # --- Data, devices, the program and the trials' states.
  dataset, splits, _ = train.evaluation_splits(config, dataset)
  splits_every_eval, splits_at_end = splits, []
  if not test_every_eval and len(splits) > 1:  # test, then val
    splits_every_eval, splits_at_end = splits[1:], splits[:1]
  num_train, batch_size = dataset.num_train, config.batch_size
  train._check_fits_data(config, num_train)  # pylint: disable=protected-access
  devices = train._mesh_devices(config)  # pylint: disable=protected-access
  traced_schedule = config.schedule in TRACEABLE_SCHEDULES
  if trial_map == "auto":
    trial_map = default_trial_map(devices[0].platform)
  spec = dataclasses.replace(
      train.ProgramSpec.from_config(config, num_train, devices,
                                    dataset.num_classes),
      trials=trial_map, traced_schedule=traced_schedule)
  if traced_schedule:  # the lengths are in the state, not in the program
    spec = dataclasses.replace(spec, total_samples=0, warmup_samples=0)
  program = train.build_program(spec)
  budgets = [train._step_budget(c, num_train) for c in configs]  # pylint: disable=protected-access
  lengths = [(total, warmup) for total, _, warmup in budgets]
  end_steps = np.array([min(steps, max_steps) if max_steps else steps
                        for _, steps, _ in budgets], int)
  unit_schedules = [SCHEDULES[config.schedule](1.0, total, warmup)
                    for total, warmup in lengths]
  state = _stacked_initial_state(program, configs, lengths, dataset.x[:1],
                                 traced_schedule)
  sampler = data_lib.EpochSampler(num_train, seed=config.seed)
  batch_sharding = NamedSharding(program.mesh, P(None, AXIS))
  eval_chunk = -(-config.eval_batch_size // len(devices)) * len(devices)
  scan_steps = train.steps_per_dispatch(config, devices[0].platform)
  no_epoch_fields = batching.FixedBatch(batch_size, config.microbatch_size,
                                        int(end_steps.max()))

  # --- The loop: chunks of steps end at every evaluation and trial end.
  num_trials = len(configs)
  curves = [[] for _ in configs]
  losses = [[] for _ in configs]  # finite losses since the last record
  nonfinite_in_a_row = np.zeros(num_trials, int)
  diverged_at: list[int | None] = [None] * num_trials
  reached: list[dict | None] = [None] * num_trials
  step, stopped_early = 0, False
  while True:
    alive = np.array([d is None for d in diverged_at])
    active = alive & (step < end_steps)
    if not active.any():
      break
    limit = scan_steps if scan_steps > 1 else train.STEPS_PER_SYNC
    next_stop = min([(step // eval_every + 1) * eval_every,
                     *end_steps[active].tolist()])
    num_steps = max(1, min(next_stop - step, limit))
    state, step_metrics = train._run_steps(  # pylint: disable=protected-access
        program, state, dataset, sampler.next_batch(batch_size * num_steps),
        num_steps, config.microbatch_size, config.num_microbatches,
        scan_steps, batch_sharding, jnp.asarray(active))
    for number, metrics in enumerate(step_metrics, start=step + 1):
      for index in np.flatnonzero(active & alive):
        loss = float(metrics["loss"][index])
        if math.isfinite(loss):
          nonfinite_in_a_row[index] = 0
          losses[index].append(loss)
          continue
        nonfinite_in_a_row[index] += 1
        if nonfinite_in_a_row[index] >= config.max_nonfinite_steps:
          diverged_at[index], alive[index] = number, False
    step += num_steps

    # --- Evaluation of the trials that trained: when due, and at their end.
    due = step % eval_every == 0
    record_now = active & alive & (due | (end_steps == step))
    if record_now.any():
      evaluated = train._evaluate_splits(  # pylint: disable=protected-access
          program.eval_step, state, splits_every_eval, eval_chunk)
      seen = step_metrics[-1]["samples_seen"]
      for index in np.flatnonzero(record_now):
        record = train._record_epoch(  # pylint: disable=protected-access
            sampler.samples_seen, num_train, step, batch_size,
            losses[index], no_epoch_fields, configs[index].learning_rate
            * float(unit_schedules[index](seen[index])))
        record.update({name: float(value[index])
                       for name, value in evaluated.items()})
        if "noise_scale" in step_metrics[-1]:  # Config.monitor_noise_scale
          record["noise_scale"] = float(step_metrics[-1]["noise_scale"][index])
        record["wall_time_s"] = time.perf_counter() - start_time
        curves[index].append(record)
        losses[index] = []
        if (target is not None and reached[index] is None
            and _target_metric(record) >= target):
          reached[index] = record
      if not quiet:
        best = max(_target_metric(curves[i][-1])
                   for i in np.flatnonzero(record_now))
        print(f"trials {config.optimizer} B={batch_size} step {step}: "
              f"{int(record_now.sum())} training, best accuracy {best:.4f}",
              flush=True)
    still_training = alive & (step < end_steps)
    stop = early_stop and due and all(
        reached[i] is not None for i in np.flatnonzero(still_training))
    last_records = record_now & (stop | (end_steps == step))
    if last_records.any() and splits_at_end:
      evaluated = train._evaluate_splits(  # pylint: disable=protected-access
          program.eval_step, state, splits_at_end, eval_chunk)
      for index in np.flatnonzero(last_records):
        curves[index][-1].update({name: float(value[index])
                                  for name, value in evaluated.items()})
    if stop:
      stopped_early = bool(still_training.any())
      break

  # --- One Run per trial; the program's times split equally.
  wall_time = time.perf_counter() - start_time
  compile_time = train.compile_clock.seconds - compile_seconds_before
  run_time = wall_time - compile_time
  program_fields = {"trials": num_trials, "run_time_s": run_time,
                    "compile_time_s": compile_time, "time_split": "equal",
                    "trial_map": trial_map,
                    "stopped_early": stopped_early}
  runs = []
  for index, trial in enumerate(configs):
    settings = trial_settings(trial, eval_every=eval_every,
                              max_steps=max_steps, target=target,
                              early_stop=early_stop,
                              test_every_eval=test_every_eval)
    fields = dict(curve=curves[index], run_time_s=run_time / num_trials,
                  compile_time_s=compile_time / num_trials,
                  code_version=sweep.code_version(),
                  extra={"program": program_fields, "num_train": num_train,
                         "total_steps": int(budgets[index][1])})
    if diverged_at[index] is not None:
      error = train._non_finite_error(  # pylint: disable=protected-access
          trial, trial.max_nonfinite_steps, diverged_at[index])
      runs.append(sweep.Run.diverged(settings, str(error), **fields))
      continue
    final = dict(curves[index][-1])
    hit = reached[index]
    final.update(
        steps_to_target=None if hit is None else hit["steps"],
        samples_to_target=None if hit is None else hit["samples_seen"])
    runs.append(sweep.Run.finished(settings, final, dataset.num_classes,
                                   **fields))
  return runs, state
