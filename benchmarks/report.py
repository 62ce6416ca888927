"""Writes every published table and measured sentence from the results JSON.

README.md and benchmarks/README.md hold generated blocks:

  <!-- begin: NAME -->
  ...what the renderer NAME writes from benchmarks/results/*.json...
  <!-- end: NAME -->

Usage:
  python benchmarks/report.py          # rewrite every block in place
  python benchmarks/report.py --check  # exit 1 if any block would change

A renderer is a function from nothing to Markdown, registered with `@block`.
It reads committed JSON only, and states verdicts (bold, "beats", "level")
through the engine's one rule, `sngm_optax.harness.sweep.verdict`; no number
in a block is typed by hand. The test suite runs `--check`.
"""

import argparse
import difflib
import json
import pathlib
import re
import sys
from typing import Callable

import _common

from sngm_optax.harness import sweep

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = _common.RESULTS
DOCUMENTS = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")

BLOCKS: dict[str, Callable[[], str]] = {}
_BEGIN = re.compile(r"^<!-- begin: ([\w-]+) -->$")
_END = "<!-- end: {} -->"


def block(name: str):
  """Registers the decorated function as the renderer of block `name`."""

  def register(render: Callable[[], str]) -> Callable[[], str]:
    if name in BLOCKS:
      raise ValueError(f"two renderers for block {name!r}")
    BLOCKS[name] = render
    return render

  return register


def render_document(text: str, where: str = "document") -> tuple[str, list]:
  """`text` with every block rewritten, and the names of its blocks.

  Raises:
    ValueError: a block has no renderer, or no end line.
  """
  lines, out, names = text.split("\n"), [], []
  index = 0
  while index < len(lines):
    line = lines[index]
    out.append(line)
    match = _BEGIN.match(line.strip())
    index += 1
    if not match:
      continue
    name = match.group(1)
    if name not in BLOCKS:
      raise ValueError(f"{where}: no renderer for block {name!r}")
    end = _END.format(name)
    try:
      stop = next(i for i in range(index, len(lines))
                  if lines[i].strip() == end)
    except StopIteration:
      raise ValueError(f"{where}: block {name!r} has no line {end!r}") from None
    out.extend(BLOCKS[name]().strip("\n").split("\n"))
    out.append(lines[stop])
    names.append(name)
    index = stop + 1
  return "\n".join(out), names


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 if a block is out of date")
  args = parser.parse_args(argv)
  stale, used = [], []
  for path in DOCUMENTS:
    text = path.read_text()
    new, names = render_document(text, str(path.relative_to(ROOT)))
    used += names
    if new == text:
      continue
    if args.check:
      stale.append(path)
      sys.stdout.writelines(difflib.unified_diff(
          text.splitlines(True), new.splitlines(True), str(path),
          f"{path} (generated)"))
    else:
      path.write_text(new)
      print(f"wrote {path.relative_to(ROOT)}")
  unused = sorted(set(BLOCKS) - set(used))
  if unused:
    print(f"renderers with no block in any document: {', '.join(unused)}")
    return 1
  if stale:
    print(f"out of date: {', '.join(str(p.relative_to(ROOT)) for p in stale)}"
          " (run python benchmarks/report.py)")
    return 1
  return 0


# ----------------------------------------------------------------------------
# What the renderers share.


def load(name: str) -> dict:
  """`benchmarks/results/NAME.json`."""
  return json.loads((RESULTS / f"{name}.json").read_text())


def percent(value: float | None, digits: int = 1) -> str:
  """A fraction as a percentage with `digits` decimals, "–" for None."""
  return "–" if value is None else f"{100 * value:.{digits}f}"


def mean_sd(summary: sweep.Summary | dict | None, digits: int = 1,
            scale: float = 100.0) -> str:
  """`mean ± sd` of a summary of fractions, in percent by default."""
  if summary is None:
    return "–"
  if isinstance(summary, dict):
    summary = sweep.Summary(**summary)
  return (f"{scale * summary.mean:.{digits}f} ± "
          f"{scale * summary.sd:.{digits}f}")


def number(value: float, digits: int = 0) -> str:
  """`value` with thousands separators and `digits` decimals."""
  return f"{value:,.{digits}f}"


def bold(text: str, on: bool) -> str:
  return f"**{text}**" if on else text


table = _common.markdown_table


def spread_rule() -> str:
  """The verdict rule, as every report states it."""
  return f"Verdicts follow one rule: {sweep.SPREAD_RULE}"


@block("spread-rule")
def _spread_rule_block() -> str:
  return spread_rule()


# ----------------------------------------------------------------------------
# compare --quick and the large-batch benchmark (large_batch.py).



# ----------------------------------------------------------------------------
# Adaptive batch size (adaptive_batch.py).



# ----------------------------------------------------------------------------
# TR at tiny batches (small_batch.py) and sparse communication
# (sparse_communication.py).



# ----------------------------------------------------------------------------
# Timing: update cost, top-k selection, step and harness throughput, the
# batch-size test's cost, the accelerator check.
#
# Every figure is a median or a ratio the script stored (`_common.Timings`);
# a figure across two runs (before/after a change) is `_common.times_less`
# or a difference of stored values. Targets are the issues' own numbers.

