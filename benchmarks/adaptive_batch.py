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

Every contender's peak learning rate is picked on seed 0 from its family's
grid (`--lrs-*`) by the final validation accuracy, never the test set; a pick
at an end of the grid extends the grid one value in that direction
(`compare.grid_search`, at most `--max-extensions` times), and a pick still
at an end is marked. The pick is rerun on `--seeds` - 1 more seeds; tables
report the final test accuracy, mean ± sd. "Fixed B for N steps" trains each
fixed batch for the headline's mean step count N (its schedule, warmup
included, over that shorter budget): the equal-steps comparison. Partial
results are written after every run, and a restarted run resumes from them.
Writes results/adaptive_batch.json and .png.

  PYTHONPATH=. python benchmarks/adaptive_batch.py
"""

import argparse
import json
import math
import os
import pathlib
import statistics
import time

import _common

_common.force_host_devices(4, cpu_only=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sngm_optax.harness import compare  # noqa: E402
from sngm_optax.harness import config as config_lib  # noqa: E402
from sngm_optax.harness import data  # noqa: E402
from sngm_optax.harness import steps as steps_lib  # noqa: E402
from sngm_optax.harness import train  # noqa: E402

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


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num-samples", type=int, default=60000)
  parser.add_argument("--val-fraction", type=float, default=0.1)
  parser.add_argument("--epochs", type=float, default=5.0)
  parser.add_argument("--warmup-epochs", type=float, default=0.625)
  parser.add_argument("--initial-batch-size", type=int, default=32)
  parser.add_argument("--max-batch-size", type=int, default=8192)
  parser.add_argument("--devices", type=int, default=4)
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
  parser.add_argument("--report", action="store_true",
                      help="no runs: summarize --out (e.g. a stopped run's "
                      "partial results), rewrite it and its figure, print")
  return parser.parse_args()


def family_lrs(args, family):
  text = getattr(args, "lrs_" + family.lower().replace("-", "_"))
  return [float(value) for value in text.split(",")]


class Bench:
  """Runs (or finds in the partial results) one training run per key."""

  def __init__(self, args, dataset, payload, out):
    self.args, self.dataset, self.payload, self.out = (
        args, dataset, payload, out)
    self.done = {row["key"]: row for row in payload["runs"]}

  def run(self, family, contender, lr, seed, *, optimizer, batch_size,
          epochs=None, **changes):
    """One run's row (accuracies None if the loss diverged)."""
    key = f"{family}|{contender}|{lr:g}|{seed}"
    if key in self.done:
      return self.done[key]
    args = self.args
    epochs = epochs or args.epochs
    config = config_lib.Config(
        model="cnn", optimizer=optimizer, learning_rate=lr,
        batch_size=batch_size, epochs=epochs, schedule="warmup_cosine",
        # The warmup is the same fraction of every budget.
        warmup_epochs=args.warmup_epochs * epochs / args.epochs,
        weight_decay=0.0, num_devices=args.devices, seed=seed,
        val_fraction=args.val_fraction, **changes)
    compiles_before = train.build_program.cache_info().misses
    start = time.perf_counter()
    try:
      result = train.train_and_evaluate(config, dataset=self.dataset,
                                        quiet=True)
    except steps_lib.NonFiniteLossError:
      result = None
    row = {
        "key": key, "family": family, "contender": contender,
        "learning_rate": lr, "seed": seed, "batch_size": batch_size,
        "epochs": epochs, "wall_time_s": time.perf_counter() - start,
        # Whether this run built (and compiled) its program; the runs that
        # reuse one give the comparable wall times.
        "compiled": train.build_program.cache_info().misses
        > compiles_before,
        "diverged": result is None,
    }
    if result is not None:
      row.update({
          "steps": result["steps"], "samples_seen": result["samples_seen"],
          "final_val_accuracy": result["final"]["val_accuracy"],
          "final_test_accuracy": result["final"]["test_accuracy"],
          "history": result["history"],
          "batch_sizes": result.get("batch_sizes"),
          "noise_scales": result.get("noise_scales"),
          "train_step_compilations": result.get("train_step_compilations"),
      })
      final_b = max(row["batch_sizes"] or [batch_size])
      print(f"{family:12s} {contender:38s} lr={lr:<6g} seed={seed} "
            f"steps={row['steps']:5d} val={row['final_val_accuracy']:.4f} "
            f"test={row['final_test_accuracy']:.4f} B_max={final_b} "
            f"{row['wall_time_s']:.0f}s", flush=True)
    else:
      print(f"{family:12s} {contender:38s} lr={lr:<6g} seed={seed} diverged",
            flush=True)
    self.payload["runs"].append(row)
    self.done[key] = row
    self.payload["load_average_end"] = list(os.getloadavg())
    _common.write_json(self.out, self.payload)
    return row

  def tune(self, family, contender, kwargs):
    """Picks the learning rate on seed 0 by validation accuracy, extending
    the grid past an edge pick, then reruns the pick on the other seeds."""
    args = self.args

    def score(lr):
      row = self.run(family, contender, lr, 0, **kwargs)
      return None if row["diverged"] else row["final_val_accuracy"]

    search = compare.grid_search(score, [family_lrs(args, family)],
                                 max_extensions=args.max_extensions)
    if search["best"] is None:
      pick = None
    else:
      pick = search["best"][0]
      for seed in range(1, args.seeds):
        self.run(family, contender, pick, seed, **kwargs)
    self.payload["tuning"][f"{family}|{contender}"] = {
        "family": family, "contender": contender, "pick": pick,
        "grid": search["axes"][0], "on_edge": search["on_edge"],
        "extended": [value for _, value in search["extended"]],
        "val_accuracy": {f"{point[0]:g}": value
                         for point, value in search["scores"].items()},
    }
    _common.write_json(self.out, self.payload)
    return pick

  def seeds_at_pick(self, family, contender):
    """The rows of `contender`'s picked learning rate, one per seed."""
    tuning = self.payload["tuning"].get(f"{family}|{contender}")
    if tuning is None or tuning["pick"] is None:
      return []
    return [self.done[key] for seed in range(self.args.seeds)
            if (key := f"{family}|{contender}|{tuning['pick']:g}|{seed}")
            in self.done and not self.done[key]["diverged"]]


