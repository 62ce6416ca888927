"""SNGM closes the large-batch gap: MNIST-1D CNN at B = 4096 and 8192.

Runs `sngm-optax compare` with its default (benchmark) preset at each large
batch size: SNGM, momentum SGD, LARS and LAMB, each with the best peak
learning rate of a 4-value grid (picked on a validation split, 10% of the
training set), 30 epochs of linear warmup (2 epochs) + cosine decay, against
momentum SGD at batch 128 as the reference (trained once, shown in every
table). Each picked learning rate is then trained with 2 more seeds
(initialization and batch order) for a mean ± standard deviation. See
`sngm_optax/harness/compare.py` for the grids.

Usage:
  python benchmarks/large_batch.py                          # the benchmark
  python benchmarks/large_batch.py --batch-sizes 4096 --epochs 5   # a try
  python benchmarks/large_batch.py --batch-sizes 256 --epochs 1 \
      --num-samples 2000 --grid-size 1 --extra-seeds 0      # a smoke test
Writes benchmarks/results/large_batch.json (tables, every run's final
accuracies, the picked runs' curves) and large_batch.png, prints the tables.
"""

import argparse
import dataclasses
import os
import pathlib
import time

import _common

from sngm_optax.harness import compare


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", type=int, nargs="+",
                      default=[4096, 8192])
  parser.add_argument("--epochs", type=float, default=None,
                      help="default: the preset's 30")
  parser.add_argument("--num-samples", type=int, default=None,
                      help="default: the preset's 60,000")
  parser.add_argument("--grid-size", type=int, default=None,
                      help="learning rates per optimizer (default: the "
                           "preset's 4)")
  parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS)
  parser.add_argument("--extra-seeds", type=int, default=2,
                      help="retrain each picked learning rate with this many "
                           "more seeds (mean ± sd in the table)")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args()

  start = time.perf_counter()
  load_start = os.getloadavg()[0]
  preset = compare.PRESETS["default"]
  sizes = {"epochs": args.epochs, "num_samples": args.num_samples,
           "grid_size": args.grid_size}
  preset = dataclasses.replace(
      preset, **{key: value for key, value in sizes.items()
                 if value is not None})
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
      "command": _common.command_line(),
      "machine": _common.machine_description(),
      "wall_time_s": time.perf_counter() - start,
      "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
      "lr_grids": {name: dataclasses.asdict(grid)
                   for name, grid in compare.LR_GRIDS.items()},
      "small_batch_lr_grids": {
          name: dataclasses.asdict(grid)
          for name, grid in compare.SMALL_BATCH_GRIDS.items()},
      "results": [compare.without_histories(r) for r in results],
  }
  _common.write_json(args.out / "large_batch.json", summary)

  plot(results, args.out / "large_batch.png")
  print(f"\nmachine: {_common.machine_line(summary['machine'])}; total "
        f"{summary['wall_time_s'] / 60:.1f} min; wrote "
        f"{args.out / 'large_batch.json'} and {args.out / 'large_batch.png'}")


def plot(results: list[dict], path: pathlib.Path) -> None:
  """Test accuracy curves, one panel per large batch size."""
  plt = _common.pyplot()
  if plt is None:
    return
  figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2),
                              squeeze=False)
  for panel, result in zip(axes[0], results):
    compare.plot_curves(result, panel)
    panel.set_title(f"MNIST-1D CNN, large batch "
                    f"{result['preset']['large_batch']}, "
                    f"{result['preset']['epochs']:g} epochs")
  _common.save_figure(figure, path, dpi=110)


if __name__ == "__main__":
  main()
