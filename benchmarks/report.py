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


# ----------------------------------------------------------------------------
# Timing: update cost, top-k selection, step and harness throughput, the
# batch-size test's cost, the accelerator check.



if __name__ == "__main__":
  sys.exit(main())