def fixed_spec(optimizer, batch_size):
  return dict(optimizer=optimizer, batch_size=batch_size)


def adaptive_spec(args, optimizer, test, kwargs):
  return dict(optimizer=optimizer, batch_size=args.initial_batch_size,
              adaptive_batch=test, max_batch_size=args.max_batch_size,
              adaptive_statistics="per_device", optimizer_kwargs=kwargs)


def best_by_validation(bench, family, names, prefix):
  """The contender named `prefix...` with the best mean validation
  accuracy at its pick (the headline: prefix "norm")."""
  def mean_val(name):
    rows = bench.seeds_at_pick(family, name)
    return statistics.mean(r["final_val_accuracy"] for r in rows) if rows \
        else -1.0
  return max((n for n in names if n.startswith(prefix)), key=mean_val,
             default=None)


def final_batch_size(bench, family, contender):
  """The largest batch of the contender's seed-0 run at its pick."""
  rows = [r for r in bench.seeds_at_pick(family, contender) if r["seed"] == 0]
  return max(rows[0]["batch_sizes"]) if rows else None


def run_family(bench, family, chosen=None):
  """Tunes and seeds every contender of `family`.

  `chosen` None: the full set of adaptive contenders; else only these (the
  first family's best norm test and best inner-product test). Returns the
  family's best norm test (the headline) and best inner-product test.
  """
  args = bench.args
  fixed, adaptive = FAMILIES[family]
  b0 = args.initial_batch_size
  specs = {SMALL: fixed_spec(fixed, b0)}
  small_pick = bench.tune(family, SMALL, specs[SMALL])
  if chosen is None and small_pick is not None:
    # Is the baseline at its plateau? Its pick on twice the samples.
    for seed in range(args.seeds):
      bench.run(family, PLATEAU, small_pick, seed, epochs=2 * args.epochs,
                **specs[SMALL])
  contenders = adaptive_contenders(args)
  if chosen is not None:
    contenders = [c for c in contenders if c[0] in chosen]
  elif args.contenders:
    wanted = args.contenders.split(",")
    contenders = [c for c in contenders if c[0] in wanted]
  for name, test, kwargs in contenders:
    specs[name] = adaptive_spec(args, adaptive, test, kwargs)
    bench.tune(family, name, specs[name])
  names = [c[0] for c in contenders]
  headline = best_by_validation(bench, family, names, "norm")
  inner = best_by_validation(bench, family, names, "inner")
  bench.payload["headline"][family] = headline
  final_b = headline and final_batch_size(bench, family, headline)
  if final_b is None:
    return headline, inner
  # Sized by the headline: a fixed batch of its final size and of the
  # geometric middle of 32 and it, and the ramps from 32 to it.
  sized = {}
  for size in sorted({final_b, 2 ** round(math.log2(math.sqrt(b0 * final_b)))}):
    sized[f"fixed {size}"] = fixed_spec(fixed, size)
  for ramp in ("linear", "stagewise"):
    sized[f"{ramp} ramp 32->{final_b}"] = dict(
        optimizer=fixed, batch_size=b0, batch_ramp=ramp,
        max_batch_size=final_b)
  for name, kwargs in sized.items():
    bench.tune(family, name, kwargs)
  run_equal_steps(bench, family, headline, {**specs, **sized})
  return headline, inner


