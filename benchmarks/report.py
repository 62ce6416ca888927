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

ROOT = _common.ROOT
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

LABELS = {"sngm": "SNGM", "sngm_paper": "SNGM (paper)",
          "sngm_decoupled": "SNGM, decoupled decay",
          "sngm_nesterov": "SNGM, Nesterov", "sngm_per_layer": "SNGM, per layer",
          "msgd": "momentum SGD", "lars": "LARS", "lamb": "LAMB"}


def _label(name: str) -> str:
  return LABELS.get(name, name)


def _summary(contender) -> sweep.Summary | None:
  if contender is None or contender["summary"] is None:
    return None
  return sweep.Summary(**contender["summary"])


def _versus(a: str, a_summary, b: str, b_summary, missing: str = "") -> str:
  """"A beats/is level with/is behind B" by `sweep.verdict`, with the gap
  and the spread in points; "no data" when either side was not run."""
  if a_summary is None or b_summary is None:
    absent = b if b_summary is None else a
    return f"no data against {absent}{missing}"
  found = sweep.verdict(a_summary, b_summary)
  words = {"beats": f"beats {b}", "behind": f"is behind {b}",
           "level": f"is level with {b}",
           "no verdict": f"has no verdict against {b} (fewer than 2 seeds)"}
  return (f"{a} {words[found.word]}: {mean_sd(a_summary)} against "
          f"{mean_sd(b_summary)} %, a gap of {100 * found.gap:+.1f} points "
          f"{'beyond' if found.decided else 'within'} the spread "
          f"{100 * found.spread:.1f}")


# --- compare --quick (README.md's quick start).


def _quick() -> dict:
  return json.loads((RESULTS / "compare_quick" / "compare.json").read_text())


@block("compare-quick-table")
def _compare_quick_table() -> str:
  from sngm_optax.harness import compare  # pylint: disable=g-import-not-at-top
  result = _quick()
  seeds = len(result["seeds"])
  return (f"`{result['command']}` at {result['code_version']}, "
          f"{seeds} seed{'s' if seeds > 1 else ''} per pick (seed "
          f"{', '.join(map(str, result['seeds']))}), "
          f"{number(result['wall_time_s'])} s wall on "
          f"{result['machine']['cpu_count']} CPU cores "
          f"(`benchmarks/results/compare_quick/compare.json`):\n\n"
          + compare.format_table(result, times=False))


@block("compare-quick-summary")
def _compare_quick_summary() -> str:
  result = _quick()
  contenders = result["contenders"]
  steps = ", ".join(
      f"{number(c['pick']['final']['steps'])} at batch {c['batch_size']}"
      for c in contenders if c["pick"] and c["batch_size"] in (
          result["preset"]["large_batch"], result["preset"]["small_batch"])
      and c is next(d for d in contenders if d["batch_size"] ==
                    c["batch_size"]))
  extended = [f"{_label(c['optimizer'])} at {c['batch_size']} (to "
              + ", ".join(f"{v:g}" for e in c["search"]["extended"]
                          for v in e.values()) + ")"
              for c in contenders if c["search"]["extended"]]
  on_edge = [f"{_label(c['optimizer'])} at {c['batch_size']}"
             for c in contenders if c["search"]["on_edge"]]
  picks = "; ".join(
      f"{_label(c['optimizer'])} at {c['batch_size']}: learning rate "
      f"{c['pick']['point']['learning_rate']:g}, test "
      f"{percent(c['pick']['final']['test_accuracy'], 2)} %"
      for c in contenders if c["pick"])
  by_key = {(c["optimizer"], c["batch_size"]): _summary(c)
            for c in contenders}
  large, small = result["preset"]["large_batch"], result["preset"]["small_batch"]
  verdicts = "; ".join(
      _versus(f"SNGM at {large}", by_key.get(("sngm", large)),
              f"{_label(name)} at {batch}", by_key.get((name, batch)))
      for name, batch in (("msgd", large), ("lars", large), ("lamb", large),
                          ("msgd", small)) if (name, batch) in by_key)
  seeds = len(result["seeds"])
  lines = [
      f"Steps per run: {steps}. Picks: {picks}.",
      f"{number(result['runs'])} runs in all, {result['collapsed']} of them "
      f"diverged or collapsed (never picked); every contender had the same "
      f"trial budget, {result['trial_budget']} runs.",
      ("Grids extended past an edge pick: " + ", ".join(extended) + "."
       if extended else "No pick fell on an edge of its grid, so no grid "
       "was extended.")
      + (" Still on an edge after the allowed extensions (marked \"(grid "
         "edge)\"): " + ", ".join(on_edge) + "." if on_edge else ""),
      f"The table has {seeds} seed{'s' if seeds > 1 else ''} per pick. "
      + (f"By the verdict rule: {verdicts}." if seeds > 1 else
         "With one seed the verdict rule gives no verdict, so the table "
         "names no winner; `--extra-seeds 2` reruns each pick on two more "
         "seeds."),
  ]
  return "\n".join(lines)


# --- The large-batch benchmark.


def _large() -> dict:
  return load("large_batch")


def _by_key(result) -> dict:
  return {(c["optimizer"], c["batch_size"]): c for c in result["contenders"]}


def _large_batches(result) -> list[int]:
  return sorted(result["batch_sizes"])


@block("large-batch-command")
def _large_batch_command() -> str:
  result = _large()
  lines = ["```",
           "python benchmarks/large_batch.py                      # the "
           "whole benchmark",
           f"# what was run, at {result['code_version']} (the recorded "
           "command):", result["command"]]
  if result.get("converted_from"):
    lines += ["# its results converted to the engine's records, once:",
              "python benchmarks/large_batch.py --convert-legacy"]
  return "\n".join(lines + ["```"])


_SUMMARY_COLUMNS = ("sngm_paper", "sngm_nesterov", "msgd", "lars", "lamb")


@block("large-batch-summary-table")
def _large_batch_summary_table() -> str:
  result = _large()
  by_key = _by_key(result)
  rows = []
  for batch in _large_batches(result):
    at_batch = {name: _summary(by_key.get((name, batch)))
                for name in _SUMMARY_COLUMNS}
    lead = sweep.leader(at_batch)
    steps = next(c["pick"]["final"]["steps"] for (n, b), c in by_key.items()
                 if b == batch and c["pick"])
    rows.append([f"{number(batch)} ({steps})"] + [
        bold(mean_sd(at_batch[name]), name == lead) for name in
        _SUMMARY_COLUMNS])
  budget = result["budget"]
  head = (f"MNIST-1D with {number(budget['num_samples'])} examples, the "
          f"{budget['model'].upper()}, {budget['epochs']:g} epochs, picks on "
          f"validation, {len(result['seeds'])} seeds per pick. Test %, mean "
          "± sd; bold only for a contender that beats every other one of "
          "its row by the verdict rule; – where it was not run:\n\n")
  return head + table(["batch (steps)"] + [_label(n) for n in
                                           _SUMMARY_COLUMNS], rows)


def _reference(result):
  return _by_key(result).get(("msgd", result["small_batch"]))


@block("large-batch-claims")
def _large_batch_claims() -> str:
  result = _large()
  by_key = _by_key(result)
  reference = _reference(result)
  lines = []
  for batch in _large_batches(result):
    sngm = _summary(by_key.get(("sngm_paper", batch)))
    parts = [_versus("SNGM", sngm, name_label, _summary(by_key.get(
        (name, batch))), f" (not run at {number(batch)})")
        for name, name_label in (("msgd", "momentum SGD"), ("lars", "LARS"),
                                 ("lamb", "LAMB"))]
    parts.append(_versus("SNGM", sngm, f"momentum SGD at B = "
                         f"{result['small_batch']}", _summary(reference)))
    lines.append(f"- **B = {number(batch)}.** " + "; ".join(parts) + ".")
  return "\n".join(lines)


@block("large-batch-variants")
def _large_batch_variants() -> str:
  result = _large()
  by_key = _by_key(result)
  batch = result["tune_batch"]
  paper = _summary(by_key.get(("sngm_paper", batch)))
  lines = []
  for name in ("sngm_nesterov", "sngm_decoupled", "sngm_per_layer"):
    contender = by_key.get((name, batch))
    if contender is None:
      continue
    seeds = ", ".join(percent(s["test_accuracy"]) for s in contender["seeds"])
    lines.append(f"- At B = {number(batch)}: " + _versus(
        _label(name), _summary(contender), "the paper's SNGM", paper)
                 + f" (seeds {seeds}).")
  winners = [_label(name) for name in ("sngm_nesterov", "sngm_decoupled",
                                       "sngm_per_layer")
             if (name, batch) in by_key and paper is not None
             and sweep.verdict(_summary(by_key[(name, batch)]),
                               paper).word == "beats"]
  lines.append("- " + (f"{', '.join(winners)} beat{'s' if len(winners) == 1 else ''} "
                       "the paper's recipe by the rule." if winners else
                       "No variant beats the paper's recipe by the rule, so "
                       "the library's `sngm` and the registry's stay the "
                       "paper's."))
  return "\n".join(lines)


@block("large-batch-setting")
def _large_batch_setting() -> str:
  result = _large()
  budget = result["budget"]
  steps = ", ".join(
      f"{number(c['pick']['final']['steps'])} at B = {c['batch_size']}"
      for c in sorted({c["batch_size"]: c for c in result["contenders"]
                       if c["pick"]}.values(), key=lambda c: c["batch_size"]))
  return (f"MNIST-1D, {number(budget['num_samples'])} generated examples "
          f"({100 * budget['val_fraction']:g} % of the training set held out "
          f"for validation), the {budget['model'].upper()}, "
          f"**{budget['epochs']:g} epochs** for every run ({steps}), linear "
          f"warm-up over {budget['warmup_epochs']:g} epochs, then cosine "
          f"decay. Each pick is rerun on seeds "
          f"{', '.join(map(str, result['seeds']))}.")


@block("large-batch-tables")
def _large_batch_tables() -> str:
  from sngm_optax.harness import compare  # pylint: disable=g-import-not-at-top
  result = _large()
  batches = sorted({c["batch_size"] for c in result["contenders"]})
  parts = []
  for batch in batches:
    at_batch = [c for c in result["contenders"] if c["batch_size"] == batch]
    parts.append(f"**B = {number(batch)}**\n\n" + compare.format_table(
        {"contenders": at_batch}, times=False))
  return ("The seed-0 pick's test and validation accuracy, the "
          f"{len(result['seeds'])}-seed mean ± sd (bold only for a row's "
          "leader by the verdict rule), the trials each search ran and how "
          "many of them diverged or collapsed:\n\n" + "\n\n".join(parts))


@block("large-batch-tuning")
def _large_batch_tuning() -> str:
  result = _large()
  lines = []
  for comparison in result["comparisons"]:
    used = comparison["trials_used"]
    lines.append(f"- B = {number(comparison['batch_size'])}: " + ", ".join(
        f"{_label(name)} {count}" for name, count in used.items())
                 + " trials (seed 0)" + (
                     "; not the same for every contender"
                     if len(set(used.values())) > 1 else "") + ".")
  for old in result.get("superseded", []):
    point = old["pick"]["point"]
    lines.append(
        f"- Not in the tables: {old['note']}: {len(old['trials'])} "
        f"trial{'s' if len(old['trials']) != 1 else ''}, pick learning rate "
        f"{point['learning_rate']:g} at weight decay "
        f"{point['weight_decay']:g}, {mean_sd(_summary(old))} % over "
        f"{old['summary']['n']} seeds.")
  edges = [c for c in result["contenders"] if c["search"]["on_edge"]]
  for contender in edges:
    axis = contender["search"]["on_edge"][0]
    scores = [t["score"] for t in contender["trials"] if t["score"]
              is not None and t["point"]["learning_rate"] ==
              contender["pick"]["point"]["learning_rate"]]
    lines.append(
        f"- Still on an edge: {_label(contender['optimizer'])}'s {axis.replace('_', ' ')} at "
        f"B = {number(contender['batch_size'])} (pick "
        f"{contender['pick']['point'][axis]:g}, after the extensions "
        + ", ".join(f"{v:g}" for e in contender["search"]["extended"]
                    for k, v in e.items() if k == axis)
        + f"); its trials at that learning rate score "
        f"{percent(min(scores), 2)}-{percent(max(scores), 2)} % on "
        "validation.")
  collapsed = result["collapsed"]
  lines.append(f"- {number(result['runs'])} runs, {collapsed} of them "
               "diverged or collapsed (ended within 5 points of chance); the "
               "tables count them per contender.")
  if not result["budgets_equal"]:
    lines.append("- The trial budgets were **not** equal in this run: it "
                 "predates the engine, declared no trial budget and gave "
                 "the contenders the counts above. The engine's "
                 "`large_batch.py` gives every contender of a batch size "
                 "the same declared budget and refuses to run otherwise.")
  return "\n".join(lines)


