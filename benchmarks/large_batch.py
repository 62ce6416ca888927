"""SNGM at large batch: a fair comparison, B = 4096, 8192 and 16384.

MNIST-1D CNN (100k examples: 72k train, 8k validation, 20k test), linear
warmup + cosine decay, the same number of epochs for every run. The
experiment runs on the engine (`sngm_optax.harness.sweep`); every
contender at a batch size follows the same procedure, with the same trial
budget (`sweep.check_same_budget`, recorded in the JSON):

1. at `--tune-batch` (4096), every large-batch contender (SNGM as in the
   paper, with decoupled weight decay, with Nesterov momentum, with
   per-layer normalization; momentum SGD, LARS, LAMB) searches its 2-D grid
   of `compare.LR_GRIDS` (3 peak learning rates x 3 weight decays; the
   grids and the rule that set them are in `sngm_optax/harness/compare.py`)
   one axis at a time (`sweep.AxisByAxis`): the learning rates at the
   middle weight decay, then the weight decays at the best learning rate;
2. at every other batch size a local grid (`sweep.Grid`): the 4096 pick's
   learning rate scaled by sqrt(B / 4096), times 1/2, 1, 2, at the 4096
   pick's weight decay;
3. a pick at an edge of its grid extends the grid by one value in that
   direction, at most `--max-extensions` times per axis and direction;
4. picks on the validation split (`sweep.tune`: never a run that diverged
   or collapsed), each pick retrained with `--extra-seeds` more seeds
   (initialization and batch order), summarized by `sweep.summarize`.

Momentum SGD at `--small-batch` is the reference (learning-rate grid of
`compare.SMALL_BATCH_GRIDS`, weight decay 1e-4). Whether the budget
(`--epochs`) is long enough: the plateau check trains the reference's pick
and the second batch size's picks of SNGM, LARS and LAMB again on twice the
epochs (all seeds); `sweep.verdict` says whether the longer run beats the
shorter one against the seed spread.

Work is done in order of priority (4096; the reference; 8192; the SNGM
variants; 16384, without momentum SGD; the plateau check; each pick's seeds
right after its grid). Every run goes to a `sweep.RunStore`,
`large_batch_runs.jsonl` (the plateau check's, of another budget, to
`large_batch_plateau_runs.jsonl`), as it ends, and a restarted benchmark
reuses them. `--stop-after HH:MM` (UTC) starts no new run after that time;
the contenders it skips are listed in the JSON (a restart after the
deadline only rebuilds the JSON and the figure from the stored runs).
`benchmarks/report.py` writes the tables and verdicts of the READMEs from
the JSON.

Usage:
  python benchmarks/large_batch.py                     # the benchmark
  python benchmarks/large_batch.py --batch-sizes 256 --tune-batch 256 \\
      --num-samples 2000 --epochs 1 --small-batch 64 --extra-seeds 1 \\
      --model mlp --out /tmp/lb                          # a smoke test
  python benchmarks/large_batch.py --convert-legacy    # the old JSON, once
Writes benchmarks/results/large_batch.json and large_batch.png.
"""

import argparse
import dataclasses
import datetime
import json
import pathlib
import subprocess
import sys
import time

import _common

from sngm_optax.harness import compare
from sngm_optax.harness import config as config_lib
from sngm_optax.harness import sweep