TIMING_FILES = (
    "update_cost", "update_cost_norm_pass", "update_cost_b7c30e6",
    "update_cost_before_790a1d2", "update_cost_sparse_after",
    "update_cost_sparse_before_8790120", "topk_selection",
    "topk_selection_ad87a1c", "step_throughput",
    "step_throughput_before_790a1d2", "harness_throughput",
    "harness_throughput_0c1ccf2", "harness_throughput_before_8790120",
    "batch_size_test_cost")
_TREE_NAMES = {"flat_1m": "flat 1M", "resnet50_like": "ResNet-like",
               "transformer_like": "transformer-like"}
_LARGE_TREES = ("resnet50_like", "transformer_like")


def _row(rows: list, **match) -> dict:
  """The one row of `rows` whose fields equal `match`."""
  found = [row for row in rows
           if all(row.get(key) == value for key, value in match.items())]
  if len(found) != 1:
    raise ValueError(f"{len(found)} rows match {match}")
  return found[0]


def _times(value: float, digits: int = 2) -> str:
  return f"{value:.{digits}f}×"


def _span(values, digits: int = 2, unit: str = "") -> str:
  """`low–high` of `values` (one value when they agree at `digits`)."""
  low, high = (f"{f(values):.{digits}f}" for f in (min, max))
  return (low if low == high else f"{low}–{high}") + unit


def _signed_span(values, digits: int = 1) -> str:
  """`low to high` of fractions, in signed percent."""
  low, high = (f"{100 * f(values):+.{digits}f} %" for f in (min, max))
  return low if low == high else f"{low} to {high}"


def _at(name: str) -> str:
  return f"`results/{name}.json`, code {load(name)['code_version']}"


def _command(name: str, note: str = "") -> str:
  """The command a timing JSON recorded, and the code it ran."""
  record = load(name)
  command = record["command"] or f"(command not recorded; {name}.json)"
  return f"{command}   # at {record['code_version']}{note}"


def _load_of(name: str) -> str:
  return _common.load_text(load(name)["machine"])


@block("timing-machine")
def _timing_machine() -> str:
  machines = [load(name)["machine"] for name in TIMING_FILES]
  cores = sorted({m["cpu_count"] for m in machines})
  models = sorted({m["cpu_model"] for m in machines if m.get("cpu_model")})
  versions = sorted({m["jax"] for m in machines})
  backends = sorted({m.get("backend") or m.get("device") or "cpu"
                     for m in machines if "backend" in m or "device" in m})
  return (f"The {len(machines)} timing JSONs record a machine of "
          f"{' or '.join(map(str, cores))} CPU cores ({', '.join(models)} "
          f"where the CPU model is recorded), JAX {', '.join(versions)} on "
          f"the {', '.join(backends)} backend.")


# Top-k selection (topk_selection.py).


def _topk_cells(rows: list) -> dict:
  return {(r["input"], r["size"], r["density"], r["selection"]): r
          for r in rows}


def _entries(size: int) -> str:
  return f"{size / 1e6:g}M" if size >= 1e6 else f"{size / 1e3:g}k"


def _density(density: float) -> str:
  return f"{100 * density:g}%"


@block("topk-selection-command")
def _topk_command() -> str:
  return "```\n" + _command("topk_selection") + "\n```"


@block("topk-selection-setting")
def _topk_setting() -> str:
  rows = load("topk_selection")["rows"]
  by_repeats = {}
  for row in rows:
    by_repeats.setdefault(row["repeats"], set()).add(row["size"])
  rounds = ", ".join(
      f"{repeats} rounds at {', '.join(map(_entries, sorted(sizes)))}"
      for repeats, sizes in sorted(by_repeats.items(), reverse=True))
  return (f"Median ms of interleaved rounds ({rounds} entries); ratios are "
          "medians of per-round ratios to `exact` (`lax.top_k`); "
          f"{_load_of('topk_selection')}.")


@block("topk-selection-table")
def _topk_table() -> str:
  now = _topk_cells(load("topk_selection")["rows"])
  before = _topk_cells(load("topk_selection_ad87a1c")["rows"])
  version = load("topk_selection_ad87a1c")["code_version"]
  rows = []
  for kind, size, density, selection in now:
    if selection != "exact":
      continue
    cell = {s: now[kind, size, density, s] for s in
            ("exact", "approx", "sampled")}
    earlier = before.get((kind, size, density, "sampled"))
    rows.append([kind, _entries(size), _density(density)]
                + [f"{cell[s]['median_ms']:.1f}" for s in cell]
                + [f"{cell[s]['median_ratio_to_exact']:.2f}"
                   for s in ("approx", "sampled")]
                + ["–" if earlier is None
                   else f"{earlier['median_ratio_to_exact']:.2f}"])
  return table(["input", "entries", "density", "exact", "approx", "sampled",
                "approx/exact", "sampled/exact",
                f"sampled/exact at {version}"], rows, align="lrrrrrrrr")