@block("large-batch-plateau")
def _large_batch_plateau() -> str:
  result = _large()
  by_key = _by_key(result)
  epochs = result["plateau"]["budget"]["epochs"]
  lines = []
  for doubled in result["plateau"]["contenders"]:
    short = by_key[(doubled["optimizer"], doubled["batch_size"])]
    found = sweep.verdict(_summary(doubled), _summary(short))
    lines.append(
        f"- {_label(doubled['optimizer'])} at B = {doubled['batch_size']}: "
        f"{mean_sd(_summary(short), 2)} % on {result['budget']['epochs']:g} "
        f"epochs, {mean_sd(_summary(doubled), 2)} % on {epochs:g}: "
        + ("the longer run beats it, so it is not at its plateau"
           if found.word == "beats" else
           f"{found.word} by the rule (gap {100 * found.gap:+.2f}, spread "
           f"{100 * found.spread:.2f}), so it is at its plateau"
           if found.word == "level" else found.word) + ".")
  if result["skipped"]:
    lines.append("- Not run (the deadline passed): "
                 + ", ".join(result["skipped"]) + ".")
  return "\n".join(lines)


@block("large-batch-pick-path")
def _large_batch_pick_path() -> str:
  result = _large()
  by_key = _by_key(result)
  picks = [(b, by_key.get(("sngm_paper", b))) for b in _large_batches(result)]
  path = " → ".join(f"{c['pick']['point']['learning_rate']:g}"
                    for _, c in picks if c and c["pick"])
  collapsed = [f"{t['point']['learning_rate']:g} at {number(b)}"
               for b, c in picks if c for t in c["trials"]
               if t["status"] != sweep.OK]
  return (f"The paper SNGM's pick goes {path} from B = "
          f"{number(picks[0][0])} to {number(picks[-1][0])}; its learning "
          f"rates that collapsed: {', '.join(collapsed) or 'none'}.")



# ----------------------------------------------------------------------------
# Adaptive batch size (adaptive_batch.py).


def _ab():
  """The adaptive-batch record and its contenders by (family, name)."""
  record = load("adaptive_batch")
  return record, {(c["family"], c["name"]): c for c in record["contenders"]}


def _ab_summary(entry, name=None) -> sweep.Summary | None:
  """The entry's test accuracy summary, or the statistic `name`'s."""
  if entry is None:
    return None
  value = entry["summary"] if name is None else entry["statistics"][name]
  return None if value is None else sweep.Summary(**value)


def _ab_budgeted(record, entries, family):
  """The family's contenders on the full sample budget (no rerun)."""
  return [e for (f, _), e in entries.items()
          if f == family and e["kind"] in ("fixed", "adaptive", "ramp")]


def _ab_points(a, b) -> str:
  return f"{100 * (a.mean - b.mean):+.2f}"


def _ab_seeds(entry, record) -> str:
  summary = entry["summary"]
  return f"{0 if summary is None else summary['n']}/{record['budget']['seeds']}"


def _ab_lr(entry) -> str:
  if entry["pick"] is None:
    return "–"
  text = f"{entry['pick']['point']['learning_rate']:g}"
  if entry["search"] and entry["search"]["on_edge"]:
    text += " (edge)"
  return text


def _ab_grids(record, entries) -> str:
  """Each family's declared grid, as the runs used it."""
  parts = []
  for family in record["grids"]:
    grids = {tuple(e["search"]["axes"]["learning_rate"])
             for (f, _), e in entries.items() if f == family and e["search"]}
    parts.append(f"{family} " + "; ".join(
        "/".join(f"{v:g}" for v in grid) for grid in sorted(grids)))
  return ", ".join(parts)


@block("adaptive-batch-command")
def _adaptive_batch_command() -> str:
  record, _ = _ab()
  words, lines, line = record["command"].split()[2:], [], "# ="
  for word in words:
    if len(line) + len(word) > 100:
      lines.append(line)
      line = "#  "
    line += " " + word
  lines.append(line)
  versions = ", ".join(f"{family} at {commit}" for family, commit
                       in record["code_versions"].items())
  return "\n".join([
      "```",
      "# The whole benchmark; every run is appended to "
      "results/adaptive_batch_runs.jsonl as it ends,",
      "# and the same command again resumes from it:",
      "PYTHONPATH=. python benchmarks/adaptive_batch.py", *lines,
      f"# (runs: {versions}; converted to the engine's record from "
      f"{record['converted_from']})" if record.get("converted_from")
      else f"# (run at {record['code_version']})",
      "# The tables and sentences below, from the JSON:",
      "python benchmarks/report.py",
      "```"])


@block("adaptive-batch-setting")
def _adaptive_batch_setting() -> str:
  record, entries = _ab()
  budget = record["budget"]
  train_all = budget["num_samples"] - record["num_test"]
  held_out = train_all - budget["num_train"]
  b0, devices = budget["initial_batch_size"], budget["num_devices"]
  options = budget["options"]
  epochs = budget["sample_budget_epochs"]
  tuned = [e for e in entries.values() if e["search"]]
  used = [e["search"]["trials_used"] for e in tuned]
  trials = sum(used)
  collapsed = sum(e["collapsed"] for e in tuned)
  seeds = budget["seeds"]
  return "\n".join([
      f"**Setting.** MNIST-1D with {number(budget['num_samples'])} examples: "
      f"{number(train_all)} train, of which {number(held_out)} "
      f"({percent(budget['val_fraction'], 0)} %) are held out for validation, "
      f"so {number(budget['num_train'])} are trained on; "
      f"{number(record['num_test'])} test.",
      f"- The {budget['model'].upper()}, on {devices} simulated CPU devices "
      f"with per-device statistics ({b0 // devices} samples per device at "
      f"B = {b0}).",
      f"- B₀ = {b0}, cap {number(budget['max_batch_size'])}.",
      f"- Every run gets the same budget of **{epochs:g} epochs = "
      f"{number(epochs * budget['num_train'])} samples**: a warmup-cosine "
      "learning rate scheduled in samples (warmup "
      f"{budget['warmup_epochs_at_budget']:g} epoch), one peak learning rate "
      "for the whole run, no weight decay, and one evaluation per epoch.",
      f"- \"+options\" = `max_growth_factor={options['max_growth_factor']:g}, "
      f"smoothing={options['smoothing']:g}, "
      f"test_interval={options['test_interval']}`; \"paper rule\" = the "
      "defaults.",
      "",
      "**Tuning.** Each contender's peak learning rate is picked on seed 0 by "
      "the final **validation** accuracy, from its family's grid (as the runs "
      f"used it: {_ab_grids(record, entries)}).",
      "- A pick at an end of the grid adds one value past it (`sweep.Grid`), "
      f"at most {record['max_extensions']} times per direction, under one "
      f"trial budget of {record['trial_budget']} runs for every contender; "
      f"the {len(tuned)} searches used {min(used)} to {max(used)} trials "
      f"({trials} in all).",
      f"- {collapsed} of the {trials} trials diverged or collapsed (final "
      "validation accuracy within 5 points of chance); they are never picked.",
      f"- The pick is rerun on seeds 1 to {seeds - 1}. The tables report the "
      f"final **test** accuracy, mean ± sd over the pick's ok seeds (of "
      f"{seeds}).",
      f"- **Plateau check:** fixed {b0} at its pick, trained on twice the "
      f"samples ({2 * epochs:g} epochs, {seeds} seeds)."])


@block("adaptive-batch-table")
def _adaptive_batch_table() -> str:
  record, entries = _ab()
  rows, families = [], list(record["families"])
  for family in families:
    budgeted = _ab_budgeted(record, entries, family)
    best = sweep.leader({e["name"]: _ab_summary(e) for e in budgeted})
    for (f, name), e in entries.items():
      if f != family:
        continue
      stats, search = e["statistics"], e["search"]
      trials = (f"{search['trials_used']}/{search['trial_budget']}, "
                f"{e['collapsed']}" if search else f"pick of {e['base']}")
      reached = (f"{stats['reached_target']}/{stats['seeds_ok']}"
                 if stats["seeds_ok"] else "–")
      steps = _ab_summary(e, "steps")
      max_b = _ab_summary(e, "final_batch_size")
      to_target = _ab_summary(e, "steps_to_target")
      run_s = _ab_summary(e, "run_time_s")
      rows.append([
          family, bold(name, name == best), _ab_lr(e), trials,
          "–" if steps is None else number(steps.mean),
          "–" if max_b is None else number(max_b.mean),
          percent(stats["val_accuracy"] and stats["val_accuracy"]["mean"], 2),
          bold(f"{mean_sd(e['summary'], 2)} ({_ab_seeds(e, record)})",
               name == best), reached,
          "–" if to_target is None else number(to_target.mean),
          "–" if run_s is None else f"{run_s.mean:.0f} ({run_s.n})"])
  return "\n".join([
      "Results: the final test accuracy at the rate picked on validation, "
      "mean ± sd over the pick's ok seeds (ok seeds / seeds). \"trials\" is "
      "the search's runs / its trial budget, and how many of them diverged or "
      "collapsed; a rerun (the plateau check, \"for N steps\") takes the pick "
      "of its contender. \"max B\" is the largest batch (mean over seeds); "
      "\"reached\" counts the seeds whose test accuracy reached the family's "
      "fixed-32 mean at an evaluation; \"run s\" is the mean run time of the "
      "seeds that did not compile their program (their count in brackets). "
      "Bold: the contender that beats every other of its family on the full "
      "budget by the spread rule (none where no one does).",
      "",
      table(["family", "contender", "lr", "trials", "steps", "max B",
             "val acc %", "test acc % (mean ± sd, seeds)", "reached fixed-32 "
             "acc", "steps to it", "run s"], rows)])


@block("adaptive-batch-search")
def _adaptive_batch_search() -> str:
  record, entries = _ab()
  rows = []
  for (family, name), e in entries.items():
    if not e["search"]:
      continue
    cells = []
    for trial in sorted(e["trials"], key=lambda t: t["point"]["learning_rate"]):
      value = f"{trial['point']['learning_rate']:g}: "
      if trial["status"] == sweep.OK:
        value += percent(trial["score"])
      else:
        value += trial["status"]
      cells.append(value)
    search = e["search"]
    rows.append([
        family, name, ", ".join(cells), _ab_lr(e).replace(" (edge)", ""),
        ", ".join(f"{x['learning_rate']:g}" for x in search["extended"])
        or "–", "yes" if search["on_edge"] else "no",
        f"{search['trials_used']}/{search['trial_budget']}", e["collapsed"]])
  return "\n".join([
      "The learning-rate search, seed 0, validation accuracy % (a trial that "
      "diverged or collapsed is named so):", "",
      table(["family", "contender", "lr: seed-0 val acc %", "pick",
             "added past an edge", "pick still on an edge",
             "trials / budget", "collapsed"], rows)])


def _ab_goal(record, entries):
  """Per norm-test contender of the first family: the parts of the goal."""
  family = record["first_family"]
  small = entries[(family, "fixed 32")]
  small_s, small_steps = _ab_summary(small), _ab_summary(small, "steps")
  headline = record["families"][family]["headline"]
  equal = [e for (f, _), e in entries.items()
           if f == family and e["kind"] == "equal_steps"]
  out = []
  for (f, name), e in entries.items():
    if f != family or not name.startswith("norm"):
      continue
    s, steps = _ab_summary(e), _ab_summary(e, "steps")
    if s is None or small_s is None:
      continue
    row = {"name": name, "headline": name == headline, "summary": s,
           "gap": 100 * (small_s.mean - s.mean),
           "verdict": sweep.verdict(s, small_s),
           "steps_fraction": steps.mean / small_steps.mean, "equal": []}
    if name == headline:
      row["equal"] = [(x, sweep.verdict(s, _ab_summary(x)) if
                       _ab_summary(x) else None) for x in equal]
    out.append(row)
  return out


