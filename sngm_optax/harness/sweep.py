"""The experiment engine: runs, a run store, searches, seeds and verdicts.

Every benchmark and `compare` describe their experiment as contenders (a
name, base settings, a search space) and leave the rest to this module:

- `Run`: one training run, in one schema: its `settings` (everything that
  defines it, the budget included), `code_version`, the evaluation `curve`,
  the `final` metrics, a `status` and its run and compile time apart.
- Status: `ok`; `diverged` (the loss went non-finite); `collapsed` (it
  finished, but its final validation accuracy is within `CHANCE_MARGIN` of
  chance). A run that is not `ok` is never picked; reports count both kinds
  as collapsed runs (`count_collapsed`).
- `RunStore`: runs by `run_key(settings)`, appended to a JSON-lines file as
  they end, so a stopped benchmark resumes where it stopped. The file
  declares its budget (epochs, data, ...) on its first line; a store of
  another budget, or a run whose settings disagree with it, is refused.
- Searches: `Grid` (the grid with edge extension: a pick on an edge adds a
  value past it), `AxisByAxis` (such a grid searched one axis at a time)
  and `QuasiRandom` (scrambled Halton points over declared
  ranges, `scipy.stats.qmc`). Each has a declared `trial_budget`, the most
  runs it may train, recorded with the result; a comparison gives every
  contender the same one (`check_same_budget`).
- `tune`: a contender's search, its pick rerun on more seeds, and the
  summary of the pick's seeds; `rerun`: a given point on the seeds, with no
  search (another contender's pick on another budget). `tune_together`:
  `tune` with a search's points trained first, together
  (`VmappedTrainer`: the missing ones as vmapped trials, one compiled
  program, `RunStore.run_together`).
- `summarize` (mean ± sd over seeds) and `verdict`, the one rule for "A beats
  B" that every report uses (`SPREAD_RULE`).

This module needs no JAX: reports import it to read results. Only
`train_config` (the harness's runner) imports the training loop.

Example:
  >>> from sngm_optax.harness import sweep
  >>> grid = sweep.Grid({"learning_rate": [0.1, 0.2, 0.4]},
  ...                   max_extensions=2)
  >>> def train(point, seed):  # a stand-in for a training run
  ...   score = 1.0 - abs(point["learning_rate"] - 0.8)
  ...   return sweep.Run.finished(dict(point, seed=seed),
  ...                             {"val_accuracy": score}, num_classes=10)
  >>> result = sweep.tune("toy", train, grid, seeds=(0,))
  >>> result["pick"]["point"], result["search"]["trials_used"]
  ({'learning_rate': 0.8}, 5)
"""

import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import math
import os
import pathlib
import statistics
import subprocess
from typing import Any, Callable, Iterable, Mapping, Sequence

SCHEMA_VERSION = 1
OK, DIVERGED, COLLAPSED = "ok", "diverged", "collapsed"
# A final validation accuracy at most this far above chance is a collapse.
CHANCE_MARGIN = 0.05

SPREAD_RULE = (
    "A beats B when A's mean is better than B's by more than the sum of "
    "their two seed standard deviations (each over at least 2 seeds); a "
    "smaller difference is level; with fewer than 2 seeds on either side "
    "there is no verdict.")

# Config fields that do not change what a run computes: left out of its key.
NOT_IN_KEY = ("cache_dir", "checkpoint_dir", "checkpoint_every_steps",
              "checkpoint_at_epoch_end", "keep_checkpoints", "max_steps")
# Config fields added after runs were stored: left out of a run's settings
# while at this value (their default), so that stored runs keep their keys.
KEY_UNLESS = {"evals_per_epoch": 1, "monitor_noise_scale": False}


# ----------------------------------------------------------------------------
# Runs.


def canonical_json(value: Any) -> str:
  """`value` as JSON with sorted keys and no spaces: the text a key hashes."""
  return json.dumps(value, sort_keys=True, separators=(",", ":"))


def run_key(settings: Mapping[str, Any]) -> str:
  """The store key of a run: a hash of all its settings, budget included."""
  return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
  """`git describe` of the checkout this module is in ("+dirty" with
  uncommitted changes), else the package version."""
  here = pathlib.Path(__file__).resolve().parent
  try:
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty=+dirty", "--abbrev=12"],
        cwd=here, capture_output=True, text=True, timeout=10, check=True)
    return described.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    from sngm_optax import __version__  # pylint: disable=g-import-not-at-top
    return __version__


