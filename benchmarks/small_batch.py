"""Does trajectory regularization (TR) help at tiny batches? MNIST-1D CNN, B = 2-16.

The authors' setting (ResNet-18 on CIFAR, B = 8, 200 epochs, LR x0.1 at 50 %
and 75 % of training, coupled lambda = lambda_0 / eta_t with lambda_0 =
0.1 eta_0, S = 10, the inner window restarted each epoch, weight decay 1e-4)
scaled to a CPU: every run trains the harness CNN (`train.train_and_evaluate`,
one CPU device) on MNIST-1D with at least 10k training examples, for the same
sample budget at every batch size (`--epochs` passes, so B = 2 takes 8x the
steps of B = 16), with the "step" schedule (peak LR x0.1 at 50 % and x0.01
at 75 % of the budget, no warm-up) and coupled weight decay 1e-4 on the
kernels. TR uses the harness defaults, which are the authors'.

For each batch size and method the peak learning rate is picked from a grid
of `GRID_SIZE` values, spaced by 3, by the final accuracy on a validation
split (10 % of the training set, `compare`'s rule); a pick on an edge of the
grid extends it by one value on that side, at most `MAX_EXTENSIONS` times
(every method gets the same rule). The picked learning rate is trained with
`--extra-seeds` more seeds (initialization and batch order), and the table
reports the test accuracy's mean ± sample standard deviation over all its
seeds.

Methods (`p` = `SGD_LR * sqrt(B / 8)`, `a` = `ADAM_LR * sqrt(B / 8)`):

| method | optimizer | initial grid |
| --- | --- | --- |
| sgd | momentum SGD (0.9) | p/3, p, 3p |
| adam | Adam, coupled L2 | a/3, a, 3a |
| tr_sgd | TR-SGD, authors' defaults | p, 3p, 9p |
| decay only | TR-SGD with strength 0 (only the 1/(k+1) decay) | p, 3p, 9p |
| tr_adam | TR-Adam, authors' defaults | a, 3a, 9a |

TR's 1/(k+1) decay makes its average step 0.293x that of SGD at the same
learning rate, so the SGD grid sits 3x lower than TR's: it contains SGD at
TR-SGD's average step (0.29p to 2.6p), and the edge rule extends either.
"decay only" isolates the proximal term: TR-SGD against it is the proximal
term's effect at the same schedule and step sizes; "decay only" against SGD
is the inner decay's. For TR-Adam
two untuned controls at `--controls` batch sizes do the same (3 seeds each):
Adam at its grid value nearest TR-Adam's average step, and TR-Adam with
strength 0 at TR-Adam's picked LR.

Usage:
  python benchmarks/small_batch.py                 # the benchmark
  # or in parallel, then merged (table and figures from all three):
  python benchmarks/small_batch.py --batch-sizes 8 16
  python benchmarks/small_batch.py --batch-sizes 2 --out DIR2 --curve-epochs 0
  python benchmarks/small_batch.py --merge DIR2/small_batch.json
  python benchmarks/small_batch.py --batch-sizes 16 --epochs 1 --extra-seeds 0
Writes benchmarks/results/small_batch.json (after every method, and resumes
from it), small_batch.png (test accuracy against B) and
small_batch_curve.png (SGD's test accuracy per epoch at B = 8: every seed
of the benchmark's budget, and one `--curve-epochs` run at the same peak
LR), prints a Markdown table.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import time

import numpy as np

import _common

from sngm_optax.harness import compare
from sngm_optax.harness import train
from sngm_optax.harness import config as config_lib

SGD_LR = 0.01    # p at B = 8 (0.03 was unstable in a pilot)
ADAM_LR = 0.003  # a at B = 8
GRID_SIZE = 3
MAX_EXTENSIONS = 1  # per side
CURVE_METHOD, CURVE_BATCH_SIZE = "sgd", 8
# Average step of TR's 1/(k+1) decay relative to its learning rate, S = 10.
TR_STEP_FACTOR = sum(1 / (k + 1) for k in range(10)) / 10


@dataclasses.dataclass(frozen=True)
class Method:
  label: str
  optimizer: str
  base: str          # "sgd" or "adam": which peak the grid scales
  lowest: float      # the grid's lowest factor; GRID_SIZE values x3 apart
  kwargs: tuple = ()  # optimizer_kwargs as (key, value) pairs


METHODS = (
    Method("sgd", "msgd", "sgd", 1 / 3),
    Method("adam", "adam", "adam", 1 / 3),
    Method("tr_sgd", "tr_sgd", "sgd", 1.0),
    Method("decay only", "tr_sgd", "sgd", 1.0, (("strength", 0.0),)),
    Method("tr_adam", "tr_adam", "adam", 1.0),
)


def learning_rate(method: Method, batch_size: int, index: int) -> float:
  """The grid's `index`-th value (negative or past the end: an extension)."""
  peak = (SGD_LR if method.base == "sgd" else ADAM_LR) * math.sqrt(
      batch_size / 8)
  return float(f"{peak * method.lowest * 3.0 ** index:.3g}")