@block("adaptive-batch-goal")
def _adaptive_batch_goal() -> str:
  record, entries = _ab()
  family = record["first_family"]
  rows = []
  for g in _ab_goal(record, entries):
    equal = "–"
    if g["equal"]:
      equal = "; ".join(f"{_ab_verb(v)} {x['name']}"
                        for x, v in g["equal"])
    rows.append([
        g["name"] + (" (headline)" if g["headline"] else ""),
        f"{g['gap']:.2f}", g["verdict"].word,
        f"{100 * g['summary'].sd:.2f} / "
        f"{100 * _ab_summary(entries[(family, 'fixed 32')]).sd:.2f}",
        f"{g['steps_fraction']:.3f}", "yes" if g["gap"] <= 0.3 else "no",
        "yes" if g["steps_fraction"] <= 0.2 else "no", equal])
  return "\n".join([
      f"The goal of issue 13, per {family} norm-test contender: within 0.3 "
      "points of fixed 32 (on the means), in at most 20 % of its steps, and, "
      "for the headline, beating every fixed batch trained for as many steps "
      "(by the spread rule). Each run uses one peak learning rate and the "
      "same warmup-cosine in samples as fixed 32.", "",
      table(["contender", "points below fixed 32", "vs fixed 32",
             "seed sd (points): it / fixed 32", "steps / fixed-32 steps",
             "≤ 0.3 points", "≤ 20 % steps", "at equal steps"], rows), "",
      "```", _common.machine_line(record["machine"]) + " (at the start)",
      "```"])


def _ab_acc(entry, digits=2) -> str:
  summary = entry["summary"]
  if summary and summary["n"] == 1:
    return f"{percent(summary['mean'], digits)} % (one seed)"
  return f"{mean_sd(summary, digits)} %"


def _ab_verb(v) -> str:
  """The verdict as a verb before its object: "beats", "is level with"."""
  if v is None:
    return "has no verdict against"
  return {"beats": "beats", "level": "is level with", "behind": "is behind",
          "no verdict": "has no verdict against"}[v.word]


def _ab_steps(entry) -> str:
  steps = _ab_summary(entry, "steps")
  return "–" if steps is None else number(steps.mean)


def _ab_growing(entries, family):
  return [e for (f, _), e in entries.items()
          if f == family and e["kind"] in ("adaptive", "ramp")]


def _ab_vs(entry, others) -> str:
  """`entry` against `others` by the spread rule, grouped by verdict."""
  groups = {}
  for other in others:
    if other is entry or _ab_summary(other) is None:
      continue
    word = sweep.verdict(_ab_summary(entry), _ab_summary(other)).word
    groups.setdefault(word, []).append(
        f"{other['name']} ({_ab_acc(other)}, {_ab_steps(other)} steps)")
  names = {"beats": "it beats", "level": "level with it",
           "behind": "ahead of it", "no verdict": "no verdict"}
  return "; ".join(f"{names[word]}: {', '.join(items)}"
                   for word, items in groups.items())


def _ab_untuned(record, entries) -> list[str]:
  """Contenders whose search or seeds mostly collapsed."""
  seeds, lines = record["budget"]["seeds"], []
  for (family, name), e in entries.items():
    n = 0 if e["summary"] is None else e["summary"]["n"]
    tried = e["search"]["trials_used"] if e["search"] else len(e["seeds"])
    # One ok trial is no search; a pick with collapsed seeds is no result.
    if (e["search"] and tried - e["collapsed"] <= 1) or n < seeds:
      what = (f"{e['collapsed']} of its {tried} trials diverged or collapsed"
              if e["search"] else f"it reruns the pick of {e['base']}")
      lines.append(
          f"   - {family} {name}: {what}, and {n} of the {seeds} seeds at "
          f"its pick are ok ({_ab_acc(e) if n else 'no ok seed'}). "
          + ("Not a tuned result." if e["search"] else "Not a result."))
  return lines


@block("adaptive-batch-findings")
def _adaptive_batch_findings() -> str:
  record, entries = _ab()
  family = record["first_family"]
  info = record["families"][family]
  small = entries[(family, "fixed 32")]
  small_s = _ab_summary(small)
  small_steps = _ab_summary(small, "steps").mean
  double = entries.get((family, "fixed 32 for 2x the samples"))
  lines = ["**What it says** (every number and verdict below is generated "
           "from `results/adaptive_batch.json`).", ""]

  # 1. The plateau check.
  if double and _ab_summary(double):
    v = sweep.verdict(_ab_summary(double), small_s)
    at = {"beats": "is not", "level": "is", "behind": "is"}.get(v.word)
    lines.append(
        f"1. **The baseline {at or 'cannot be checked'} at its plateau.** "
        f"{family} at a fixed B = 32 reaches {_ab_acc(small)} in "
        f"{number(small_steps)} steps. On twice the samples it reaches "
        f"{_ab_acc(double)}: {v.gap * 100:+.2f} points against a sum of seed "
        f"sds of {100 * v.spread:.2f}: the longer run {_ab_verb(v)} the "
        "baseline.")
  else:
    lines.append("1. **Plateau:** no plateau check in the JSON.")

  # 2. and 3. The norm test: the paper's rule and the options.
  paper = [e for (f, n), e in entries.items()
           if f == family and n.startswith("norm") and "paper" in n]
  parts = []
  for e in paper:
    cap = _ab_summary(e, "steps_to_cap")
    stats = e["statistics"]
    reach = ("its batch never reaches the cap" if cap is None else
             f"its batch is at the cap from step {cap.mean:.0f} (mean over "
             f"the {stats['reached_cap']} of {stats['seeds_ok']} seeds that "
             "reach it)")
    parts.append(f"   - {e['name']}: {reach}; {_ab_acc(e, 1)} in "
                 f"{_ab_steps(e)} steps.")
  lines += ["2. **The paper's rule at B₀ = 32** (the norm test, no options):",
            *parts]
  parts = []
  for e in paper:
    options = entries.get((family, e["name"].replace("(paper rule)",
                                                     "+options")))
    if options is None or not _ab_summary(options) or not _ab_summary(e):
      continue
    v = sweep.verdict(_ab_summary(options), _ab_summary(e))
    parts.append(f"   - {options['name']}: {_ab_acc(options)} in "
                 f"{_ab_steps(options)} steps, {100 * v.gap:+.1f} points: it "
                 f"{_ab_verb(v)} the paper rule (sum of sds "
                 f"{100 * v.spread:.1f}).")
  lines += ["3. **The controller options against the paper's rule**, per η:",
            *parts]

  # 4. The goal.
  goal = [g for g in _ab_goal(record, entries) if g["headline"]]
  if goal:
    g = goal[0]
    met = (g["gap"] <= 0.3 and g["steps_fraction"] <= 0.2 and g["equal"]
           and all(v and v.word == "beats" for _, v in g["equal"]))
    headline = entries[(family, info["headline"])]
    samples = _ab_summary(headline, "samples_seen").mean
    equal = []
    for x, v in g["equal"]:
      seen = _ab_summary(x, "samples_seen")
      equal.append(
          f"{_ab_verb(v)} {x['name']} "
          f"({_ab_acc(x)}, {seen.mean / samples:.2g}× the headline's "
          "samples)" if seen else f"{x['name']}: no ok run")
    within = sum(x["gap"] <= 0.3 for x in _ab_goal(record, entries))
    lines.append(
        f"4. **The goal is {'met' if met else 'not met'}.** The headline "
        f"({family}, {info['headline']}) ends {g['gap']:.2f} points below "
        f"fixed 32 (it {_ab_verb(g['verdict'])} it by the rule: sum of sds "
        f"{100 * g['verdict'].spread:.2f}), in {100 * g['steps_fraction']:.0f}"
        f" % of fixed 32's steps ({_ab_steps(headline)} against "
        f"{number(small_steps)}). At equal steps it {'; '.join(equal)}. "
        f"{within} of the {len(_ab_goal(record, entries))} norm-test settings "
        "come within 0.3 points of fixed 32.")

  # 5. The inner-product test.
  inner = entries.get((family, info["inner_product"] or ""))
  if inner and _ab_summary(inner):
    v = sweep.verdict(_ab_summary(inner), small_s)
    steps = _ab_summary(inner, "steps").mean
    others = [e for e in _ab_budgeted(record, entries, family)
              if e is not small and not e["name"].startswith("norm")]
    lines.append(
        f"5. **The best inner-product test** ({inner['name']}, by validation) "
        f"reaches {_ab_acc(inner)} in {_ab_steps(inner)} steps "
        f"({100 * steps / small_steps:.0f} % of fixed 32's), "
        f"{-100 * v.gap:.2f} points below fixed 32: it {_ab_verb(v)} it by "
        "the rule "
        f"(sum of sds {100 * v.spread:.2f}). Against the other contenders on "
        f"the full budget, {_ab_vs(inner, others)}.")

  # 6. The other families.
  parts = []
  for other in list(record["families"])[1:]:
    o = record["families"][other]
    o_small = entries.get((other, "fixed 32"))
    if o_small is None or not _ab_summary(o_small):
      continue
    cells = [_ab_acc(entries[(other, n)], 1) if (other, n) in entries
             and _ab_summary(entries[(other, n)]) else "–"
             for n in (o["headline"], o["inner_product"])]
    growing = [e for e in _ab_growing(entries, other) if _ab_summary(e)]
    closest = max(growing, key=lambda e: e["summary"]["mean"])
    v = sweep.verdict(_ab_summary(closest), _ab_summary(o_small))
    parts.append(
        f"   - {other}: {cells[0]} / {cells[1]} / {_ab_acc(o_small)}; its "
        f"closest growing batch is {closest['name']}, "
        f"{-100 * v.gap:.2f} points below fixed 32 (it {_ab_verb(v)} it).")
  untuned = _ab_untuned(record, entries)
  lines += [f"6. **The other families** (the headline's setting / "
            f"{family}'s inner-product setting / fixed 32):", *parts]
  if untuned:
    lines += ["   Rows that are not results:", *untuned]

  # 7. Run time.
  budgeted = [e for e in _ab_budgeted(record, entries, family)
              if _ab_summary(e, "run_time_s")]
  fastest = min(budgeted, key=lambda e: e["statistics"]["run_time_s"]["mean"])
  faster, growing_all = 0, 0
  for fam in record["families"]:
    base = _ab_summary(entries.get((fam, "fixed 32")), "run_time_s")
    for e in _ab_growing(entries, fam):
      t = _ab_summary(e, "run_time_s")
      if base and t:
        growing_all += 1
        faster += t.mean < base.mean
  machine = record["machine"]
  load_end = record.get("load_average_end")
  lines.append(
      f"7. **Run time.** The fastest {family} run on the full budget is "
      f"{fastest['name']} "
      f"({fastest['statistics']['run_time_s']['mean']:.0f} s); fixed 32 takes "
      f"{_ab_summary(small, 'run_time_s').mean:.0f} s and the headline "
      f"{_ab_summary(entries[(family, info['headline'])], 'run_time_s').mean:.0f}"
      f" s. {faster} of the {growing_all} growing batches of all families ran "
      "faster than their family's fixed 32. The runs shared "
      f"{machine['cpu_count']} CPU cores with other jobs (load average "
      f"{machine['load_average'][0]:.1f} at the start"
      + (f", {load_end[0]:.1f} at the end" if load_end else "") + "), so the "
      "times are rough.")
  if goal and inner and _ab_summary(inner):
    headline = entries[(family, info["headline"])]
    lines += ["", "So, at this scale:",
              f"- the norm test trades {goal[0]['gap']:.1f} points for a "
              f"{small_steps / _ab_summary(headline, 'steps').mean:.0f}× cut "
              f"in steps, and the inner-product test "
              f"{100 * (small_s.mean - _ab_summary(inner).mean):.1f} points "
              f"for {small_steps / _ab_summary(inner, 'steps').mean:.0f}×."]
  return "\n".join(lines)