def chance_accuracy(num_classes: int) -> float:
  return 1.0 / num_classes


def status_of(final: Mapping[str, Any] | None, num_classes: int) -> str:
  """`ok`, or `collapsed` for a final validation accuracy (test accuracy
  without a validation split) within `CHANCE_MARGIN` of chance, or for no
  final metrics at all."""
  if not final:
    return COLLAPSED
  accuracy = final.get("val_accuracy")
  if accuracy is None:
    accuracy = final.get("test_accuracy")
  if accuracy is None or not math.isfinite(accuracy):
    return COLLAPSED
  return (COLLAPSED if accuracy <= chance_accuracy(num_classes)
          + CHANCE_MARGIN else OK)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run, as the store keeps it (`to_json` / `from_json`)."""

  settings: dict
  status: str
  final: dict | None = None
  curve: list = dataclasses.field(default_factory=list)
  run_time_s: float = 0.0
  compile_time_s: float = 0.0
  code_version: str = ""
  error: str | None = None
  # Benchmark-specific results (bytes sent, batch sizes, ...).
  extra: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.status not in (OK, DIVERGED, COLLAPSED):
      raise ValueError(f"status must be {OK!r}, {DIVERGED!r} or "
                       f"{COLLAPSED!r}, got {self.status!r}")

  @property
  def key(self) -> str:
    return run_key(self.settings)

  @property
  def ok(self) -> bool:
    return self.status == OK

  def metric(self, name: str) -> float | None:
    """A final metric, None for a run that is not `ok` or lacks it."""
    if not self.ok or self.final is None:
      return None
    return self.final.get(name)

  @classmethod
  def finished(cls, settings: Mapping[str, Any], final: Mapping[str, Any],
               num_classes: int, **fields) -> "Run":
    """A run that trained to its end: `ok` or `collapsed` by `status_of`."""
    return cls(dict(settings), status_of(final, num_classes), dict(final),
               **fields)

  @classmethod
  def diverged(cls, settings: Mapping[str, Any], error: str,
               **fields) -> "Run":
    return cls(dict(settings), DIVERGED, None, error=error, **fields)

  def to_json(self) -> dict:
    return {"schema": SCHEMA_VERSION, "key": self.key,
            **dataclasses.asdict(self)}

  @classmethod
  def from_json(cls, payload: Mapping[str, Any]) -> "Run":
    if payload.get("schema") != SCHEMA_VERSION:
      raise ValueError(f"run record of schema {payload.get('schema')!r}, "
                       f"expected {SCHEMA_VERSION}")
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in payload.items() if k in names})


def count_collapsed(runs: Iterable[Run]) -> int:
  """Runs that diverged or collapsed."""
  return sum(not run.ok for run in runs)


# ----------------------------------------------------------------------------
# The run store.


class DeadlineReached(Exception):
  """A new run would start after the store's `stop_after`."""


