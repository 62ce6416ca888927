"""Vmapped trials against the same trials trained one by one.

A search at one (optimizer, batch) point trains trials that differ only in
traced hyperparameters (peak learning rate, weight decay, the length of a
linear decay). `trials.train_trials` trains them as one compiled program,
vmapped over a leading trial axis; the baseline trains each trial alone
with `train.train_and_evaluate`, the loop every single run uses. Both see
the same trials (quasi-random points over the three ranges, warm-up a fixed
fraction of the decay) for the same number of steps, at each batch size.
The program maps its step over the trials in both ways
`steps.map_over_trials` offers: `jax.vmap` (`vmap`), and an unrolled loop
(`unroll`); `per_trial` is `train_trials` with one trial per program
(`trials_per_program=1`): one by one, but one compilation for all of them.

- run time: the wall time of all trials, less what JAX spent compiling
  (`compile_clock`), one program against the sum of the single runs;
- compile time apart: one program against one per single run (a trial of
  another decay length is another `ProgramSpec` for a single run).

The trials' program evaluates them once at the end (on the first 500 test
examples, kept to a few steps' cost); the single runs stop at the step
budget before an epoch ends and evaluate nothing, so the ratio leans
against the program. The measurements run in the order vmap, unroll, one
by one at each batch size; the load average is recorded with each row.

  PYTHONPATH=. python benchmarks/vmapped_trials.py
  PYTHONPATH=. python benchmarks/vmapped_trials.py --batch-sizes 64 \\
      --steps 50 --out /tmp/vmapped_trials.json   # a quick look
"""

import argparse
import dataclasses
import os
import time

import _common

from sngm_optax.harness import config as config_lib  # noqa: E402
from sngm_optax.harness import data as data_lib  # noqa: E402
from sngm_optax.harness import sweep  # noqa: E402
from sngm_optax.harness import train  # noqa: E402
from sngm_optax.harness import trials  # noqa: E402

CLAIM = ("training a point's trials as one vmapped program is faster than "
         "training them one by one, at B = 64, 1,024 and 8,192")
WARMUP_FRACTION = 0.1


def search(num_trials: int, seed: int) -> sweep.QuasiRandom:
  """The frontier's kind of search: learning rate, weight decay (log) and
  the decay length in epochs (long enough that every trial trains the
  whole step budget)."""
  return sweep.QuasiRandom(
      {"learning_rate": sweep.Range(0.01, 1.0),
       "weight_decay": sweep.Range(1e-5, 1e-2),
       "epochs": sweep.Range(20.0, 60.0, log=False)},
      trial_budget=num_trials, seed=seed)


# The programs' options of each contender.
PROGRAMS = {"vmap": {"trial_map": "vmap"}, "unroll": {"trial_map": "unroll"},
            "per_trial": {"trial_map": "unroll", "trials_per_program": 1}}


def time_program(base, points, dataset, steps: int, options) -> dict:
  start = time.perf_counter()
  runs = trials.train_trials(base, points, dataset, eval_every=steps,
                             max_steps=steps, warmup_fraction=WARMUP_FRACTION,
                             **options)
  assert all(run.final["steps"] == steps for run in runs
             if run.final is not None)
  # Each run holds its share of its program's times: they add up.
  return {"wall_s": time.perf_counter() - start,
          "run_time_s": sum(run.run_time_s for run in runs),
          "compile_time_s": sum(run.compile_time_s for run in runs),
          "programs": len({id(run.extra["program"]) for run in runs}),
          "statuses": [run.status for run in runs]}