@block("adaptive-batch-readme")
def _adaptive_batch_readme() -> str:
  record, entries = _ab()
  family = record["first_family"]
  budget, info = record["budget"], record["families"][family]
  small = entries[(family, "fixed 32")]
  small_s, small_steps = _ab_summary(small), _ab_summary(small, "steps").mean
  double = entries.get((family, "fixed 32 for 2x the samples"))
  headline = entries[(family, info["headline"])]
  inner = entries[(family, info["inner_product"])]
  lines = [
      "The setting:",
      f"- MNIST-1D with {number(budget['num_samples'])} examples: "
      f"{number(budget['num_train'])} trained on, a validation split for "
      f"every pick, {number(record['num_test'])} test.",
      f"- The {budget['model'].upper()}, B₀ = {budget['initial_batch_size']},"
      f" cap {number(budget['max_batch_size'])}.",
      f"- The same budget of {budget['sample_budget_epochs']:g} epochs "
      f"({number(budget['sample_budget_epochs'] * budget['num_train'])} "
      "samples) for every run, with the learning rate scheduled in samples.",
      "- Learning rates picked on validation, with the grid extended past "
      f"edge picks, {record['trial_budget']} trials at most per contender; "
      f"{budget['seeds']} seeds.", ""]
  if double and _ab_summary(double):
    v = sweep.verdict(_ab_summary(double), small_s)
    lines += [
        f"{family} at a fixed B = 32 reaches {_ab_acc(small)} in "
        f"{number(small_steps)} steps. Twice the samples add "
        f"{100 * v.gap:+.2f} points: the longer run {_ab_verb(v)} it by the "
        "spread rule"
        + (", so that is its plateau." if v.word == "level" else "."), ""]
  paper = [e for (f, n), e in entries.items()
           if f == family and n.startswith("norm") and "paper" in n]
  fastest_cap = min((e for e in paper if _ab_summary(e, "steps_to_cap")),
                    key=lambda e: e["statistics"]["steps_to_cap"]["mean"],
                    default=None)
  gains = []
  for e in paper:
    options = entries.get((family, e["name"].replace("(paper rule)",
                                                     "+options")))
    if options and _ab_summary(options) and _ab_summary(e):
      gains.append(100 * (options["summary"]["mean"] - e["summary"]["mean"]))
  goal = [g for g in _ab_goal(record, entries) if g["headline"]][0]
  biggest = max((x for x, v in goal["equal"] if v),
                key=lambda x: x["changes"]["batch_size"], default=None)
  met = (goal["gap"] <= 0.3 and goal["steps_fraction"] <= 0.2
         and goal["equal"] and all(v and v.word == "beats"
                                   for _, v in goal["equal"]))
  lines.append("**The norm test.**")
  if fastest_cap:
    lines.append(
        "- With the paper's rule its batch is at the cap from step "
        f"{fastest_cap['statistics']['steps_to_cap']['mean']:.0f} at the "
        f"fastest ({fastest_cap['name']}: {_ab_acc(fastest_cap, 1)}).")
  if gains:
    lines.append(f"- The controller options change it by {min(gains):+.0f} to "
                 f"{max(gains):+.0f} points across η.")
  lines.append(
      f"- The best by validation, {info['headline']}, reaches "
      f"{_ab_acc(headline)} in {_ab_steps(headline)} steps "
      f"({100 * goal['steps_fraction']:.0f} % of the steps): "
      f"{goal['gap']:.1f} points short of fixed 32; it "
      f"{_ab_verb(goal['verdict'])} it by the spread rule.")
  if biggest:
    v = sweep.verdict(goal["summary"], _ab_summary(biggest))
    lines.append(f"- At equal steps it {_ab_verb(v)} {biggest['name']} "
                 f"({_ab_acc(biggest)}).")
  lines += [
      "", "So the goal of issue 13 (within 0.3 points in ≤ 20 % of the steps,"
      " and better than every fixed batch at equal steps) is "
      f"**{'met' if met else 'not met'}**.", ""]
  v = sweep.verdict(_ab_summary(inner), small_s)
  steps = _ab_summary(inner, "steps").mean
  others = [e for e in _ab_budgeted(record, entries, family)
            if e is not small and not e["name"].startswith("norm")
            and e is not inner]
  lines += [
      f"**The closest growing batch of {family} is the inner-product test** "
      f"({inner['name']}): {_ab_acc(inner)} in {number(steps)} steps "
      f"({100 * steps / small_steps:.0f} %), {-100 * v.gap:.2f} points short "
      f"of fixed 32 (it {_ab_verb(v)} it). Against the rest, "
      f"{_ab_vs(inner, others)}."
      if max(_ab_growing(entries, family),
             key=lambda e: e["summary"]["mean"] if e["summary"] else -1)
      is inner else
      f"**The inner-product test** ({inner['name']}): {_ab_acc(inner)} in "
      f"{number(steps)} steps, {-100 * v.gap:.2f} points short of fixed 32 "
      f"(it {_ab_verb(v)} it).", ""]
  norm_loss, inner_loss = [], []
  for other in list(record["families"])[1:]:
    o = record["families"][other]
    base = entries.get((other, "fixed 32"))
    for name, losses in ((o["headline"], norm_loss),
                         (o["inner_product"], inner_loss)):
      e = entries.get((other, name))
      if base and e and e["summary"] and base["summary"]:
        losses.append(100 * (base["summary"]["mean"] - e["summary"]["mean"]))
  if norm_loss and inner_loss:
    lines += [
        "The other families, with the same settings "
        f"({', '.join(list(record['families'])[1:])}), against their own "
        "fixed 32:",
        f"- with the norm test they lose {min(norm_loss):.0f} to "
        f"{max(norm_loss):.0f} points;",
        f"- with the inner-product test they lose {min(inner_loss):.0f} to "
        f"{max(inner_loss):.0f} points.", ""]
  faster = 0
  for fam in record["families"]:
    base = _ab_summary(entries.get((fam, "fixed 32")), "run_time_s")
    faster += sum(1 for e in _ab_growing(entries, fam)
                  if base and _ab_summary(e, "run_time_s")
                  and _ab_summary(e, "run_time_s").mean < base.mean)
  lines.append(
      f"On {record['machine']['cpu_count']} shared CPU cores "
      + ("no growing batch ran faster than fixed 32." if faster == 0 else
         f"{faster} growing batches ran faster than their fixed 32."))
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# TR at tiny batches (small_batch.py) and sparse communication
# (sparse_communication.py).



def verdict_of(a: dict | None, b: dict | None,
               higher_is_better: bool = True) -> sweep.Verdict | None:
  """`sweep.verdict` of two JSON summaries, None when either is missing."""
  if a is None or b is None:
    return None
  return sweep.verdict(sweep.Summary(**a), sweep.Summary(**b),
                       higher_is_better)


def points(value: float, digits: int = 1) -> str:
  """A difference of fractions in signed percentage points."""
  return f"{100 * value:+.{digits}f}".replace("-", "−")


def verdict_phrase(found: sweep.Verdict | None, digits: int = 1) -> str:
  """"beats (+0.7 points, spread 0.5)" and the like."""
  if found is None:
    return "no data"
  return (f"{found.word} ({points(found.gap, digits)} points, spread "
          f"{100 * found.spread:.{digits}f})")


def by_word(verdicts: dict, what: str = "B = ", sep: str = "; ") -> str:
  """"beats at B = 4; level at B = 2, 8" from {B: Verdict}."""
  groups = {}
  for key, found in verdicts.items():
    groups.setdefault("no data" if found is None else found.word,
                      []).append(str(key))
  order = ("beats", "level", "behind", "no verdict", "no data")
  return sep.join(f"{word} at {what}{', '.join(groups[word])}"
                   for word in order if word in groups)


def _plural(count: int, noun: str) -> str:
  return f"{count} {noun}" + ("" if count == 1 else "s")


# --- TR at tiny batches.


def small_batch_cell(result: dict, on: bool = False) -> str:
  """One method at one B: test accuracy mean ± sd, its pick and trials."""
  trials = len(result["trials"])
  tried = (f"{_plural(trials, 'trial')}, {result['collapsed']} collapsed"
           if not result.get("untuned") else "untuned")
  if result["summary"] is None:
    return f"all failed ({tried})"
  edge = "*" if result["search"]["on_edge"] else ""
  lr = result["pick"]["point"]["learning_rate"]
  return (bold(mean_sd(result["summary"]), on)
          + f" (lr {lr:g}{edge}; {tried})")


def _small_batch_find(record: dict, name: str, batch_size: int,
                      controls: bool = False) -> dict | None:
  rows = record["controls"] if controls else record["contenders"]
  return next((r for r in rows if r["name"] == name
               and r["batch_size"] == batch_size), None)


def small_batch_table(record: dict) -> str:
  """Methods × batch sizes; bold: the column's `sweep.leader`."""
  sizes = record["batch_sizes"]
  leaders = {b: sweep.leader({
      r["name"]: r["summary"] and sweep.Summary(**r["summary"])
      for r in record["contenders"] if r["batch_size"] == b}) for b in sizes}
  rows = []
  for name in record["methods"]:
    cells = [name]
    for b in sizes:
      found = _small_batch_find(record, name, b)
      cells.append("–" if found is None else small_batch_cell(
          found, leaders[b] == name))
    rows.append(cells)
  for name in dict.fromkeys(r["name"] for r in record["controls"]):
    cells = [name]
    for b in sizes:
      found = _small_batch_find(record, name, b, controls=True)
      cells.append("–" if found is None else small_batch_cell(found))
    rows.append(cells)
  return table(["method", *(f"B = {b}" for b in sizes)], rows,
               align="l" + "r" * len(sizes))


def _small_batch_record() -> dict:
  return load("small_batch")


@block("small-batch-setup")
def _small_batch_setup() -> str:
  record = _small_batch_record()
  data, seeds = record["data"], record["seeds"]
  contenders = record["contenders"]
  on_edge = sum(bool(r["search"]["on_edge"]) for r in contenders)
  extended = sum(bool(r["search"]["extended"]) for r in contenders)
  trials = sum(len(r["trials"]) for r in contenders)
  used = sorted({len(r["trials"]) for r in contenders})
  controls = sorted({r["batch_size"] for r in record["controls"]})
  text = [
      f"The harness CNN on MNIST-1D ({number(data['num_train'])} train + "
      f"{number(data['num_val'])} validation / {number(data['num_test'])} "
      f"test), the same sample budget at every B ({data['epochs']:g} "
      f"epochs, so B = {min(record['batch_sizes'])} takes "
      f"{max(record['batch_sizes']) // min(record['batch_sizes'])}× the "
      f"steps of B = {max(record['batch_sizes'])}). Each of the "
      f"{len(contenders)} method × B contenders searches its peak LR on "
      f"validation (seed {seeds[0]}) over {record['grid_size']} values ×3 "
      f"apart, extended by one value past an edge pick "
      f"(at most {record['max_extensions_per_side']} per side), with the "
      f"same trial budget of {record['trial_budget']} runs: they used "
      f"{'–'.join(map(str, used))} ({extended} extended; {on_edge} final "
      f"picks on an edge of what was tried). {trials} search runs, "
      f"{record['collapsed']} of them diverged or collapsed (final "
      f"validation accuracy within 5 points of chance; never picked). The "
      f"pick is retrained on {len(seeds) - 1} more seeds: test accuracy (%) "
      f"mean ± sd over {len(seeds)} seeds. The control rows (B = "
      f"{', '.join(map(str, controls)) or '–'}, untuned, {len(seeds)} "
      f"seeds) are Adam at its grid value nearest TR-Adam's average step "
      f"({record['tr_average_step_factor']:.3f}× its LR) and TR-Adam with "
      f"strength 0 at TR-Adam's LR."]
  parts = record.get("parts") or []
  if parts:
    minutes = " and ".join(f"{p['wall_time_s'] / 60:.0f}" for p in parts)
    loads = [x for p in parts for x in p["load_average_start"]
             + p["load_average_end"]]
    text.append(
        f"The {len(parts)} parts ran {minutes} minutes (load average "
        f"{min(loads):.0f}–{max(loads):.0f} at their start and end), then "
        f"were merged; results at {record['code_version']}, in "
        f"`results/small_batch.json` and the run stores "
        f"`results/{record['runs']}`, `results/{record['long_runs']}`.")
  return "\n".join(text)


@block("small-batch-table")
def _small_batch_table() -> str:
  return (small_batch_table(_small_batch_record()) + "\n\n"
          "Each cell: test accuracy (%), mean ± sd over the seeds, the picked "
          "LR (* on an edge of what was tried), the runs its search trained "
          "and how many of them diverged or collapsed. Bold: the method that "
          "beats every other at that B by the spread rule (none in a column "
          "where no method does).")


def _small_batch_verdicts(record, a, b, a_control=False,
                          b_control=False) -> dict:
  """{B: `verdict` of method `a` against `b`} where `a` ran."""
  out = {}
  for size in record["batch_sizes"]:
    first = _small_batch_find(record, a, size, a_control)
    second = _small_batch_find(record, b, size, b_control)
    if first is not None:
      out[size] = verdict_of(first["summary"], second and second["summary"])
  return out