class RunStore:
  """Runs by key, in memory and (with a path) in a JSON-lines file.

  The first line of the file is `{"budget": ...}`; every other line is a
  `Run.to_json()`, appended as the run ends (a stop loses at most the run
  in progress). Reopening the file resumes: `run` returns a stored run
  instead of training it again.

  Args:
    path: the file, or None for a store in memory only.
    budget: the settings every run of the store shares (epochs, data, model,
      ...). A file written with another budget is refused, and so is a run
      whose settings hold one of these keys with another value.
    stop_after: no new run starts after this time (`DeadlineReached`).
  """

  def __init__(self, path: str | os.PathLike | None,
               budget: Mapping[str, Any],
               stop_after: datetime.datetime | None = None):
    self.path = None if path is None else pathlib.Path(path)
    self.budget = json.loads(canonical_json(dict(budget)))
    self.stop_after = stop_after
    self._runs: dict[str, Run] = {}
    if self.path is not None and self.path.exists():
      self._load()

  def _load(self) -> None:
    lines = self.path.read_text().splitlines()
    header = json.loads(lines[0]) if lines else {}
    if header.get("budget") != self.budget:
      saved = header.get("budget") or {}
      changed = sorted(k for k in set(saved) | set(self.budget)
                       if saved.get(k) != self.budget.get(k))
      raise ValueError(
          f"{self.path} holds runs of another budget (differs in "
          f"{', '.join(changed) or 'its header'}): use another store path")
    for number, line in enumerate(lines[1:], start=2):
      try:
        run = Run.from_json(json.loads(line))
      except (json.JSONDecodeError, TypeError, ValueError):
        if number == len(lines):  # a run cut off mid-write by a stop
          continue
        raise ValueError(f"{self.path}:{number}: not a run record") from None
      self._runs[run.key] = run

  def __len__(self) -> int:
    return len(self._runs)

  def __iter__(self):
    return iter(self._runs.values())

  def get(self, settings: Mapping[str, Any]) -> Run | None:
    return self._runs.get(run_key(settings))

  def check_budget(self, settings: Mapping[str, Any]) -> None:
    """Raises ValueError when `settings` disagree with the store's budget."""
    settings = json.loads(canonical_json(dict(settings)))
    changed = [f"{k}={settings[k]!r} (budget {v!r})"
               for k, v in self.budget.items()
               if k in settings and settings[k] != v]
    if changed:
      raise ValueError("a run of another budget in this store: "
                       + ", ".join(changed))

  def put(self, run: Run) -> None:
    self.check_budget(run.settings)
    self._runs[run.key] = run
    if self.path is None:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    new = not self.path.exists() or self.path.stat().st_size == 0
    with open(self.path, "a", encoding="utf-8") as file:
      if new:
        file.write(canonical_json({"budget": self.budget}) + "\n")
      file.write(json.dumps(run.to_json(), allow_nan=True) + "\n")
      file.flush()
      os.fsync(file.fileno())

  def _check_deadline(self) -> None:
    if (self.stop_after is not None and
        datetime.datetime.now(datetime.timezone.utc) > self.stop_after):
      raise DeadlineReached(f"not started after {self.stop_after:%H:%M} UTC")

  def run_together(self, settings: Sequence[Mapping[str, Any]],
                   train: Callable[[list[dict]], list[Run]]) -> list[Run]:
    """`run` for many settings at once: the stored runs, and the missing
    ones (each once) trained by one call `train(missing settings)`, which
    returns their runs in order (vmapped trials, see `trials`)."""
    for each in settings:
      self.check_budget(each)
    missing = {}
    for each in settings:
      if self.get(each) is None:
        missing.setdefault(run_key(each), dict(each))
    if missing:
      self._check_deadline()
      runs = train(list(missing.values()))
      if [run.key for run in runs] != list(missing):
        raise ValueError("train(settings) returned runs of other settings")
      for run in runs:
        self.put(run)
    return [self.get(each) for each in settings]

  def run(self, settings: Mapping[str, Any],
          train: Callable[[dict], Run]) -> Run:
    """The stored run of `settings`, else `train(settings)`, stored."""
    self.check_budget(settings)
    found = self.get(settings)
    if found is not None:
      return found
    self._check_deadline()
    run = train(dict(settings))
    if run.key != run_key(settings):
      raise ValueError("train(settings) returned a run of other settings")
    self.put(run)
    return run


# ----------------------------------------------------------------------------
# Searches.


def _sig3(value: float) -> float:
  return float(f"{value:.3g}")


