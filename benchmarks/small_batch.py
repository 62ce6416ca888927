"""Does trajectory regularization (TR) help at tiny batches? MNIST-1D CNN, B = 2-16.

The authors' setting (ResNet-18 on CIFAR, B = 8, 200 epochs, LR x0.1 at 50 %
and 75 % of training, coupled lambda = lambda_0 / eta_t with lambda_0 =
0.1 eta_0, S = 10, the inner window restarted each epoch, weight decay 1e-4)
scaled to a CPU: every run trains the harness CNN (one CPU device) on
MNIST-1D, for the same sample budget at every batch size (`--epochs`
passes, so B = 2 takes 8x the steps of B = 16), with the "step" schedule
(peak LR x0.1 at 50 % and x0.01 at 75 % of the budget, no warm-up) and
coupled weight decay 1e-4 on the kernels. TR uses the harness defaults,
which are the authors'.

On the experiment engine (`sngm_optax.harness.sweep`): for each batch size
and method the peak learning rate is a `sweep.Grid` of `GRID_SIZE` values
spaced by 3, extended by one value past an edge pick on each side
(`MAX_EXTENSIONS`), the same trial budget for every contender; `sweep.tune`
picks on a validation split (10 % of the training set; a diverged or
collapsed run is never picked) and reruns the pick on `--extra-seeds` more
seeds (initialization and batch order). Every run is kept in the run store
`small_batch_runs.jsonl` (the longer curve run in `small_batch_long_runs.jsonl`)
beside the results, so a stopped benchmark resumes where it stopped.

Methods (`p` = `SGD_LR * sqrt(B / 8)`, `a` = `ADAM_LR * sqrt(B / 8)`):

| method | optimizer | initial grid |
| --- | --- | --- |
| sgd | momentum SGD (0.9) | p/3, p, 3p |
| adam | Adam, coupled L2 | a/3, a, 3a |
| tr_sgd | TR-SGD, authors' defaults | p, 3p, 9p |
| decay only | TR-SGD with strength 0 (only the 1/(k+1) decay) | p, 3p, 9p |
| tr_adam | TR-Adam, authors' defaults | a, 3a, 9a |

TR's 1/(k+1) decay makes its average step `TR_STEP_FACTOR` that of SGD at
the same learning rate, so the SGD grid sits 3x lower than TR's: it contains
SGD at TR-SGD's average step, and the edge rule extends either. "decay
only" isolates the proximal term. For TR-Adam two untuned controls at
`--controls` batch sizes do the same: Adam at the value of its grid nearest
TR-Adam's average step, and TR-Adam with strength 0 at TR-Adam's pick.

Usage:
  python benchmarks/small_batch.py                 # the benchmark
  # or in parallel, then merged (the merge trains what is missing):
  python benchmarks/small_batch.py --batch-sizes 8 16
  python benchmarks/small_batch.py --batch-sizes 2 --out DIR2 --curve-epochs 0
  python benchmarks/small_batch.py --merge DIR2/small_batch.json
  python benchmarks/small_batch.py --convert-legacy  # the pre-engine JSON
Writes small_batch.json (`sweep.results_record`; after every contender),
small_batch.png (test accuracy against B) and small_batch_curve.png (SGD's
test accuracy per epoch at B = 8: every seed, and one `--curve-epochs` run
at its pick) under `--out`, and prints the table.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import re
import subprocess

import numpy as np

import _common
import report

from sngm_optax.harness import config as config_lib
from sngm_optax.harness import sweep
from sngm_optax.harness import train

SGD_LR = 0.01    # p at B = 8 (0.03 was unstable in a pilot)
ADAM_LR = 0.003  # a at B = 8
GRID_SIZE = 3
MAX_EXTENSIONS = 1  # per side
CURVE_METHOD, CURVE_BATCH_SIZE = "sgd", 8
# Average step of TR's 1/(k+1) decay relative to its learning rate, S = 10.
TR_STEP_FACTOR = sum(1 / (k + 1) for k in range(10)) / 10
RUNS, LONG_RUNS = "small_batch_runs.jsonl", "small_batch_long_runs.jsonl"
# The settings every run of a store shares (its declared budget).
BUDGET_FIELDS = ("num_samples", "data_seed", "val_fraction", "model",
                 "schedule", "warmup_epochs", "weight_decay", "epochs",
                 "num_devices")
CLAIM = ("TR-SGD / TR-Adam beat SGD (with a grid containing TR's average "
         "step) and Adam at batch sizes 2-16")


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
# The matched-step controls of TR-Adam: (label, optimizer, kwargs).
ADAM_AT_TR_STEP = ("control: adam at tr_adam's mean step", "adam", {})
TR_ADAM_DECAY_ONLY = ("control: tr_adam decay only", "tr_adam",
                      {"strength": 0.0})


def grid(method: Method, batch_size: int) -> sweep.Grid:
  """The method's learning-rate grid at `batch_size`."""
  peak = (SGD_LR if method.base == "sgd" else ADAM_LR) * math.sqrt(
      batch_size / 8)
  values = [float(f"{peak * method.lowest * 3.0 ** index:.3g}")
            for index in range(GRID_SIZE)]
  return sweep.Grid({"learning_rate": values}, max_extensions=MAX_EXTENSIONS)


