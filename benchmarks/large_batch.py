"""SNGM closes the large-batch gap: MNIST-1D CNN at B = 4096 and 8192.

Runs `sngm-optax compare` with its default (benchmark) preset at each large
batch size: SNGM, momentum SGD, LARS and LAMB, each with the best peak
learning rate of a 4-value grid (picked on a validation split, 10% of the
training set), 30 epochs of linear warmup (2 epochs) + cosine decay, against
momentum SGD at batch 128 as the reference (trained once, shown in every
table). Each picked learning rate is then trained with 2 more seeds
(initialization and batch order) for a mean ± standard deviation. See
`sngm_optax/compare.py` for the grids.

Usage:
  python benchmarks/large_batch.py                          # the benchmark
  python benchmarks/large_batch.py --batch-sizes 4096 --epochs 5   # a try
Writes benchmarks/results/large_batch.json (tables, every run's final
accuracies, the picked runs' curves) and large_batch.png, prints the tables.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time

import jax

from sngm_optax.harness import compare

RESULTS = pathlib.Path(__file__).parent / "results"


def machine() -> str:
  devices = jax.devices()
  kinds = sorted({f"{d.device_kind} ({d.platform})" for d in devices})
  return (f"{len(devices)} x {', '.join(kinds)}; {os.cpu_count()} CPU cores "
          f"({platform.processor() or platform.machine()}); jax "
          f"{jax.__version__}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", type=int, nargs="+",
                      default=[4096, 8192])
  parser.add_argument("--epochs", type=float, default=None,
                      help="default: the preset's 30")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  parser.add_argument("--extra-seeds", type=int, default=2,
                      help="retrain each picked learning rate with this many "
                           "more seeds (mean ± sd in the table)")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args()

  start = time.perf_counter()
  load_start = os.getloadavg()[0]
  preset = compare.PRESETS["default"]
  if args.epochs is not None:
    preset = dataclasses.replace(preset, epochs=args.epochs)
  results, reference = [], None
  for batch_size in args.batch_sizes:
    result = compare.compare(dataclasses.replace(preset,
                                                 large_batch=batch_size),
                             reference=reference, quiet=args.quiet,
                             extra_seeds=args.extra_seeds)
    reference = result["contenders"][-1]  # momentum SGD at batch 128
    results.append(result)
    print(f"\nB = {batch_size}:\n{result['table']}", flush=True)

  summary = {
      "claim": "SNGM at a large batch reaches the accuracy of small-batch "
               "momentum SGD; large-batch momentum SGD falls short",
      "command": "python benchmarks/large_batch.py " + " ".join(sys.argv[1:]),
      "machine": machine(),
      "wall_time_s": time.perf_counter() - start,
      "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
      "lr_grids": {name: dataclasses.asdict(grid)
                   for name, grid in compare.LR_GRIDS.items()},
      "small_batch_lr_grids": {
          name: dataclasses.asdict(grid)
          for name, grid in compare.SMALL_BATCH_GRIDS.items()},
      "results": [compare.without_histories(r) for r in results],
  }
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "large_batch.json").write_text(
      json.dumps(summary, indent=1) + "\n")

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2),
                              squeeze=False)
  for panel, result in zip(axes[0], results):
    compare.plot_curves(result, panel)
    panel.set_title(f"MNIST-1D CNN, large batch "
                    f"{result['preset']['large_batch']}, "
                    f"{result['preset']['epochs']:g} epochs")
  figure.tight_layout()
  figure.savefig(args.out / "large_batch.png", dpi=110)
  print(f"\nmachine: {summary['machine']}; total "
        f"{summary['wall_time_s'] / 60:.1f} min; wrote "
        f"{args.out / 'large_batch.json'} and {args.out / 'large_batch.png'}")


if __name__ == "__main__":
  main()
