"""The `resnet`'s training step against the `cnn`'s, and their accuracy.

Two measurements, written to `benchmarks/results/resnet_cost.json`:

- step cost: the harness's jitted train step (`build_program(...)
  .train_step`: forward with BatchNorm in train mode, backward, optimizer,
  donated state) of each model at the same global batch sizes, on one
  device, timed interleaved (`_common.time_interleaved`), as the median over
  rounds of the resnet's time over the cnn's in the same round (wall time,
  and this process's CPU time, which a shared machine's load disturbs less);
  the claim is at most about 3x; with each step's FLOPs by XLA's cost
  analysis (of each model's whole-batch formulation, `WHOLE_BATCH`), for the
  part of the ratio that is the models' arithmetic, XLA's temp buffer and
  the MiB first touched per step;
- accuracy: short runs of each model at its default width and depth on
  MNIST-1D (`--num-samples`, 80 % for training), the same optimizer, batch,
  budget and learning-rate grid for both, `--seeds` seeds each; the table
  gives each model's best learning rate by mean final test accuracy.

  PYTHONPATH=. python benchmarks/resnet_cost.py
  PYTHONPATH=. python benchmarks/resnet_cost.py --batch-sizes 256 --seeds 1
"""

import argparse
import os
import pathlib

import _common

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sngm_optax.harness import config as config_lib  # noqa: E402
from sngm_optax.harness import data as data_lib  # noqa: E402
from sngm_optax.harness import steps as steps_lib  # noqa: E402
from sngm_optax.harness import sweep  # noqa: E402
from sngm_optax.harness import train  # noqa: E402

CLAIM = ("a training step of the resnet costs at most about 3x the cnn's at "
         "the same batch, and at its default width and depth it reaches "
         "clearly higher MNIST-1D test accuracy in a short run")
MODELS = ("cnn", "resnet")
# XLA's cost analysis counts a loop body once, so the FLOPs of both models'
# steps, which loop over groups of the batch (the CNN's chunks, the resnet's
# ghost BatchNorm groups), are taken from their whole-batch formulations: the
# same arithmetic, without remat.
WHOLE_BATCH = {"cnn": {"chunk_size": None},
               "resnet": {"ghost_batch_size": None}}
FEATURES, CLASSES = 40, 10


def _program_and_inputs(model: str, optimizer: str, batch_size: int,
                        model_kwargs: dict | None = None):
  """The one-device harness program of `model`, its initial state and a
  random batch."""
  model_kwargs = model_kwargs or {}
  config = config_lib.Config(model=model, optimizer=optimizer,
                             learning_rate=0.01, num_devices=1,
                             batch_size=batch_size, model_kwargs=model_kwargs)
  program = train.build_program(train.ProgramSpec(
      model=model, num_classes=CLASSES, optimizer=optimizer,
      schedule="constant", total_samples=1000, warmup_samples=0,
      devices=tuple(jax.local_devices()[:1]),
      model_kwargs=train.frozen_items(model_kwargs)))
  rng = np.random.default_rng(0)
  shape = (1, batch_size)
  batch = jax.device_put({
      "x": rng.normal(size=shape + (FEATURES,)).astype(np.float32),
      "y": rng.integers(0, CLASSES, shape).astype(np.int32),
      "weight": np.ones(shape, np.float32),
  }, NamedSharding(program.mesh, P(None, steps_lib.AXIS)))
  state = train.initial_state(program, config, batch["x"][0, :1])
  return program, state, batch


def make_step(model: str, optimizer: str, batch_size: int):
  """One-device train step of `model` on a random batch: a zero-argument
  call that runs a step and keeps the state, the parameter count, and the
  step's XLA temp buffer in MiB."""
  program, state, batch = _program_and_inputs(model, optimizer, batch_size)
  num_params = sum(p.size for p in jax.tree.leaves(state.params))
  train_step = program.train_step.lower(state, batch).compile()

  def one_step():
    nonlocal state
    state, metrics = train_step(state, batch)
    return state, metrics

  return one_step, num_params, _common.temp_mib(train_step)


def step_flops(model: str, optimizer: str, batch_size: int) -> float:
  """XLA's cost-analysis FLOPs of `model`'s train step, in its whole-batch
  formulation (`WHOLE_BATCH`)."""
  program, state, batch = _program_and_inputs(model, optimizer, batch_size,
                                              WHOLE_BATCH[model])
  return _common.flops(program.train_step.lower(state, batch).compile())


