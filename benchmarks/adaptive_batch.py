"""Adaptive batch sizes against fixed batches and ramps, on one sample budget.

MNIST-1D (60k examples by default: 48k train, of which 10 % is held out for
validation, and 12k test), the CNN, B0 = 32, a cap of 8,192 on the batch,
every run the same sample budget (`--epochs`) with a warmup-cosine learning
rate scheduled in samples, so every contender follows the same learning-rate
curve over the samples it sees, with one peak learning rate for the whole
run. SNGM gets the full set of contenders:

* fixed small (B = 32), and, to check that this baseline is at its plateau,
  its pick trained on twice the samples;
* adaptive, the norm test at eta = 0.5, 0.25, 0.1 (the authors' values),
  each with the paper's rule and with the new controller options
  (`max_growth_factor=--growth`, `smoothing=--smoothing`,
  `test_interval=--interval`); the inner-product test (theta = 0.5) with
  and without them;
* fixed large: the final batch size of the headline adaptive run and the
  power of two nearest the geometric middle of 32 and it;
* the authors' baselines, a linear and a stagewise ramp-up from 32 to that
  final size.

The headline is the SNGM norm-test contender with the best validation
accuracy (mean over seeds at its pick). The other families (`--families`
after the first) get two adaptive contenders, the headline's setting and
SNGM's best inner-product setting, and the same fixed and ramped baselines
(sized by their own headline run).

The experiment runs on the engine (`sngm_optax.harness.sweep`). Every
contender's peak learning rate is picked on seed 0 from its family's grid
(`--lrs-*`) by the final validation accuracy, never the test set, with a
`sweep.Grid` that extends past an edge pick (at most `--max-extensions`
times per direction) under one declared trial budget for every contender;
diverged and collapsed runs are never picked. The pick is rerun on
`--seeds` - 1 more seeds; summaries are the final test accuracy, mean ± sd.
"Fixed B for N steps" trains each fixed batch at its pick for the headline's
mean step count N (its schedule, warmup included, over that shorter budget):
the equal-steps comparison. Every run goes to the run store
`results/adaptive_batch_runs.jsonl` as it ends, with its evaluation curve
and, for a growing batch, its per-step batch sizes and noise scales in
`extra`; a restarted command resumes from it. Writes
results/adaptive_batch.json (`sweep.results_record`) and .png; the tables
are `python benchmarks/report.py`'s.

  PYTHONPATH=. python benchmarks/adaptive_batch.py

`--convert-legacy results/adaptive_batch.json@84797e0` turned the results of
the script before the engine into the run store and results of this one,
training nothing.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import subprocess
from typing import Callable

import _common

_common.force_host_devices(4, cpu_only=True)

import numpy as np  # noqa: E402

from sngm_optax.harness import config as config_lib  # noqa: E402
from sngm_optax.harness import data  # noqa: E402
from sngm_optax.harness import sweep  # noqa: E402

CLAIM = ("an adaptive batch (B0 = 32, capped) reaches the accuracy of a fixed "
         "B = 32 in far fewer steps, on the same sample budget, and beats "
         "every fixed batch trained for as many steps")
# family -> (fixed optimizer, adaptive optimizer)
FAMILIES = {
    "SNGM": ("sngm", "sngm"),
    "AdaGrad-Norm": ("adagrad_norm", "adadagrad_norm"),
    "AdaGrad": ("adagrad", "adadagrad"),
    "MSGD": ("msgd", "msgd"),
}
SMALL = "fixed 32"
# Fixed 32 at its pick on twice the sample budget: the plateau check.
PLATEAU = f"{SMALL} for 2x the samples"
NUM_CLASSES = 10  # MNIST-1D


def adaptive_contenders(args):
  """(name, test, optimizer kwargs) of every adaptive contender."""
  options = {"max_growth_factor": args.growth, "smoothing": args.smoothing,
             "test_interval": args.interval}
  contenders = []
  for eta in (0.5, 0.25, 0.1):
    contenders.append((f"norm eta={eta} +options", "norm",
                       {"eta": eta, **options}))
    contenders.append((f"norm eta={eta} (paper rule)", "norm", {"eta": eta}))
  contenders.append(("inner product theta=0.5 +options", "inner_product",
                     {"theta": 0.5, **options}))
  contenders.append(("inner product theta=0.5 (paper rule)", "inner_product",
                     {"theta": 0.5}))
  return contenders


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num-samples", type=int, default=60000)
  parser.add_argument("--val-fraction", type=float, default=0.1)
  parser.add_argument("--epochs", type=float, default=5.0)
  parser.add_argument("--warmup-epochs", type=float, default=0.625)
  parser.add_argument("--initial-batch-size", type=int, default=32)
  parser.add_argument("--max-batch-size", type=int, default=8192)
  parser.add_argument("--devices", type=int, default=4)
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--growth", type=float, default=2.0)
  parser.add_argument("--smoothing", type=float, default=0.9)
  parser.add_argument("--interval", type=int, default=10)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--families", default="SNGM,AdaGrad-Norm,MSGD,AdaGrad",
                      help="the first gets every contender, the others the "
                      "headline contenders")
  parser.add_argument("--contenders", default=None,
                      help="only these SNGM adaptive contenders (comma "
                      "separated names; default: all)")
  parser.add_argument("--lrs-sngm", default="0.1,0.3,1")
  parser.add_argument("--lrs-adagrad-norm", default="9,27,81")
  parser.add_argument("--lrs-adagrad", default="0.03,0.1,0.3")
  parser.add_argument("--lrs-msgd", default="0.1,0.3,1")
  parser.add_argument("--max-extensions", type=int, default=2)
  parser.add_argument("--out",
                      default=str(_common.RESULTS / "adaptive_batch.json"))
  parser.add_argument("--convert-legacy", default=None,
                      metavar="OLD_JSON[@COMMIT]",
                      help="no training: convert the results of the script "
                      "before the engine (the file, or the file as COMMIT "
                      "wrote it) to --out and its store")
  return parser.parse_args(argv)


def family_lrs(args, family):
  text = getattr(args, "lrs_" + family.lower().replace("-", "_"))
  return [float(value) for value in text.split(",")]


def store_path(out: pathlib.Path) -> pathlib.Path:
  return out.with_name(out.stem + "_runs.jsonl")


def budget_of(args) -> dict:
  """The store's budget: what every run shares (the epochs of a run vary:
  the plateau check and the equal-steps runs)."""
  return {"benchmark": "adaptive_batch", "num_samples": args.num_samples,
          "data_seed": data.DEFAULT_SEED, "val_fraction": args.val_fraction,
          "model": args.model, "schedule": "warmup_cosine",
          "weight_decay": 0.0, "num_devices": args.devices,
          "sample_budget_epochs": args.epochs,
          "warmup_epochs_at_budget": args.warmup_epochs}


# A function (config, family, contender, point, seed) -> the function that
# produces the Run of `config`'s settings (`RunStore.run`'s `train`).
Producer = Callable[..., Callable[[dict], sweep.Run]]


class Benchmark:
  """The contenders of every family, tuned and seeded on one run store."""

  def __init__(self, args, store: sweep.RunStore, num_train: int,
               produce: Producer):
    self.args, self.store, self.produce = args, store, produce
    self.num_train = num_train  # the examples trained on (validation held out)
    self.seeds = tuple(range(args.seeds))
    self.entries: dict[tuple[str, str], dict] = {}
    self.families: dict[str, dict] = {}
    self.runs: dict[str, sweep.Run] = {}

  def grid(self, family) -> sweep.Grid:
    return sweep.Grid({"learning_rate": family_lrs(self.args, family)},
                      max_extensions=self.args.max_extensions)

  def config(self, epochs=None, **changes) -> config_lib.Config:
    args = self.args
    epochs = epochs or args.epochs
    return config_lib.Config(
        model=args.model, num_samples=args.num_samples,
        data_seed=data.DEFAULT_SEED, val_fraction=args.val_fraction,
        epochs=epochs, schedule="warmup_cosine",
        # The warmup is the same fraction of every budget.
        warmup_epochs=args.warmup_epochs * epochs / args.epochs,
        weight_decay=0.0, num_devices=args.devices, **changes)

  def trainer(self, family, name, epochs=None, **changes):
    """`train(point, seed)` for `sweep.tune`, through the store."""
    base = self.config(epochs, **changes)

    def train(point, seed):
      config = dataclasses.replace(base, seed=seed, **point)
      run = self.store.run(sweep.config_settings(config),
                           self.produce(config, family, name, point, seed))
      self.runs[run.key] = run
      return run

    return train

  def _add(self, family, kind, result, changes, epochs=None, base=None):
    entry = {"family": family, "kind": kind, "base": base,
             "epochs": epochs or self.args.epochs, "changes": changes,
             **result}
    self.entries[(family, result["name"])] = entry
    mean = entry["summary"] and 100 * entry["summary"]["mean"]
    print(f"{family:12s} {result['name']:38s} "
          + ("no ok run" if mean is None else
             f"lr={entry['pick']['point']['learning_rate']:<7g} test "
             f"{mean:.2f} % ({entry['summary']['n']} seeds)"), flush=True)
    return entry

  def tune(self, family, name, kind, **changes):
    result = sweep.tune(name, self.trainer(family, name, **changes),
                        self.grid(family), seeds=self.seeds)
    return self._add(family, kind, result, changes)

  def rerun(self, family, name, kind, base, epochs, **changes):
    """`base`'s pick on another budget (`epochs`), on every seed."""
    point = self.entries[(family, base)]["pick"]["point"]
    result = sweep.rerun(name, self.trainer(family, name, epochs, **changes),
                         point, seeds=self.seeds)
    return self._add(family, kind, result, changes, epochs, base)

  def ok_runs(self, entry) -> list[sweep.Run]:
    """The ok runs of `entry`'s pick, one per seed."""
    runs = (self.runs[seed["key"]] for seed in entry["seeds"])
    return [run for run in runs if run.ok]

  def mean_val(self, family, name) -> float:
    entry = self.entries.get((family, name))
    summary = entry and sweep.summarize(
        run.metric("val_accuracy") for run in self.ok_runs(entry))
    return -1.0 if summary is None else summary.mean

  def best(self, family, names, prefix):
    """The contender named `prefix...` with the best mean validation
    accuracy at its pick (the headline: prefix "norm")."""
    return max((n for n in names if n.startswith(prefix)),
               key=lambda name: self.mean_val(family, name), default=None)

  def run_family(self, family, chosen=None):
    """Tunes and seeds every contender of `family`.

    `chosen` None: the full set of adaptive contenders; else only these (the
    first family's best norm test and best inner-product test). Returns the
    family's best norm test (the headline) and best inner-product test.
    """
    args = self.args
    fixed, adaptive = FAMILIES[family]
    b0 = args.initial_batch_size
    small = self.tune(family, SMALL, "fixed", optimizer=fixed, batch_size=b0)
    if chosen is None and small["pick"] is not None:
      # Is the baseline at its plateau? Its pick on twice the samples.
      self.rerun(family, PLATEAU, "plateau", SMALL, 2 * args.epochs,
                 optimizer=fixed, batch_size=b0)
    contenders = adaptive_contenders(args)
    if chosen is not None:
      contenders = [c for c in contenders if c[0] in chosen]
    elif args.contenders:
      wanted = args.contenders.split(",")
      contenders = [c for c in contenders if c[0] in wanted]
    for name, test, kwargs in contenders:
      self.tune(family, name, "adaptive", optimizer=adaptive, batch_size=b0,
                adaptive_batch=test, max_batch_size=args.max_batch_size,
                adaptive_statistics="per_device", optimizer_kwargs=kwargs)
    names = [c[0] for c in contenders]
    headline = self.best(family, names, "norm")
    inner = self.best(family, names, "inner")
    self.families[family] = {"headline": headline, "inner_product": inner,
                             "final_batch_size": None, "equal_steps": None}
    final_b = headline and self.final_batch_size(family, headline)
    if final_b is None:
      return headline, inner
    self.families[family]["final_batch_size"] = final_b
    # Sized by the headline: a fixed batch of its final size and of the
    # geometric middle of 32 and it, and the ramps from 32 to it.
    sizes = sorted({final_b, 2 ** round(math.log2(math.sqrt(b0 * final_b)))})
    for size in sizes:
      self.tune(family, f"fixed {size}", "fixed", optimizer=fixed,
                batch_size=size)
    for ramp in ("linear", "stagewise"):
      self.tune(family, f"{ramp} ramp 32->{final_b}", "ramp",
                optimizer=fixed, batch_size=b0, batch_ramp=ramp,
                max_batch_size=final_b)
    self.run_equal_steps(family, headline, [SMALL] + [f"fixed {size}"
                                                      for size in sizes])
    return headline, inner

  def final_batch_size(self, family, name):
    """The largest batch of the contender's seed-0 run at its pick."""
    entry = self.entries[(family, name)]
    run = entry["pick"] and self.runs[entry["seeds"][0]["key"]]
    if not run or not run.ok:
      return None
    return max(run.extra.get("batch_sizes") or [run.settings["batch_size"]])

  def run_equal_steps(self, family, headline, fixed_names):
    """Each fixed batch at its pick for the headline's mean step count."""
    steps = sweep.summarize(run.final["steps"] for run in self.ok_runs(
        self.entries[(family, headline)]))
    if steps is None:
      return
    steps = round(steps.mean)
    self.families[family]["equal_steps"] = steps
    for name in fixed_names:
      entry = self.entries[(family, name)]
      if entry["pick"] is None:
        continue
      size = entry["changes"]["batch_size"]
      self.rerun(family, f"{name} for {steps} steps", "equal_steps", name,
                 steps * size / self.num_train, **entry["changes"])

  def run(self):
    first, *others = self.args.families.split(",")
    chosen = self.run_family(first)
    for family in others:
      self.run_family(family, chosen)

  def contenders(self) -> list[dict]:
    """Every entry with its statistics over the pick's ok seeds."""
    out = []
    for (family, _), entry in self.entries.items():
      small = self.entries.get((family, SMALL))
      target = small and small["summary"] and small["summary"]["mean"]
      out.append({**entry, "statistics": statistics_of(
          self.ok_runs(entry), target, self.args.max_batch_size)})
    return out