@block("topk-selection-verdict")
def _topk_verdict() -> str:
  rows = load("topk_selection")["rows"]
  earlier = load("topk_selection_ad87a1c")
  sampled = [r for r in rows if r["selection"] == "sampled"]

  def worst(candidates):
    row = max(candidates, key=lambda r: r["median_ratio_to_exact"])
    return (f"{_times(row['median_ratio_to_exact'])} of exact ({row['input']}"
            f", {_entries(row['size'])}, {_density(row['density'])}: "
            f"k = {row['k']:,})")

  faster = [f"{r['input']} {_entries(r['size'])} {_density(r['density'])}"
            for r in sampled if r["median_ratio_to_exact"] < 1]
  recalls = [r["recall"] for r in rows] + [
      r["recall_min_over_keys"] for r in sampled
      if r["recall_min_over_keys"] is not None]
  exact_k = all(r["sent"] == r["k"] for r in rows)
  old_sampled = [r for r in earlier["rows"] if r["selection"] == "sampled"]
  return "\n".join([
      f"- The worst case of `'sampled'`: {worst(sampled)}; in the run at "
      f"{earlier['code_version']}, {worst(old_sampled)}.",
      f"- `'sampled'` is faster than `exact` in {len(faster)} of "
      f"{len(sampled)} cells: {', '.join(faster) or 'none'}.",
      f"- Every selection sent {'exactly' if exact_k else 'not always'} k "
      f"distinct indices; the lowest recall against the exact top-k is "
      f"{min(recalls):.3f} (for `'sampled'`, over "
      f"{load('topk_selection')['budget'].get('recall_keys', 'several')} "
      "random keys).",
  ])


# Cost of the batch-size test (batch_size_test_cost.py).


@block("batch-size-test-cost-command")
def _batch_test_command() -> str:
  return "```\n" + _command("batch_size_test_cost") + "\n```"


@block("batch-size-test-cost-setting")
def _batch_test_setting() -> str:
  record = load("batch_size_test_cost")
  budget = record["budget"]
  micro = budget["batch"] // budget["microbatches"]
  return (f"{record['num_params']:,} parameters, batch {budget['batch']}; "
          f"the microbatch and moment modes use {budget['microbatches']} × "
          f"{micro}; the per-device mode runs on {budget['devices']} "
          f"simulated devices under `{budget['mapper']}`. Each figure is the "
          f"median of {budget['repeats']} interleaved turns of at least "
          f"{budget['steps']} steps and {budget['min_seconds']} s; "
          f"{_load_of('batch_size_test_cost')}. Measured at "
          f"{record['code_version']}.")


@block("batch-size-test-cost-table")
def _batch_test_table() -> str:
  rows = []
  for r in load("batch_size_test_cost")["rows"]:
    name = r["mode"] + (f" ({r['mapper']})" if r["mapper"] else "")
    sources = r.get("sources_ms")
    rows.append([
        name, r["test"], f"{r['baseline_ms']:.2f}",
        "—" if sources is None else f"{sources:.2f}",
        f"{r['with_test_ms']:.2f}",
        f"{r['ratio_median']:.2f} [{r['ratio_min']:.2f}, "
        f"{r['ratio_max']:.2f}]", f"{r['cpu_ratio_median']:.2f}"])
  return table(["mode", "test", "baseline ms", "source only ms",
                "with test ms", "with test / baseline (median [min, max])",
                "CPU-time ratio"], rows)


@block("batch-size-test-cost-summary")
def _batch_test_summary() -> str:
  rows = load("batch_size_test_cost")["rows"]
  per_example = [r for r in rows if r["mode"] == "per_example"]
  others = [r for r in rows if r["mode"] != "per_example"]
  return (
      "Per-example gradients (`vmap` of `grad`) with the test cost "
      f"{_span([r['ratio_median'] for r in per_example], 0, '×')} a plain "
      f"step ({_span([r['cpu_ratio_median'] for r in per_example], 0, '×')} "
      "in CPU time); the test adds "
      f"{_span([r['test_only_ratio_median'] for r in per_example], 1, '×')} "
      "to the per-example gradients alone. The microbatch, moment and "
      "per-device modes cost "
      f"{_span([r['ratio_median'] for r in others], 1, '×')} wall "
      f"({_span([r['cpu_ratio_median'] for r in others], 1, '×')} CPU time) "
      "on this tiny model.")


# Cost of one optimizer update (update_cost.py).

# Issue 7's targets on the large trees: the most a ratio to
# sgd(momentum) may be, and the least fraction of the copy roofline (float32).
UPDATE_TARGETS = {"sngm": (1.3, 0.7), "adagrad_norm": (1.3, None),
                  "tr_sgd": (1.5, None)}
NORM_TEST_TARGET = 0.03  # the per-device norm test's share of a step
UPDATE_RUNS = ("update_cost", "update_cost_norm_pass")


def _mode(row: dict) -> str:
  return "jit" if row["mode"] == "jit" else f"pmap×{row['devices']}"


def _large(name: str, optimizer: str, dtype: str) -> list:
  return [r for r in load(name)["rows"] if r["optimizer"] == optimizer
          and r["dtype"] == dtype and r["mode"] == "jit"
          and r["tree"] in _LARGE_TREES]


@block("update-cost-command")
def _update_cost_command() -> str:
  budget = load("update_cost")["budget"]
  return ("```\n" + _command(
      "update_cost", f": {budget['rounds']} rounds × median of "
      f"{budget['repeats']} calls") + "\n```")


