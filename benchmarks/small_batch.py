"""Does trajectory regularization (TR) help at tiny batches? MNIST-1D, B = 2-16.

Every run trains the harness MLP (`train.train_and_evaluate`, one CPU device)
on the same samples budget (`--epochs` passes over the training set, so B = 2
takes 8x the steps of B = 16), with a cosine decay of the peak learning rate
to 0 (no warmup) and coupled weight decay 1e-4 on the kernels. For each batch
size and method the peak learning rate is picked from a grid by the final
accuracy on a validation split (10% of the training set, `compare`'s rule);
the picked learning rate is then trained with `--extra-seeds` more seeds
(initialization and batch order) and the table reports the test accuracy's
mean ± sample standard deviation over all its seeds.

Methods (`p` = `SGD_LR * sqrt(B / 2)`, `a` = `ADAM_LR * sqrt(B / 2)`):

| method | optimizer | learning-rate grid |
| --- | --- | --- |
| sgd | momentum SGD (0.9) | p/3, p, 3p |
| sgd re-tuned | momentum SGD (0.9) | p/27, p/9, p/3, p, 3p (the sgd runs reused) |
| adam | Adam, coupled L2 | a/3, a, 3a, 9a |
| tr_sgd | TR-SGD, lambda = 0.1, S = 10, 1/(k+1) decay | p/3, p, 3p, 9p |
| decay only | TR-SGD with strength 0 (only the 1/(k+1) decay) | p/3, p, 3p, 9p |
| tr_adam | TR-Adam, lambda = 0.1, S = 10, 1/(k+1) decay | a/3, a, 3a, 9a |

TR's 1/(k+1) decay makes its average step 0.293x that of SGD at the same
learning rate: the re-tuned SGD grid extends the sgd grid downward by two
factors of 3 (p/9 and p/27), so it contains SGD at every step size TR-SGD's
grid takes on average (0.098p to 2.6p; SGD's own grid covers p/3 to 3p).
TR-SGD's grid has one value more at the top (9p) so that its average steps
also reach SGD's largest. "decay only" isolates the proximal
term: TR-SGD against it is the proximal term's effect at the same schedule
and step size.

Usage:
  python benchmarks/small_batch.py                 # the benchmark (~25 min on 2 loaded cores)
  python benchmarks/small_batch.py --batch-sizes 16 --epochs 0.5 --extra-seeds 0
Writes benchmarks/results/small_batch.json (after every batch size) and
small_batch.png, prints a Markdown table.
"""

import argparse
import dataclasses
import math
import os
import pathlib
import time

import numpy as np

import _common

from sngm_optax.harness import compare
from sngm_optax.harness import train
from sngm_optax.harness import config as config_lib

SGD_LR = 0.015    # p at B = 2 (momentum SGD's middle grid value)
ADAM_LR = 0.001   # a at B = 2
# Average step of TR's 1/(k+1) decay relative to its learning rate, S = 10.
TR_STEP_FACTOR = sum(1 / (k + 1) for k in range(10)) / 10


@dataclasses.dataclass(frozen=True)
class Method:
  label: str
  optimizer: str
  base: str            # "sgd" or "adam": which p the grid scales
  factors: tuple[float, ...]
  kwargs: tuple = ()   # optimizer_kwargs as (key, value) pairs
  reuse: str | None = None  # label whose runs are part of this grid


METHODS = (
    Method("sgd", "msgd", "sgd", (1 / 3, 1, 3)),
    Method("sgd re-tuned", "msgd", "sgd", (1 / 27, 1 / 9, 1 / 3, 1, 3),
           reuse="sgd"),
    Method("adam", "adam", "adam", (1 / 3, 1, 3, 9)),
    Method("tr_sgd", "tr_sgd", "sgd", (1 / 3, 1, 3, 9)),
    Method("decay only", "tr_sgd", "sgd", (1 / 3, 1, 3, 9),
           kwargs=(("strength", 0.0),)),
    Method("tr_adam", "tr_adam", "adam", (1 / 3, 1, 3, 9)),
)


def grid(method: Method, batch_size: int) -> list[float]:
  peak = (SGD_LR if method.base == "sgd" else ADAM_LR) * math.sqrt(
      batch_size / 2)
  return [float(f"{peak * factor:.3g}") for factor in method.factors]