def _small_batch_comparisons(record: dict) -> list[tuple[str, dict]]:
  """(what, {B: verdict}) for every comparison the benchmark makes."""
  return [
      ("TR-SGD against momentum SGD",
       _small_batch_verdicts(record, "tr_sgd", "sgd")),
      ("TR-SGD against \"decay only\" (the proximal term)",
       _small_batch_verdicts(record, "tr_sgd", "decay only")),
      ("\"decay only\" against momentum SGD (the 1/(k+1) decay)",
       _small_batch_verdicts(record, "decay only", "sgd")),
      ("TR-Adam against Adam",
       _small_batch_verdicts(record, "tr_adam", "adam")),
      ("TR-Adam against TR-Adam with strength 0 (the proximal term)",
       {b: v for b, v in _small_batch_verdicts(
           record, "tr_adam", TR_ADAM_DECAY_ONLY_LABEL,
           b_control=True).items() if _small_batch_find(
               record, TR_ADAM_DECAY_ONLY_LABEL, b, True)}),
      ("Adam at TR-Adam's average step against Adam's pick",
       _small_batch_verdicts(record, ADAM_AT_TR_STEP_LABEL, "adam",
                             a_control=True)),
  ]


ADAM_AT_TR_STEP_LABEL = "control: adam at tr_adam's mean step"
TR_ADAM_DECAY_ONLY_LABEL = "control: tr_adam decay only"


def _small_batch_plateau(record: dict) -> str:
  curve = record.get("curve")
  if not curve:
    return "No per-epoch curve was recorded, so no plateau check."
  sgd = _small_batch_find(record, curve["method"], curve["batch_size"])
  first = curve["seeds"][0]["test_accuracy"]
  half = len(first) // 2
  text = (f"**Plateau.** SGD at B = {curve['batch_size']} reaches "
          f"{mean_sd(sgd['summary'])} in {len(first)} epochs; over epochs "
          f"{half + 1}–{len(first)} its seed-{curve['seeds'][0]['seed']} "
          f"test accuracy stays within {percent(min(first[half:]))}–"
          f"{percent(max(first[half:]))}.")
  long = curve.get("long")
  if not long:
    return text + " No longer run was recorded."
  gain = long["test_accuracy"][-1] - first[-1]
  within = abs(gain) <= sgd["summary"]["sd"]
  return text + (
      f" One {long['epochs']:g}-epoch run at the same LR (the dotted curve) "
      f"ends at {percent(long['test_accuracy'][-1])}, "
      f"{points(gain)} points from seed {curve['seeds'][0]['seed']}'s "
      f"{len(first)}-epoch run: " + (
          f"within the seed sd ({100 * sgd['summary']['sd']:.1f}), so the "
          "budget is at the plateau." if within else
          f"more than the seed sd ({100 * sgd['summary']['sd']:.1f}), so the "
          "budget is short of the plateau."))


@block("small-batch-findings")
def _small_batch_findings() -> str:
  record = _small_batch_record()
  lines = [_small_batch_plateau(record), "",
           "Against the seed spread (difference of means in points; spread "
           "= the sum of the two sds):"]
  for what, verdicts in _small_batch_comparisons(record):
    detail = ", ".join(f"B = {b} {verdict_phrase(v, 2)}"
                       for b, v in verdicts.items())
    lines.append(f"- {what}: {by_word(verdicts)} ({detail}).")
  means = [r["summary"]["mean"] for r in record["contenders"]
           if r["summary"]]
  leaders = {b: sweep.leader({
      r["name"]: r["summary"] and sweep.Summary(**r["summary"])
      for r in record["contenders"] if r["batch_size"] == b})
             for b in record["batch_sizes"]}
  led = {b: name for b, name in leaders.items() if name}
  lines.append(
      f"- Every method's mean lies in {percent(min(means))}–"
      f"{percent(max(means))} at every B; "
      + ("no method beats every other at any B." if not led else
         "; ".join(f"{name} beats every other at B = {b}"
                   for b, name in led.items()) + "."))
  return "\n".join(lines)


@block("small-batch-summary")
def _small_batch_summary() -> str:
  """The measured sentences of README.md's "When to use TR"."""
  record = _small_batch_record()
  comparisons = dict(_small_batch_comparisons(record))
  sizes = record["batch_sizes"]
  sgd = "TR-SGD against momentum SGD"
  proximal = 'TR-SGD against "decay only" (the proximal term)'
  tr_wins = [b for what in ("TR-SGD against momentum SGD",
                            "TR-Adam against Adam")
             for b, v in comparisons[what].items() if v and v.word == "beats"]
  return (
      f"What we measured (`benchmarks/small_batch.py`, "
      f"[benchmarks/README.md](benchmarks/README.md#tr-at-tiny-batches-"
      f"small_batchpy): MNIST-1D CNN, B = {min(sizes)}–{max(sizes)}, "
      f"{record['data']['epochs']:g} epochs, {len(record['seeds'])} seeds, "
      f"the spread rule): TR-SGD against momentum SGD tuned over TR's "
      f"average step is {by_word(comparisons[sgd], sep=', ')}; TR-Adam "
      f"against Adam is {by_word(comparisons['TR-Adam against Adam'], sep=', ')}; "
      f"TR-SGD against its own strength-0 version (the 1/(k+1) decay "
      f"alone) is {by_word(comparisons[proximal], sep=', ')}"
      + ". " + ("So on this scale TR beats its baseline at no batch size."
                if not tr_wins else
                f"So TR beats its baseline at B = "
                f"{', '.join(map(str, sorted(set(tr_wins))))} only."))


# --- Sparse communication.


def sparse_cell(result: dict) -> str:
  """A contender's pick and test accuracy, for the script's progress."""
  if result["summary"] is None:
    return f"all {len(result['trials'])} trials failed"
  lr = result["pick"]["point"]["learning_rate"]
  return (f"lr {lr:g}: test {mean_sd(result['summary'], 4, 1.0)} "
          f"({result['summary']['n']} seeds)")


def _sparse_summaries(record: dict) -> dict:
  return {r["name"]: r["summary"] and sweep.Summary(**r["summary"])
          for r in record["contenders"]}


def sparse_table(record: dict) -> str:
  """One row per contender: pick, accuracy, verdict against dense, bytes."""
  dense_bytes = record["dense_bytes"]
  dense = next((r for r in record["contenders"] if r["optimizer"] == "msgd"),
               None)
  leader = sweep.leader(_sparse_summaries(record))
  times = {r["name"]: r["ms_per_step"] for r in record["contenders"]}
  rows = []
  for r in sorted(record["contenders"], key=lambda r: (
      r["density"] is not None, -(r["density"] or 0), r["warm_up"],
      r["optimizer"] != "gmc")):
    final = r["bytes_sent_per_step"] or dense_bytes
    mean = r["bytes_sent_mean_per_step"] or dense_bytes
    edge = " (edge)" if r["search"]["on_edge"] else ""
    lr = (f"{r['pick']['point']['learning_rate']:g}{edge}" if r["pick"]
          else "–")
    against = ("–" if r is dense or dense is None else verdict_phrase(
        verdict_of(r["summary"], dense["summary"])))
    rows.append([
        f"{r['name']} (dense)" if r["optimizer"] == "msgd" else r["name"],
        lr, f"{len(r['trials'])} / {r['collapsed']}",
        bold(mean_sd(r["summary"], 4, 1.0), leader == r["name"]), against,
        f"{number(final)} ({dense_bytes / final:.0f}×)",
        f"{number(mean)} ({dense_bytes / mean:.0f}×)",
        "—" if r["density"] is None else number(final * 6 / 8),
        "–" if r["ms_per_step"] is None else f"{r['ms_per_step']:.1f}",
        "–" if not dense or not dense["ms_per_step"] or not r["ms_per_step"]
        else f"{r['ms_per_step'] / times[dense['name']]:.2f}"])
  seeds = len(record["seeds"])
  return table(
      ["method", "peak LR", "trials / collapsed",
       f"test acc. (mean ± sd, {seeds} seeds)", "vs dense (points)",
       "bytes/step/worker, final (less)", "mean over run (less)",
       "16-bit values", "ms/step", "time vs dense"], rows,
      align="llrrrrrrrr")


def _sparse_find(record, optimizer, density, warm_up) -> dict | None:
  return next((r for r in record["contenders"] if r["optimizer"] == optimizer
               and r["density"] == density and r["warm_up"] == warm_up), None)


def _sparse_settings(record) -> list[tuple[float, bool]]:
  return sorted({(r["density"], r["warm_up"]) for r in record["contenders"]
                 if r["density"] is not None}, key=lambda s: (-s[0], s[1]))


def _setting_name(density: float, warm_up: bool) -> str:
  return f"{density:.1%}" + (" with warm-up" if warm_up else "")


def _counted(verdicts: dict) -> str:
  """"behind in 3 of 6 settings, level in 3" from {setting: Verdict}."""
  words = [v.word for v in verdicts.values() if v is not None]
  counts = {w: words.count(w) for w in dict.fromkeys(
      ("beats", "level", "behind", "no verdict")) if words.count(w)}
  first, *rest = counts.items() if counts else [("no data", 0)]
  return (f"{first[0]} in {first[1]} of {len(verdicts)} settings"
          + "".join(f", {word} in {count}" for word, count in rest))


def _sparse_setup(record: dict, name: str) -> str:
  data, budget = record["data"], record["budget"]
  steps = sorted({s for r in record["contenders"] for s in r["steps"]})
  ok_runs = record["num_runs"] - record["collapsed_runs"]
  batch = budget["batch_size"]
  warm = record["density_warmup_epochs"]
  validation = (f"a validation split of {number(data['num_val'])}, picks on "
                "validation" if data["num_val"] else
                "no validation split: the learning rate was picked on the "
                "final test accuracy")
  plateau = record["plateau"]
  return (
      f"MNIST-1D MLP (d = {number(record['num_params'])} parameters), "
      f"{budget['num_devices']} simulated XLA CPU devices "
      f"({batch // budget['num_devices']} examples each, global batch "
      f"{batch}), {number(data['num_train'])} training examples (test "
      f"{number(data['num_test'])}) and {validation}; {budget['epochs']:g} "
      f"epochs = {' or '.join(number(s) for s in steps)} steps "
      f"({number(ok_runs)} finished runs of {number(record['num_runs'])}; "
      f"{record['collapsed_runs']} diverged or collapsed), 1-epoch LR "
      f"warm-up then cosine, momentum 0.9, weight decay 1e-4 on kernels "
      f"(GMC: in the message; DGC: dense, after the exchange)"
      + (f"; density warm-up over the first {warm:g} epochs" if warm else "")
      + f". Every contender: LR grid {', '.join(f'{x:g}' for x in record['lrs'])}"
      f" on seed {record['seeds'][0]}, extended past a winning edge, the "
      f"same trial budget of {record['trial_budget']} runs; "
      f"{sum(bool(r['search']['on_edge']) for r in record['contenders'])} "
      f"final picks on an edge of what was tried; the pick rerun on seeds "
      f"{', '.join(map(str, record['seeds'][1:]))}: test accuracy mean ± sd "
      f"over {len(record['seeds'])} seeds."
      + ("" if not plateau else
         f" Dense momentum SGD's test accuracy (mean over its "
         f"{plateau['runs']} seeds) is {plateau['at_75_percent']:.4f} at 75 % "
         f"of the run and {plateau['final']:.4f} at the end.")
      + f" Run time of all runs: {record['run_time_s'] / 60:.0f} minutes; "
      f"results at {record['code_version']} in `results/{name}.json` and "
      f"its run store `results/{record['runs']}`.")