@block("update-cost-setting")
def _update_cost_setting() -> str:
  rows = load("update_cost")["rows"]
  copy = [r["copy_bandwidth_gb_s"] for r in rows
          if r["tree"] in _LARGE_TREES]
  passes = {}
  for r in rows:
    passes.setdefault(_mode(r), {})[r["optimizer"]] = r["ideal_passes"]
  listed = "; ".join(
      f"{mode}: " + ", ".join(f"{name} {count:g}"
                              for name, count in by_name.items())
      for mode, by_name in passes.items())
  return (f"Measured with {_load_of('update_cost')}. The copy roofline's "
          "bandwidth, a "
          f"donated `x + 1` counting read + write, was "
          f"{_span(copy, 0, ' GB/s')} on the large trees. Ideal passes "
          f"({listed}).")


@block("update-cost-table")
def _update_cost_table() -> str:
  rows = [[r["tree"], r["dtype"], _mode(r), r["optimizer"],
           f"{r['ideal_passes']:g}", f"{r['median_ms']:.2f}",
           f"{r['ratio_to_sgd_momentum']:.2f}",
           f"{r['fraction_of_roofline']:.0%}"]
          for r in load("update_cost")["rows"]]
  return table(["tree", "dtype", "mode", "optimizer", "ideal passes",
                "median ms", "× sgd(momentum)", "% of copy roofline"], rows,
               align="llllrrrr")


def _run_to_run() -> list[float]:
  """|ratio in the second run - in the first| of every row both have."""
  first = load("update_cost")["rows"]
  moved = []
  for r in load("update_cost_norm_pass")["rows"]:
    if r["optimizer"] == "optax.sgd(momentum)":
      continue
    other = _row(first, tree=r["tree"], dtype=r["dtype"], mode=r["mode"],
                 optimizer=r["optimizer"])
    moved.append(abs(r["ratio_to_sgd_momentum"]
                     - other["ratio_to_sgd_momentum"]))
  return moved


@block("update-cost-second-run")
def _update_cost_second_run() -> str:
  record = load("update_cost_norm_pass")
  parts = []
  for optimizer in ("sngm", "tr_sgd"):
    for dtype in ("float32", "bfloat16"):
      cells = [_row(record["rows"], tree=tree, dtype=dtype, mode="jit",
                    optimizer=optimizer) for tree in _LARGE_TREES]
      roofline = dtype == "float32" and optimizer == "sngm"
      parts.append(f"{optimizer} {dtype} " + " / ".join(
          _times(c["ratio_to_sgd_momentum"])
          + (f" ({c['fraction_of_roofline']:.0%})" if roofline else "")
          for c in cells))
  return (f"A second run of the large trees right after (`{record['command']}`"
          f", at {record['code_version']}, {_load_of('update_cost_norm_pass')})"
          " gave, ResNet-like / transformer-like: " + "; ".join(parts)
          + ". The same ratio moved by " + _span(_run_to_run())
          + " between the two runs, so the targets below are judged on the "
          "range of both.")


def _target_cells(optimizer: str) -> tuple[str, str]:
  limit, roofline = UPDATE_TARGETS[optimizer]
  runs = [name for name in UPDATE_RUNS if _large(name, optimizer, "float32")]
  f32 = [r for name in runs for r in _large(name, optimizer, "float32")]
  bf16 = [r for name in runs for r in _large(name, optimizer, "bfloat16")]
  measured = (f"float32 {_span([r['ratio_to_sgd_momentum'] for r in f32])}×"
              + (f", {_span([100 * r['fraction_of_roofline'] for r in f32], 0)}"
                 " % of roofline" if roofline else "")
              + f"; bfloat16 {_span([r['ratio_to_sgd_momentum'] for r in bf16])}×"
              + f" ({len(runs)} run{'s' if len(runs) > 1 else ''})")
  met = [r["ratio_to_sgd_momentum"] <= limit
         and (roofline is None or r["dtype"] != "float32"
              or r["fraction_of_roofline"] >= roofline) for r in f32 + bf16]
  return measured, _on_target(met)


def _on_target(met: list[bool]) -> str:
  if all(met):
    return "on target"
  return "**off**" + ("" if not any(met) else
                      f" (on target in {sum(met)} of {len(met)} measurements)")


@block("update-cost-targets")
def _update_cost_targets() -> str:
  rows = []
  for optimizer, (limit, roofline) in UPDATE_TARGETS.items():
    target = f"≤ {limit}× sgd(momentum)" + (
        f", ≥ {roofline:.0%} of roofline (float32)" if roofline else "")
    rows.append([f"`{optimizer}`", target, *_target_cells(optimizer)])
  overheads = [r for r in load("step_throughput")["rows"]
               if r["test_overhead"] is not None]
  met = [r["test_overhead"] <= NORM_TEST_TARGET for r in overheads]
  passing = ", ".join(f"{r['model']} B = {r['batch_size']}"
                      for r, ok in zip(overheads, met) if ok)
  rows.append([
      "per-device norm test (`adaptive_batch_size(axis_name=...)`)",
      f"adds ≤ {NORM_TEST_TARGET:.0%} to a harness step",
      f"{_signed_span([r['test_overhead'] for r in overheads])} "
      f"({overheads[0]['devices']} simulated devices"
      + (f"; within it: {passing}" if passing else "") + ")",
      _on_target(met)])
  trees = ", ".join(
      f"{_TREE_NAMES[tree]} ({row['params'] / 1e6:.1f}M parameters)"
      for tree in _LARGE_TREES
      for row in [_row(load("update_cost")["rows"], tree=tree,
                       dtype="float32", mode="jit", optimizer="sngm")])
  return (f"On the large trees, {trees}, in both runs of `update_cost.py` "
          "where they have the row, and the norm test in the step-throughput "
          "run:\n\n" + table(["transform", "target", "measured", ""], rows))