SNGM = ("sngm_paper", "sngm_decoupled", "sngm_nesterov", "sngm_per_layer")
OTHERS = ("msgd", "lars", "lamb")
# The tune batch's contenders, in order of priority: the goal's
# first, the SNGM variants last (the "variants" stage).
MAIN = ("sngm_paper", "lars", "lamb", "sngm_decoupled", "msgd")
SNGM_ONLY = ("sngm_nesterov", "sngm_per_layer")
# The work in order of priority.
STAGES = ("tune", "reference", "second", "variants", "rest", "plateau")
# The plateau check: these picks again on twice the epochs (the reference,
# then the goal's contenders at the second batch size).
PLATEAU = ("msgd", "sngm_paper", "lars", "lamb")
# Momentum SGD is left out beyond the second batch size.
REST = ("sngm_paper", "lars", "lamb", "sngm_decoupled")
RUNS, PLATEAU_RUNS = "large_batch_runs.jsonl", "large_batch_plateau_runs.jsonl"
CLAIM = ("SNGM at a large batch reaches the accuracy of small-batch momentum "
         "SGD and is level with LARS and LAMB")


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", type=int, nargs="+",
                      default=[4096, 8192, 16384])
  parser.add_argument("--tune-batch", type=int, default=4096,
                      help="the batch size of the full 2-D grids")
  parser.add_argument("--epochs", type=float, default=15)
  parser.add_argument("--warmup-epochs", type=float, default=1.5)
  parser.add_argument("--num-samples", type=int, default=100_000)
  parser.add_argument("--small-batch", type=int, default=256)
  parser.add_argument("--extra-seeds", type=int, default=2)
  parser.add_argument("--max-extensions", type=int, default=3,
                      help="values a grid may add past an edge pick, per "
                           "axis and direction")
  parser.add_argument("--reference-size", type=int, default=3,
                      help="learning rates of the small-batch reference's "
                           "grid (1: its middle value, not tuned)")
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--stop-after", default=None,
                      help="HH:MM UTC: start no new run after it")
  parser.add_argument("--stages", default=",".join(STAGES),
                      help="comma-separated, from " + ", ".join(STAGES)
                      + " (later stages need the tune stage's picks)")
  parser.add_argument("--contenders", default=None,
                      help="comma-separated subset of the contenders "
                           "(default all), to split the work over processes")
  parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS)
  parser.add_argument("--quiet", action="store_true")
  parser.add_argument("--convert-legacy", action="store_true",
                      help="convert the pre-engine large_batch.json and "
                           "large_batch_runs.json in --out, train nothing")
  return parser.parse_args(argv)


def _deadline(text):
  if text is None:
    return None
  now = datetime.datetime.now(datetime.timezone.utc)
  hour, minute = (int(part) for part in text.split(":"))
  stop = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
  return stop if stop > now - datetime.timedelta(hours=12) else (
      stop + datetime.timedelta(days=1))


def _around(value, factor=1.0):
  """The local grid: value * factor * (1/2, 1, 2), 3 significant digits."""
  return tuple(float(f"{value * factor * f:.3g}") for f in (0.5, 1.0, 2.0))


def _base(args, epochs_factor=1) -> config_lib.Config:
  return config_lib.Config(
      num_samples=args.num_samples, val_fraction=0.1, model=args.model,
      warmup_epochs=epochs_factor * args.warmup_epochs,
      epochs=epochs_factor * args.epochs, seed=0)


def budget_of(base: config_lib.Config) -> dict:
  """The settings every run of a store shares."""
  return {key: getattr(base, key) for key in (
      "num_samples", "data_seed", "val_fraction", "model", "epochs",
      "warmup_epochs")}


def contender_config(base: config_lib.Config, name: str,
                     batch_size: int) -> config_lib.Config:
  registry_name, kwargs = compare.VARIANTS.get(name, (name, {}))
  return dataclasses.replace(base, optimizer=registry_name,
                             batch_size=batch_size, optimizer_kwargs=kwargs)