def _summary(values):
  summary = sweep.summarize(values)
  return None if summary is None else summary.to_json()


def _first_step(run, reached: Callable[[dict], bool]):
  return next((record["steps"] for record in run.curve if reached(record)),
              None)


def statistics_of(runs: list[sweep.Run], target: float | None,
                  cap: int) -> dict:
  """What the tables show of a pick's ok runs: summaries of the validation
  accuracy, steps, samples, largest batch and run time; how many seeds
  reached `target` (the family's fixed-32 mean test accuracy) and the
  steps to it; for a growing batch, the steps until the batch hit `cap`."""
  final_b = [max(run.extra.get("batch_sizes") or [run.settings["batch_size"]])
             for run in runs]
  to_target = [] if target is None else [
      _first_step(run, lambda r: r["test_accuracy"] >= target) for run in runs]
  to_cap = [next((i + 1 for i, b in enumerate(run.extra["batch_sizes"])
                  if b >= cap), None)
            for run in runs if run.extra.get("batch_sizes")]
  # Converted runs that compiled their program have it in their run time.
  timed = [run.run_time_s for run in runs
           if not run.extra.get("run_time_includes_compile")]
  return {
      "seeds_ok": len(runs),
      "val_accuracy": _summary(run.metric("val_accuracy") for run in runs),
      "steps": _summary(run.final["steps"] for run in runs),
      "samples_seen": _summary(run.final["samples_seen"] for run in runs),
      "final_batch_size": _summary(final_b),
      "run_time_s": _summary(timed),
      "target_accuracy": target,
      "reached_target": sum(step is not None for step in to_target),
      "steps_to_target": _summary(to_target),
      "reached_cap": sum(step is not None for step in to_cap),
      "steps_to_cap": _summary(to_cap),
  }


