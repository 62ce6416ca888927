"""Samples/s of the harness training loop against a bare jitted-step loop.

At tiny batches a step of the MNIST-1D CNN takes well under a millisecond on
a CPU, so whatever the loop does in Python per step (draw the indices, build
and place the batch, bring the metrics to the host, update the progress bar)
can cost more than the step. This times, interleaved, over the same arrays:

- `bare`: the harness's own jitted step (`build_program(...).train_step`) in
  a Python loop over batches already placed on the device, blocking once at
  the end: the cost of the step and its dispatch alone;
- `harness`: `train.train_and_evaluate` (the loop the CLI, the notebooks and
  the benchmarks run) for one epoch of the same data, with its default
  `steps_per_dispatch` (the measured choice);
- `harness K=1` and `harness K=32`: the same loop forced to one dispatch a
  step, or to 32 steps per dispatch (`lax.scan`), when the installed harness
  has that option (`Config.steps_per_dispatch`).

The harness's time includes everything `train_and_evaluate` does once per
run at a warm cache (state init and placement, a final evaluation of 16 test
examples), so the ratio is a lower bound on the loop's own.

  PYTHONPATH=. flock /tmp/timing.lock python benchmarks/harness_throughput.py
  PYTHONPATH=. flock /tmp/timing.lock python benchmarks/harness_throughput.py \\
      --batch-sizes 2 16 --out /tmp/before.json   # e.g. on an older commit
"""

import argparse
import dataclasses
import pathlib

import _common

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sngm_optax.harness import config as config_lib  # noqa: E402
from sngm_optax.harness import data as data_lib  # noqa: E402
from sngm_optax.harness import steps as steps_lib  # noqa: E402
from sngm_optax.harness import train  # noqa: E402

CLAIM = ("the harness loop reaches at least 0.8x the samples/s of a bare "
         "loop over its own jitted step at B = 2, 4, 8 and 16")
FEATURES, CLASSES = 40, 10


def make_dataset(num_train: int) -> data_lib.Dataset:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(num_train, FEATURES)).astype(np.float32)
  y = rng.integers(0, CLASSES, num_train).astype(np.int32)
  return data_lib.Dataset(x=x, y=y, x_test=x[:16], y_test=y[:16],
                          num_classes=CLASSES)


def contenders(config: config_lib.Config, dataset: data_lib.Dataset) -> dict:
  """name -> a zero-argument call that trains one epoch and returns an
  array to block on."""
  num_train = dataset.num_train
  steps = num_train // config.batch_size
  program = train.build_program(train.ProgramSpec(
      model=config.model, num_classes=CLASSES, optimizer=config.optimizer,
      schedule=config.schedule, total_samples=steps, warmup_samples=0,
      devices=tuple(jax.local_devices()[:1])))
  state = train.initial_state(program, config, dataset.x[:1])
  order = np.random.default_rng(1).permutation(num_train)
  sharding = NamedSharding(program.mesh, P(None, steps_lib.AXIS))
  batches = [jax.device_put({
      "x": dataset.x[idx][None], "y": dataset.y[idx][None],
      "weight": np.ones((1, len(idx)), np.float32)}, sharding)
             for idx in np.split(order[:steps * config.batch_size], steps)]

  def bare():
    nonlocal state
    for batch in batches:
      state, metrics = program.train_step(state, batch)
    return metrics["loss"]

  def harness(**changes):
    def run():
      result = train.train_and_evaluate(
          dataclasses.replace(config, **changes), dataset=dataset, quiet=True)
      return np.asarray(result["steps"])
    return run

  functions = {"bare": bare, "harness": harness()}
  if "steps_per_dispatch" in {f.name for f in dataclasses.fields(config)}:
    functions["harness K=1"] = harness(steps_per_dispatch=1)
    functions["harness K=32"] = harness(steps_per_dispatch=32)
  return functions


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", nargs="+", type=int,
                      default=[2, 4, 8, 16, 32, 64])
  parser.add_argument("--num-train", type=int, default=2048,
                      help="examples in the epoch each call trains")
  parser.add_argument("--optimizer", default="tr_sgd")
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", type=pathlib.Path,
                      default=_common.RESULTS / "harness_throughput.json")
  args = parser.parse_args()

  machine = _common.machine_description()
  dataset = make_dataset(args.num_train)
  rows = []
  for batch_size in args.batch_sizes:
    config = config_lib.Config(
        model=args.model, optimizer=args.optimizer, learning_rate=0.01,
        batch_size=batch_size, epochs=1.0, warmup_epochs=0.0,
        schedule="constant", num_devices=1, eval_batch_size=16)
    functions = contenders(config, dataset)
    timings = _common.time_interleaved(functions, args.repeats)
    seconds = timings.medians()
    samples = (args.num_train // batch_size) * batch_size
    for name in functions:
      row = {"batch_size": batch_size, "loop": name,
             "samples_per_s": samples / seconds[name],
             "ms_per_step": 1e3 * seconds[name] / (samples // batch_size),
             "ratio_to_bare": timings.median_ratio("bare", name)}
      rows.append(row)
      print(f"B={batch_size:<3d} {name:13s} {row['samples_per_s']:9.0f} "
            f"samples/s {row['ms_per_step']:7.3f} ms/step  "
            f"x{row['ratio_to_bare']:.2f} of bare", flush=True)

  payload = _common.timing_record(
      "harness_throughput", claim=CLAIM, command=_common.command_line(args),
      machine=machine,
      budget={"batch_sizes": args.batch_sizes, "num_train": args.num_train,
              "optimizer": args.optimizer, "model": args.model,
              "repeats": args.repeats},
      contenders=list(functions), rows=rows)
  _common.write_json(args.out, payload)
  table = [[r["batch_size"], r["loop"], f"{r['samples_per_s']:.0f}",
            f"{r['ms_per_step']:.3f}", f"{r['ratio_to_bare']:.2f}"]
           for r in rows]
  print(f"\nmachine: {_common.machine_line(machine)}; code "
        f"{payload['code_version']}; median of {args.repeats} interleaved "
        "epochs\n")
  print(_common.markdown_table(
      ["B", "loop", "samples/s", "ms/step", "× bare (samples/s)"], table,
      align="rlrrr"))


if __name__ == "__main__":
  main()