class Benchmark:
  """The stores, the dataset and the contenders' `sweep.tune` results."""

  def __init__(self, args):
    from sngm_optax.harness import train  # pylint: disable=g-import-not-at-top
    self.args = args
    stop = _deadline(args.stop_after)
    self.base = _base(args)
    self.doubled = _base(args, epochs_factor=2)
    self.store = sweep.RunStore(args.out / RUNS, budget_of(self.base), stop)
    self.plateau_store = sweep.RunStore(args.out / PLATEAU_RUNS,
                                        budget_of(self.doubled), stop)
    self.dataset = train.load_dataset(self.base)
    self.seeds = tuple(range(args.extra_seeds + 1))
    self.results = {}  # (name, batch_size) -> contender
    self.plateau = {}  # (name, batch_size) -> its pick on twice the epochs
    self.searches = {}  # batch_size -> {name: search}
    self.skipped = []

  def tune(self, name, batch_size, search, plateau=False):
    """`sweep.tune` of `name` at `batch_size` over `search`; None (listed
    as skipped) when the store's deadline stops it."""
    store = self.plateau_store if plateau else self.store
    base = contender_config(self.doubled if plateau else self.base, name,
                            batch_size)
    label = f"{name} B={batch_size}" + (
        f" on {self.doubled.epochs:g} epochs" if plateau else "")
    try:
      result = sweep.tune(label, sweep.harness_trainer(store, base,
                                                       self.dataset),
                          search, seeds=self.seeds)
    except sweep.DeadlineReached:
      self.skipped.append(label)
      return None
    result = compare.with_pick_run(result, store, name, base.optimizer,
                                   base.optimizer_kwargs, batch_size)
    if not self.args.quiet:
      print(f"{label}: {_pick_line(result)}", flush=True)
    if not plateau:
      self.searches.setdefault(batch_size, {})[name] = search
      self.results[(name, batch_size)] = result
    return result

  def pick(self, name, batch_size=None):
    found = self.results.get((name, batch_size or self.args.tune_batch))
    return None if found is None or found["pick"] is None else found[
        "pick"]["point"]

  def full_search(self, name) -> sweep.AxisByAxis:
    """The 2-D grid of `name` at the tune batch, one axis at a time."""
    grid = compare.LR_GRIDS[name]
    return sweep.AxisByAxis(
        {"learning_rate": grid.at(self.args.tune_batch),
         "weight_decay": grid.weight_decays},
        max_extensions=self.args.max_extensions)

  def local(self, name, batch_size):
    """The local grid at `batch_size` around the tune-batch pick."""
    if (name, batch_size) in self.results:
      return
    point = self.pick(name)
    if point is None:
      self.skipped.append(f"{name} B={batch_size} (no pick at the tune "
                          "batch)")
      return
    factor = (batch_size / self.args.tune_batch) ** 0.5
    self.tune(name, batch_size, sweep.Grid(
        {"learning_rate": _around(point["learning_rate"], factor),
         "weight_decay": (point["weight_decay"],)},
        max_extensions=self.args.max_extensions))


def _pick_line(result) -> str:
  if result["pick"] is None:
    return f"every trial collapsed ({result['collapsed']})"
  summary = result["summary"]
  spread = ("" if summary is None else
            f", test {100 * summary['mean']:.2f} ± {100 * summary['sd']:.2f}"
            f" over {summary['n']} seeds")
  return (f"pick {result['pick']['point']} of {result['search']['trials_used']}"
          f" trials ({result['collapsed']} collapsed){spread}")


def run_all(bench: Benchmark) -> None:
  """The stages in order of priority; the seeds of a pick right after its
  search, while its compiled step is still cached."""
  args = bench.args
  stages = args.stages.split(",")
  chosen = args.contenders.split(",") if args.contenders else None
  keep = lambda names: [n for n in names if chosen is None or n in chosen]
  others = [b for b in args.batch_sizes if b != args.tune_batch]
  searches = {name: bench.full_search(name) for name in MAIN + SNGM_ONLY}
  sweep.check_same_budget(searches)

  def tuned(name):  # the tune batch's pick (its stored runs, if any)
    if (name, args.tune_batch) not in bench.results:
      bench.tune(name, args.tune_batch, searches[name])

  if "tune" in stages:
    for name in keep(MAIN):
      tuned(name)
  if "reference" in stages:
    bench.tune("msgd", args.small_batch, sweep.Grid(
        {"learning_rate": compare.SMALL_BATCH_GRIDS["msgd"].at(
            args.small_batch, args.reference_size),
         "weight_decay": (1e-4,)}, max_extensions=args.max_extensions))
  if "second" in stages:
    for batch_size in others[:1]:
      for name in keep(MAIN):
        tuned(name)
        bench.local(name, batch_size)
  if "variants" in stages:
    for name in keep(SNGM_ONLY):
      tuned(name)
  if "rest" in stages:
    for batch_size in others[1:]:
      for name in keep(REST):
        tuned(name)
        bench.local(name, batch_size)
  if "plateau" in stages:
    for name, batch_size in zip(PLATEAU, [args.small_batch]
                                + others[:1] * (len(PLATEAU) - 1)):
      point = bench.pick(name, batch_size)
      if point is None:
        continue
      doubled = bench.tune(name, batch_size, sweep.Grid(
          {k: (v,) for k, v in point.items()}), plateau=True)
      if doubled is not None:
        bench.plateau[(name, batch_size)] = doubled
  for batch_size, at_batch in bench.searches.items():
    sweep.check_same_budget(at_batch)