def run_equal_steps(bench, family, headline, specs):
  """Each fixed batch at its pick for the headline's mean step count."""
  rows = bench.seeds_at_pick(family, headline)
  if not rows:
    return
  steps = round(statistics.mean(r["steps"] for r in rows))
  num_train = bench.dataset.num_train - round(
      bench.args.val_fraction * bench.dataset.num_train)
  bench.payload["equal_steps"][family] = steps
  for name, kwargs in specs.items():
    pick = bench.payload["tuning"][f"{family}|{name}"]["pick"]
    if not name.startswith("fixed") or pick is None:
      continue
    epochs = steps * kwargs["batch_size"] / num_train
    for seed in range(bench.args.seeds):
      bench.run(family, f"{name} for {steps} steps", pick, seed,
                epochs=epochs, **kwargs)


def main():
  args = parse_args()
  out = pathlib.Path(args.out)
  if args.report:
    payload = json.loads(out.read_text())
    finish(payload, out)
    print_table(payload)
    return
  dataset = data.load_mnist1d(args.num_samples, 0)
  payload = {
      "benchmark": "adaptive_batch",
      "command": _common.command_line(args, exclude=("out", "report")),
      "args": vars(args),
      "num_train": dataset.num_train,
      "num_test": dataset.num_test,
      "jax": jax.__version__,
      "machine": _common.machine_description(),
      "load_average_start": list(os.getloadavg()),
      "runs": [], "tuning": {}, "headline": {}, "equal_steps": {},
  }
  if out.exists():
    previous = json.loads(out.read_text())
    if previous.get("args") == payload["args"]:
      for key in ("runs", "tuning", "headline", "equal_steps"):
        payload[key] = previous.get(key, payload[key])  # resume
  bench = Bench(args, dataset, payload, out)
  first, *others = args.families.split(",")
  chosen = run_family(bench, first)
  finish(payload, out)
  for family in others:
    run_family(bench, family, chosen)
    finish(payload, out)
  print_table(payload)


def finish(payload, out):
  """Summary, verdict, JSON and figure from the runs so far."""
  payload["summary"] = summarize(payload)
  payload["verdict"] = verdict(payload)
  payload["plateau"] = plateau(payload)
  _common.write_json(out, payload)
  plot(payload, out.with_suffix(".png"))


def _reach(row, target):
  """Steps and wall time when the test accuracy first >= target."""
  for record in row["history"]:
    if record["test_accuracy"] >= target:
      return record["steps"], record["wall_time_s"]
  return None, None


def _mean(values):
  values = list(values)
  return statistics.mean(values) if values else None


def _group(payload):
  """(family, contender) -> its rows at the pick (the equal-step runs use
  their fixed batch's pick), one per seed, in order of first run."""
  tuning, groups = payload["tuning"], {}
  for row in payload["runs"]:
    if row["diverged"]:
      continue
    base = row["contender"].split(" for ")[0]
    pick = tuning.get(f"{row['family']}|{base}", {}).get("pick")
    if pick is not None and row["learning_rate"] == pick:
      groups.setdefault((row["family"], row["contender"]), []).append(row)
  return groups


def summarize(payload):
  """Per (family, contender): the pick, mean ± sd over seeds, the steps and
  wall time to the fixed-32 accuracy."""
  groups = _group(payload)
  summary = []
  for (family, contender), rows in groups.items():
    small = groups.get((family, SMALL), [])
    target = _mean(r["final_test_accuracy"] for r in small)
    accs = [r["final_test_accuracy"] for r in rows]
    reach = [_reach(r, target) for r in rows] if target else []
    reached = [x for x in reach if x[0] is not None]
    warm = [r for r in rows if not r["compiled"]] or rows
    warm_reach = [_reach(r, target) for r in warm] if target else []
    tuning = payload["tuning"].get(
        f"{family}|{contender.split(' for ')[0]}", {})
    summary.append({
        "family": family, "contender": contender,
        "learning_rate": rows[0]["learning_rate"], "seeds": len(rows),
        "grid": tuning.get("grid"), "grid_edge": tuning.get("on_edge"),
        "val_accuracy_mean": _mean(r["final_val_accuracy"] for r in rows),
        "accuracy_mean": statistics.mean(accs),
        "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else None,
        "steps_mean": statistics.mean(r["steps"] for r in rows),
        # Wall times of the runs that reused a compiled program.
        "wall_time_s_mean": statistics.mean(r["wall_time_s"] for r in warm),
        "final_batch_size": statistics.mean(
            max(r["batch_sizes"] or [r["batch_size"]]) for r in rows),
        "target_accuracy": target,
        "reached_target": f"{len(reached)}/{len(rows)}",
        "steps_to_target_mean": _mean(x[0] for x in reached),
        "wall_s_to_target_mean": _mean(
            x[1] for x in warm_reach if x[1] is not None),
    })
  return summary