def strip(run: dict, keep_history: bool) -> dict:
  return {k: v for k, v in run.items() if keep_history or k != "history"}


def one_run(config: config_lib.Config, dataset, quiet: bool,
            keep_history: bool = False) -> dict:
  """Trains `config` once: `compare`'s run summary (`diverged` included)."""
  contender = compare.run_contender(config, config.optimizer,
                                    config.batch_size, [config.learning_rate],
                                    dataset, quiet)
  return strip(contender["runs"][0], keep_history)


def _pick(runs: dict) -> dict | None:
  finished = [run for run in runs.values() if not run["diverged"]]
  return max(finished, key=lambda run: run["val_accuracy"]) if finished else None


def run_method(method: Method, base: config_lib.Config, dataset,
               extra_seeds: int, quiet: bool) -> dict:
  """Grid (extended past an edge pick), pick on validation, more seeds."""
  start = time.perf_counter()
  config = dataclasses.replace(base, optimizer=method.optimizer,
                               optimizer_kwargs=dict(method.kwargs))
  curve = (method.label == CURVE_METHOD
           and base.batch_size == CURVE_BATCH_SIZE)
  runs = {}  # grid index -> run
  low, high = 0, GRID_SIZE - 1
  extensions = 0
  while True:
    for index in range(low, high + 1):
      if index not in runs:
        runs[index] = one_run(dataclasses.replace(
            config, learning_rate=learning_rate(method, base.batch_size,
                                                index)), dataset, quiet, curve)
    best = _pick(runs)
    if best is None or extensions >= 2 * MAX_EXTENSIONS:
      break
    best_index = next(i for i, run in runs.items() if run is best)
    if best_index == low and low > -MAX_EXTENSIONS:
      low -= 1
    elif best_index == high and high < GRID_SIZE - 1 + MAX_EXTENSIONS:
      high += 1
    else:
      break
    extensions += 1
  ordered = [runs[i] for i in sorted(runs)]
  learning_rates = [run["learning_rate"] for run in ordered]
  result = {"method": method.label, "optimizer": method.optimizer,
            "optimizer_kwargs": dict(method.kwargs),
            "batch_size": base.batch_size, "learning_rates": learning_rates,
            "grid_extensions": extensions,
            "runs": [strip(run, curve and run is best) for run in ordered],
            "best": best and strip(best, False)}
  if best is None:
    result["wall_time_s"] = time.perf_counter() - start
    return result
  result["picked_at_grid_edge"] = best["learning_rate"] in (
      learning_rates[0], learning_rates[-1])
  seed_runs = [one_run(
      dataclasses.replace(config, learning_rate=best["learning_rate"],
                          seed=base.seed + offset), dataset, quiet, curve)
               for offset in range(1, extra_seeds + 1)]
  accuracies = [run["test_accuracy"] for run in [best, *seed_runs]
                if not run["diverged"]]
  if curve:
    result["curves"] = [[h["test_accuracy"] for h in run["history"]]
                        for run in [runs[next(i for i, r in runs.items()
                                              if r is best)], *seed_runs]
                        if not run["diverged"]]
  result.update(
      seed_runs=[strip(run, False) for run in seed_runs],
      num_seeds=len(accuracies),
      num_diverged_seeds=1 + len(seed_runs) - len(accuracies),
      test_accuracies=accuracies,
      test_accuracy_mean=float(np.mean(accuracies)),
      test_accuracy_std=float(np.std(accuracies, ddof=1))
      if len(accuracies) > 1 else 0.0,
      steps=best["steps"], step_time_ms=1e3 * best["wall_time_s"] /
      best["steps"], wall_time_s=time.perf_counter() - start)
  return result