def comparisons(contenders) -> list[dict]:
  """Per batch size: each contender's trial budget and trials used."""
  by_batch = {}
  for contender in contenders:
    by_batch.setdefault(contender["batch_size"], []).append(contender)
  return [{"batch_size": batch_size,
           "budgets": {c["optimizer"]: c["search"]["trial_budget"]
                       for c in found},
           "trials_used": {c["optimizer"]: c["search"]["trials_used"]
                           for c in found}}
          for batch_size, found in sorted(by_batch.items())]


def plot(results: dict, path: pathlib.Path) -> None:
  """Test accuracy (mean ± sd over seeds) against batch size."""
  plt = _common.pyplot()
  if plt is None:
    return
  figure, axes = plt.subplots(figsize=(7, 4.5))
  contenders = [c for c in results["contenders"]
                if c["batch_size"] != results["small_batch"]]
  for name in dict.fromkeys(c["optimizer"] for c in contenders):
    points = sorted((c["batch_size"], c["summary"]) for c in contenders
                    if c["optimizer"] == name and c["summary"])
    if points:
      axes.errorbar([b for b, _ in points],
                    [100 * s["mean"] for _, s in points],
                    yerr=[100 * s["sd"] for _, s in points], marker="o",
                    capsize=3, label=name)
  reference = [c["summary"] for c in results["contenders"]
               if c["batch_size"] == results["small_batch"] and c["summary"]]
  if reference:
    mean, sd = 100 * reference[0]["mean"], 100 * reference[0]["sd"]
    axes.axhline(mean, color="black", linestyle="--",
                 label=f"msgd B={results['small_batch']}")
    axes.axhspan(mean - sd, mean + sd, color="black", alpha=0.1)
  axes.set_xscale("log", base=2)
  axes.set_xlabel("batch size")
  axes.set_ylabel("test accuracy (%), mean ± sd over seeds")
  budget = results["budget"]
  axes.set_title(f"MNIST-1D {budget['model'].upper()}, "
                 f"{budget['epochs']:g} epochs, {budget['num_samples']} "
                 "examples")
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)
  _common.save_figure(figure, path, dpi=110)


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.convert_legacy:
    convert_legacy(args.out)
    return
  start = time.perf_counter()
  bench = Benchmark(args)
  run_all(bench)
  contenders = list(bench.results.values())
  tune_budgets = {s.budget for s in bench.searches.get(args.tune_batch,
                                                       {}).values()}
  results = sweep.results_record(
      "large_batch", claim=CLAIM, command=_common.command_line(),
      machine=_common.machine_description(), budget=bench.store.budget,
      contenders=contenders,
      trial_budget=tune_budgets.pop() if len(tune_budgets) == 1 else None,
      budgets_equal=True, comparisons=comparisons(contenders),
      batch_sizes=args.batch_sizes, tune_batch=args.tune_batch,
      small_batch=args.small_batch, seeds=list(bench.seeds),
      settings={key: str(value) if isinstance(value, pathlib.Path)
                else value for key, value in vars(args).items()},
      grids={name: dataclasses.asdict(compare.LR_GRIDS[name])
             for name in MAIN + SNGM_ONLY},
      small_batch_grid=dataclasses.asdict(compare.SMALL_BATCH_GRIDS["msgd"]),
      plateau={"budget": bench.plateau_store.budget,
               "contenders": list(bench.plateau.values())},
      superseded=[], skipped=bench.skipped, runs=len(bench.store)
      + len(bench.plateau_store),
      collapsed=sweep.count_collapsed(bench.store)
      + sweep.count_collapsed(bench.plateau_store),
      wall_time_s=time.perf_counter() - start)
  _common.write_json(args.out / "large_batch.json", results)
  plot(results, args.out / "large_batch.png")
  for batch_size in sorted({c["batch_size"] for c in contenders}):
    table = compare.format_table({"contenders": [
        c for c in contenders if c["batch_size"] == batch_size]})
    print(f"\nB = {batch_size}:\n{table}", flush=True)
  if bench.skipped:
    print(f"skipped (deadline): {', '.join(bench.skipped)}")
  print(f"\nmachine: {_common.machine_line(results['machine'])}; total "
        f"{results['wall_time_s'] / 60:.1f} min; wrote "
        f"{args.out / 'large_batch.json'} and {args.out / 'large_batch.png'}")