def verdict(payload):
  """The issue's goal, per norm-test contender of the first family: within
  0.3 points of fixed 32, in at most 20 % of its steps (one peak learning
  rate and the same sample schedule for the whole run, by construction),
  and, for the headline, more accurate than every fixed batch trained for
  as many steps; means over seeds, with the seed sds beside them."""
  family = payload["args"]["families"].split(",")[0]
  summary = {s["contender"]: s for s in payload.get("summary", [])
             if s["family"] == family}
  small = summary.get(SMALL)
  if small is None:
    return []
  headline = payload["headline"].get(family)
  equal = {c: s for c, s in summary.items() if c.endswith(" steps")}
  out = []
  for contender, s in summary.items():
    if not contender.startswith("norm"):
      continue
    gap = 100 * (small["accuracy_mean"] - s["accuracy_mean"])
    entry = {
        "contender": contender, "headline": contender == headline,
        "gap_to_fixed_32_points": gap,
        "sd_points": 100 * (s["accuracy_sd"] or 0.0),
        "fixed_32_sd_points": 100 * (small["accuracy_sd"] or 0.0),
        "steps_fraction_of_fixed_32": s["steps_mean"] / small["steps_mean"],
        "within_0.3_points": gap <= 0.3,
        "at_most_20_percent_steps": s["steps_mean"]
        <= 0.2 * small["steps_mean"],
        "one_learning_rate": True,
    }
    if contender == headline and equal:
      entry["equal_step_fixed_accuracies"] = {
          c: [e["accuracy_mean"], e["accuracy_sd"]] for c, e in equal.items()}
      entry["beats_every_fixed_at_equal_steps"] = all(
          s["accuracy_mean"] > e["accuracy_mean"] for e in equal.values())
    entry["goal_met"] = (entry["within_0.3_points"]
                         and entry["at_most_20_percent_steps"]
                         and entry.get("beats_every_fixed_at_equal_steps",
                                       False))
    out.append(entry)
  return out


def plateau(payload):
  """Fixed 32 on twice the budget against fixed 32: the gain, in points, and
  both seed sds (the baseline is at its plateau if the gain is within them)."""
  family = payload["args"]["families"].split(",")[0]
  summary = {s["contender"]: s for s in payload.get("summary", [])
             if s["family"] == family}
  if SMALL not in summary or PLATEAU not in summary:
    return None
  small, double = summary[SMALL], summary[PLATEAU]
  gain = 100 * (double["accuracy_mean"] - small["accuracy_mean"])
  spread = 100 * ((small["accuracy_sd"] or 0.0)
                  + (double["accuracy_sd"] or 0.0))
  return {"gain_points": gain, "sum_of_sds_points": spread,
          "at_plateau": gain <= spread}


def verdict_line(payload):
  """One sentence: the headline against the goal, with the seed spread."""
  entries = [e for e in payload.get("verdict", []) if e["headline"]]
  if not entries:
    return "verdict: not enough runs yet"
  e = entries[0]
  equal = e.get("equal_step_fixed_accuracies", {})
  equal_text = ", ".join(f"{c} {100 * m:.1f} ± {100 * (sd or 0):.1f}"
                         for c, (m, sd) in equal.items())
  return (f"goal {'MET' if e['goal_met'] else 'NOT met'}: {e['contender']} "
          f"is {e['gap_to_fixed_32_points']:.2f} points below fixed 32 "
          f"(seed sd {e['sd_points']:.2f} vs {e['fixed_32_sd_points']:.2f}) "
          f"in {100 * e['steps_fraction_of_fixed_32']:.0f} % of its steps; "
          f"at equal steps: {equal_text or 'not run'}")