def _norm_passes(name: str) -> list[tuple[dict, float]]:
  """(row, copy bandwidth / global_norm bandwidth) of the large-tree sngm
  rows: the time of the norm's one read, in copy passes."""
  return [(r, r["copy_bandwidth_gb_s"] / r["global_norm_bandwidth_gb_s"])
          for dtype in ("float32", "bfloat16")
          for r in _large(name, "sngm", dtype)]


@block("update-cost-gaps")
def _update_cost_gaps() -> str:
  passes = _norm_passes("update_cost_norm_pass")
  baseline = _row(load("update_cost")["rows"], tree="flat_1m",
                  dtype="float32", mode="jit",
                  optimizer="optax.sgd(momentum)")["ideal_passes"]
  norm = "; ".join(
      f"{dtype} " + " / ".join(f"{r['global_norm_bandwidth_gb_s']:.1f}"
                               for r, _ in passes if r["dtype"] == dtype)
      for dtype in ("float32", "bfloat16"))
  copy = [r["copy_bandwidth_gb_s"] for r, _ in passes]
  rows = load("update_cost")["rows"]
  reference = [r["ratio_to_sgd_momentum"] for r in rows
               if r["optimizer"] in ("optax.lars", "optax.lamb")
               and r["tree"] in _LARGE_TREES]
  gmc = [r["ratio_to_sgd_momentum"] for r in rows
         if r["optimizer"].startswith("gmc")]
  return "\n".join([
      "- **sngm.** After the fixes below its update is the momentum update "
      "plus one `global_norm` reduction, nothing else (the HLO has one "
      "reduce per leaf, a scalar `lax.cond`, and the same elementwise "
      "fusions as sgd(momentum)). On this CPU a reduction streams slower "
      "than a copy: in the second run `global_norm` alone read the trees "
      f"(ResNet-like / transformer-like) at {norm} GB/s, against "
      f"{_span(copy, 0, ' GB/s')} for the copy "
      "(`results/update_cost_norm_pass.json`). So the one extra read takes "
      f"{_span([p for _, p in passes], 1)} copy passes' time instead of 1, "
      f"and sgd(momentum)'s {baseline:g} passes plus it come to "
      f"{_span([(baseline + p) / baseline for _, p in passes], 1, '×')}. "
      "A GPU (where a reduction runs at HBM bandwidth) was not available to "
      "check.",
      "- **tr_sgd.** XLA:CPU does not fuse several outputs into one loop: "
      "every written array is its own pass that re-reads its inputs. "
      "sgd(momentum) is two loops (m, then p), TR's momentum loop also reads "
      "p and the anchor. With the anchor reset as a `lax.cond` it is no "
      "longer rewritten between resets (the HLO shows the donated buffer "
      "passed through), but the extra reads remain.",
      "- **norm test.** The statistics add three scalars of work and fold "
      "one scalar into the gradient all-reduce; what remains is a fixed "
      "cost of scalar bookkeeping (test, EMA, next batch size) per step on "
      "each simulated device sharing the cores, which is above the target "
      "only when the step itself takes a few milliseconds (see the "
      "step-throughput table).",
      f"- `optax.lars`/`optax.lamb` ({_span(reference, 1, '×')} on the large "
      "trees) and `optax.adagrad` are optax's, shown for reference; `gmc` is "
      f"dominated by the exact top-k of each device's full vector "
      f"({_span(gmc, 1, '×')} on CPU), see `topk_selection.py`.",
  ])


# The before/after table: (change, [(row label, before file, after file,
# the row's fields)]); ratios to sgd(momentum) of the same run.
_FIXES = (
    ("`normalize_by_global_norm`: its `lax.cond` for norms above 2^64 "
     "returned the whole tree, so XLA materialized the normalized gradient "
     "(an extra write and read of every leaf) before the momentum update; "
     "now both branches are scalars (d42e515)", [
         ("sngm", "resnet50_like", "float32", "jit"),
         ("sngm", "transformer_like", "float32", "jit"),
         ("sngm", "flat_1m", "float32", "jit")],
     "update_cost_before_790a1d2", "update_cost"),
    ("`sum_of_squares`: for bfloat16 leaves XLA shared the float32 "
     "conversion between the norm and the update and materialized a float32 "
     "copy of the tree; an `optimization_barrier` before the reduction "
     "stops it (b7c30e6)", [
         ("adagrad_norm", "resnet50_like", "bfloat16", "jit"),
         ("adagrad_norm", "transformer_like", "bfloat16", "jit"),
         ("sngm", "transformer_like", "bfloat16", "jit")],
     "update_cost_before_790a1d2", "update_cost"),
    ("GMC's top-k on `|v|` in float32: XLA:CPU's bfloat16 top-k is a "
     "generic sort (0a9eb75)", [
         ("gmc(density=0.01)", "flat_1m", "bfloat16", "pmap")],
     "update_cost_before_790a1d2", "update_cost"),
    ("per-device norm test: `‖g_d‖²` all-reduced with the gradient mean "
     "instead of a second all-reduce and two more reductions after it "
     "(0a9eb75)", [
         ("adaptive_batch_size(per-device) + sgd(momentum)", "flat_1m",
          "bfloat16", "pmap")],
     "update_cost_before_790a1d2", "update_cost"),
    ("TR anchor reset as `lax.cond` instead of a select that rewrote the "
     "anchor every step (4768455)", [
         ("tr_sgd", "transformer_like", "float32", "jit"),
         ("tr_sgd", "resnet50_like", "float32", "jit"),
         ("tr_sgd", "resnet50_like", "bfloat16", "jit"),
         ("tr_sgd", "transformer_like", "bfloat16", "jit")],
     "update_cost_b7c30e6", "update_cost"),
)