# ----------------------------------------------------------------------------
# The pre-engine results (large_batch.json, large_batch_runs.json of
# 9108ed2), converted once to the engine's records.

LEGACY_NOTE = (
    "converted from the pre-engine results: the run had no declared trial "
    "budget, and its contenders did not get the same number of trials")


def _git_commit(path: pathlib.Path) -> str:
  described = subprocess.run(
      ["git", "log", "--format=%h", "-1", "--", path.name], cwd=path.parent,
      capture_output=True, text=True, check=True)
  return described.stdout.strip()


def _legacy_run(old: dict, config: config_lib.Config, commit: str,
                source: str) -> sweep.Run:
  """One old run as a `sweep.Run`, its status by the engine's rule."""
  settings = sweep.config_settings(config)
  fields = {"code_version": commit,
            "extra": {"converted_from": source,
                      # the old wall time includes compiling
                      "wall_time_includes_compile": True}}
  if old.get("diverged"):
    return sweep.Run.diverged(settings, old.get("error", "non-finite"),
                              **fields)
  final = {key: old[key] for key in (
      "val_accuracy", "test_accuracy", "test_loss", "steps") if key in old}
  final["samples_seen"] = old["steps"] * config.batch_size
  return sweep.Run.finished(settings, final, num_classes=10,
                            curve=old.get("history", []),
                            run_time_s=old.get("wall_time_s", 0.0), **fields)