def _sparse_findings(record: dict) -> str:
  dense = _sparse_find(record, "msgd", None, False)
  settings = _sparse_settings(record)
  lines = []
  densities = sorted({d for d, _ in settings}, reverse=True)
  for density in densities:
    best = max((r for r in record["contenders"] if r["density"] == density
                and r["summary"]), key=lambda r: r["summary"]["mean"],
               default=None)
    if best is None or dense is None:
      continue
    found = verdict_of(best["summary"], dense["summary"])
    final = best["bytes_sent_per_step"]
    lines.append(
        f"- At {density:.1%} ({record['dense_bytes'] / final:.0f}× fewer "
        f"bytes after the warm-up, "
        f"{record['dense_bytes'] / best['bytes_sent_mean_per_step']:.0f}× "
        f"over the run) the best contender, {best['name']} "
        f"({mean_sd(best['summary'], 4, 1.0)}), against dense "
        f"({mean_sd(dense['summary'], 4, 1.0)}): {verdict_phrase(found, 2)}.")
  warm = {}
  for optimizer in ("gmc", "dgc"):
    for density in densities:
      on = _sparse_find(record, optimizer, density, True)
      off = _sparse_find(record, optimizer, density, False)
      if on and off:
        warm[f"{optimizer} {density:.1%}"] = verdict_of(on["summary"],
                                                        off["summary"])
  if warm:
    gaps = [v.gap for v in warm.values() if v]
    lines.append(
        f"- Density warm-up against none: {_counted(warm)} (differences "
        f"{points(min(gaps))} to {points(max(gaps))} points).")
  against = {}
  for density, warm_up in settings:
    gmc = _sparse_find(record, "gmc", density, warm_up)
    dgc = _sparse_find(record, "dgc", density, warm_up)
    if gmc and dgc:
      against[_setting_name(density, warm_up)] = verdict_of(gmc["summary"],
                                                            dgc["summary"])
  if against:
    lines.append(
        f"- **GMC against DGC: {_counted(against)}** ("
        + "; ".join(f"{name} {verdict_phrase(v, 2)}"
                    for name, v in against.items()) + ").")
  steps = max(s for r in record["contenders"] for s in r["steps"])
  lowest = min(densities)
  lines.append(
      f"- At {lowest:.1%} a worker's memory needs about "
      f"{number(1 / lowest)} steps to send every coordinate once; each run "
      f"has {number(steps)}.")
  ratios = [r["ms_per_step"] / dense["ms_per_step"]
            for r in record["contenders"] if r is not dense and dense
            and r["ms_per_step"] and dense["ms_per_step"]]
  if ratios:
    lines.append(
        f"- Time per step (run time / steps; the simulated workers share one "
        f"host, so it measures compute, not the network the bytes would "
        f"save): compression costs {min(ratios):.1f}–{max(ratios):.1f}× "
        f"dense's.")
  return "\n".join(lines)


def _sparse_claim(record: dict) -> str:
  """The paper's claim ("~100× fewer bytes, no accuracy lost") at the
  density nearest 100×, by the spread rule."""
  dense = _sparse_find(record, "msgd", None, False)
  near = min((r for r in record["contenders"] if r["density"]),
             key=lambda r: abs(record["dense_bytes"] / r[
                 "bytes_sent_per_step"] - 100))
  at = [r for r in record["contenders"] if r["density"] == near["density"]
        and r["summary"]]
  kept = [r["name"] for r in at
          if verdict_of(r["summary"], dense["summary"]).word != "behind"]
  return (f"**Against the paper's claim** (~100× less communication, no "
          f"accuracy lost), at {near['density']:.1%} density: "
          + (f"**holds** for {', '.join(kept)} (not behind dense by the "
             "spread rule)." if kept else
             f"**not reproduced**: all {len(at)} contenders at "
             f"{near['density']:.1%} are behind dense by the spread rule."))


@block("sparse-communication-b256-setup")
def _sparse_b256_setup() -> str:
  return _sparse_setup(load("sparse_communication_b256"),
                       "sparse_communication_b256")


@block("sparse-communication-b256-table")
def _sparse_b256_table() -> str:
  return sparse_table(load("sparse_communication_b256"))


@block("sparse-communication-b256-findings")
def _sparse_b256_findings() -> str:
  record = load("sparse_communication_b256")
  return _sparse_claim(record) + "\n\n" + _sparse_findings(record)


@block("sparse-communication-b1024-setup")
def _sparse_b1024_setup() -> str:
  return _sparse_setup(load("sparse_communication"), "sparse_communication")


@block("sparse-communication-b1024-table")
def _sparse_b1024_table() -> str:
  return sparse_table(load("sparse_communication"))


@block("sparse-communication-b1024-findings")
def _sparse_b1024_findings() -> str:
  record = load("sparse_communication")
  compression = load("compression")
  dense = _sparse_find(compression, "msgd", None, False)
  gmc = _sparse_find(compression, "gmc", 0.01, False)
  steps = sorted({s for r in compression["contenders"] for s in r["steps"]})
  return (
      _sparse_claim(record) + "\n\n" + _sparse_findings(record) + "\n\n"
      f"The first run of this script (`results/compression.json`, at "
      f"{compression['code_version']}: a "
      f"{number(compression['num_params'])}-parameter MLP, "
      f"{' or '.join(map(number, steps))} steps, no warm-up, picked on the "
      f"test accuracy of seed {compression['seeds'][0]}): GMC at 1.0% "
      f"{mean_sd(gmc['summary'], 4, 1.0)} against dense "
      f"{mean_sd(dense['summary'], 4, 1.0)}, "
      f"{verdict_phrase(verdict_of(gmc['summary'], dense['summary']))}.")


@block("sparse-communication-summary")
def _sparse_summary() -> str:
  """README.md's paragraph on the batch-256 run."""
  record = load("sparse_communication_b256")
  dense = _sparse_find(record, "msgd", None, False)
  steps = sorted({s for r in record["contenders"] for s in r["steps"]})
  against = {}
  for density, warm_up in _sparse_settings(record):
    gmc = _sparse_find(record, "gmc", density, warm_up)
    dgc = _sparse_find(record, "dgc", density, warm_up)
    if gmc and dgc:
      against[_setting_name(density, warm_up)] = verdict_of(gmc["summary"],
                                                            dgc["summary"])
  best = {}
  for density in sorted({d for d, _ in _sparse_settings(record)},
                        reverse=True):
    at = [r for r in record["contenders"] if r["density"] == density
          and r["summary"]]
    best[density] = max(at, key=lambda r: r["summary"]["mean"])
  return (
      f"Measured (`benchmarks/sparse_communication.py --batch-size "
      f"{record['budget']['batch_size']} --epochs "
      f"{record['budget']['epochs']:g}`, "
      f"{number(record['num_params'])}-parameter MLP, "
      f"{record['budget']['num_devices']} simulated workers, "
      f"{' or '.join(map(number, steps))} steps "
      f"({number(record['data']['num_train'])} training examples per "
      f"epoch), picks on validation, {len(record['seeds'])} seeds; "
      f"[table](benchmarks/README.md#sparse-communication-gmc-and-dgc-vs-"
      f"dense-momentum-sgd-sparse_communicationpy)): dense momentum SGD "
      f"{mean_sd(dense['summary'], 4, 1.0)}; "
      + "; ".join(
          f"at {density:.1%} density "
          f"({record['dense_bytes'] / r['bytes_sent_per_step']:.0f}× fewer "
          f"bytes) the best is {r['name']}, "
          f"{mean_sd(r['summary'], 4, 1.0)}, "
          f"{verdict_of(r['summary'], dense['summary']).word} dense"
          for density, r in best.items())
      + f". GMC against DGC: {_counted(against)}. "
      + _sparse_claim(record).replace("**", "")
      + (" The most accurate compressed contender at every density is DGC "
         "with warm-up: use `dgc` with `density_warmup_steps` unless your "
         "own runs say otherwise." if all(
             r["optimizer"] == "dgc" and r["warm_up"] for r in best.values())
         else ""))


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


def _large_tree_rows(name: str, optimizer: str, dtype: str) -> list:
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
  runs = [name for name in UPDATE_RUNS if _large_tree_rows(name, optimizer, "float32")]
  f32 = [r for name in runs for r in _large_tree_rows(name, optimizer, "float32")]
  bf16 = [r for name in runs for r in _large_tree_rows(name, optimizer, "bfloat16")]
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
          for r in _large_tree_rows(name, "sngm", dtype)]


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


# ----------------------------------------------------------------------------
# The large-batch step's efficiency (step_efficiency.py), vmapped trials
# (vmapped_trials.py) and the resnet's cost (resnet_cost.py).


def _command_at(record: dict) -> str:
  return f"`{record['command']}` at {record['code_version']}"


@block("step-efficiency")
def _step_efficiency() -> str:
  lines = []
  for name, where in (("step_efficiency", "one core (`taskset -c 1`)"),
                      ("step_efficiency_two_cores", "both cores")):
    record = load(name)
    matmul = record["matmul"]["flops_per_s"]
    rows = [[label, f"{step['flops_per_s'] / 1e9:.1f}",
             percent(step["fraction_of_matmul"]),
             f"{step['speedup_over_before']:.2f}×",
             f"{step['samples_per_s']:,.0f}"]
            for label, step in record["steps"].items()]
    loop = record["harness_loop"]
    lines += [
        f"On {where}: {_command_at(record)}; a 1024×1024 float32 matmul runs "
        f"at {matmul / 1e9:.1f} GFLOP/s in the same run; load average "
        f"{record['load_average_before'][0]:.1f} before, "
        f"{record['load_average_after'][0]:.1f} after (1 min). FLOP/s count "
        f"the `nn.Conv` step's {record['model_flops'] / 1e6:,.0f} MFLOP "
        "(XLA's cost analysis) for every formulation.", "",
        table(["step (CNN, B = "
               f"{record['budget']['batch_size']:,}, sgd(momentum))",
               "GFLOP/s", "of the matmul (%)", "speed-up", "samples/s"],
              rows, "lrrrr"), "",
        "The harness loop against the bare jitted step, same number of "
        "steps: " + "; ".join(
            f"{label}: {entry['loop_over_bare']:.2f}×"
            for label, entry in loop.items()) + ".", ""]
  return "\n".join(lines)


@block("vmapped-trials")
def _vmapped_trials() -> str:
  record = load("vmapped_trials")
  rows = []
  for row in record["rows"]:
    one = row["one_by_one"]
    cells = [f"{row['batch_size']:,}", str(row["steps"]),
             f"{one['run_time_s']:.1f} / {one['compile_time_s']:.1f}"]
    for how in ("vmap", "unroll", "per_trial"):
      entry = row[how]
      cells.append(f"{entry['run_time_s']:.1f} / {entry['compile_time_s']:.1f}"
                   f" (×{entry['run_time_speedup']:.2f} run, "
                   f"×{entry['compile_time_speedup']:.1f} compile)")
    rows.append(cells)
  trials = record["rows"][0]["trials"]
  return "\n".join([
      f"{_command_at(record)}; {trials} trials of the CNN with sngm, run / "
      "compile seconds (speed-up over one by one); "
      f"{_common.load_text(record['machine'])}.", "",
      table(["B", "steps", "one by one", "one program, vmap",
             "one program, unrolled", "one compile, trials in turn"],
            rows, "rrrrrr")])


@block("resnet-cost")
def _resnet_cost() -> str:
  record = load("resnet_cost")
  rows = [[f"{row['batch_size']:,}", f"{row['step_ms']['cnn']:.2f}",
           f"{row['step_ms']['resnet']:.2f}", f"{row['ratio']:.2f}",
           f"{row['cpu_ratio']:.2f}", f"{row['flops_ratio']:.2f}",
           _by_model(row.get("temp_mib"), ".1f"),
           _by_model(row.get("faulted_mib_per_step"), ".0f")]
          for row in record["step_cost"]]
  params = record["step_cost"][0]["params"]
  budget = record["budget"]
  # The script's pick per model: the learning rate of the best mean.
  best = {entry["name"]: (entry["learning_rate"], sweep.Summary(
      entry["mean"], entry["sd"], entry["seeds"]))
          for entry in record["contenders"]}
  said = sweep.verdict(best["resnet"][1], best["cnn"][1])
  return "\n".join([
      f"{_command_at(record)} (both models' convolutions `PatchConv`s, as from 2d25c62); "
      f"{_common.load_text(record['machine'])}"
      f"{_first_touch_text(record['machine'])}. Parameters: CNN "
      f"{params['cnn']:,}, resnet {params['resnet']:,}.", "",
      table(["B", "CNN ms/step", "resnet ms/step", "ratio (wall)",
             "ratio (CPU time)", "ratio (XLA FLOPs)",
             "temp MiB, CNN / resnet",
             "MiB first touched per step, CNN / resnet"], rows, "rrrrrrrr"),
      "",
      f"Accuracy on {budget['num_train']:,} training examples, "
      f"{budget['epochs']:g} epochs at B = {budget['batch_size']}, "
      f"{budget['optimizer']}, the best of the learning rates "
      f"{', '.join(f'{lr:g}' for lr in budget['learning_rates'])} on the "
      f"test set, {budget['seeds']} seeds: resnet "
      f"{mean_sd(best['resnet'][1])} % (lr {best['resnet'][0]:g}), CNN "
      f"{mean_sd(best['cnn'][1])} % (lr {best['cnn'][0]:g}): the resnet "
      f"{_VERDICT_PHRASE[said.word]} the CNN by the rule (gap "
      f"{100 * said.gap:+.1f} points, spread {100 * said.spread:.1f})."])