def base_config(num_samples: int, epochs: float,
                seed: int) -> config_lib.Config:
  return config_lib.Config(num_samples=num_samples, val_fraction=0.1,
                           model="cnn", weight_decay=1e-4, warmup_epochs=0.0,
                           schedule="step", epochs=epochs, num_devices=1,
                           seed=seed)


def budget(base: config_lib.Config) -> dict:
  return {"benchmark": "small_batch",
          **{name: getattr(base, name) for name in BUDGET_FIELDS}}


def method_config(base, optimizer, batch_size, kwargs) -> config_lib.Config:
  return dataclasses.replace(base, optimizer=optimizer, batch_size=batch_size,
                             optimizer_kwargs=dict(kwargs))


def contender(base, trainer, label, optimizer, kwargs, batch_size, search,
              seeds) -> dict:
  """`sweep.tune` of one method at one batch size, labelled; `trainer(config)`
  gives its `train(point, seed)`."""
  config = method_config(base, optimizer, batch_size, kwargs)
  result = sweep.tune(label, trainer(config), search, seeds=seeds)
  return {**result, "batch_size": batch_size, "optimizer": optimizer,
          "optimizer_kwargs": dict(kwargs)}


def control_points(tuned: list[dict], batch_size: int) -> list[tuple]:
  """The two controls' (label, optimizer, kwargs, learning rate) at
  `batch_size`, [] without both TR-Adam's and Adam's picks there."""
  picked = {r["name"]: r for r in tuned
            if r["batch_size"] == batch_size and r["pick"]}
  if "tr_adam" not in picked or "adam" not in picked:
    return []
  tr_lr = picked["tr_adam"]["pick"]["point"]["learning_rate"]
  adam_grid = [t["point"]["learning_rate"] for t in picked["adam"]["trials"]]
  adam_lr = min(adam_grid, key=lambda lr: abs(math.log(
      lr / (TR_STEP_FACTOR * tr_lr))))
  return [(*ADAM_AT_TR_STEP, adam_lr), (*TR_ADAM_DECAY_ONLY, tr_lr)]


def untuned(learning_rate: float) -> sweep.Grid:
  return sweep.Grid({"learning_rate": [learning_rate]})


def curve_record(store: sweep.RunStore, long_store: sweep.RunStore,
                 tuned: list[dict], long_key: str | None) -> dict | None:
  """SGD's test accuracy per epoch at B = 8 (each seed of its pick) and the
  longer run's, from the stores."""
  picked = [r for r in tuned if r["name"] == CURVE_METHOD
            and r["batch_size"] == CURVE_BATCH_SIZE and r["pick"]]
  if not picked:
    return None
  runs = {run.key: run for run in store}
  seeds = [{"seed": s["seed"], "status": s["status"],
            "test_accuracy": [h["test_accuracy"]
                              for h in runs[s["key"]].curve]}
           for s in picked[0]["seeds"]]
  long = None
  if long_key is not None:
    run = {run.key: run for run in long_store}[long_key]
    long = {"epochs": run.settings["epochs"], "key": run.key,
            "status": run.status, "seed": run.settings["seed"],
            "test_accuracy": [h["test_accuracy"] for h in run.curve]}
  return {"method": CURVE_METHOD, "batch_size": CURVE_BATCH_SIZE,
          "learning_rate": picked[0]["pick"]["point"]["learning_rate"],
          "seeds": seeds, "long": long}


def long_config(base, tuned, epochs) -> config_lib.Config | None:
  """The longer SGD run at B = 8 and its pick (first seed), or None."""
  picked = [r for r in tuned if r["name"] == CURVE_METHOD
            and r["batch_size"] == CURVE_BATCH_SIZE and r["pick"]]
  if not picked or not epochs:
    return None
  return dataclasses.replace(
      method_config(base, "msgd", CURVE_BATCH_SIZE, {}), epochs=epochs,
      learning_rate=picked[0]["pick"]["point"]["learning_rate"])