def plot(payload, path):
  plt = _common.pyplot()
  if plt is None:
    return
  family = payload["args"]["families"].split(",")[0]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for (row_family, contender), rows in _group(payload).items():
    row = rows[0]
    if row_family != family or row["seed"] != 0 or not row.get(
        "batch_sizes") or " for " in contender:
      continue
    sizes = row["batch_sizes"]
    if len(sizes) > 1 and sizes[-1] < sizes[-2]:
      sizes = sizes[:-1]  # the budget's remainder, not a size the test chose
    seen = np.cumsum(sizes)
    label = f"{contender} lr={row['learning_rate']:g}"
    style = "--" if "ramp" in contender else "-"
    axes[0].step(seen, sizes, style, where="post", label=label)
    if row.get("noise_scales"):
      axes[1].plot(seen, row["noise_scales"][:len(sizes)], style, label=label)
  axes[0].set(xlabel="samples seen", ylabel="batch size", yscale="log",
              title=f"{family}: batch size (seed 0, picked lr)")
  axes[1].set(xlabel="samples seen", ylabel="B_simple = tr(Σ)/|G|² (EMA)",
              yscale="log", title="gradient noise scale")
  axes[0].legend(fontsize=6)
  axes[1].legend(fontsize=6)
  _common.save_figure(fig, path, dpi=100)


def print_table(payload):
  rows = []
  for s in payload.get("summary", []):
    sd = "-" if s["accuracy_sd"] is None else f"{100 * s['accuracy_sd']:.2f}"
    rows.append([
        s["family"], s["contender"], f"{s['learning_rate']:g}"
        + (" (edge)" if s["grid_edge"] else ""),
        f"{s['steps_mean']:.0f}", f"{s['final_batch_size']:.0f}",
        f"{100 * s['val_accuracy_mean']:.2f}",
        f"{100 * s['accuracy_mean']:.2f} ± {sd} ({s['seeds']})",
        s["reached_target"],
        "-" if s["steps_to_target_mean"] is None
        else f"{s['steps_to_target_mean']:.0f}",
        "-" if s["wall_s_to_target_mean"] is None
        else f"{s['wall_s_to_target_mean']:.0f}",
        f"{s['wall_time_s_mean']:.0f}"])
  print(_common.markdown_table(
      ["family", "contender", "lr", "steps", "max B", "val acc %",
       "test acc % (mean ± sd, seeds)", "reached fixed-32 acc", "steps to it",
       "wall s to it", "wall s"], rows))
  print_tuning(payload)
  print_verdict(payload)
  print(_common.machine_line(payload["machine"]))
  print(verdict_line(payload))
  check = payload.get("plateau")
  if check:
    print(f"plateau check: fixed 32 on twice the samples gains "
          f"{check['gain_points']:+.2f} points (sum of the seed sds "
          f"{check['sum_of_sds_points']:.2f}): "
          + ("at" if check["at_plateau"] else "NOT at") + " its plateau")


def print_tuning(payload):
  """Seed 0's validation accuracy at every learning rate each contender
  tried, the pick in bold, an unresolved edge marked."""
  rows = []
  for tuning in payload["tuning"].values():
    cells = []
    for lr in tuning["grid"]:
      value = tuning["val_accuracy"].get(f"{lr:g}")
      text = "diverged" if value is None else f"{100 * value:.1f}"
      bold = tuning["pick"] is not None and lr == tuning["pick"]
      cells.append(f"{lr:g}: " + (f"**{text}**" if bold else text))
    rows.append([tuning["family"], tuning["contender"], ", ".join(cells),
                 ", ".join(f"{v:g}" for v in tuning["extended"]) or "-",
                 "yes" if tuning["on_edge"] else "no"])
  print(_common.markdown_table(
      ["family", "contender", "lr: seed-0 val acc %", "added past an edge",
       "pick still on an edge"], rows))


def print_verdict(payload):
  """The goal's parts per norm-test contender of the first family."""
  rows = []
  for e in payload.get("verdict", []):
    rows.append([
        e["contender"] + (" (headline)" if e["headline"] else ""),
        f"{e['gap_to_fixed_32_points']:.2f}",
        f"{e['sd_points']:.2f} / {e['fixed_32_sd_points']:.2f}",
        f"{e['steps_fraction_of_fixed_32']:.2f}", e["within_0.3_points"],
        e["at_most_20_percent_steps"],
        e.get("beats_every_fixed_at_equal_steps", "-")])
  print(_common.markdown_table(
      ["contender", "gap to fixed 32 (points)", "seed sd (points): it / "
       "fixed 32", "steps / fixed-32 steps", "≤ 0.3 points", "≤ 20 % steps",
       "beats every fixed B at equal steps"], rows))


if __name__ == "__main__":
  main()