def _figure(value: float | None, spec: str) -> str:
  """`value` in the format `spec`; "–" where the run lacks it."""
  return "–" if value is None else f"{value:{spec}}"


def _by_model(values: dict | None, spec: str) -> str:
  """"cnn / resnet" of a per-model figure; "–" where the run lacks it."""
  if not values:
    return "–"
  return f"{_figure(values['cnn'], spec)} / {_figure(values['resnet'], spec)}"


@block("grid-compile-time")
def _grid_compile_time() -> str:
  record = load("grid_compile_time")
  budget = record["budget"]
  rows = []
  for name in ("before", "after"):
    if name not in record:
      continue
    result = record[name]
    rows.append([name, f"{result['first_run_compile_s']:.1f}",
                 f"{result['later_runs_compile_s']:.1f}",
                 str(result["later_runs_backend_compiles"])])
  trials = len(budget["learning_rates"]) * len(budget["weight_decays"])
  return "\n".join([
      f"{_command_at(record)} (before: the harness at "
      f"{record['checkouts'].get('before')}); "
      f"{budget['optimizer']}, the {budget['model'].upper()}, B = "
      f"{budget['batch_size']:,}, a grid of "
      f"{len(budget['learning_rates'])} learning rates × "
      f"{len(budget['weight_decays'])} weight decays ({trials} runs); "
      f"{_common.load_text(record['machine'])}.", "",
      table(["harness", "compile s, first run",
             f"compile s, the other {trials - 1} runs",
             "XLA compilations, the other runs"], rows, "lrrr")])


_SPARSE_UPDATE_FILES = {"before": ("update_cost_gmc_fast_before_bb71a70",),
                        "after": ("update_cost_gmc_fast",
                                  "update_cost_gmc_fast_resnet")}
_SPARSE_UPDATE_LIMIT = 2.0  # issue 27: gmc and dgc at most 2x the dense one
_SPARSE_UPDATE_BASELINE = "pmean + optax.sgd(momentum)"


@block("sparse-update-cost")
def _sparse_update_cost() -> str:
  ratios, memory, records = {}, {}, {}
  for when, names in _SPARSE_UPDATE_FILES.items():
    for name in names:
      record = records[name] = load(name)
      for row in record["rows"]:
        if row["mode"] == "jit":
          continue
        ratios[(row["tree"], row["optimizer"], when)] = row[
            "cpu_ratio_to_sgd_momentum"]
        if when == "after":
          memory[(row["tree"], row["optimizer"])] = (
              _figure(row.get("temp_mib"), ".1f"),
              _figure(row.get("faulted_mib_per_call"), ".0f"))
  keys = sorted({(tree, optimizer) for tree, optimizer, _ in ratios},
                key=lambda key: (key[0], key[1] != _SPARSE_UPDATE_BASELINE,
                                 key[1]))
  rows = []
  for tree, optimizer in keys:
    after = ratios.get((tree, optimizer, "after"))
    verdict = ("baseline" if optimizer == _SPARSE_UPDATE_BASELINE
               else "–" if after is None
               else "yes" if after <= _SPARSE_UPDATE_LIMIT else "no")
    rows.append([tree, f"`{optimizer}`",
                 f"{ratios[(tree, optimizer, 'before')]:.2f}"
                 if (tree, optimizer, "before") in ratios else "–",
                 "not measured" if after is None else f"{after:.2f}",
                 verdict, *memory.get((tree, optimizer), ("–", "–"))])
  runs = [f"{when}: {_command_at(records[name])}, on "
          f"{records[name]['machine'].get('cpu_model', 'an unrecorded CPU')}"
          f", {_common.load_text(records[name]['machine'])}"
          f"{_first_touch_text(records[name]['machine'])}"
          for when, names in _SPARSE_UPDATE_FILES.items() for name in names]
  return "\n".join([
      "CPU time of one update under `pmap` over 8 simulated workers, density "
      "1 %, float32, over `pmean` + `optax.sgd(momentum)` in the same run "
      f"(median of per-round ratios); the limit is {_SPARSE_UPDATE_LIMIT:g}×. "
      "With the after runs: XLA's temp buffer of one worker's program, and "
      "the memory the process first touched per update (all 8 workers; "
      "minor page faults × page size).",
      "", table(["tree", "update", "before", "after",
                 f"≤ {_SPARSE_UPDATE_LIMIT:g}×", "temp MiB per worker",
                 "MiB first touched per update"], rows, "llrrlrr"), "",
      *[f"- {run}." for run in runs]])


def _first_touch_text(machine: dict) -> str:
  """What first touching memory cost on the machine of a timing JSON."""
  touch = machine.get("first_touch_ms")
  if not touch:
    return ""
  return (f"; writing {touch['mib']:g} MiB of freshly mapped memory took "
          f"{touch['first']:.1f} ms there, {touch['first'] / touch['again']:.0f}"
          f"× writing it again ({touch['again']:.1f} ms)")


_VERDICT_PHRASE = {"beats": "beats", "level": "is level with",
                   "behind": "is behind", "no verdict": "has no verdict against"}


# ----------------------------------------------------------------------------
# The steps-to-target frontier (frontier.py).

FRONTIER_LABELS = {**LABELS, "nesterov": "Nesterov", "adamw": "AdamW"}
# A point reaches the target when at least this many of its seeds do (so
# that the spread rule can compare it).
FRONTIER_MIN_SEEDS = 2
PERFECT_SCALING_RULE = (
    "doubling the batch keeps perfect scaling while twice the steps at 2B "
    "are level with or fewer than the steps at B by the spread rule (the "
    "steps at least halve, within the seeds' spread); the largest batch in "
    "perfect scaling is the last one reached that way from the smallest "
    "batch that reaches the target")


def _steps(point: dict, field: str = "steps_to_target"):
  """The point's summary over the seeds that reached the target; None when
  fewer than `FRONTIER_MIN_SEEDS` did (or the point is incomplete)."""
  if not point.get("complete"):
    return None
  values = [v for v in point[field] if v is not None]
  if len(values) < FRONTIER_MIN_SEEDS:
    return None
  return sweep.summarize(values)


def _frontier_curves(record: dict) -> dict[str, dict[int, dict]]:
  curves: dict[str, dict[int, dict]] = {}
  for point in record["points"]:
    curves.setdefault(point["optimizer"], {})[point["batch_size"]] = point
  return curves


def _scaled(summary: sweep.Summary, factor: float) -> sweep.Summary:
  return sweep.Summary(factor * summary.mean, factor * summary.sd,
                       summary.n)


def perfect_scaling_limit(curve: dict[int, dict]) -> int | None:
  """`PERFECT_SCALING_RULE`'s largest batch in perfect scaling."""
  sizes = sorted(b for b in curve if _steps(curve[b]) is not None)
  if not sizes:
    return None
  limit = sizes[0]
  for batch in sizes[1:]:
    if batch != 2 * limit:
      break
    doubled = _scaled(_steps(curve[batch]), 2.0)
    if sweep.verdict(doubled, _steps(curve[limit]),
                     higher_is_better=False).word == "behind":
      break
    limit = batch
  return limit


def _steps_cell(point: dict) -> str:
  if not point.get("complete"):
    return "…"
  reached = sum(v is not None for v in point["steps_to_target"])
  summary = _steps(point)
  if summary is None:
    return f"– ({reached}/{len(point['steps_to_target'])})"
  cell = f"{summary.mean:,.0f} ± {summary.sd:,.0f}"
  return cell + ("" if reached == len(point["steps_to_target"])
                 else f" ({reached}/{len(point['steps_to_target'])})")