def results(*, base, data, tuned, controls, curve, searches, command,
            machine, **fields) -> dict:
  """The results JSON: `sweep.results_record` and this benchmark's fields."""
  return sweep.results_record(
      "small_batch", claim=CLAIM, command=command, machine=machine,
      budget=budget(base), contenders=tuned,
      trial_budget=sweep.check_same_budget(searches) if searches else None,
      data=data, seeds=sorted({s["seed"] for r in tuned for s in r["seeds"]}),
      batch_sizes=sorted({r["batch_size"] for r in tuned}),
      methods=[m.label for m in METHODS],
      tr_average_step_factor=TR_STEP_FACTOR, sgd_lr_at_b8=SGD_LR,
      adam_lr_at_b8=ADAM_LR, grid_size=GRID_SIZE,
      max_extensions_per_side=MAX_EXTENSIONS,
      collapsed=sum(r["collapsed"] for r in tuned),
      controls=controls, curve=curve, runs=RUNS, long_runs=LONG_RUNS,
      **fields)


def plot(record: dict, path: pathlib.Path, title: str) -> None:
  plt = _common.pyplot()
  if plt is None:
    return
  figure, axes = plt.subplots(figsize=(6.4, 4.2))
  for index, method in enumerate(METHODS):
    rows = sorted((r for r in record["contenders"]
                   if r["name"] == method.label and r["summary"]),
                  key=lambda r: r["batch_size"])
    if not rows:
      continue
    # Small horizontal offsets keep the error bars apart.
    x = [r["batch_size"] * 1.04 ** (index - 2) for r in rows]
    axes.errorbar(x, [100 * r["summary"]["mean"] for r in rows],
                  yerr=[100 * r["summary"]["sd"] for r in rows],
                  marker="o", capsize=3, label=method.label,
                  linestyle="--" if method.label == "decay only" else "-")
  axes.set_xscale("log", base=2)
  sizes = record["batch_sizes"]
  axes.set_xticks(sizes, [str(b) for b in sizes])
  _finish(figure, axes, path, "batch size",
          "test accuracy (%), mean ± sd over seeds", title)


def _finish(figure, axes, path, xlabel, ylabel, title) -> None:
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  axes.set_title(title, fontsize=8)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)
  _common.save_figure(figure, path)


def plot_curve(record: dict, path: pathlib.Path, title: str) -> None:
  """SGD's test accuracy per epoch at B = 8 (its pick, every seed), and the
  longer run's."""
  plt = _common.pyplot()
  curve = record["curve"]
  if plt is None or not curve:
    return
  figure, axes = plt.subplots(figsize=(6.4, 3.6))
  for seed in curve["seeds"]:
    values = seed["test_accuracy"]
    axes.plot(np.arange(1, len(values) + 1), 100 * np.asarray(values),
              marker=".", label=f"seed {seed['seed']}")
  if curve["long"]:
    values = curve["long"]["test_accuracy"]
    axes.plot(np.arange(1, len(values) + 1), 100 * np.asarray(values),
              color="k", linestyle=":",
              label=f"{curve['long']['epochs']:g} epochs, seed "
              f"{curve['long']['seed']}")
  _finish(figure, axes, path, "epoch", "test accuracy (%)", title)


def data_fields(dataset, epochs: float) -> dict:
  num_val = max(1, round(0.1 * dataset.num_train))
  return {"num_train": dataset.num_train - num_val, "num_val": num_val,
          "num_test": dataset.num_test, "epochs": epochs,
          "line": f"MNIST-1D: {dataset.num_train - num_val} train + "
                  f"{num_val} validation / {dataset.num_test} test; CNN; "
                  f"{epochs:g} epochs, step decay, at every batch size"}


def _stores(out: pathlib.Path, base, curve_epochs):
  return (sweep.RunStore(out / RUNS, budget(base)),
          sweep.RunStore(out / LONG_RUNS, budget(
              dataclasses.replace(base, epochs=curve_epochs or base.epochs))))


