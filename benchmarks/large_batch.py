"""SNGM at large batch: a fair comparison, B = 4096, 8192 and 16384.

MNIST-1D CNN (100k examples: 72k train, 8k validation, 20k test), linear
warmup + cosine decay, the same number of epochs for every run. Every
large-batch contender (SNGM as in the paper, SNGM with decoupled weight
decay, momentum SGD, LARS, LAMB) follows the same procedure:

1. at `--tune-batch` (4096) the 2-D grid of `compare.LR_GRIDS` (3 peak
   learning rates x 3 weight decays; the grids and the rule that set them
   are in `sngm_optax/harness/compare.py`), searched one axis at a time to
   fit the CPU budget: the learning rates at the middle weight decay, then
   the weight decays at the best learning rate;
2. at every other batch size a local grid: the 4096 pick's learning rate
   scaled by sqrt(B / 4096), times 1/2, 1, 2, at the 4096 pick's weight
   decay;
3. a pick at an edge of its grid extends the grid by one value in that
   direction (`compare.grid_search`, at most `--max-extensions` times per
   axis and direction);
4. picks on the validation split, each pick retrained with `--extra-seeds`
   more seeds (initialization and batch order): mean ± sd over seeds.

The SNGM variants Nesterov and per-layer normalization get a learning-rate
grid (3 values, factor 2) centred on the paper SNGM's 4096 pick, at its
weight decay. Momentum SGD at `--small-batch` is the reference (learning
rate grid of `compare.SMALL_BATCH_GRIDS`, weight decay 1e-4).

Whether the budget (`--epochs`) is long enough: the plateau check trains
the reference's pick, and the 8192 picks of SNGM, LARS and LAMB, again on
twice the epochs (all seeds) and reports the gain against the seed spread.

Work is done in order of priority (4096; the reference; 8192; variants;
16384, without momentum SGD; the plateau check; each pick's seeds right
after its grid), every
run is saved to `large_batch_runs.json` as it ends,
and a restarted benchmark reuses them. `--stop-after HH:MM` (UTC) starts no
new run after that time and reports what was skipped (so a restart after
the deadline only rebuilds the tables and the figure from the saved runs).

Usage:
  python benchmarks/large_batch.py                     # the benchmark
  python benchmarks/large_batch.py --batch-sizes 256 --tune-batch 256 \\
      --num-samples 2000 --epochs 1 --small-batch 64 --extra-seeds 1 \\
      --model mlp --out /tmp/lb                          # a smoke test
Writes benchmarks/results/large_batch.json and large_batch.png.
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import time

import _common

from sngm_optax.harness import compare
from sngm_optax.harness import config as config_lib
from sngm_optax.harness import train

MAIN = ("sngm_paper", "sngm_decoupled", "msgd", "lars", "lamb")
SNGM_ONLY = ("sngm_nesterov", "sngm_per_layer")
SNGM = ("sngm_paper", "sngm_decoupled", "sngm_nesterov", "sngm_per_layer")
OTHERS = ("msgd", "lars", "lamb")
# The work in order of priority: the tune batch's grids, the small-batch
# reference, the second batch size, the SNGM variants, the other batch sizes.
STAGES = ("tune", "reference", "second", "variants", "rest", "plateau")
# The plateau check: these picks again on twice the epochs (the reference,
# then the goal's contenders at the second batch size).
PLATEAU = ("msgd", "sngm_paper", "lars", "lamb")
# After the tune batch: the contenders of the goal first.
BY_PRIORITY = ("sngm_paper", "lars", "lamb", "sngm_decoupled", "msgd")


class Deadline(Exception):
  """Raised before a run that would start after `--stop-after`."""


class _SavedRuns(dict):
  """The saved runs by `compare.run_key`; asking for a missing one after
  the deadline (i.e. before training it) raises `Deadline`, so that a run
  restarted late still reports every saved run."""

  stop = None

  def __contains__(self, key):
    found = super().__contains__(key)
    if (not found and self.stop is not None
        and datetime.datetime.now(datetime.timezone.utc) > self.stop):
      raise Deadline
    return found


def _parse_args():
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
  return parser.parse_args()


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


# The settings a saved run's key does not name: a restart must share them.
BUDGET = ("epochs", "warmup_epochs", "num_samples", "model")


def _check_same_budget(args):
  """Saved runs are reused by optimizer, batch, learning rate, weight decay
  and seed: refuse to mix them with runs of another budget."""
  summary = args.out / "large_batch.json"
  if not summary.exists():
    return
  saved = json.loads(summary.read_text())["settings"]
  changed = [f"{key} {saved[key]} -> {getattr(args, key)}" for key in BUDGET
             if saved.get(key) != getattr(args, key)]
  if changed:
    raise SystemExit(f"{summary} holds runs of another budget "
                     f"({', '.join(changed)}): pass another --out")


class Benchmark:
  """The runs done so far, saved after each run; the contenders by stage."""

  def __init__(self, args):
    self.args = args
    self.stop = _deadline(args.stop_after)
    self.runs_path = args.out / "large_batch_runs.json"
    _check_same_budget(args)
    self.done = _SavedRuns(json.loads(self.runs_path.read_text())
                           if self.runs_path.exists() else {})
    self.done.stop = self.stop
    self.base = config_lib.Config(
        num_samples=args.num_samples, val_fraction=0.1, model=args.model,
        warmup_epochs=args.warmup_epochs, epochs=args.epochs, seed=0)
    self.dataset = train.load_dataset(self.base)
    self.contenders = {}  # (name, batch_size) -> contender
    self.plateau = {}  # (name, batch_size) -> its pick on twice the epochs
    self.learning_rate_stages = {}  # name -> the 1st axis of `full`
    self.skipped = []

  def save_run(self, key, run):
    self.done[key] = run
    _common.write_json(self.runs_path, self.done)

  def tune(self, name, batch_size, learning_rates, decays, seeds=0):
    """`compare.run_contender` with the saved runs; None if it would need a
    run after the deadline (the contender is then listed as skipped)."""
    try:
      contender = compare.run_contender(
          self.base, name, batch_size, learning_rates, self.dataset,
          self.args.quiet, seeds, weight_decays=decays,
          max_extensions=self.args.max_extensions,
          done=self.done, on_run=self.save_run)
    except Deadline:
      self.skipped.append(f"{name} B={batch_size}")
      return None
    self.contenders[(name, batch_size)] = contender
    return contender

  def twice_the_epochs(self, name, batch_size, seeds):
    """The pick of `name` at `batch_size` on twice the budget, or None."""
    if (name, batch_size) not in self.contenders:
      return None
    learning_rate, decay = self.pick(name, batch_size)
    base = dataclasses.replace(self.base, epochs=2 * self.base.epochs,
                               warmup_epochs=2 * self.base.warmup_epochs)
    try:
      return compare.run_contender(
          base, name, batch_size, (learning_rate,), self.dataset,
          self.args.quiet, seeds, weight_decays=(decay,),
          name=f"{name} on {base.epochs:g} epochs", done=self.done,
          on_run=self.save_run)
    except Deadline:
      self.skipped.append(f"{name} B={batch_size} on twice the epochs")
      return None

  def pick(self, name, batch_size=None):
    best = self.contenders[(name, batch_size or self.args.tune_batch)]["best"]
    return best["learning_rate"], best["weight_decay"]

  def local(self, name, batch_size, seeds=0, center=None):
    """The local grid at `batch_size` around the tune-batch pick."""
    if (center or name, self.args.tune_batch) not in self.contenders:
      self.skipped.append(f"{name} B={batch_size} (no pick at the tune "
                          "batch)")
      return None
    learning_rate, decay = self.pick(center or name)
    factor = (batch_size / self.args.tune_batch) ** 0.5
    return self.tune(name, batch_size, _around(learning_rate, factor),
                     (decay,), seeds)

  def full(self, name, seeds=0):
    """The 2-D grid, one axis at a time: learning rates at the middle weight
    decay, then weight decays at the best learning rate."""
    grid = compare.LR_GRIDS[name]
    batch = self.args.tune_batch
    middle = grid.weight_decays[len(grid.weight_decays) // 2]
    stage = self.tune(name, batch, grid.at(batch), (middle,))
    if stage is None:
      return None
    self.learning_rate_stages[name] = stage
    learning_rate = stage["best"]["learning_rate"]
    return self.tune(name, batch, (learning_rate,), grid.weight_decays,
                     seeds)


def run_all(bench: Benchmark) -> None:
  """The stages in order of priority; the seeds of a pick right after its
  grid, while its compiled step is still cached."""
  args = bench.args
  stages = args.stages.split(",")
  chosen = args.contenders.split(",") if args.contenders else None
  keep = lambda names: [n for n in names if chosen is None or n in chosen]
  others = [b for b in args.batch_sizes if b != args.tune_batch]
  seeds = args.extra_seeds
  if "tune" in stages:
    for name in keep(MAIN):
      bench.full(name, seeds)
  if "reference" in stages:
    small = compare.SMALL_BATCH_GRIDS["msgd"].at(args.small_batch,
                                                 args.reference_size)
    bench.tune("msgd", args.small_batch, small, (1e-4,), seeds)
  if "second" in stages:
    for batch_size in others[:1]:
      for name in keep(BY_PRIORITY):
        if (name, args.tune_batch) not in bench.contenders:
          bench.full(name, seeds)  # the pick (saved runs, if any)
        bench.local(name, batch_size, seeds)
  if "variants" in stages:
    if ("sngm_paper", args.tune_batch) not in bench.contenders:
      bench.full("sngm_paper", seeds)  # the pick (saved runs, if any)
    for name in keep(SNGM_ONLY):
      if ("sngm_paper", args.tune_batch) in bench.contenders:
        learning_rate, decay = bench.pick("sngm_paper")
        bench.tune(name, args.tune_batch, _around(learning_rate), (decay,),
                   seeds)
  if "rest" in stages:
    for batch_size in others[1:]:
      for name in keep(BY_PRIORITY[:-1]):
        if (name, args.tune_batch) not in bench.contenders:
          bench.full(name, seeds)  # the pick (saved runs, if any)
        bench.local(name, batch_size, seeds)
  if "plateau" in stages:
    for name, batch_size in zip(PLATEAU, [args.small_batch]
                                + others[:1] * (len(PLATEAU) - 1)):
      doubled = bench.twice_the_epochs(name, batch_size, seeds)
      if doubled is not None:
        bench.plateau[(name, batch_size)] = doubled


def plateau_lines(bench: Benchmark) -> list[str]:
  """Each plateau-check pick: the gain of twice the epochs, against the
  sum of the two seed sds."""
  lines = []
  for key, doubled in bench.plateau.items():
    (mean, sd, _), (mean2, sd2, _) = (_mean_sd(bench.contenders[key]),
                                      _mean_sd(doubled))
    gain = mean2 - mean
    lines.append(
        f"{key[0]} B={key[1]}: {bench.args.epochs:g} epochs {mean:.2f} ± "
        f"{sd:.2f}, {2 * bench.args.epochs:g} epochs {mean2:.2f} ± "
        f"{sd2:.2f}: {gain:+.2f} points, "
        + ("within" if abs(gain) <= sd + sd2 else "beyond")
        + f" the seed spread ({sd + sd2:.2f})")
  return lines


def _mean_sd(contender):
  if contender is None or contender.get("best") is None:
    return None
  if "test_accuracy_mean" in contender:
    return (100 * contender["test_accuracy_mean"],
            100 * contender["test_accuracy_std"], contender["num_seeds"])
  return 100 * contender["best"]["test_accuracy"], 0.0, 1


def verdicts(bench: Benchmark) -> list[str]:
  """SNGM against the best other optimizer, against the seed spread."""
  lines = []
  reference = _mean_sd(bench.contenders.get(("msgd", bench.args.small_batch)))
  for batch_size in bench.args.batch_sizes:
    stats = {name: _mean_sd(bench.contenders.get((name, batch_size)))
             for name in SNGM + OTHERS}
    stats = {name: value for name, value in stats.items()
             if value is not None and value[2] > 1}
    sngm = [name for name in SNGM if name in stats]
    others = [name for name in OTHERS if name in stats]
    if not sngm or not others:
      continue
    best_other = max(others, key=lambda name: stats[name][0])
    for name in sngm:
      mean, sd, _ = stats[name]
      other_mean, other_sd, _ = stats[best_other]
      gap = mean - other_mean
      spread = sd + other_sd
      side = "larger" if abs(gap) > spread else "not larger"
      line = (f"B={batch_size}: {name} {mean:.2f} ± {sd:.2f} vs "
              f"{best_other} {other_mean:.2f} ± {other_sd:.2f}: gap "
              f"{gap:+.2f} points, {side} than the seed spread "
              f"(sum of the sds, {spread:.2f})")
      if reference is not None:
        line += (f"; {mean - reference[0]:+.2f} points from momentum SGD at "
                 f"B={bench.args.small_batch} ({reference[0]:.2f} ± "
                 f"{reference[1]:.2f})")
      lines.append(line)
  return lines


def plot(bench: Benchmark, path: pathlib.Path) -> None:
  """Test accuracy (mean ± sd over seeds) against batch size."""
  plt = _common.pyplot()
  if plt is None:
    return
  figure, axes = plt.subplots(figsize=(7, 4.5))
  for name in MAIN + SNGM_ONLY:
    points = [(b, _mean_sd(bench.contenders.get((name, b))))
              for b in bench.args.batch_sizes]
    points = [(b, s) for b, s in points if s is not None]
    if points:
      axes.errorbar([b for b, _ in points], [s[0] for _, s in points],
                    yerr=[s[1] for _, s in points], marker="o", capsize=3,
                    label=name)
  reference = _mean_sd(bench.contenders.get(("msgd", bench.args.small_batch)))
  if reference is not None:
    axes.axhline(reference[0], color="black", linestyle="--",
                 label=f"msgd B={bench.args.small_batch}")
    axes.axhspan(reference[0] - reference[1], reference[0] + reference[1],
                 color="black", alpha=0.1)
  axes.set_xscale("log", base=2)
  axes.set_xlabel("batch size")
  axes.set_ylabel("test accuracy (%), mean ± sd over seeds")
  axes.set_title(f"MNIST-1D {bench.args.model.upper()}, "
                 f"{bench.args.epochs:g} epochs, {bench.args.num_samples} "
                 "examples")
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)
  _common.save_figure(figure, path, dpi=110)


def main() -> None:
  args = _parse_args()
  start = time.perf_counter()
  load_start = os.getloadavg()[0]
  bench = Benchmark(args)
  run_all(bench)
  tables = {}
  for batch_size in sorted({b for _, b in bench.contenders}):
    contenders = [c for (_, b), c in bench.contenders.items()
                  if b == batch_size]
    tables[str(batch_size)] = compare.format_table(
        {"contenders": contenders})
    print(f"\nB = {batch_size}:\n{tables[str(batch_size)]}", flush=True)
  summary = {
      "claim": "SNGM at a large batch reaches the accuracy of small-batch "
               "momentum SGD and is level with LARS and LAMB",
      "command": _common.command_line(),
      "machine": _common.machine_description(),
      "wall_time_s": time.perf_counter() - start,
      "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
      "settings": {key: str(value) if isinstance(value, pathlib.Path)
                   else value for key, value in vars(args).items()},
      "grids": {name: dataclasses.asdict(compare.LR_GRIDS[name])
                for name in MAIN + SNGM_ONLY},
      "small_batch_grid": dataclasses.asdict(
          compare.SMALL_BATCH_GRIDS["msgd"]),
      "skipped": bench.skipped,
      "learning_rate_stages": [
          compare.without_histories({"contenders": [c]})["contenders"][0]
          for c in bench.learning_rate_stages.values()],
      "tables": tables,
      "verdicts": verdicts(bench),
      "plateau": plateau_lines(bench),
      "contenders": [compare.without_histories({"contenders": [c]})
                     ["contenders"][0] for c in bench.contenders.values()],
  }
  _common.write_json(args.out / "large_batch.json", summary)
  plot(bench, args.out / "large_batch.png")
  print("\n" + "\n".join(summary["verdicts"] + summary["plateau"]))
  if bench.skipped:
    print(f"skipped (deadline): {', '.join(bench.skipped)}")
  print(f"\nmachine: {_common.machine_line(summary['machine'])}; total "
        f"{summary['wall_time_s'] / 60:.1f} min; wrote "
        f"{args.out / 'large_batch.json'} and {args.out / 'large_batch.png'}")


if __name__ == "__main__":
  main()