def frontier_setting(record: dict) -> str:
  budget = record["budget"]
  curves = _frontier_curves(record)
  done = sum(p["complete"] for p in record["points"])
  reference = curves.get("msgd", {}).get(256)
  samples = reference and _steps(reference, "samples_to_target")
  num_train = (budget["num_samples"] * 4 // 5) * (1 - budget["val_fraction"])
  reason = record["target_reason"]
  if samples is not None:
    reason += (f"; momentum SGD at B = 256 reaches it in "
               f"{samples.mean / num_train:.1f} ± {samples.sd / num_train:.1f}"
               " epochs here")
  ranges = "; ".join(
      f"{FRONTIER_LABELS.get(name, name)}: learning rate "
      f"{lr['low']:g}–{lr['high']:g}, weight decay {wd['low']:g}–{wd['high']:g}"
      for name, (lr, wd) in record["search_space"].items())
  return "\n".join([
      f"- Command: `{record['command']}` at "
      f"{', '.join(record['run_code_versions']) or '–'}, on "
      f"{record['machine']['cpu_count']} CPU cores, 2 worker processes; "
      f"{record['compute_s'] / 3600:.1f} h of run time in the stores "
      f"({done} of {len(record['points'])} points complete"
      + ("" if record["complete"] else "; the run resumes where it stopped")
      + ").",
      f"- Data and model: MNIST-1D with {budget['num_samples']:,} examples "
      f"({num_train:,.0f} trained on, a validation split of "
      f"{budget['val_fraction']:.0%} of the training set, the test set "
      f"apart), the harness's `{budget['model']}`"
      + "".join(f", `{key}={value!r}`"
                for key, value in budget.get("model_kwargs", {}).items())
      + ".",
      f"- Target: {percent(record['target'])} % validation accuracy: "
      f"{reason}.",
      f"- Search at every point: {record['trial_budget']} scrambled Halton "
      "trials over the peak learning rate (log), the weight decay (log) and "
      "the length of a linear decay (log, from 1/"
      f"{round(1 / budget['shortest_decay'])} of the step budget to all of "
      "it), with a linear warm-up of "
      f"{budget['warmup_fraction']:.0%} of the decay; {ranges}.",
      f"- Step budget: the larger of {budget['budget_epochs']:g} epochs and "
      f"{budget['budget_steps']:,} steps; evaluation "
      f"{budget['evals_per_epoch']} times an epoch, and at most "
      f"{budget['eval_every_large_batch']} steps apart from B = 4,096; steps "
      "to target = the first evaluation at or above it.",
      f"- The pick (fewest steps to target) is rerun on seeds "
      f"{', '.join(map(str, budget['seeds'][1:]))}; a point reaches the "
      f"target when at least {FRONTIER_MIN_SEEDS} of its "
      f"{len(budget['seeds'])} seeds do, and its steps are their mean ± sd."])


def frontier_table(record: dict) -> str:
  curves = _frontier_curves(record)
  sizes = record["budget"]["batch_sizes"]
  rows = [[FRONTIER_LABELS.get(name, name),
           *[_steps_cell(curve[b]) if b in curve else "" for b in sizes]]
          for name, curve in curves.items()]
  reached = [[FRONTIER_LABELS.get(name, name),
              *[f"{curve[b]['trials_reached']}/{curve[b]['trials']}"
                if curve.get(b, {}).get("complete") else "…" for b in sizes]]
             for name, curve in curves.items()]
  return "\n".join([
      "Steps to target (mean ± sd over the seeds that reached it; (k/3): "
      "only k seeds did; –: fewer than 2; …: not yet run):", "",
      table(["optimizer", *[f"B = {b:,}" for b in sizes]], rows,
            "l" + "r" * len(sizes)), "",
      "Trials of the search that reached the target:", "",
      table(["optimizer", *[f"{b:,}" for b in sizes]], reached,
            "l" + "r" * len(sizes))])


def _largest_reaching(curve: dict[int, dict]) -> int | None:
  sizes = [b for b, point in curve.items() if _steps(point) is not None]
  return max(sizes) if sizes else None


def _steps_phrase(summary) -> str:
  return f"{summary.mean:,.0f} ± {summary.sd:,.0f} steps"


def _versus_steps(a: str, a_point: dict, b: str, b_point: dict | None) -> str:
  a_steps = _steps(a_point)
  b_steps = None if b_point is None else _steps(b_point)
  if a_steps is None and b_steps is None:
    return f"neither {a} nor {b} reaches the target"
  if a_steps is None:
    return f"only {b} reaches the target ({_steps_phrase(b_steps)})"
  if b_steps is None:
    return f"only {a} reaches the target ({_steps_phrase(a_steps)})"
  said = sweep.verdict(a_steps, b_steps, higher_is_better=False)
  return (f"{a} {_VERDICT_PHRASE[said.word]} {b}: "
          f"{_steps_phrase(a_steps)} against {_steps_phrase(b_steps)}")


def frontier_findings(record: dict) -> list[str]:
  """The generated verdicts, one line each."""
  curves = _frontier_curves(record)
  label = lambda name: FRONTIER_LABELS.get(name, name)  # noqa: E731
  lines = []
  for name, curve in curves.items():
    limit, largest = perfect_scaling_limit(curve), _largest_reaching(curve)
    incomplete = sum(not p["complete"] for p in curve.values())
    if incomplete == len(curve):
      lines.append(f"{label(name)}: not yet run.")
      continue
    note = (f" ({_plural(incomplete, 'point')} not yet run)" if incomplete
            else "")
    if largest is None:
      lines.append(f"{label(name)}: no batch reaches the target{note}.")
      continue
    lines.append(f"{label(name)}: perfect scaling up to B = {limit:,}; the "
                 f"largest batch that reaches the target is B = "
                 f"{largest:,}{note}.")
  sngm, msgd = curves.get("sngm", {}), curves.get("msgd", {})
  shared = sorted(set(sngm) & set(msgd))
  if shared:
    words = {}
    for batch in shared:
      if sngm[batch]["complete"] and msgd[batch]["complete"]:
        words[batch] = _versus_steps("SNGM", sngm[batch], "momentum SGD",
                                     msgd[batch])
    if words:
      lines.append("SNGM against momentum SGD (the paper's theorem: at the "
                   "same gradient computations, a larger usable batch): "
                   + "; ".join(f"B = {b:,}: {w}" for b, w in words.items())
                   + ".")
  largest_batches = sorted(record["budget"]["batch_sizes"])[-3:]
  for other in ("lars", "lamb"):
    if other in curves and sngm:
      words = [f"B = {b:,}: " + _versus_steps("SNGM", sngm[b], label(other),
                                              curves[other].get(b))
               for b in largest_batches
               if b in sngm and sngm[b]["complete"]
               and curves[other].get(b, {}).get("complete")]
      if words:
        lines.append(f"SNGM against {label(other)} at the largest batches: "
                     + "; ".join(words) + ".")
  lines += _frontier_adaptive_findings(record)
  lines += _frontier_edges(record)
  return lines


# What a pick near each end of a frontier range means (`_frontier_edges`).
_EDGE_MEANING = {
    ("learning_rate", "low"): "the learning rate's low end",
    ("learning_rate", "high"): "the learning rate's high end",
    ("weight_decay", "low"): "the weight decay's low end (next to none)",
    ("weight_decay", "high"): "the weight decay's high end",
    ("epochs", "low"): "the shortest decay",
    ("epochs", "high"): "the decay as long as the step budget"}


def _frontier_edges(record: dict) -> list[str]:
  """The picks within `sweep.EDGE_FRACTION` of an end of a range, by which
  end: a learning rate there is not a result (the range should be wider); a
  decay as long as the step budget or the smallest weight decay are bounds
  of the protocol (the budget; no decay)."""
  found: dict[tuple[str, str], list[str]] = {}
  for point in record["points"]:
    if not point.get("complete") or not point["pick"]:
      continue
    for name in point["search"]["on_edge"]:
      declared = point["search"]["ranges"][name]
      unit = sweep.Range(**declared).unit(point["pick"][name])
      end = "low" if unit < 0.5 else "high"
      found.setdefault((name, end), []).append(
          f"{FRONTIER_LABELS.get(point['optimizer'], point['optimizer'])} "
          f"at {point['batch_size']:,}")
  if not any(point.get("complete") for point in record["points"]):
    return []
  if not found:
    return ["No pick lies within 10 % of an end of its ranges."]
  lines = [f"Picks at {_EDGE_MEANING[key]}: {', '.join(where)}."
           for key, where in found.items()]
  rates = sum(len(w) for (name, _), w in found.items()
              if name == "learning_rate")
  lines.append(
      (f"{_plural(rates, 'learning-rate pick')} at a range's end: not a "
       "result until that range is widened." if rates else
       "No learning-rate pick is at an end of its range.")
      + " The other ends are the protocol's bounds: the decay cannot be "
      "longer than the step budget, and the smallest weight decay is next "
      "to none.")
  return lines


def _frontier_adaptive_findings(record: dict) -> list[str]:
  """Whether each adaptive pick lies beyond the fixed-batch frontier: fewer
  steps than every fixed point (any optimizer) that reaches the target with
  no more samples, by the spread rule."""
  fixed = [(p, _steps(p), _steps(p, "samples_to_target"))
           for p in record["points"] if _steps(p) is not None]
  lines = []
  for adaptive in record.get("adaptive", []):
    steps = _steps(adaptive)
    if steps is None:
      state = ("not yet run" if not adaptive.get("complete")
               else "does not reach the target")
      lines.append(f"{adaptive['name']}: {state}.")
      continue
    samples = _steps(adaptive, "samples_to_target")
    cheaper = [(p, s) for p, s, e in fixed if e.mean <= samples.mean]
    behind = [p for p, s in cheaper if sweep.verdict(
        steps, s, higher_is_better=False).word != "beats"]
    where = (f"{_steps_phrase(steps)} and {samples.mean:,.0f} samples to "
             "target")
    if not cheaper:
      lines.append(f"{adaptive['name']}: {where}; every fixed batch that "
                   "reaches the target uses more samples, so it lies on the "
                   "frontier's low-sample end.")
    elif behind:
      names = ", ".join(f"{FRONTIER_LABELS.get(p['optimizer'], p['optimizer'])}"
                        f" at {p['batch_size']:,}" for p in behind[:4])
      lines.append(f"{adaptive['name']}: {where}: not beyond the fixed-batch "
                   f"frontier (not fewer steps, by the rule, than {names}"
                   + (", ..." if len(behind) > 4 else "")
                   + ", with no more samples).")
    else:
      lines.append(f"{adaptive['name']}: {where}: beyond the fixed-batch "
                   f"frontier (fewer steps than all {len(cheaper)} fixed "
                   "points that use no more samples).")
  return lines


NOISE_ROWS = 12  # rows of the noise-scale table (every k-th evaluation)


def frontier_noise_scale(record: dict) -> str:
  noise = record.get("noise_scale")
  if not noise:
    return "The noise-scale reference run is not in the results yet."
  curves = _frontier_curves(record)
  late = noise["late_noise_scale"]
  every = max(1, len(noise["rows"]) // NOISE_ROWS)
  shown = noise["rows"][every - 1::every]
  if shown[-1] is not noise["rows"][-1]:
    shown.append(noise["rows"][-1])
  rows = [[f"{r['epoch']:.2f}", f"{r['samples_seen']:,}",
           percent(r.get("val_accuracy"), 2), f"{r['noise_scale']:,.0f}"]
          for r in shown]
  low, high = noise["suggested_batch_range"]
  reference = noise["reference_config"]
  text = [f"Along a reference run, "
          f"{FRONTIER_LABELS.get(reference['optimizer'])} at B = "
          f"{reference['batch_size']:,} with its frontier pick (learning "
          f"rate {reference['learning_rate']:g}, a decay of "
          f"{reference['epochs']:g} epochs, seed {reference['seed']}), "
          f"`sngm_optax.noise_scale_monitor` on {noise['num_devices']} "
          f"devices (B_small = {reference['batch_size'] // noise['num_devices']}"
          "), B_simple against samples seen:", "", table(["epoch", "samples seen",
                              "validation accuracy (%)", "B_simple"], rows,
                             "rrrr"), "",
          f"Late in training (the median of the last third of the "
          f"evaluations) B_simple is {late:,.0f}, which suggests batches of "
          f"{low:,} to {high:,} (`sngm_optax.harness.noise_scale`'s rule)."
          " It grows as the loss falls (McCandlish et al. predict the "
          "critical batch of a target from B_simple at that target):"]
  at_target = next((r for r in noise["rows"]
                    if r.get("val_accuracy", 0.0) >= record["target"]), None)
  if at_target is not None:
    text[-1] += (f" at the reference run's first evaluation at or above "
                 f"the target (epoch {at_target['epoch']:.2f}) it is "
                 f"{at_target['noise_scale']:,.0f}.")
  knees = {name: perfect_scaling_limit(curve)
           for name, curve in curves.items()}
  knees = {name: knee for name, knee in knees.items() if knee is not None}
  if knees and at_target is not None:
    text.append("Measured knees (the largest batch in perfect scaling): "
                + ", ".join(f"{FRONTIER_LABELS.get(name, name)} {knee:,} "
                            "(B_simple at the target is "
                            f"{at_target['noise_scale'] / knee:.2g}× it)"
                            for name, knee in knees.items()) + ".")
  return "\n".join(text)


def sngm_standing(cnn: dict, resnet: dict) -> list[str]:
  """SNGM against each other optimizer at the resnet frontier's batch
  sizes, on both workloads: whether the verdict changes."""
  cnn_curves, resnet_curves = _frontier_curves(cnn), _frontier_curves(resnet)
  lines = []
  for other in [name for name in resnet_curves if name != "sngm"]:
    words = []
    for batch in resnet["budget"]["batch_sizes"]:
      said = {}
      for workload, curves in (("CNN", cnn_curves), ("resnet", resnet_curves)):
        mine = curves.get("sngm", {}).get(batch)
        theirs = curves.get(other, {}).get(batch)
        if not (mine and theirs and mine["complete"] and theirs["complete"]):
          said[workload] = "not yet run"
          continue
        a, b = _steps(mine), _steps(theirs)
        said[workload] = (
            "neither reaches the target" if a is None and b is None
            else "only SNGM reaches the target" if b is None
            else f"only {FRONTIER_LABELS.get(other, other)} reaches it"
            if a is None else "SNGM " + _VERDICT_PHRASE[sweep.verdict(
                a, b, higher_is_better=False).word] + " it")
      change = ("" if "not yet run" in said.values() else
                " (the same)" if said["CNN"] == said["resnet"]
                else " (changed)")
      words.append(f"B = {batch:,}: on the CNN {said['CNN']}, on the "
                   f"resnet {said['resnet']}{change}")
    lines.append(f"SNGM against {FRONTIER_LABELS.get(other, other)}: "
                 + "; ".join(words) + ".")
  return lines


@block("frontier-resnet-setting")
def _frontier_resnet_setting() -> str:
  return frontier_setting(load("frontier_resnet"))


@block("frontier-resnet-table")
def _frontier_resnet_table() -> str:
  return frontier_table(load("frontier_resnet"))


@block("frontier-resnet-findings")
def _frontier_resnet_findings() -> str:
  record = load("frontier_resnet")
  return "\n".join([*[f"- {line}" for line in frontier_findings(record)],
                     "", "Does SNGM's standing change on the normalized "
                     "residual network? Steps to target, by the spread "
                     "rule, at the resnet frontier's batch sizes:", "",
                     *[f"- {line}" for line in sngm_standing(
                         load("frontier"), record)]])


@block("frontier-resnet-readme")
def _frontier_resnet_readme() -> str:
  record = load("frontier_resnet")
  done = sum(p["complete"] for p in record["points"])
  total = len(record["points"])
  progress = ("every point run" if done == total
              else f"{done} of {total} points run so far")
  head = (f"On the BatchNorm resnet (`benchmarks/frontier.py run --workload "
          f"resnet`, the same protocol, B = "
          f"{', '.join(f'{b:,}' for b in record['budget']['batch_sizes'])};"
          f" {progress}), does "
          "SNGM's standing change? Steps to target by the spread rule:")
  return "\n".join([head, "", *[f"- {line}" for line in sngm_standing(
      load("frontier"), record)]])


@block("frontier-setting")
def _frontier_setting() -> str:
  return frontier_setting(load("frontier"))


@block("frontier-table")
def _frontier_table() -> str:
  return frontier_table(load("frontier"))


@block("frontier-findings")
def _frontier_findings_block() -> str:
  record = load("frontier")
  return "\n".join([f"The rule for perfect scaling: {PERFECT_SCALING_RULE}.",
                     "", *[f"- {line}" for line in frontier_findings(record)],
                     "", frontier_noise_scale(record)])


@block("frontier-readme")
def _frontier_readme() -> str:
  record = load("frontier")
  budget = record["budget"]
  return "\n".join([
      f"Steps to {percent(record['target'])} % validation accuracy on "
      f"MNIST-1D ({budget['num_samples']:,} examples, the "
      f"`{budget['model']}`), each optimizer tuned with "
      f"{record['trial_budget']} trials at every batch size, 3 seeds "
      "(`benchmarks/frontier.py`; the tables and the protocol are in "
      "benchmarks/README.md):", "", frontier_table(record).split("\n\n")[1],
      "", *[f"- {line}" for line in frontier_findings(record)]])


if __name__ == "__main__":
  sys.exit(main())