def _fix_cell(name: str, optimizer, tree, dtype, mode) -> str:
  row = _row(load(name)["rows"], optimizer=optimizer, tree=tree, dtype=dtype,
             mode=mode)
  roofline = (f" ({row['fraction_of_roofline']:.0%})"
              if optimizer == "sngm" and dtype == "float32"
              and tree in _LARGE_TREES else "")
  return _times(row["ratio_to_sgd_momentum"]) + roofline


def _fix_ratio(name, optimizer, tree, dtype, mode) -> float:
  return _row(load(name)["rows"], optimizer=optimizer, tree=tree,
              dtype=dtype, mode=mode)["ratio_to_sgd_momentum"]


@block("update-cost-fixes")
def _update_cost_fixes() -> str:
  rows = []
  for change, cells, before, after in _FIXES:
    for index, (optimizer, tree, dtype, mode) in enumerate(cells):
      mode_name = "" if mode == "jit" else ", pmap"
      rows.append([
          change if index == 0 else "",
          f"{optimizer}, {_TREE_NAMES[tree]} {dtype}{mode_name}",
          f"{_fix_cell(before, optimizer, tree, dtype, mode)} "
          f"(at {load(before)['code_version']})",
          f"{_fix_cell(after, optimizer, tree, dtype, mode)}"])
  return table(["change", "row", "before", "after"], rows, align="llrr")


@block("update-cost-fixes-summary")
def _update_cost_fixes_summary() -> str:
  def change(cells, before="update_cost_before_790a1d2",
             after="update_cost"):
    return (f"{_span([_fix_ratio(before, *c) for c in cells], 1, '×')} → "
            f"{_span([_fix_ratio(after, *c) for c in cells], 2, '×')}")

  step_now = load("step_throughput")["rows"]
  step_before = load("step_throughput_before_790a1d2")["rows"]
  return (
      "What was slow and is fixed (ratios to sgd(momentum) before and after,"
      " `benchmarks/results/update_cost*.json`): a whole-tree `lax.cond` "
      "that materialized the normalized gradient (sngm, ResNet-like float32 "
      f"{change([('sngm', 'resnet50_like', 'float32', 'jit')])}), a float32 "
      "copy XLA made of bfloat16 gradients for the norm (adagrad_norm "
      "bfloat16 on the large trees "
      f"{change([('adagrad_norm', t, 'bfloat16', 'jit') for t in _LARGE_TREES])}"
      "), GMC's bfloat16 top-k "
      f"({change([('gmc(density=0.01)', 'flat_1m', 'bfloat16', 'pmap')])}), "
      "the per-device norm test's second all-reduce (its overhead "
      f"{_span(_norm_test_gains(step_before, step_now), 1, '×')} lower), "
      "TR's anchor rewrite.")


def _norm_test_gains(before: list, after: list) -> list[float]:
  """How many times smaller the norm test's overhead is after than before,
  where it is positive in both runs."""
  gains = []
  for row in after:
    if row["test_overhead"] is None:
      continue
    old = _row(before, model=row["model"], devices=row["devices"],
               batch_size=row["batch_size"], optimizer=row["optimizer"])
    if row["test_overhead"] > 0 and old["test_overhead"] > 0:
      gains.append(_common.times_less(old["test_overhead"],
                                      row["test_overhead"]))
  return gains


@block("update-cost-why-summary")
def _update_cost_why_summary() -> str:
  passes = [p for _, p in _norm_passes("update_cost_norm_pass")]
  return (
      "Why the rest is not on target, here: a reduction (SNGM's norm) "
      "streams slower than a copy on this CPU, so SNGM's one extra read "
      f"costs {_span(passes, 1)} passes' time; XLA:CPU gives every written "
      "array its own loop, so TR's momentum loop re-reads the params and "
      "the anchor; and the norm test's remaining cost is a fixed amount of "
      "scalar bookkeeping per step on each simulated device, which matters "
      "only when the step takes a few milliseconds.")


# GMC's selection on the ResNet-like tree (update_cost.py, issue 16).

_SPARSE = ("update_cost_sparse_before_8790120", "update_cost_sparse_after")
_GMC = {"exact": "gmc(density=0.01, selection='exact')",
        "sampled": "gmc(density=0.01, selection='sampled')"}


@block("update-cost-sparse-command")
def _sparse_command() -> str:
  return "```\n" + "\n".join(_command(name) for name in reversed(_SPARSE)) \
      + "\n```"


@block("update-cost-sparse-setting")
def _sparse_setting() -> str:
  record = load("update_cost_sparse_after")
  row = _row(record["rows"], optimizer=_GMC["exact"])
  return (f"One update of {row['params'] / 1e6:.1f}M parameters per worker, "
          f"{row['devices']} simulated workers under `pmap`, against `pmean "
          "+ optax.sgd(momentum)` of the same run; median of "
          f"{record['budget']['repeats']} calls. Before: "
          f"{_load_of(_SPARSE[0])}; after: {_load_of(_SPARSE[1])}.")