def time_one_by_one(base, points, dataset, steps: int) -> dict:
  start = time.perf_counter()
  run_time = compile_time = 0.0
  for point in points:
    config = dataclasses.replace(
        trials.trial_config(base, point, WARMUP_FRACTION), max_steps=steps)
    try:
      result = train.train_and_evaluate(config, dataset=dataset, quiet=True)
    except train.NonFiniteLossError:
      continue  # not in these ranges; timed up to the stop if it were
    assert result["steps"] == steps
    run_time += result["run_time_s"]
    compile_time += result["compile_time_s"]
  return {"wall_s": time.perf_counter() - start, "run_time_s": run_time,
          "compile_time_s": compile_time}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", nargs="+", type=int,
                      default=[64, 1024, 8192])
  parser.add_argument("--steps", nargs="+", type=int, default=[200, 60, 12],
                      help="step budget at each batch size")
  parser.add_argument("--trials", type=int, default=8)
  parser.add_argument("--trial-maps", nargs="+", choices=list(PROGRAMS),
                      default=list(PROGRAMS))
  parser.add_argument("--optimizer", default="sngm")
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--num-samples", type=int, default=20_000,
                      help="MNIST-1D size (80%% train)")
  parser.add_argument("--out", default=str(_common.RESULTS
                                           / "vmapped_trials.json"))
  args = parser.parse_args()
  if len(args.steps) != len(args.batch_sizes):
    parser.error("give one --steps per --batch-sizes")

  machine = _common.machine_description()
  dataset = data_lib.load_mnist1d(args.num_samples)
  dataset = dataclasses.replace(dataset, x_test=dataset.x_test[:500],
                                y_test=dataset.y_test[:500])
  points = search(args.trials, seed=0).points()
  rows = []
  for batch_size, steps in zip(args.batch_sizes, args.steps):
    base = config_lib.Config(
        model=args.model, optimizer=args.optimizer, batch_size=batch_size,
        schedule="warmup_linear", num_devices=1)
    row = {"batch_size": batch_size, "steps": steps, "trials": args.trials,
           "load_average_start": list(os.getloadavg())}
    for trial_map in args.trial_maps:
      row[trial_map] = time_program(base, points, dataset, steps,
                                    PROGRAMS[trial_map])
    single = row["one_by_one"] = time_one_by_one(base, points, dataset, steps)
    row["load_average"] = list(os.getloadavg())
    for trial_map in args.trial_maps:
      program = row[trial_map]
      program["run_time_speedup"] = (single["run_time_s"]
                                     / program["run_time_s"])
      program["compile_time_speedup"] = (single["compile_time_s"]
                                         / program["compile_time_s"])
      print(f"B={batch_size:<5d} {steps} steps x {args.trials} trials, "
            f"{trial_map}: run {single['run_time_s']:.1f} s one by one, "
            f"{program['run_time_s']:.1f} s as one program (x"
            f"{program['run_time_speedup']:.2f}); compile "
            f"{single['compile_time_s']:.1f} s vs "
            f"{program['compile_time_s']:.1f} s", flush=True)
    rows.append(row)

  payload = _common.timing_record(
      "vmapped_trials", claim=CLAIM, command=_common.command_line(args),
      machine=machine,
      budget={"batch_sizes": args.batch_sizes, "steps": args.steps,
              "trials": args.trials, "optimizer": args.optimizer,
              "model": args.model, "num_samples": args.num_samples,
              "warmup_fraction": WARMUP_FRACTION,
              "search": search(args.trials, seed=0).describe()},
      contenders=[*args.trial_maps, "one_by_one"], rows=rows)
  _common.write_json(args.out, payload)
  table = [[r["batch_size"], r["steps"], trial_map,
            f"{r['one_by_one']['run_time_s']:.1f}",
            f"{r[trial_map]['run_time_s']:.1f}",
            f"{r[trial_map]['run_time_speedup']:.2f}",
            f"{r['one_by_one']['compile_time_s']:.1f}",
            f"{r[trial_map]['compile_time_s']:.1f}"]
           for r in rows for trial_map in args.trial_maps]
  print(f"\nmachine: {_common.machine_line(machine)}; code "
        f"{payload['code_version']}\n")
  print(_common.markdown_table(
      ["B", "steps", "map", "one by one (s)", "one program (s)", "speed-up",
       "compile, one by one (s)", "compile, one program (s)"], table,
      align="rrlrrrrr"))


if __name__ == "__main__":
  main()