def _legacy_contender(name, batch_size, stages, runs, base, store,
                      max_extensions, seeds=(0, 1, 2)) -> dict:
  """A `sweep.tune`-shaped result from the old contender entries of one
  search (`stages`: the learning-rate stage, then the weight-decay stage,
  or one grid), its runs taken from `store`."""
  config = contender_config(base, name, batch_size)

  def run_of(learning_rate, weight_decay, seed):
    return store.get(sweep.config_settings(dataclasses.replace(
        config, learning_rate=learning_rate, weight_decay=weight_decay,
        seed=seed)))

  trials, extended, seen = [], [], set()
  for stage in stages:
    for old in stage["runs"]:
      point = {"learning_rate": old["learning_rate"],
               "weight_decay": old["weight_decay"]}
      if tuple(point.values()) in seen:
        continue
      seen.add(tuple(point.values()))
      run = run_of(*point.values(), 0)
      trials.append({"point": point, "key": run.key, "status": run.status,
                     "score": run.metric("val_accuracy")})
    extended += [{("learning_rate", "weight_decay")[axis]: value}
                 for axis, value in stage["extended"]]
  last = stages[-1]
  on_edge = []
  if last["on_edge"]:  # the axis of more than one value in the last grid
    on_edge = ["weight_decay" if len(last["weight_decays"]) > 1
               else "learning_rate"]
  scored = [t for t in trials if t["score"] is not None]
  best = max(scored, key=lambda t: t["score"])["point"] if scored else None
  old_best = last["best"]
  if best is not None and old_best is not None:
    assert best == {"learning_rate": old_best["learning_rate"],
                    "weight_decay": old_best["weight_decay"]}, (name, best)
  axes = {"learning_rate": sorted({t["point"]["learning_rate"]
                                   for t in trials}),
          "weight_decay": sorted({t["point"]["weight_decay"]
                                  for t in trials})}
  result = {
      "name": f"{name} B={batch_size}",
      "search": {"kind": "axis_by_axis" if len(stages) > 1 else "grid",
                 "axes": axes, "max_extensions": max_extensions,
                 "trial_budget": None, "trials_used": len(trials),
                 "extended": extended, "on_edge": on_edge},
      "objective": "val_accuracy", "trials": trials,
      "collapsed": sum(t["status"] != sweep.OK for t in trials),
      "pick": None, "seeds": [], "summary": None}
  if best is not None:
    seed_runs = [(seed, run_of(*best.values(), seed)) for seed in seeds]
    seed_runs = [(seed, run) for seed, run in seed_runs if run is not None]
    result["pick"] = {"point": best, "key": seed_runs[0][1].key}
    result["seeds"] = [{"seed": seed, "key": run.key, "status": run.status,
                        "test_accuracy": run.metric("test_accuracy")}
                       for seed, run in seed_runs]
    summary = sweep.summarize(run.metric("test_accuracy")
                              for _, run in seed_runs)
    result["summary"] = None if summary is None else summary.to_json()
  return compare.with_pick_run(result, store, name, config.optimizer,
                               config.optimizer_kwargs, batch_size)


