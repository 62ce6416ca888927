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



# ----------------------------------------------------------------------------
# TR at tiny batches (small_batch.py) and sparse communication
# (sparse_communication.py).



# ----------------------------------------------------------------------------
# Timing: update cost, top-k selection, step and harness throughput, the
# batch-size test's cost, the accelerator check.



if __name__ == "__main__":
  sys.exit(main())