def results(bench: Benchmark, *, command, machine, **fields) -> dict:
  contenders = bench.contenders()
  searches = {f"{c['family']}: {c['name']}": bench.grid(c["family"])
              for c in contenders if c["search"] is not None}
  args = bench.args
  budget = {**bench.store.budget, "initial_batch_size": args.initial_batch_size,
            "max_batch_size": args.max_batch_size,
            "num_train": bench.num_train, "seeds": args.seeds,
            "options": {"max_growth_factor": args.growth,
                        "smoothing": args.smoothing,
                        "test_interval": args.interval}}
  return sweep.results_record(
      "adaptive_batch", claim=CLAIM, command=command, machine=machine,
      budget=budget, contenders=contenders,
      trial_budget=sweep.check_same_budget(searches) if searches else None,
      families=bench.families, first_family=args.families.split(",")[0],
      grids={family: family_lrs(args, family)
             for family in args.families.split(",")},
      max_extensions=args.max_extensions, **fields)


def plot(bench: Benchmark, path):
  plt = _common.pyplot()
  if plt is None:
    return
  family = bench.args.families.split(",")[0]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for (row_family, name), entry in bench.entries.items():
    if row_family != family or entry["kind"] not in ("adaptive", "ramp") or (
        entry["pick"] is None):
      continue
    run = bench.runs[entry["seeds"][0]["key"]]
    sizes = run.extra.get("batch_sizes")
    if not run.ok or not sizes:
      continue
    if len(sizes) > 1 and sizes[-1] < sizes[-2]:
      sizes = sizes[:-1]  # the budget's remainder, not a size the test chose
    seen = np.cumsum(sizes)
    label = f"{name} lr={entry['pick']['point']['learning_rate']:g}"
    style = "--" if entry["kind"] == "ramp" else "-"
    axes[0].step(seen, sizes, style, where="post", label=label)
    if run.extra.get("noise_scales"):
      axes[1].plot(seen, run.extra["noise_scales"][:len(sizes)], style,
                   label=label)
  axes[0].set(xlabel="samples seen", ylabel="batch size", yscale="log",
              title=f"{family}: batch size (seed 0, picked lr)")
  axes[1].set(xlabel="samples seen", ylabel="B_simple = tr(Σ)/|G|² (EMA)",
              yscale="log", title="gradient noise scale")
  axes[0].legend(fontsize=6)
  axes[1].legend(fontsize=6)
  _common.save_figure(fig, path, dpi=100)