@dataclasses.dataclass(frozen=True)
class Grid:
  """Every point of a grid; a pick on an edge extends the grid past it.

  When the best point lies at the smallest or largest value of an axis of
  2 or more values, that axis gets one more value in that direction (the
  ratio of its two outermost values again, 3 significant digits), the new
  points are trained and the search repeats, at most `max_extensions`
  times per axis and direction and never past `trial_budget` runs. A pick
  still on an edge is reported in `on_edge`: the grid did not bracket it.

  Attributes:
    axes: setting name -> its values (positive).
    max_extensions: extensions per axis and direction.
    trial_budget: the most runs of the search (default: the initial grid
      plus every allowed extension).
  """

  axes: Mapping[str, Sequence[float]]
  max_extensions: int = 0
  trial_budget: int | None = None

  def __post_init__(self):
    for name, values in self.axes.items():
      if not values or min(values) <= 0:
        raise ValueError(f"axes[{name!r}] must be non-empty and positive, got "
                         f"{values!r}")
    if self.max_extensions < 0:
      raise ValueError("max_extensions must be >= 0, got "
                       f"{self.max_extensions!r}")
    if self.trial_budget is not None and self.trial_budget < math.prod(
        len(values) for values in self.axes.values()):
      raise ValueError(f"trial_budget={self.trial_budget} is smaller than "
                       "the initial grid")

  @property
  def budget(self) -> int:
    """`trial_budget`, else the grid's size after every allowed extension."""
    if self.trial_budget is not None:
      return self.trial_budget
    return math.prod(len(v) + (2 * self.max_extensions if len(v) > 1 else 0)
                     for v in self.axes.values())

  def describe(self) -> dict:
    return {"kind": "grid", "axes": {k: list(v) for k, v in self.axes.items()},
            "max_extensions": self.max_extensions,
            "trial_budget": self.budget}

  def search(self, score: Callable[[dict], float | None]) -> dict:
    """Maximizes `score(point)` (None: a failed run, never picked)."""
    names = list(self.axes)
    axes = [sorted(float(v) for v in self.axes[name]) for name in names]
    scores, extended, used = {}, [], {}
    budget = self.budget
    while True:
      for values in itertools.product(*axes):
        if values not in scores:
          scores[values] = score(dict(zip(names, values)))
      finished = [p for p, value in scores.items() if value is not None]
      best = (max(finished, key=lambda p: scores[p]) if finished else None)
      edges = [] if best is None else [
          (axis, -1 if best[axis] == values[0] else +1)
          for axis, values in enumerate(axes)
          if len(values) > 1 and best[axis] in (values[0], values[-1])]
      todo, sizes = [], [len(values) for values in axes]
      for axis, direction in edges:
        grown = sizes[:axis] + [sizes[axis] + 1] + sizes[axis + 1:]
        if (used.get((axis, direction), 0) < self.max_extensions
            and math.prod(grown) <= budget):
          todo.append((axis, direction))
          sizes = grown
      if not todo:
        return _search_result(self.describe(), names, scores, best,
                              extended, [names[a] for a, _ in edges])
      for axis, direction in todo:
        used[(axis, direction)] = used.get((axis, direction), 0) + 1
        values = axes[axis]
        if direction > 0:
          value = _sig3(values[-1] * values[-1] / values[-2])
          axes[axis] = values + [value]
        else:
          value = _sig3(values[0] * values[0] / values[1])
          axes[axis] = [value] + values
        extended.append({names[axis]: value})