def _sparse_ratio(name: str, selection: str, cpu: bool = False) -> float:
  row = _row(load(name)["rows"], optimizer=_GMC[selection])
  return row["cpu_ratio_to_sgd_momentum" if cpu else "ratio_to_sgd_momentum"]


@block("update-cost-sparse-table")
def _sparse_table() -> str:
  rows = [[f"`selection='{selection}'`"] + [
      f"{_times(_sparse_ratio(name, selection))} / "
      f"{_times(_sparse_ratio(name, selection, cpu=True))}"
      for name in _SPARSE] for selection in _GMC]
  return table(["gmc, density 1 %"] + [
      f"{label}: {load(name)['code_version']} (wall / CPU × baseline)"
      for label, name in zip(("before", "after"), _SPARSE)], rows,
               align="lrr")


@block("update-cost-sparse-verdict")
def _sparse_verdict() -> str:
  before, after = _SPARSE
  best = min(_sparse_ratio(after, s, cpu=True) for s in _GMC)
  topk = [r["median_ratio_to_exact"] for r in load("topk_selection")["rows"]
          if r["selection"] == "sampled"]
  return (
      f"**The aim, gmc at most 2× `sgd(momentum)` under `pmap`, is "
      f"{'met' if best <= 2 else 'not met'}** (CPU-time ratios): the faster "
      f"selection brings it from {_times(_sparse_ratio(before, 'sampled', True), 1)}"
      f" (the old sampled) or {_times(_sparse_ratio(before, 'exact', True), 1)}"
      f" (exact) to {_times(_sparse_ratio(after, 'sampled', True), 1)}. "
      "The exact row's own change between the two runs "
      f"({_times(_sparse_ratio(before, 'exact', True), 1)} to "
      f"{_times(_sparse_ratio(after, 'exact', True), 1)}) is not a change of "
      "its code; earlier unpinned reruns that moved it are not recorded. "
      f"`exact` stays the default: `'sampled'` costs up to "
      f"{_times(max(topk), 1)} of it in `topk_selection.json`.")


# Harness loop throughput (harness_throughput.py).

_HARNESS = ("harness_throughput_before_8790120", "harness_throughput")
HARNESS_TARGET = (0.8, (2, 4, 8, 16))  # ≥ 0.8× the bare loop at these B


@block("harness-throughput-commands")
def _harness_commands() -> str:
  return "```\n" + "\n".join(_command(name) for name in reversed(_HARNESS)) \
      + "\n```"


@block("harness-throughput-setting")
def _harness_setting() -> str:
  return (f"After: {_load_of(_HARNESS[1])}; before: "
          f"{_load_of(_HARNESS[0])} (`results/harness_throughput.json`, "
          "`..._before_8790120.json`; `..._0c1ccf2.json` is a run of the "
          f"first chunked loop, {_load_of('harness_throughput_0c1ccf2')}).")


def _loop(name: str, batch_size: int, loop: str) -> dict:
  return _row(load(name)["rows"], batch_size=batch_size, loop=loop)


@block("harness-throughput-table")
def _harness_table() -> str:
  before, after = _HARNESS
  rows = []
  for batch_size in sorted({r["batch_size"] for r in load(after)["rows"]}):
    old = _loop(before, batch_size, "harness")
    rows.append([
        batch_size,
        f"{_loop(before, batch_size, 'bare')['samples_per_s']:.0f}",
        f"{old['samples_per_s']:.0f} ({_times(old['ratio_to_bare'])})",
        f"{_loop(after, batch_size, 'bare')['samples_per_s']:.0f}"] + [
            f"{r['samples_per_s']:.0f} ({_times(r['ratio_to_bare'])})"
            for r in (_loop(after, batch_size, loop) for loop in
                      ("harness", "harness K=1", "harness K=32"))])
  return table([
      "B", "bare, before run (samples/s)",
      f"harness at {load(before)['code_version']} (× bare)",
      "bare, after run", "harness, default (× bare)",
      "K=1: a dispatch a step", "K=32: `lax.scan`"], rows, align="rrrrrrr")