def main(argv=None):
  args = parse_args(argv)
  if args.convert_legacy:
    convert_legacy(args)
    return
  out = pathlib.Path(args.out)
  machine = _common.machine_description()
  dataset = data.load_mnist1d(args.num_samples, data.DEFAULT_SEED)
  num_train = dataset.num_train - round(args.val_fraction * dataset.num_train)
  store = sweep.RunStore(store_path(out), budget_of(args))

  def produce(config, *_):
    return lambda _: sweep.train_config(config, dataset)

  bench = Benchmark(args, store, num_train, produce)
  bench.run()
  record = results(bench, machine=machine, command=_common.command_line(
      args, exclude=("out", "convert_legacy")), num_test=dataset.num_test)
  _common.write_json(out, record)
  plot(bench, out.with_suffix(".png"))
  print(f"wrote {out} ({len(store)} runs in {store.path})")


# ----------------------------------------------------------------------------
# The results of the script before the engine.


def _commit_of(path) -> str:
  path = pathlib.Path(path).resolve()
  return subprocess.run(["git", "log", "-1", "--format=%h", "--", str(path)],
                        capture_output=True, text=True, check=True,
                        cwd=path.parent).stdout.strip()


# The commits whose code ran the legacy runs (benchmarks/README.md: the runs
# at 5a2a828, AdaGrad-Norm at ba0ff77, the change of its grid).
LEGACY_CODE = {"AdaGrad-Norm": "ba0ff77"}
LEGACY_CODE_DEFAULT = "5a2a828"