@dataclasses.dataclass(frozen=True)
class AxisByAxis:
  """A grid searched one axis at a time, each axis as a `Grid` with edge
  extension.

  The first axis is searched with every other axis at its middle value
  (the upper middle of an even count), the next at the best value found so
  far, and so on: far fewer runs than the whole product when each axis
  extends. Each point is trained once, so `trial_budget` is the sum of the
  axes' `Grid` budgets less the point each later axis shares with the
  previous one.

  Attributes:
    axes: setting name -> its values (positive), searched in this order.
    max_extensions: extensions per axis and direction.
  """

  axes: Mapping[str, Sequence[float]]
  max_extensions: int = 0

  def __post_init__(self):
    Grid(self.axes, self.max_extensions)  # the same checks

  def _grid(self, name: str) -> Grid:
    return Grid({name: self.axes[name]}, self.max_extensions)

  @property
  def budget(self) -> int:
    return sum(self._grid(name).budget for name in self.axes) - (
        len(self.axes) - 1)

  def describe(self) -> dict:
    return {"kind": "axis_by_axis",
            "axes": {k: list(v) for k, v in self.axes.items()},
            "max_extensions": self.max_extensions,
            "trial_budget": self.budget}

  def search(self, score: Callable[[dict], float | None]) -> dict:
    names = list(self.axes)
    current = {}
    for name in names:
      values = sorted(float(v) for v in self.axes[name])
      current[name] = values[len(values) // 2]
    scores, extended, on_edge, best = {}, [], [], None

    def scored(point):
      values = tuple(point[name] for name in names)
      if values not in scores:
        scores[values] = score(dict(point))
      return scores[values]

    for name in names:
      stage = self._grid(name).search(
          functools.partial(lambda fixed, point: scored({**fixed, **point}),
                            dict(current)))
      extended += stage["search"]["extended"]
      if stage["best"] is None:
        best = None
        break
      current[name] = stage["best"][name]
      on_edge += stage["search"]["on_edge"]
      best = tuple(current[n] for n in names)
    return _search_result(self.describe(), names, scores, best, extended,
                          on_edge)


@dataclasses.dataclass(frozen=True)
class Range:
  """A search range: `[low, high]`, sampled uniformly in log space when
  `log` (learning rates, weight decays), else linearly."""

  low: float
  high: float
  log: bool = True

  def __post_init__(self):
    if not (self.low < self.high) or (self.log and self.low <= 0):
      raise ValueError(f"Range needs low < high (and low > 0 when log), got "
                       f"{self.low!r}, {self.high!r}")

  def value(self, unit: float) -> float:
    """The point at `unit` in [0, 1) of this range, 3 significant digits."""
    if self.log:
      low, high = math.log(self.low), math.log(self.high)
      return _sig3(math.exp(low + unit * (high - low)))
    return _sig3(self.low + unit * (self.high - self.low))

  def unit(self, value: float) -> float:
    """Where `value` lies in this range, 0 at `low` and 1 at `high`."""
    if self.log:
      return ((math.log(value) - math.log(self.low))
              / (math.log(self.high) - math.log(self.low)))
    return (value - self.low) / (self.high - self.low)


# A pick within this fraction of a range's width (log width when `log`) from
# one of its ends is reported as an edge pick.
EDGE_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class QuasiRandom:
  """`trial_budget` scrambled Halton points over declared ranges.

  Halton points cover the box evenly for any number of trials (Sobol points
  need a power of two); the scrambling `seed` makes them reproducible. A
  pick within `EDGE_FRACTION` of an end of a range is reported in
  `on_edge`: the range may not bracket the best value.

  Attributes:
    ranges: setting name -> `Range`.
    trial_budget: the number of trials.
    seed: the scrambling seed.
  """

  ranges: Mapping[str, Range]
  trial_budget: int
  seed: int = 0

  def __post_init__(self):
    if not self.ranges:
      raise ValueError("ranges must name at least one setting")
    if not isinstance(self.trial_budget, int) or self.trial_budget < 1:
      raise ValueError(f"trial_budget must be a positive integer, got "
                       f"{self.trial_budget!r}")

  @property
  def budget(self) -> int:
    return self.trial_budget

  def points(self) -> list[dict]:
    """The trials' settings, in the order they are trained."""
    from scipy.stats import qmc  # pylint: disable=g-import-not-at-top
    names = list(self.ranges)
    units = qmc.Halton(d=len(names), scramble=True, seed=self.seed).random(
        self.trial_budget)
    return [{name: self.ranges[name].value(float(u))
             for name, u in zip(names, row)} for row in units]

  def describe(self) -> dict:
    return {"kind": "quasi_random", "sequence": "halton (scrambled)",
            "seed": self.seed, "trial_budget": self.trial_budget,
            "ranges": {k: dataclasses.asdict(v)
                       for k, v in self.ranges.items()}}

  def search(self, score: Callable[[dict], float | None]) -> dict:
    names = list(self.ranges)
    scores = {}
    for point in self.points():
      values = tuple(point[name] for name in names)
      if values not in scores:  # two trials rounded to the same point
        scores[values] = score(point)
    finished = [p for p, value in scores.items() if value is not None]
    best = max(finished, key=lambda p: scores[p]) if finished else None
    on_edge = [] if best is None else [
        name for name, value in zip(names, best)
        if min(self.ranges[name].unit(value),
               1 - self.ranges[name].unit(value)) < EDGE_FRACTION]
    return _search_result(self.describe(), names, scores, best, [], on_edge)


@dataclasses.dataclass(frozen=True)
class Recorded:
  """A search that already ran, replayed: its points in the order trained.

  For converting results written before the engine: `tune` with a
  `Recorded` search and a `train` that reads the converted runs from a
  store gives the same result record (and the engine's pick, which never
  takes a failed run) as a search run today. A pick at the smallest or
  largest value tried on an axis of 2 or more values is reported in
  `on_edge`.

  Attributes:
    described: the declared search space as its `describe()` gave it (the
      `trial_budget` included).
    points: every point trained, in order.
    extended: the values added past an edge, as `Grid` reports them.
  """

  described: Mapping[str, Any]
  points: Sequence[Mapping[str, float]]
  extended: Sequence[Mapping[str, float]] = ()

  def __post_init__(self):
    if not self.points or "trial_budget" not in self.described:
      raise ValueError("Recorded needs points and a described trial_budget")

  @property
  def budget(self) -> int:
    return self.described["trial_budget"]

  def describe(self) -> dict:
    return dict(self.described)

  def search(self, score: Callable[[dict], float | None]) -> dict:
    names = list(self.points[0])
    scores = {}
    for point in self.points:
      values = tuple(point[name] for name in names)
      if values not in scores:
        scores[values] = score(dict(point))
    finished = [p for p, value in scores.items() if value is not None]
    best = max(finished, key=lambda p: scores[p]) if finished else None
    tried = [sorted({p[axis] for p in scores}) for axis in range(len(names))]
    on_edge = [] if best is None else [
        name for axis, name in enumerate(names) if len(tried[axis]) > 1
        and best[axis] in (tried[axis][0], tried[axis][-1])]
    return _search_result(self.describe(), names, scores, best,
                          [dict(e) for e in self.extended], on_edge)


def _search_result(described, names, scores, best, extended,
                   on_edge) -> dict:
  """A search's outcome: the declared space with what it used, every
  (point, score) in the order trained, and the best point."""
  return {
      "search": {**described, "trials_used": len(scores),
                 "extended": extended, "on_edge": on_edge},
      "scores": [(dict(zip(names, point)), value)
                 for point, value in scores.items()],
      "best": None if best is None else dict(zip(names, best)),
  }


Search = Grid | AxisByAxis | QuasiRandom | Recorded


def check_same_budget(searches: Mapping[str, Search]) -> int:
  """The trial budget shared by every contender's search.

  Raises:
    ValueError: two contenders of one comparison have different budgets.
  """
  budgets = {name: search.budget for name, search in searches.items()}
  if len(set(budgets.values())) > 1:
    raise ValueError("every contender of a comparison needs the same trial "
                     f"budget, got {budgets}")
  return next(iter(budgets.values()))


# ----------------------------------------------------------------------------
# Summaries and the verdict rule.


@dataclasses.dataclass(frozen=True)
class Summary:
  """Mean and sample standard deviation (ddof 1; 0 for one value)."""

  mean: float
  sd: float
  n: int

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def summarize(values: Iterable[float | None]) -> Summary | None:
  """The `Summary` of the values that are not None; None if there are none."""
  values = [float(v) for v in values if v is not None]
  if not values:
    return None
  sd = statistics.stdev(values) if len(values) > 1 else 0.0
  return Summary(statistics.fmean(values), sd, len(values))


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The outcome of `verdict(a, b)`, as seen from `a`."""

  # "beats", "level", "behind", or "no verdict" (fewer than 2 seeds).
  word: str
  gap: float  # a's mean minus b's (higher is better) or b's minus a's
  spread: float  # the sum of the two standard deviations

  @property
  def decided(self) -> bool:
    return self.word in ("beats", "behind")


def verdict(a: Summary, b: Summary, higher_is_better: bool = True) -> Verdict:
  """`SPREAD_RULE`: does `a` beat `b`, against the seed spread?

  `gap` is how much better `a` is than `b` (positive: better), `spread` the
  sum of their standard deviations.
  """
  gap = (a.mean - b.mean) if higher_is_better else (b.mean - a.mean)
  spread = a.sd + b.sd
  if a.n < 2 or b.n < 2:
    return Verdict("no verdict", gap, spread)
  if gap > spread:
    return Verdict("beats", gap, spread)
  if -gap > spread:
    return Verdict("behind", gap, spread)
  return Verdict("level", gap, spread)


def leader(summaries: Mapping[str, Summary | None],
           higher_is_better: bool = True) -> str | None:
  """The contender that beats every other one by `verdict`, else None (the
  one a table may set in bold)."""
  present = {k: v for k, v in summaries.items() if v is not None}
  if len(present) < 2:
    return None
  sign = 1 if higher_is_better else -1
  best = max(present, key=lambda name: sign * present[name].mean)
  others = [v for k, v in present.items() if k != best]
  if all(verdict(present[best], other, higher_is_better).word == "beats"
         for other in others):
    return best
  return None


# ----------------------------------------------------------------------------
# Tuning a contender.


def tune(name: str, train: Callable[[dict, int], Run], search: Search, *,
         seeds: Sequence[int] = (0,), objective: str = "val_accuracy",
         report: str = "test_accuracy",
         score: Callable[[Run], float | None] | None = None) -> dict:
  """Searches `search` for `name`, then reruns the pick on every seed.

  Args:
    name: the contender's name in the result.
    train: `train(point, seed) -> Run`, the point's settings trained with
      that seed (usually through a `RunStore`, so that it resumes).
    search: a `Grid` or `QuasiRandom`.
    seeds: the pick's seeds; the search runs with the first.
    objective: the final metric the pick maximizes, among `ok` runs.
    report: the final metric summarized over the pick's seeds.
    score: instead of `objective`, a function of the run (None: not
      pickable); the pick maximizes it.

  Returns:
    A JSON-serializable dict: `name`, `search` (the declared space, its
    `trial_budget`, `trials_used`, `extended` and `on_edge`), `trials`
    (each point, its run key, status and score), `collapsed` (trials that
    diverged or collapsed), `pick` (point and run key, None if every trial
    failed), `seeds` (the pick's runs: seed, key, status, `report`) and
    `summary` (of `report` over the pick's ok seeds, None without).
  """
  score = score or (lambda run: run.metric(objective))
  runs = {}

  def scored(point):
    run = train(point, seeds[0])
    runs[canonical_json(point)] = run
    return score(run)

  searched = search.search(scored)
  trials = [{"point": point, "key": runs[canonical_json(point)].key,
             "status": runs[canonical_json(point)].status, "score": value}
            for point, value in searched["scores"]]
  result = {
      "name": name, "search": searched["search"], "objective": objective,
      "trials": trials,
      "collapsed": sum(trial["status"] != OK for trial in trials),
      "pick": None, "seeds": [], "summary": None,
  }
  best = searched["best"]
  if best is None:
    return result
  seed_runs = [(seed, train(best, seed)) for seed in seeds]
  result["pick"] = {"point": best, "key": runs[canonical_json(best)].key}
  result["seeds"] = [{"seed": seed, "key": run.key, "status": run.status,
                      report: run.metric(report)} for seed, run in seed_runs]
  summary = summarize(run.metric(report) for _, run in seed_runs)
  result["summary"] = None if summary is None else summary.to_json()
  return result


def rerun(name: str, train: Callable[[dict, int], Run], point: Mapping[str,
                                                                     Any], *,
          seeds: Sequence[int] = (0,), report: str = "test_accuracy") -> dict:
  """`point` trained on every seed, with no search: a pick taken from
  another contender (the same rate on a longer or shorter budget).

  Returns:
    `tune`'s result without a search: `name`, `pick` (the point, and the
    key of its first seed's run), `seeds`, `collapsed` (seeds that diverged
    or collapsed) and `summary` (of `report` over the ok seeds).
  """
  seed_runs = [(seed, train(dict(point), seed)) for seed in seeds]
  summary = summarize(run.metric(report) for _, run in seed_runs)
  return {
      "name": name, "search": None,
      "pick": {"point": dict(point), "key": seed_runs[0][1].key},
      "seeds": [{"seed": seed, "key": run.key, "status": run.status,
                 report: run.metric(report)} for seed, run in seed_runs],
      "collapsed": count_collapsed(run for _, run in seed_runs),
      "summary": None if summary is None else summary.to_json(),
  }


# ----------------------------------------------------------------------------
# The harness's runner.


def config_settings(config) -> dict:
  """A `Config`'s settings as a run's: every field but `NOT_IN_KEY`, and
  but the fields of `KEY_UNLESS` at their default."""
  settings = dataclasses.asdict(config)
  return {k: v for k, v in settings.items() if k not in NOT_IN_KEY
          and not (k in KEY_UNLESS and v == KEY_UNLESS[k])}


def train_config(config, dataset, *, settings: Mapping[str, Any] | None = None,
                 keep_curve: bool = True, quiet: bool = True) -> Run:
  """Trains `config` with the harness's loop and returns its `Run`.

  A non-finite loss gives a `diverged` run; a finished run is `ok` or
  `collapsed` (`status_of`). The run's settings are `settings` (default
  `config_settings(config)`); its `extra` holds the loop's other results
  (steps, samples seen, bytes sent, the batch sizes of a growing batch).
  """
  from sngm_optax.harness import steps  # pylint: disable=g-import-not-at-top
  from sngm_optax.harness import train  # pylint: disable=g-import-not-at-top
  settings = dict(config_settings(config) if settings is None else settings)
  try:
    result = train.train_and_evaluate(config, dataset=dataset, quiet=quiet,
                                      log_epochs=False)
  except steps.NonFiniteLossError as error:
    return Run.diverged(settings, str(error), code_version=code_version())
  wall = result["wall_time_s"]
  compile_time = result.get("compile_time_s", 0.0)
  final = dict(result["final"] or {})
  final["steps"], final["samples_seen"] = result["steps"], result[
      "samples_seen"]
  extra = {k: v for k, v in result.items()
           if k not in ("config", "history", "final", "wall_time_s",
                        "run_time_s", "compile_time_s")}
  return Run.finished(
      settings, final, dataset.num_classes,
      curve=result["history"] if keep_curve else [],
      run_time_s=wall - compile_time, compile_time_s=compile_time,
      code_version=code_version(), extra=extra)


def harness_trainer(store: RunStore, base, dataset, *,
                    keep_curve: bool = True) -> Callable[[dict, int], Run]:
  """`train(point, seed)` for `tune`: `base` (a `Config`) with the point's
  fields and the seed, trained by `train_config` unless `store` has it."""

  def train(point: dict, seed: int) -> Run:
    config = dataclasses.replace(base, seed=seed, **point)
    return store.run(config_settings(config), lambda _: train_config(
        config, dataset, keep_curve=keep_curve))

  return train


@dataclasses.dataclass(frozen=True)
class VmappedTrainer:
  """`train(point, seed)` for `tune` whose runs are vmapped trials
  (`trials.train_trials`), stored in `store`; `train_together` trains many
  points' missing runs as one program.

  Attributes:
    store: the `RunStore`.
    base: the `Config` the points change.
    dataset: the data.
    options: `train_trials`'s keyword arguments (`eval_every`, `target`,
      `max_steps`, `early_stop`, `test_every_eval`, `warmup_fraction`,
      `trials_per_program`, ...).
  """

  store: RunStore
  base: Any
  dataset: Any
  options: Mapping[str, Any]

  def _config(self, point: Mapping[str, Any], seed: int):
    from sngm_optax.harness import trials  # pylint: disable=g-import-not-at-top
    return trials.trial_config(self.base, dict(point, seed=seed),
                               self.options.get("warmup_fraction"))

  def settings(self, point: Mapping[str, Any], seed: int) -> dict:
    """The run settings of `point` trained with `seed`."""
    from sngm_optax.harness import trials  # pylint: disable=g-import-not-at-top
    options = {k: v for k, v in self.options.items()
               if k in trials.SETTINGS_OPTIONS}
    return trials.trial_settings(self._config(point, seed), **options)

  def train_together(self, points: Sequence[Mapping[str, Any]],
                     seed: int) -> list[Run]:
    """The runs of `points` with `seed`: stored ones read, the missing ones
    trained together (`RunStore.run_together`)."""
    from sngm_optax.harness import trials  # pylint: disable=g-import-not-at-top
    by_key = {run_key(self.settings(point, seed)): point for point in points}

    def train(missing: list[dict]) -> list[Run]:
      chosen = [dict(by_key[run_key(each)], seed=seed) for each in missing]
      return trials.train_trials(self.base, chosen, self.dataset,
                                 **self.options)

    return self.store.run_together(
        [self.settings(point, seed) for point in points], train)

  def __call__(self, point: Mapping[str, Any], seed: int) -> Run:
    return self.train_together([point], seed)[0]


def tune_together(name: str, train: VmappedTrainer, search: QuasiRandom, *,
                  seeds: Sequence[int] = (0,), **tune_options) -> dict:
  """`tune`, with the search's trials trained first, together
  (`train.train_together(search.points(), seeds[0])`: one vmapped program
  for the trials missing from the store), so that the search then reads
  them from the store; the pick's other seeds train one by one.

  Args:
    name, seeds, tune_options: as `tune`'s.
    train: a `VmappedTrainer` (or any `train(point, seed)` with a
      `train_together(points, seed)`).
    search: a search whose points are known in advance (`points()`).
  """
  train.train_together(search.points(), seeds[0])
  return tune(name, train, search, seeds=seeds, **tune_options)


def stored_trainer(store: RunStore, base) -> Callable[[dict, int], Run]:
  """`harness_trainer` that never trains: the run of `base` with the point
  and seed from `store`, KeyError if it lacks it (to replay converted
  results through `tune`, with a `Recorded` search)."""

  def train(point: dict, seed: int) -> Run:
    config = dataclasses.replace(base, seed=seed, **point)
    found = store.get(config_settings(config))
    if found is None:
      raise KeyError(f"{store.path or 'the store'} has no run of {point}, "
                     f"seed {seed}")
    return found

  return train


# ----------------------------------------------------------------------------
# A benchmark's results file.


def results_record(benchmark: str, *, claim: str, command: str,
                   machine: Mapping[str, Any], budget: Mapping[str, Any],
                   contenders: Sequence[Mapping[str, Any]],
                   trial_budget: int | None, **fields) -> dict:
  """The top level of `benchmarks/results/<benchmark>.json`, one schema for
  every benchmark: what it claims, the command and machine, the budget, the
  trial budget every contender shared, the rule of its verdicts and the
  contenders (`tune` results); `fields` adds the benchmark's own."""
  return {
      "schema": SCHEMA_VERSION, "benchmark": benchmark, "claim": claim,
      "code_version": code_version(), "command": command,
      "machine": dict(machine), "budget": dict(budget),
      "trial_budget": trial_budget, "spread_rule": SPREAD_RULE,
      "contenders": list(contenders), **fields}