def one_run(config: config_lib.Config, dataset, quiet: bool) -> dict:
  """Trains `config` once: `compare`'s run summary (`diverged` included)."""
  contender = compare.run_contender(config, config.optimizer,
                                    config.batch_size, [config.learning_rate],
                                    dataset, quiet)
  return contender["runs"][0]


def run_method(method: Method, base: config_lib.Config, dataset, extra_seeds: int,
               done: dict, quiet: bool) -> dict:
  """Grid (reusing `done[method.reuse]` runs), pick on validation, seeds."""
  start = time.perf_counter()
  config = dataclasses.replace(base, optimizer=method.optimizer,
                               optimizer_kwargs=dict(method.kwargs))
  reused = {}
  if method.reuse is not None:
    earlier = done[method.reuse]
    reused = {run["learning_rate"]: run for run in earlier["runs"]}
  learning_rates = grid(method, base.batch_size)
  runs = []
  for learning_rate in learning_rates:
    if learning_rate in reused:
      runs.append(reused[learning_rate])
    else:
      runs.append(one_run(
          dataclasses.replace(config, learning_rate=learning_rate), dataset,
          quiet))
  finished = [run for run in runs if not run["diverged"]]
  best = max(finished, key=lambda run: run["val_accuracy"]) if finished else None
  result = {"method": method.label, "optimizer": method.optimizer,
            "optimizer_kwargs": dict(method.kwargs),
            "batch_size": base.batch_size, "learning_rates": learning_rates,
            "runs": [{k: v for k, v in run.items() if k != "history"}
                     for run in runs],
            "best": best and {k: v for k, v in best.items() if k != "history"}}
  if best is None:
    result["wall_time_s"] = time.perf_counter() - start
    return result
  result["picked_at_grid_edge"] = best["learning_rate"] in (
      learning_rates[0], learning_rates[-1])
  seed_runs = None
  if method.reuse is not None:
    earlier = done[method.reuse]
    if earlier["best"]["learning_rate"] == best["learning_rate"]:
      seed_runs = earlier["seed_runs"]  # same pick: same runs
  if seed_runs is None:
    seed_runs = [one_run(
        dataclasses.replace(config, learning_rate=best["learning_rate"],
                            seed=base.seed + offset), dataset, quiet)
                 for offset in range(1, extra_seeds + 1)]
    seed_runs = [{k: v for k, v in run.items() if k != "history"}
                 for run in seed_runs]
  accuracies = [run["test_accuracy"] for run in [best, *seed_runs]
                if not run["diverged"]]
  result.update(
      seed_runs=seed_runs, num_seeds=len(accuracies),
      num_diverged_seeds=1 + len(seed_runs) - len(accuracies),
      test_accuracies=accuracies,
      test_accuracy_mean=float(np.mean(accuracies)),
      test_accuracy_std=float(np.std(accuracies, ddof=1))
      if len(accuracies) > 1 else 0.0,
      steps=best["steps"], step_time_ms=1e3 * best["wall_time_s"] /
      best["steps"], wall_time_s=time.perf_counter() - start)
  return result


def format_table(results: list[dict]) -> str:
  batch_sizes = sorted({r["batch_size"] for r in results})
  rows = []
  for method in METHODS:
    cells = [method.label]
    for batch_size in batch_sizes:
      match = [r for r in results
               if r["method"] == method.label and r["batch_size"] == batch_size]
      if not match or match[0]["best"] is None:
        cells.append("-" if not match else "all diverged")
        continue
      r = match[0]
      edge = "*" if r["picked_at_grid_edge"] else ""
      cells.append(f"{100 * r['test_accuracy_mean']:.1f} ± "
                   f"{100 * r['test_accuracy_std']:.1f} "
                   f"(lr {r['best']['learning_rate']:g}{edge})")
    rows.append(cells)
  return _common.markdown_table(
      ["method", *(f"B = {b}" for b in batch_sizes)], rows,
      align="l" + "r" * len(batch_sizes))