def convert_legacy(args):
  """Converts the old results (one row per run, keyed "family|contender|
  lr|seed") into the run store and results of this script, by running the
  benchmark's own flow on them: every run the flow asks for is found among
  the old rows, with its status recomputed by the engine's rule."""
  path, _, commit = args.convert_legacy.partition("@")
  legacy, root = pathlib.Path(path), _common.ROOT
  name = (legacy.resolve().relative_to(root)
          if legacy.resolve().is_relative_to(root) else legacy)
  if commit:  # the file as that commit wrote it
    old = json.loads(subprocess.run(
        ["git", "show", f"{commit}:{name}"], capture_output=True, text=True,
        check=True, cwd=root).stdout)
  else:
    old, commit = json.loads(legacy.read_text()), _commit_of(legacy)
  source = f"{name}@{commit}"
  for name, value in old["args"].items():
    if name not in ("out", "report"):
      setattr(args, name, value)
  rows = {(r["family"], r["contender"], f"{r['learning_rate']:g}", r["seed"]):
          r for r in old["runs"]}
  used = set()

  def produce(config, family, name, point, seed):
    def convert(settings):
      key = (family, name, f"{point['learning_rate']:g}", seed)
      row = rows[key]
      used.add(key)
      if row["batch_size"] != config.batch_size or not math.isclose(
          row["epochs"], config.epochs):
        raise ValueError(f"{key}: the old run's settings differ")
      return legacy_run(row, settings, LEGACY_CODE.get(
          family, LEGACY_CODE_DEFAULT), source)
    return convert

  out = pathlib.Path(args.out)
  path = store_path(out)
  if path.exists():
    path.unlink()  # converted anew
  store = sweep.RunStore(path, budget_of(args))
  num_train = old["num_train"] - round(args.val_fraction * old["num_train"])
  bench = Benchmark(args, store, num_train, produce)
  bench.run()
  record = results(bench, command=old["command"], machine=old["machine"],
                   num_test=old["num_test"],
                   load_average_end=old.get("load_average_end"),
                   converted_from=source, converted_by=_commit_of(__file__),
                   legacy_runs_not_used=len(rows) - len(used))
  record["code_version"] = LEGACY_CODE_DEFAULT
  record["code_versions"] = {f: LEGACY_CODE.get(f, LEGACY_CODE_DEFAULT)
                             for f in args.families.split(",")}
  _common.write_json(out, record)
  print(f"wrote {out} ({len(store)} runs in {path}; "
        f"{len(rows) - len(used)} old runs not used)")


def legacy_run(row, settings, code_version, source) -> sweep.Run:
  extra = {"converted_from": source,
           # The old wall time: with the compilation when the run built its
           # program, else the run alone.
           "run_time_includes_compile": row["compiled"]}
  if row["diverged"]:
    return sweep.Run.diverged(settings, "non-finite loss (old record)",
                              code_version=code_version, extra=extra,
                              run_time_s=row["wall_time_s"])
  final = dict(row["history"][-1], steps=row["steps"],
               samples_seen=row["samples_seen"])
  for name in ("batch_sizes", "noise_scales", "train_step_compilations"):
    if row.get(name) is not None:
      extra[name] = row[name]
  extra.update(steps=row["steps"], samples_seen=row["samples_seen"])
  return sweep.Run.finished(settings, final, NUM_CLASSES, curve=row["history"],
                            run_time_s=row["wall_time_s"], compile_time_s=0.0,
                            code_version=code_version, extra=extra)


if __name__ == "__main__":
  main()