def long_curve(base: config_lib.Config, dataset, results: list[dict],
               epochs: float, quiet: bool) -> None:
  """Appends one `epochs`-long SGD run at B = 8 and its picked LR (seed 0)
  to `results`, as method "sgd long", with its test accuracy per epoch."""
  label = f"{CURVE_METHOD} long"
  picked = [r for r in results if r["method"] == CURVE_METHOD
            and r["batch_size"] == CURVE_BATCH_SIZE and r["best"]]
  if not picked or any(r["method"] == label for r in results):
    return
  method = next(m for m in METHODS if m.label == CURVE_METHOD)
  config = dataclasses.replace(
      base, optimizer=method.optimizer, batch_size=CURVE_BATCH_SIZE,
      epochs=epochs, learning_rate=picked[0]["best"]["learning_rate"])
  run = one_run(config, dataset, quiet, keep_history=True)
  results.append({"method": label, "batch_size": CURVE_BATCH_SIZE,
                  "epochs": epochs, "best": None, "run": strip(run, False),
                  "curve": [h["test_accuracy"] for h in run["history"]]})


def matched_step_controls(base: config_lib.Config, dataset,
                          results: list[dict], batch_size: int,
                          num_seeds: int, quiet: bool) -> None:
  """Two untuned controls for TR-Adam at `batch_size`, `num_seeds` seeds
  each, appended to `results` (label "control: ..."):

  - Adam at the value of its grid nearest TR-Adam's average step (0.293 x
    TR-Adam's picked LR): the step size without the proximal term;
  - TR-Adam with strength 0 at its picked LR: the 1/(k+1) decay alone.
  """
  picked = {r["method"]: r for r in results if r["batch_size"] == batch_size
            and r.get("best")}
  if "tr_adam" not in picked or "adam" not in picked:
    return
  tr_lr = picked["tr_adam"]["best"]["learning_rate"]
  adam_grid = [run["learning_rate"] for run in picked["adam"]["runs"]]
  adam_lr = min(adam_grid, key=lambda lr: abs(math.log(lr / (
      TR_STEP_FACTOR * tr_lr))))
  for label, optimizer, lr, kwargs in (
      ("control: adam at tr_adam's mean step", "adam", adam_lr, {}),
      ("control: tr_adam decay only", "tr_adam", tr_lr, {"strength": 0.0})):
    if any(r["method"] == label and r["batch_size"] == batch_size
           for r in results):
      continue
    config = dataclasses.replace(base, optimizer=optimizer,
                                 batch_size=batch_size, learning_rate=lr,
                                 optimizer_kwargs=kwargs)
    runs = [one_run(dataclasses.replace(config, seed=base.seed + offset),
                    dataset, quiet) for offset in range(num_seeds)]
    accuracies = [run["test_accuracy"] for run in runs if not run["diverged"]]
    results.append({
        "method": label, "batch_size": batch_size, "best": None,
        "learning_rate": lr, "optimizer_kwargs": kwargs, "runs": runs,
        "test_accuracies": accuracies,
        "test_accuracy_mean": float(np.mean(accuracies)),
        "test_accuracy_std": float(np.std(accuracies, ddof=1))})
    print(f"B={batch_size:<3d} {label}: lr {lr:g}  test "
          f"{100 * np.mean(accuracies):.2f} ± "
          f"{100 * results[-1]['test_accuracy_std']:.2f}", flush=True)


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
  for label in sorted({r["method"] for r in results
                       if r["method"].startswith("control")}):
    cells = [label]
    for batch_size in batch_sizes:
      match = [r for r in results
               if r["method"] == label and r["batch_size"] == batch_size]
      cells.append(f"{100 * match[0]['test_accuracy_mean']:.1f} ± "
                   f"{100 * match[0]['test_accuracy_std']:.1f} (lr "
                   f"{match[0]['learning_rate']:g})" if match else "-")
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
    x = [r["batch_size"] * 1.04 ** (index - 2) for r in rows]
    axes.errorbar(x, [100 * r["test_accuracy_mean"] for r in rows],
                  yerr=[100 * r["test_accuracy_std"] for r in rows],
                  marker="o", capsize=3, label=method.label,
                  linestyle="--" if method.label == "decay only" else "-")
  axes.set_xscale("log", base=2)
  axes.set_xticks([2, 4, 8, 16], ["2", "4", "8", "16"])
  _finish(figure, axes, path, "batch size",
          "test accuracy (%), mean ± sd over seeds", title)