@block("harness-throughput-verdict")
def _harness_verdict() -> str:
  before, after = _HARNESS
  limit, sizes = HARNESS_TARGET
  now = [_loop(after, b, "harness")["ratio_to_bare"] for b in sizes]
  old = [_loop(before, b, "harness")["ratio_to_bare"] for b in sizes]
  closest = min(sizes, key=lambda b: _loop(after, b, "harness")[
      "ratio_to_bare"])
  idle = "harness_throughput_0c1ccf2"
  ratio = lambda name, b, loop: _times(_loop(name, b, loop)["ratio_to_bare"])
  return "\n".join([
      f"**The target, ≥ {limit}× the bare loop at B = "
      f"{', '.join(map(str, sizes))}, is "
      f"{'met' if min(now) >= limit else 'not met'}**: "
      f"{', '.join(map(_times, now))} (closest at B = {closest}: "
      f"{_loop(after, closest, 'harness')['samples_per_s']:.0f} samples/s "
      f"against the bare loop's "
      f"{_loop(after, closest, 'bare')['samples_per_s']:.0f}). Before, the "
      f"loop reached {_span(old)}× at those batch sizes. What changed, in "
      "order:",
      "- the metrics come back to the host once per chunk of steps (ending "
      "at every epoch end, due checkpoint and stop), not every step, and a "
      "chunk's batches are placed in one transfer;",
      "- at small batches on CPU a chunk runs as one `lax.scan` "
      "(`train.SCAN_MAX_BATCH_SIZE`; beyond that XLA:CPU's scanned step is "
      f"slower than a dispatch a step: {ratio(after, 16, 'harness K=32')} "
      f"and {ratio(after, 32, 'harness K=32')} at B = 16 and 32 above);",
      "- the per-step path slices a chunk in one jitted call "
      "(`train._unstack`), not one dispatch per array and step, and stacks "
      "the steps' metrics on the device (`train._stack`) before one "
      f"transfer: at {load(idle)['code_version']}, before these two, K=1 "
      f"was {ratio(idle, 8, 'harness K=1')} at B = 8 and "
      f"{ratio(idle, 16, 'harness K=1')} at B = 16, and the default at "
      f"B = 16 {ratio(idle, 16, 'harness')}.",
      "",
      "`harness` above the scan's largest batch is the K=1 loop; at B = 32 "
      f"the default's {ratio(after, 32, 'harness')} against K=1's "
      f"{ratio(after, 32, 'harness K=1')} (the same code) shows the noise of "
      "one run.",
  ])


# Harness step throughput (step_throughput.py).

_STEP = ("step_throughput_before_790a1d2", "step_throughput")


@block("step-throughput-commands")
def _step_commands() -> str:
  return "```\n" + "\n".join(_command(name) for name in reversed(_STEP)) \
      + "\n```"


@block("step-throughput-setting")
def _step_setting() -> str:
  budget = load(_STEP[1])["budget"]
  return (f"Median of {budget['repeats']} rounds of {budget['steps']} steps; "
          f"{_load_of(_STEP[1])}. \"norm test adds\" = `sngm+norm_test` / "
          "`sngm` − 1 in this run; in parentheses the same with the library "
          f"at {load(_STEP[0])['code_version']} "
          "(`results/step_throughput_before_790a1d2.json`).")


def _step_rows(name: str) -> list:
  return load(name)["rows"]


@block("step-throughput-table")
def _step_table() -> str:
  now, before = _step_rows(_STEP[1]), _step_rows(_STEP[0])
  rows = []
  for r in now:
    if r["optimizer"] != "sngm":
      continue
    same = dict(model=r["model"], devices=r["devices"],
                batch_size=r["batch_size"])
    msgd = _row(now, optimizer="msgd", **same)
    test = [t for t in now if t["optimizer"] == "sngm+norm_test"
            and all(t[k] == v for k, v in same.items())]
    old = [t for t in before if t["optimizer"] == "sngm+norm_test"
           and all(t[k] == v for k, v in same.items())]
    adds = "—"
    if test:
      adds = f"{100 * test[0]['test_overhead']:+.1f}%"
      if old:
        adds += f" ({100 * old[0]['test_overhead']:+.1f}%)"
    rows.append([f"{r['model']} ({r['params']})", r["devices"],
                 r["batch_size"], f"{msgd['step_ms']:.2f}",
                 f"{r['step_ms']:.2f}", f"{r['ratio_to_first']:.2f}",
                 f"{r['samples_per_s']:.0f}", adds])
  old_version = load(_STEP[0])["code_version"]
  return table(["model (params)", "devices", "B", "msgd ms/step",
                "sngm ms/step", "sngm × msgd", "sngm samples/s",
                f"norm test adds (at {old_version})"], rows,
               align="lrrrrrrr")


@block("step-throughput-verdict")
def _step_verdict() -> str:
  now = _step_rows(_STEP[1])
  sngm = [r for r in now if r["optimizer"] == "sngm"]
  slowest = max(sngm, key=lambda r: r["ratio_to_first"])
  msgd = _row(now, optimizer="msgd", model=slowest["model"],
              devices=slowest["devices"], batch_size=slowest["batch_size"])
  tests = [r for r in now if r["test_overhead"] is not None]
  within = [r for r in tests if r["test_overhead"] <= NORM_TEST_TARGET]
  beyond = [r["test_overhead"] for r in tests if r not in within]
  gains = _norm_test_gains(_step_rows(_STEP[0]), now)
  return (
      f"SNGM takes {_span([r['ratio_to_first'] for r in sngm])}× momentum "
      f"SGD's step time; the most at {slowest['model']}, "
      f"{slowest['devices']} device{'s' if slowest['devices'] > 1 else ''}, "
      f"B = {slowest['batch_size']} "
      f"({slowest['step_ms']:.2f} vs {msgd['step_ms']:.2f} ms). The norm "
      f"test's overhead fell {_span(gains, 1)}× with the fused all-reduce "
      f"(where it is positive in both runs); it is within "
      f"{NORM_TEST_TARGET:.0%} at "
      + (", ".join(f"{r['model']} B = {r['batch_size']}" for r in within)
         or "no size")
      + (f", and {_signed_span(beyond)} elsewhere" if beyond else "")
      + " on this CPU.")


if __name__ == "__main__":
  sys.exit(main())
