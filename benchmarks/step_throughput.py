"""Samples/s of the harness training step: SNGM, momentum SGD, and the cost
of the adaptive-batch norm test.

Times `sngm_optax.harness.train.make_train_step` (the jitted shard_map step the CLI
runs: forward, backward, gradient mean, optimizer update, donated state) on
the MNIST-1D models at global batch sizes B (one microbatch of B) on 1 and 8
devices, built the way the CLI builds them (`build_program`, learning rate
injected), with

- `msgd`: optax.sgd(momentum) behind `average_across_devices`;
- `sngm`;
- `sngm+norm_test`: the harness's adaptive-batch step with per-device
  statistics (`adaptive_batch_size(test="norm", axis_name=...)` in front of
  sngm, the step's batch size passed to it; 2+ devices only).

Data are random inputs of the MNIST-1D shape (40 features, 10 classes); the
values do not change the cost. The optimizers of one (model, devices, B) are
timed interleaved, `--repeats` rounds of `--steps` steps each, and the table
gives medians: the median over rounds of the ratio to the first optimizer of
the same round (is the optimizer a bottleneck?) and, for `+norm_test`, the
overhead over the same optimizer without the test (`_common.Timings`). On a
CPU the 8 "devices" are simulated (`--xla_force_host_platform_device_count=8`)
and share the host's cores: 8 devices are not a speed-up there, they show the
cost of the mesh machinery.

  PYTHONPATH=. python benchmarks/step_throughput.py
  PYTHONPATH=. python benchmarks/step_throughput.py --models mlp --batch-sizes 128 1024
"""

import argparse
import pathlib

import _common

_common.force_host_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.training import train_state  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sngm_optax.harness import train  # noqa: E402
from sngm_optax.harness import steps as steps_lib  # noqa: E402

CLAIM = ("the optimizer is not the bottleneck of the harness step (sngm "
         "against momentum SGD), and the per-device norm test adds little "
         "to a step")
NORM_TEST = "+norm_test"
FEATURES, CLASSES = 40, 10


def make_step(model, optimizer, batch_size, num_devices, microbatches=1):
  """Builds the step; returns (a call of one step carrying its state, params).

  With `microbatches` > 1 every optimizer's step runs that many microbatches
  and the norm test reads their moments (one device is enough) instead of
  the devices' gradients.
  """
  devices = tuple(jax.local_devices()[:num_devices])
  adaptive = None
  microbatch = batch_size // microbatches
  if optimizer.endswith(NORM_TEST):
    # The cap keeps the batch growing, so the test runs on every step.
    optimizer = optimizer[:-len(NORM_TEST)]
    statistics = "per_device" if microbatches == 1 else "microbatch"
    adaptive = ("norm", 1 << 20, batch_size, microbatch, statistics)
  program = train.build_program(train.ProgramSpec(
      model=model, num_classes=CLASSES, optimizer=optimizer,
      schedule="constant", total_samples=1000, warmup_samples=0,
      devices=devices, adaptive=adaptive))
  rng = np.random.default_rng(0)
  shape = (microbatches, microbatch)
  batch = {
      "x": rng.normal(size=shape + (FEATURES,)).astype(np.float32),
      "y": rng.integers(0, CLASSES, shape).astype(np.int32),
      "weight": np.ones(shape, np.float32),
  }
  sharding = NamedSharding(program.mesh, P(None, steps_lib.AXIS))
  batch = jax.device_put(batch, sharding)
  params = program.init_fn(jax.random.key(0), batch["x"][0, :1])["params"]
  state = train_state.TrainState.create(apply_fn=program.apply_fn,
                                        params=params, tx=program.tx)
  state = state.replace(opt_state=optax.tree.set(
      state.opt_state, learning_rate=jnp.asarray(0.01, jnp.float32)))
  state = jax.device_put(state, NamedSharding(program.mesh, P()))

  def one_step():
    nonlocal state
    state, metrics = program.train_step(state, batch)
    return state, metrics

  return one_step, params


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
  parser.add_argument("--batch-sizes", nargs="+", type=int,
                      default=[128, 1024, 4096])
  parser.add_argument("--devices", nargs="+", type=int, default=[1, 8])
  parser.add_argument("--optimizers", nargs="+",
                      default=["msgd", "sngm", "sngm" + NORM_TEST])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--microbatches", type=int, default=1,
                      help="microbatches a step; 2+: the norm test reads "
                           "microbatch moments, also on one device")
  parser.add_argument("--out", type=pathlib.Path,
                      default=_common.RESULTS / "step_throughput.json")
  args = parser.parse_args()

  machine = _common.machine_description()
  rows = []
  for model in args.models:
    for num_devices in args.devices:
      for batch_size in args.batch_sizes:
        names = [name for name in args.optimizers
                 if num_devices > 1 or args.microbatches > 1
                 or not name.endswith(NORM_TEST)]
        steps = {}
        for name in names:
          steps[name], params = make_step(model, name, batch_size,
                                          num_devices, args.microbatches)
        timings = _common.time_interleaved(steps, args.repeats,
                                           calls=args.steps)
        seconds = timings.medians()
        num_params = sum(p.size for p in jax.tree.leaves(params))
        for name in names:
          row = {
              "model": model, "params": num_params, "devices": num_devices,
              "microbatches": args.microbatches,
              "batch_size": batch_size, "optimizer": name,
              "step_ms": seconds[name] * 1e3,
              "samples_per_s": batch_size / seconds[name],
              "ratio_to_first": timings.median_ratio(name, names[0]),
              "test_overhead": None,
          }
          without_test = name[:-len(NORM_TEST)]
          if name.endswith(NORM_TEST) and without_test in seconds:
            row["test_overhead"] = timings.median_ratio(name,
                                                        without_test) - 1
          rows.append(row)
          overhead = row["test_overhead"]
          print(f"{model:4s} D={num_devices} B={batch_size:5d} {name:16s} "
                f"{row['step_ms']:8.2f} ms {row['samples_per_s']:10.0f} "
                f"samples/s x{row['ratio_to_first']:.2f}"
                + ("" if overhead is None else f" test +{overhead:.1%}"),
                flush=True)

  _common.write_json(args.out, _common.timing_record(
      "step_throughput", claim=CLAIM, command=_common.command_line(args),
      machine=machine,
      budget={"models": args.models, "batch_sizes": args.batch_sizes,
              "devices": args.devices, "microbatches": args.microbatches,
              "repeats": args.repeats, "steps": args.steps},
      contenders=args.optimizers, rows=rows))
  print(f"\nmachine: {_common.machine_line(machine)}; median of "
        f"{args.repeats} × {args.steps} steps\n")
  table = []
  for r in rows:
    overhead = r["test_overhead"]
    table.append([
        f"{r['model']} ({r['params']})", r["devices"], r["batch_size"],
        r["optimizer"], f"{r['step_ms']:.2f}", f"{r['samples_per_s']:.0f}",
        f"{r['ratio_to_first']:.2f}",
        "" if overhead is None else f"{overhead:+.1%}"])
  print(_common.markdown_table(
      ["model (params)", "devices", "B", "optimizer", "ms/step", "samples/s",
       f"× {args.optimizers[0]}", "norm test adds"], table, align="lrrlrrrr"))


if __name__ == "__main__":
  main()