def time_steps(args) -> list[dict]:
  rows = []
  for batch_size in args.batch_sizes:
    steps, params, flops, temp = {}, {}, {}, {}
    for model in MODELS:
      steps[model], params[model], temp[model] = make_step(
          model, args.optimizer, batch_size)
      flops[model] = step_flops(model, args.optimizer, batch_size)
    timings = _common.time_interleaved(steps, args.repeats, calls=args.steps,
                                       min_seconds=args.min_seconds)
    faulted = {model: _common.faulted_mib_per_call(steps[model])
               for model in MODELS}
    seconds = timings.medians()
    row = {"batch_size": batch_size,
           "params": params,
           "flops": flops,
           "flops_ratio": flops["resnet"] / flops["cnn"],
           "step_ms": {model: seconds[model] * 1e3 for model in MODELS},
           "ratio": timings.median_ratio("resnet", "cnn"),
           "ratios": timings.ratios("resnet", "cnn"),
           "cpu_ratio": timings.median_ratio("resnet", "cnn", cpu=True),
           "cpu_ratios": timings.ratios("resnet", "cnn", cpu=True),
           # What each step asks of the OS: XLA's temp buffer, and the MiB
           # first touched per step (`_common.first_touch_ms`).
           "temp_mib": temp,
           "faulted_mib_per_step": faulted}
    rows.append(row)
    print(_common.markdown_row([
        batch_size, f"{row['step_ms']['cnn']:.2f}",
        f"{row['step_ms']['resnet']:.2f}", f"{row['ratio']:.2f}",
        f"{row['cpu_ratio']:.2f}", f"{row['flops_ratio']:.2f}"]),
        flush=True)
  return rows


def accuracy_runs(args, dataset: data_lib.Dataset) -> list[dict]:
  runs = []
  for model in MODELS:
    for learning_rate in args.learning_rates:
      for seed in range(args.seeds):
        config = config_lib.Config(
            model=model, optimizer=args.optimizer,
            learning_rate=learning_rate, batch_size=args.batch_size,
            epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            num_devices=1, seed=seed, num_samples=args.num_samples)
        result = train.train_and_evaluate(config, dataset=dataset,
                                          quiet=True)
        runs.append({
            "model": model, "learning_rate": learning_rate, "seed": seed,
            "test_accuracy": result["final"]["test_accuracy"],
            "test_accuracy_per_epoch": [
                record["test_accuracy"] for record in result["history"]],
            "run_time_s": result["run_time_s"],
            "compile_time_s": result["compile_time_s"]})
        print(f"{model} lr={learning_rate:g} seed={seed}: test accuracy "
              f"{runs[-1]['test_accuracy']:.4f}", flush=True)
  return runs


def best_by_model(runs: list[dict]) -> dict:
  """Each model's learning rate of the highest mean test accuracy, with the
  mean and sd over seeds."""
  best = {}
  for model in MODELS:
    by_rate = {}
    for run in runs:
      if run["model"] == model:
        by_rate.setdefault(run["learning_rate"], []).append(
            run["test_accuracy"])
    summaries = {rate: sweep.summarize(values)
                 for rate, values in by_rate.items()}
    rate = max(summaries, key=lambda r: summaries[r].mean)
    summary = summaries[rate]
    best[model] = {"learning_rate": rate, "mean": summary.mean,
                   "sd": summary.sd, "seeds": summary.n}
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--optimizer", default="sngm")
  parser.add_argument("--batch-sizes", nargs="+", type=int,
                      default=[128, 1024, 4096])
  parser.add_argument("--repeats", type=int, default=11)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--min-seconds", type=float, default=0.3)
  parser.add_argument("--num-samples", type=int, default=5000)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--epochs", type=float, default=10)
  parser.add_argument("--warmup-epochs", type=float, default=0.5)
  parser.add_argument("--learning-rates", nargs="+", type=float,
                      default=[0.1, 0.2, 0.4, 0.8])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--out", type=pathlib.Path,
                      default=_common.RESULTS / "resnet_cost.json")
  args = parser.parse_args()

  machine = _common.machine_description()
  print(_common.machine_line(machine))
  print(_common.markdown_row(["B", "cnn ms/step", "resnet ms/step",
                              "resnet / cnn", "(CPU time)", "(FLOPs)"]))
  rows = time_steps(args)
  dataset = data_lib.load_mnist1d(args.num_samples)
  runs = accuracy_runs(args, dataset)
  best = best_by_model(runs)
  for model, entry in best.items():
    print(f"{model}: best lr {entry['learning_rate']:g}, test accuracy "
          f"{entry['mean']:.4f} +- {entry['sd']:.4f}")
  machine = dict(machine, load_average_end=list(os.getloadavg()))
  record = sweep.results_record(
      "resnet_cost", claim=CLAIM, command=_common.command_line(args),
      machine=machine,
      budget={"batch_sizes": args.batch_sizes, "repeats": args.repeats,
              "steps": args.steps, "num_samples": args.num_samples,
              "num_train": dataset.num_train, "batch_size": args.batch_size,
              "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
              "learning_rates": args.learning_rates, "seeds": args.seeds,
              "optimizer": args.optimizer},
      contenders=[{"name": model, **best[model]} for model in MODELS],
      trial_budget=len(args.learning_rates),
      step_cost=rows, max_ratio=max(row["ratio"] for row in rows),
      max_cpu_ratio=max(row["cpu_ratio"] for row in rows),
      runs=runs)
  print(f"wrote {_common.write_json(args.out, record)}")


if __name__ == "__main__":
  main()