def _finish(figure, axes, path, xlabel, ylabel, title) -> None:
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  axes.set_title(title, fontsize=8)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)
  _common.save_figure(figure, path)


def plot_curve(results: list[dict], path: pathlib.Path, title: str) -> None:
  """SGD's test accuracy per epoch at B = 8 (its picked LR, every seed),
  and the longer run's."""
  plt = _common.pyplot()
  rows = [r for r in results if r.get("curves")]
  if plt is None or not rows:
    return
  figure, axes = plt.subplots(figsize=(6.4, 3.6))
  for number, curve in enumerate(rows[0]["curves"]):
    epochs = np.arange(1, len(curve) + 1)
    axes.plot(epochs, 100 * np.asarray(curve), marker=".",
              label=f"seed {number}")
  for r in results:
    if r["method"] == f"{CURVE_METHOD} long":
      curve = r["curve"]
      axes.plot(np.arange(1, len(curve) + 1), 100 * np.asarray(curve),
                color="k", linestyle=":", label=f"{r['epochs']:g} epochs, "
                "seed 0")
  _finish(figure, axes, path, "epoch", "test accuracy (%)", title)


def _summary(args, methods, base, data_line, results, start, load_start):
  """The JSON payload: settings, machine, every result, the table."""
  summary = {
      "claim": "TR-SGD / TR-Adam beat SGD (with a grid containing TR's "
               "average step) and Adam at batch sizes 2-16",
      "command": _common.command_line(),
      "machine": _common.machine_description(),
      "load_average_start": load_start,
      "load_average_end": os.getloadavg(),
      "data": data_line,
      "tr_average_step_factor": TR_STEP_FACTOR,
      "sgd_lr_at_b8": SGD_LR, "adam_lr_at_b8": ADAM_LR,
      "grid_size": GRID_SIZE, "max_extensions_per_side": MAX_EXTENSIONS,
      "grids": {m.label: m.lowest for m in methods},
      "config": dataclasses.asdict(base),
      "wall_time_s": time.perf_counter() - start,
      "complete": sum(r["method"] in {m.label for m in methods}
                      for r in results)
                  == len(methods) * len(args.batch_sizes),
      "results": results,
  }
  summary["table"] = format_table(results)
  return summary


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", type=int, nargs="+",
                      default=[8, 16, 4, 2],
                      help="in the order run (the cheap ones first)")
  parser.add_argument("--num-samples", type=int, default=14000,
                      help="MNIST-1D samples (80%% train, 20%% test; 10%% "
                      "of train held out for validation)")
  parser.add_argument("--epochs", type=float, default=8.0)
  parser.add_argument("--curve-epochs", type=float, default=24.0,
                      help="one longer SGD run at B = 8 (its picked LR), to "
                      "show where its test accuracy plateaus (0: none)")
  parser.add_argument("--extra-seeds", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the grid runs; the extra seeds follow it")
  parser.add_argument("--methods", nargs="+", default=None,
                      help="labels from METHODS (default: all)")
  parser.add_argument("--controls", type=int, nargs="*", default=[2],
                      help="batch sizes at which to run the matched-step "
                      "controls of TR-Adam (see matched_step_controls)")
  parser.add_argument("--merge", type=pathlib.Path, nargs="*", default=[],
                      help="small_batch.json files of runs over other batch "
                      "sizes (same settings) whose results to take over")
  parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS)
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args()

  start = time.perf_counter()
  load_start = os.getloadavg()
  base = config_lib.Config(num_samples=args.num_samples, val_fraction=0.1,
                           model="cnn", weight_decay=1e-4, warmup_epochs=0.0,
                           schedule="step", epochs=args.epochs,
                           num_devices=1, seed=args.seed)
  dataset = train.load_dataset(base)
  num_val = max(1, round(0.1 * dataset.num_train))
  data_line = (f"MNIST-1D: {dataset.num_train - num_val} train + {num_val} "
               f"validation / {dataset.num_test} test; CNN; "
               f"{args.epochs:g} epochs, step decay, at every batch size")
  print(data_line, flush=True)
  methods = [m for m in METHODS
             if args.methods is None or m.label in args.methods]
  out_json = args.out / "small_batch.json"
  results = []
  # Resume: keep the finished (method, B) results of this and merged runs.
  for path in [out_json, *args.merge]:
    earlier = json.loads(path.read_text()) if path.exists() else {}
    if earlier.get("data") != data_line:
      continue
    results += [r for r in earlier["results"] if not any(
        (r["method"], r["batch_size"]) == (done["method"], done["batch_size"])
        for done in results)]
  args.out.mkdir(parents=True, exist_ok=True)
  for batch_size in args.batch_sizes:
    for method in methods:
      if any(r["method"] == method.label and r["batch_size"] == batch_size
             for r in results):
        continue
      result = run_method(method, dataclasses.replace(base,
                                                      batch_size=batch_size),
                          dataset, args.extra_seeds, args.quiet)
      results.append(result)
      if result["best"] is not None:
        print(f"B={batch_size:<3d} {method.label:>10s}: lr "
              f"{result['best']['learning_rate']:g}  test "
              f"{100 * result['test_accuracy_mean']:.2f} ± "
              f"{100 * result['test_accuracy_std']:.2f} "
              f"({result['num_seeds']} seeds, "
              f"{result['step_time_ms']:.2f} ms/step)", flush=True)
      summary = _summary(args, methods, base, data_line, results, start,
                         load_start)
      _common.write_json(out_json, summary)
    if batch_size == CURVE_BATCH_SIZE and args.curve_epochs:
      long_curve(base, dataset, results, args.curve_epochs, args.quiet)
    if batch_size in args.controls:
      matched_step_controls(base, dataset, results, batch_size,
                            1 + args.extra_seeds, args.quiet)
      _common.write_json(out_json, _summary(args, methods, base, data_line,
                                            results, start, load_start))
  summary = _summary(args, methods, base, data_line, results, start,
                     load_start)
  _common.write_json(out_json, summary)
  title = (f"{data_line}\npicked LR, {1 + args.extra_seeds} seeds, first "
           f"seed {args.seed}")
  plot(results, args.out / "small_batch.png", title)
  plot_curve(results, args.out / "small_batch_curve.png",
             f"{CURVE_METHOD} at B = {CURVE_BATCH_SIZE}, picked LR: " + title)
  print("\n" + summary["table"])
  print(f"\n(* picked at the edge of its grid)\nmachine: "
        f"{_common.machine_line(summary['machine'])}; load "
        f"{load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}; total "
        f"{summary['wall_time_s'] / 60:.1f} min; wrote {out_json}, "
        f"small_batch.png and small_batch_curve.png")


if __name__ == "__main__":
  main()