def convert_legacy(out: pathlib.Path) -> None:
  """Writes the engine's `large_batch.json`, `large_batch_runs.jsonl` and
  `large_batch_plateau_runs.jsonl` from the pre-engine files in `out`
  (their old names are left for git to remove)."""
  old_json, old_runs = out / "large_batch.json", out / "large_batch_runs.json"
  commit = _git_commit(old_runs)
  legacy = json.loads(old_json.read_text())
  runs = json.loads(old_runs.read_text())
  settings = legacy["settings"]
  args = argparse.Namespace(**{k: settings[k] for k in (
      "num_samples", "model", "epochs", "warmup_epochs")})
  base, doubled = _base(args), _base(args, epochs_factor=2)
  for path in (out / RUNS, out / PLATEAU_RUNS):
    path.unlink(missing_ok=True)
  store = sweep.RunStore(out / RUNS, budget_of(base))
  plateau_store = sweep.RunStore(out / PLATEAU_RUNS, budget_of(doubled))
  source = f"{old_runs.name}@{commit}"
  for key, old in runs.items():  # "name[ on N epochs] B=.. lr=.. wd=.. seed=.."
    head, batch, learning_rate, decay, seed = key.rsplit(" ", 4)
    name, _, epochs = head.partition(" on ")
    plateau = bool(epochs)
    config = dataclasses.replace(
        contender_config(doubled if plateau else base, name,
                         int(batch.removeprefix("B="))),
        learning_rate=float(learning_rate.removeprefix("lr=")),
        weight_decay=float(decay.removeprefix("wd=")),
        seed=int(seed.removeprefix("seed=")))
    (plateau_store if plateau else store).put(
        _legacy_run(old, config, commit, source))

  stages = {c["optimizer"]: c for c in legacy["learning_rate_stages"]}
  tune_batch = settings["tune_batch"]
  contenders, used = [], set()
  for old in legacy["contenders"]:
    name, batch_size = old["optimizer"], old["batch_size"]
    found = ([stages[name], old] if batch_size == tune_batch
             and name in stages else [old])
    contender = _legacy_contender(name, batch_size, found, runs, base, store,
                                  settings["max_extensions"])
    contenders.append(contender)
    used |= {t["key"] for t in contender["trials"]}
    used |= {s["key"] for s in contender["seeds"]}
  # Runs of no reported contender: LARS's first local grids at 8192 and
  # 16384, at the weight decay its 4096 pick had before that axis was
  # extended past 1e-6.
  superseded = []
  for batch_size in sorted({run.settings["batch_size"] for run in store
                            if run.key not in used}):
    left = [run for run in store if run.key not in used
            and run.settings["batch_size"] == batch_size]
    names = {run.settings["optimizer"] for run in left}
    decays = {run.settings["weight_decay"] for run in left}
    assert names == {"lars"} and len(decays) == 1, (names, decays)
    grid = [{"learning_rate": run.settings["learning_rate"],
             "weight_decay": run.settings["weight_decay"],
             "val_accuracy": run.final["val_accuracy"]}
            for run in left if run.settings["seed"] == 0]
    if not grid:  # only the other seeds of a trial that is reported
      (point,) = {(run.settings["learning_rate"], run.settings["weight_decay"])
                  for run in left}
      pick = _legacy_contender("lars", batch_size, [{
          "runs": [{"learning_rate": point[0], "weight_decay": point[1]}],
          "extended": [], "on_edge": False, "best": None,
          "weight_decays": [point[1]]}], runs, base, store,
                               settings["max_extensions"])
      superseded.append(dict(
          pick, note=f"the seeds of LARS's earlier pick at B = {batch_size} "
          f"(weight decay {point[1]:g}), before its weight-decay axis was "
          "extended further"))
      continue
    stage = {"runs": sorted(grid, key=lambda r: r["learning_rate"]),
             "extended": [], "on_edge": False, "best": None,
             "weight_decays": sorted(decays)}
    superseded.append(dict(_legacy_contender(
        "lars", batch_size, [stage], runs, base, store,
        settings["max_extensions"]),
        note=f"LARS's first local grid at B = {batch_size}, at weight decay "
             f"{decays.pop():g} (the 4096 pick before its weight-decay axis "
             "was extended further); replaced by the grid at the final pick"))
  plateau = []
  reference = next(c for c in contenders
                   if c["batch_size"] == settings["small_batch"])
  point = reference["pick"]["point"]
  plateau_runs = [plateau_store.get(sweep.config_settings(dataclasses.replace(
      contender_config(doubled, "msgd", settings["small_batch"]), seed=seed,
      **point))) for seed in (0, 1, 2)]
  if all(plateau_runs):
    stage = {"runs": [dict(point, val_accuracy=plateau_runs[0].final[
        "val_accuracy"])], "extended": [], "on_edge": False, "best": None,
             "weight_decays": [point["weight_decay"]]}
    plateau.append(_legacy_contender("msgd", settings["small_batch"], [stage],
                                     runs, doubled, plateau_store,
                                     settings["max_extensions"]))
  record = sweep.results_record(
      "large_batch", claim=legacy["claim"], command=legacy["command"],
      machine=legacy["machine"], budget=store.budget, contenders=contenders,
      trial_budget=None, budgets_equal=False, note=LEGACY_NOTE,
      converted_from=f"{old_json.name}@{_git_commit(old_json)}",
      comparisons=comparisons(contenders),
      batch_sizes=settings["batch_sizes"], tune_batch=tune_batch,
      small_batch=settings["small_batch"], seeds=[0, 1, 2],
      settings=settings, grids=legacy["grids"],
      small_batch_grid=legacy["small_batch_grid"],
      plateau={"budget": plateau_store.budget, "contenders": plateau},
      superseded=superseded, skipped=legacy["skipped"],
      runs=len(store) + len(plateau_store),
      collapsed=sweep.count_collapsed(store)
      + sweep.count_collapsed(plateau_store),
      wall_time_s=legacy["wall_time_s"],
      load_average_1min=legacy["load_average_1min"])
  record["converted_by"], record["code_version"] = record["code_version"], commit
  _common.write_json(old_json, record)
  print(f"wrote {old_json}, {out / RUNS} ({len(store)} runs) and "
        f"{out / PLATEAU_RUNS} ({len(plateau_store)} runs) from the files "
        f"of {commit}; {record['collapsed']} collapsed")


if __name__ == "__main__":
  main(sys.argv[1:])