def plot(results: list[dict], path: pathlib.Path, title: str) -> None:
  plt = _common.pyplot()
  if plt is None:
    return
  figure, axes = plt.subplots(figsize=(6.4, 4.2))
  for index, method in enumerate(METHODS):
    rows = sorted((r for r in results if r["method"] == method.label
                   and r["best"] is not None), key=lambda r: r["batch_size"])
    if not rows:
      continue
    # Small horizontal offsets keep the error bars apart.
    x = [r["batch_size"] * 1.04 ** (index - 2.5) for r in rows]
    axes.errorbar(x, [100 * r["test_accuracy_mean"] for r in rows],
                  yerr=[100 * r["test_accuracy_std"] for r in rows],
                  marker="o", capsize=3, label=method.label,
                  linestyle="--" if method.label in ("sgd re-tuned",
                                                     "decay only") else "-")
  axes.set_xscale("log", base=2)
  axes.set_xticks([2, 4, 8, 16], ["2", "4", "8", "16"])
  axes.set_xlabel("batch size")
  axes.set_ylabel("test accuracy (%), mean ± sd over seeds")
  axes.set_title(title, fontsize=8)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)
  _common.save_figure(figure, path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", type=int, nargs="+",
                      default=[2, 4, 8, 16])
  parser.add_argument("--num-samples", type=int, default=5000,
                      help="MNIST-1D samples (80%% train, 20%% test)")
  parser.add_argument("--epochs", type=float, default=2.0)
  parser.add_argument("--extra-seeds", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the grid runs; the extra seeds follow it")
  parser.add_argument("--methods", nargs="+", default=None,
                      help="labels from METHODS (default: all)")
  parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS)
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args()

  start = time.perf_counter()
  load_start = os.getloadavg()
  base = config_lib.Config(num_samples=args.num_samples, val_fraction=0.1,
                      model="mlp", weight_decay=1e-4, warmup_epochs=0.0,
                      schedule="warmup_cosine", epochs=args.epochs,
                      num_devices=1, seed=args.seed)
  dataset = train.load_dataset(base)
  num_val = max(1, round(0.1 * dataset.num_train))
  data_line = (f"MNIST-1D: {dataset.num_train - num_val} train + {num_val} "
               f"validation / {dataset.num_test} test; MLP 128-128; "
               f"{args.epochs:g} epochs at every batch size")
  print(data_line, flush=True)
  methods = [m for m in METHODS
             if args.methods is None or m.label in args.methods]
  results = []
  args.out.mkdir(parents=True, exist_ok=True)
  for batch_size in args.batch_sizes:
    done = {}
    for method in methods:
      result = run_method(method, dataclasses.replace(base,
                                                      batch_size=batch_size),
                          dataset, args.extra_seeds, done, args.quiet)
      done[method.label] = result
      results.append(result)
      if result["best"] is not None:
        print(f"B={batch_size:<3d} {method.label:>13s}: lr "
              f"{result['best']['learning_rate']:g}  test "
              f"{100 * result['test_accuracy_mean']:.2f} ± "
              f"{100 * result['test_accuracy_std']:.2f} "
              f"({result['num_seeds']} seeds, "
              f"{result['step_time_ms']:.2f} ms/step)", flush=True)
    summary = {
        "claim": "TR-SGD / TR-Adam beat SGD (also with a re-tuned learning "
                 "rate) and Adam at batch sizes 2-16",
        "command": _common.command_line(),
        "machine": _common.machine_description(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "data": data_line,
        "tr_average_step_factor": TR_STEP_FACTOR,
        "sgd_lr_at_b2": SGD_LR, "adam_lr_at_b2": ADAM_LR,
        "grids": {m.label: list(m.factors) for m in methods},
        "config": dataclasses.asdict(base),
        "wall_time_s": time.perf_counter() - start,
        "complete": batch_size == args.batch_sizes[-1],
        "results": results,
    }
    summary["table"] = format_table(results)
    _common.write_json(args.out / "small_batch.json", summary)
    plot(results, args.out / "small_batch.png",
         f"{data_line}\npicked LR, {1 + args.extra_seeds} seeds, "
         f"first seed {args.seed}")
  print("\n" + summary["table"])
  print(f"\n(* picked at the edge of its grid)\nmachine: "
        f"{_common.machine_line(summary['machine'])}; load "
        f"{load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}; total "
        f"{summary['wall_time_s'] / 60:.1f} min; wrote "
        f"{args.out / 'small_batch.json'} and {args.out / 'small_batch.png'}")

if __name__ == "__main__":
  main()