def main(argv=None) -> None:
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
                      "controls of TR-Adam")
  parser.add_argument("--merge", type=pathlib.Path, nargs="*", default=[],
                      help="small_batch.json files (or their directories) of "
                      "runs over other batch sizes, same settings, whose run "
                      "stores to take over")
  parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS)
  parser.add_argument("--quiet", action="store_true")
  parser.add_argument("--convert-legacy", type=pathlib.Path, default=None,
                      metavar="OLD_JSON",
                      help="convert a small_batch.json written before the "
                      "engine into --out (no training)")
  args = parser.parse_args(argv)
  if args.convert_legacy:
    convert_legacy(args.convert_legacy, args.out, tuple(sorted(
        args.convert_legacy.parent.glob("small_batch_parts/*/*.json"))))
    return

  base = base_config(args.num_samples, args.epochs, args.seed)
  dataset = train.load_dataset(base)
  data = data_fields(dataset, args.epochs)
  print(data["line"], flush=True)
  store, long_store = _stores(args.out, base, args.curve_epochs)
  for path in args.merge:  # take over the runs of parallel processes
    folder = path if path.is_dir() else path.parent
    for ours, name in ((store, RUNS), (long_store, LONG_RUNS)):
      if (folder / name).exists():
        for run in sweep.RunStore(folder / name, ours.budget):
          if ours.get(run.settings) is None:
            ours.put(run)

  def trainer(config):
    return sweep.harness_trainer(store, config, dataset)

  methods = [m for m in METHODS
             if args.methods is None or m.label in args.methods]
  seeds = tuple(args.seed + offset for offset in range(1 + args.extra_seeds))
  tuned, controls, searches, long_key = [], [], {}, None

  def write():
    record = results(base=base, data=data, tuned=tuned, controls=controls,
                     curve=curve_record(store, long_store, tuned, long_key),
                     searches=searches, command=_common.command_line(),
                     machine=_common.machine_description())
    _common.write_json(args.out / "small_batch.json", record)
    return record

  for batch_size in args.batch_sizes:
    for method in methods:
      search = grid(method, batch_size)
      searches[f"{method.label} B={batch_size}"] = search
      tuned.append(contender(base, trainer, method.label, method.optimizer,
                             method.kwargs, batch_size, search, seeds))
      if not args.quiet:
        print(f"B={batch_size:<3d} {method.label:>10s}: "
              f"{report.small_batch_cell(tuned[-1])}", flush=True)
      write()
    config = long_config(base, tuned, args.curve_epochs)
    if batch_size == CURVE_BATCH_SIZE and config is not None:
      long_key = long_store.run(
          sweep.config_settings(config),
          lambda _, config=config: sweep.train_config(config, dataset)).key
    if batch_size in args.controls:
      for label, optimizer, kwargs, lr in control_points(tuned, batch_size):
        controls.append({**contender(base, trainer, label, optimizer, kwargs,
                                     batch_size, untuned(lr), seeds),
                         "untuned": True})
    write()
  record = write()
  title = (f"{data['line']}\npicked LR, {len(seeds)} seeds, first seed "
           f"{args.seed}")
  plot(record, args.out / "small_batch.png", title)
  plot_curve(record, args.out / "small_batch_curve.png",
             f"{CURVE_METHOD} at B = {CURVE_BATCH_SIZE}, picked LR: " + title)
  print("\n" + report.small_batch_table(record))
  print(f"\nwrote {args.out / 'small_batch.json'} and its run stores")


# ----------------------------------------------------------------------------
# Converting the JSON written before the engine (kept in git history).

# The code that ran the committed results (benchmarks/README.md's command).
LEGACY_CODE_VERSION = "516ec65"


def _legacy_run(settings, old, converted_from, curve=()) -> sweep.Run:
  extra = {"converted_from": converted_from,
           "note": "run_time_s includes compilation (not recorded apart)"}
  if old.get("diverged"):
    return sweep.Run.diverged(settings, "non-finite loss (old record)",
                              code_version=LEGACY_CODE_VERSION, extra=extra)
  final = {k: old[k] for k in ("val_accuracy", "test_accuracy", "test_loss",
                               "steps") if k in old}
  return sweep.Run.finished(
      settings, final, num_classes=10, curve=list(curve),
      run_time_s=old["wall_time_s"], compile_time_s=0.0,
      code_version=LEGACY_CODE_VERSION, extra=extra)


def _git_commit(path: pathlib.Path) -> str:
  """The last commit of `path` ("uncommitted" outside git)."""
  found = subprocess.run(["git", "log", "--format=%h", "-1", "--",
                          path.name], cwd=path.parent, capture_output=True,
                         text=True, check=False).stdout.strip()
  return found or "uncommitted"


def convert_legacy(old_path: pathlib.Path, out: pathlib.Path,
                   parts: tuple = ()) -> dict:
  """Converts a pre-engine small_batch.json (and the JSON of the parts it
  merged, `parts`) into the run stores and results JSON under `out`.

  Every old run becomes a `sweep.Run` (status by the engine's rule); each
  method's search is replayed through `sweep.tune` with a `sweep.Recorded`
  search over the learning rates it tried, so the picks are the engine's.
  """
  old = json.loads(old_path.read_text())
  converted_from = f"{old_path.name}@{_git_commit(old_path)}"
  recorded = old["config"]
  base = base_config(recorded["num_samples"], recorded["epochs"],
                     recorded["seed"])
  long_epochs = next((r["epochs"] for r in old["results"]
                      if r["method"] == f"{CURVE_METHOD} long"), 0)
  for name in (RUNS, LONG_RUNS):
    (out / name).unlink(missing_ok=True)
  store, long_store = _stores(out, base, long_epochs)
  by_label = {m.label: m for m in METHODS}
  controls_by_label = {c[0]: c for c in (ADAM_AT_TR_STEP, TR_ADAM_DECAY_ONLY)}
  tuned, controls, searches, long_key = [], [], {}, None
  stored = lambda config: sweep.stored_trainer(store, config)
  seeds = tuple(range(base.seed, base.seed + max(
      r.get("num_seeds", 0) for r in old["results"])))
  for r in old["results"]:
    batch_size = r["batch_size"]
    if r["method"] == f"{CURVE_METHOD} long":
      run = r["run"]
      config = dataclasses.replace(
          method_config(base, "msgd", batch_size, {}), epochs=r["epochs"],
          learning_rate=run["learning_rate"], seed=run["seed"])
      converted = _legacy_run(
          sweep.config_settings(config), run, converted_from,
          [{"epoch": i + 1, "test_accuracy": a}
           for i, a in enumerate(r["curve"])])
      long_store.put(converted)
      long_key = converted.key
      continue
    if r["method"] in by_label:
      method = by_label[r["method"]]
      label, optimizer, kwargs = method.label, method.optimizer, dict(
          method.kwargs)
      declared = grid(method, batch_size).describe()
    else:
      label, optimizer, kwargs = controls_by_label[r["method"]]
      declared = untuned(r["learning_rate"]).describe()
    config = method_config(base, optimizer, batch_size, kwargs)
    runs = r["runs"] + r.get("seed_runs", [])
    # Old "curves": the test accuracy per epoch of the pick's seeds.
    curves = dict(zip((run["seed"] for run in runs
                       if run["learning_rate"] == (r["best"] or {}).get(
                           "learning_rate") and not run["diverged"]),
                      r.get("curves", [])))
    for run in runs:
      settings = sweep.config_settings(dataclasses.replace(
          config, learning_rate=run["learning_rate"], seed=run["seed"]))
      curve = run.get("history") or [
          {"epoch": i + 1, "test_accuracy": a}
          for i, a in enumerate(curves.get(run["seed"], []))]
      store.put(_legacy_run(settings, run, converted_from, curve))
    tried = [run["learning_rate"] for run in r["runs"]
             if run["seed"] == base.seed]
    initial = declared["axes"]["learning_rate"]
    search = sweep.Recorded(
        declared, [{"learning_rate": lr} for lr in initial + sorted(
            set(tried) - set(initial))],
        extended=[{"learning_rate": lr} for lr in tried if lr not in initial])
    result = contender(base, stored, label, optimizer, kwargs, batch_size,
                       search, seeds)
    if r["method"] in by_label:
      searches[f"{label} B={batch_size}"] = search
      tuned.append(result)
    else:
      controls.append({**result, "untuned": True})
  sizes = re.match(r"MNIST-1D: (\d+) train \+ (\d+) validation / (\d+) "
                   r"test", old["data"]).groups()
  data = {"line": old["data"], "epochs": base.epochs,
          **dict(zip(("num_train", "num_val", "num_test"), map(int, sizes)))}
  legacy_parts = []
  for part in parts:
    payload = json.loads(part.read_text())
    legacy_parts.append({
        "command": payload["command"], "wall_time_s": payload["wall_time_s"],
        "load_average_start": payload["load_average_start"],
        "load_average_end": payload["load_average_end"],
        "converted_from": f"{part.relative_to(old_path.parent)}@"
                          f"{_git_commit(part)}"})
  record = results(
      base=base, data=data, tuned=tuned, controls=controls,
      curve=curve_record(store, long_store, tuned, long_key),
      searches=searches, command=old["command"], machine=old["machine"],
      converted_from=converted_from, parts=legacy_parts)
  record["code_version"] = LEGACY_CODE_VERSION
  _common.write_json(out / "small_batch.json", record)
  return record


if __name__ == "__main__":
  main()
