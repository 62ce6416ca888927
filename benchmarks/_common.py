"""What every benchmark shares: host devices, the machine, timing, results.

A benchmark script starts with

  import _common

  _common.force_host_devices(8)  # only where it needs several devices

  import jax  # noqa: E402

(`python benchmarks/<name>.py` puts `benchmarks/` first on `sys.path`, from
any working directory). Nothing here imports JAX at import time, so the
devices can still be forced after `import _common`.
"""

import dataclasses
import json
import mmap
import os
import pathlib
import platform
import resource
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository's
RESULTS = ROOT / "benchmarks" / "results"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def force_host_devices(count: int, cpu_only: bool = False) -> None:
  """Makes the host CPU show `count` XLA devices; call before importing jax.

  Args:
    count: how many CPU devices to simulate.
    cpu_only: also run on the CPU where an accelerator exists (sets
      `JAX_PLATFORMS=cpu` unless the environment already chose).

  Raises:
    RuntimeError: if jax is already imported (the flag would be ignored).
  """
  if "jax" in sys.modules:
    raise RuntimeError("force_host_devices must run before `import jax`")
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith(_DEVICE_COUNT_FLAG + "=")]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={count}"])
  if cpu_only:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


# ----------------------------------------------------------------------------
# The machine.


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      for line in cpuinfo:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
          return value.strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _package_version(name: str) -> str | None:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def machine_description() -> dict[str, Any]:
  """What the timings depend on: CPU, cores, load now, JAX and its devices."""
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  return {
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      # The cores this process may run on (`taskset` pins them).
      "cpu_affinity": sorted(os.sched_getaffinity(0)),
      "load_average": list(os.getloadavg()),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": _package_version("jaxlib"),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "first_touch_ms": first_touch_ms(),
  }


def first_touch_ms(nbytes: int = 16 * 2**20, repeats: int = 3
                   ) -> dict[str, float]:
  """Milliseconds to write `nbytes` of freshly mapped memory, and to write
  them again (medians of `repeats`).

  The first write takes a page fault per page. Where that costs many times a
  write (in some virtual machines), a program whose temporaries are mapped
  afresh at every call (XLA:CPU's, once above glibc's 32 MiB mmap
  threshold) pays it at every step (`faulted_mib_per_call`).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  first, again = [], []
  for _ in range(repeats):
    with mmap.mmap(-1, nbytes) as buffer:
      view = np.frombuffer(buffer, np.uint8)
      start = time.perf_counter()
      view.fill(1)
      middle = time.perf_counter()
      view.fill(2)
      first.append(middle - start)
      again.append(time.perf_counter() - middle)
      del view
  return {"mib": nbytes / 2**20, "first": 1e3 * statistics.median(first),
          "again": 1e3 * statistics.median(again)}


def machine_line(machine: Mapping[str, Any]) -> str:
  """A one-line summary of `machine_description()` for printed reports."""
  load = ", ".join(f"{x:.1f}" for x in machine["load_average"])
  return (f"{machine['device_count']} x {machine['device_kind']} "
          f"({machine['backend']}); {machine['cpu_count']} CPU cores "
          f"({machine['cpu_model']}); load average {load}; jax "
          f"{machine['jax']}, jaxlib {machine['jaxlib']}")


def command_line(args=None, exclude: Sequence[str] = ()) -> str:
  """The command that ran this script.

  Args:
    args: parsed `argparse` arguments: spell out every option (defaults
      included) but those in `exclude`, unset ones (None, a `store_true`
      flag left off) and flags set without a value; None: the command line
      as typed.
    exclude: destinations of `args` to leave out.
  """
  script = "python benchmarks/" + pathlib.Path(sys.argv[0]).name
  if args is None:
    return " ".join([script, *map(shlex.quote, sys.argv[1:])])
  words = [script]
  for name, value in vars(args).items():
    flag = f"--{name.replace('_', '-')}"
    if name in exclude or value is None or value is False:
      continue
    if value is True:  # a `store_true` flag takes no value
      words.append(flag)
      continue
    values = value if isinstance(value, (list, tuple)) else [value]
    words += [flag, *map(shlex.quote, map(_from_repository, values))]
  return " ".join(words)


def _from_repository(value: Any) -> str:
  """`value` as text; a path inside the repository relative to its root, so
  that a default such as `RESULTS / "x.json"` reads the same on any machine."""
  if isinstance(value, pathlib.Path) and value.is_relative_to(ROOT):
    return str(value.relative_to(ROOT))
  return str(value)


# ----------------------------------------------------------------------------
# Timing.


def seconds_per_call(function: Callable[[], Any],
                     calls: int = 1) -> tuple[float, float]:
  """(wall, CPU) seconds per call of `calls` calls of `function()`.

  Blocks on the last result only, so consecutive calls overlap as they do in
  a training loop. CPU time is this process's, all threads.
  """
  import jax  # pylint: disable=import-outside-toplevel
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(calls):
    result = function()
  jax.block_until_ready(result)
  return ((time.perf_counter() - wall) / calls,
          (time.process_time() - cpu) / calls)


def faulted_mib_per_call(function: Callable[[], Any], calls: int = 3) -> float:
  """MiB of memory first touched per call of `function()`: this process's
  minor page faults times the page size (see `first_touch_ms`)."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(function())
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    result = function()
  jax.block_until_ready(result)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  return faults * resource.getpagesize() / calls / 2**20


def temp_mib(compiled) -> float | None:
  """XLA's temporary buffer of a compiled program, in MiB (None where the
  backend does not say)."""
  analysis = compiled.memory_analysis()
  return None if analysis is None else analysis.temp_size_in_bytes / 2**20


@dataclasses.dataclass(frozen=True)
class Timings:
  """Seconds per call of each contender, one entry per round."""

  wall: dict[str, list[float]]
  cpu: dict[str, list[float]]

  def medians(self, cpu: bool = False) -> dict[str, float]:
    """Median wall (or, with `cpu`, CPU) seconds per call of each contender."""
    times = self.cpu if cpu else self.wall
    return {name: statistics.median(values) for name, values in times.items()}

  def ratios(self, name: str, baseline: str, cpu: bool = False) -> list[float]:
    """`name`'s time over `baseline`'s of the same round, for each round."""
    times = self.cpu if cpu else self.wall
    return [t / b for t, b in zip(times[name], times[baseline])]

  def median_ratio(self, name: str, baseline: str, cpu: bool = False) -> float:
    """Median of the per-round ratios (robust to load that drifts)."""
    return statistics.median(self.ratios(name, baseline, cpu))


def flops(compiled) -> float:
  """XLA's cost-analysis FLOPs of a compiled function."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return float(analysis.get("flops", 0.0))


def time_interleaved(functions: Mapping[str, Callable[[], Any]], repeats: int,
                     calls: int = 1, min_seconds: float = 0.0) -> Timings:
  """Times zero-argument `functions` in rounds, one turn of each per round.

  Interleaving makes a slow spell of a shared machine hit every contender
  alike. Each function is first called once (compilation) and, with
  `min_seconds`, timed once to choose its number of calls per turn.

  Args:
    functions: name -> a callable whose result `jax.block_until_ready`
      accepts; a stateful step keeps its state in a closure.
    repeats: rounds.
    calls: calls per turn (at least).
    min_seconds: a turn lasts at least about this long, so that cheap calls
      are timed over enough of them to average out scheduling noise.

  Returns:
    `Timings` with `repeats` entries per contender.
  """
  turn_calls = {}
  for name, function in functions.items():
    seconds_per_call(function)  # compile, warm up
    turn_calls[name] = calls
    if min_seconds:
      one_call = seconds_per_call(function)[0]
      turn_calls[name] = max(calls, int(min_seconds / one_call))
  wall = {name: [] for name in functions}
  cpu = {name: [] for name in functions}
  for _ in range(repeats):
    for name, function in functions.items():
      wall_seconds, cpu_seconds = seconds_per_call(function, turn_calls[name])
      wall[name].append(wall_seconds)
      cpu[name].append(cpu_seconds)
  return Timings(wall, cpu)


# ----------------------------------------------------------------------------
# Results: JSON, PNG, Markdown.


def timing_record(benchmark: str, *, claim: str, command: str,
                  machine: Mapping[str, Any], budget: Mapping[str, Any],
                  contenders: Sequence[str] = (), **measurements) -> dict:
  """The results JSON of a timing benchmark: the engine's common top level
  (`sweep.results_record`: no search, so `trial_budget=None`) plus its
  measurements.

  Args:
    benchmark: the script's name, as in `benchmarks/results/<name>.json`.
    claim: what the timings are to show.
    command: the command that ran (`command_line(args)`).
    machine: `machine_description()` taken before the first timing; the
      load average now is added to it as `load_average_end`.
    budget: the sizes and repeats measured.
    contenders: the names of what was timed (`{"name": ...}` each).
    **measurements: the benchmark's own fields (its `rows`, ...).
  """
  from sngm_optax.harness import sweep  # pylint: disable=import-outside-toplevel
  machine = dict(machine, load_average_end=list(os.getloadavg()))
  return sweep.results_record(
      benchmark, claim=claim, command=command, machine=machine,
      budget=budget, contenders=[{"name": name} for name in contenders],
      trial_budget=None, **measurements)


def legacy_timing_record(old: Mapping[str, Any], *, benchmark: str,
                         claim: str, command: str, budget_keys: Sequence[str],
                         code_version: str, converted_from: str,
                         contenders: Sequence[str] = (),
                         machine_at_end: bool = True) -> dict:
  """A timing JSON written before the engine, in `timing_record`'s form.

  The measurements are kept as they were; `code_version` is the commit that
  produced the old file, and `converted_from` names it (`path@commit`).

  Args:
    old: the old file's payload.
    benchmark, claim, command, contenders: as in `timing_record` (`command`
      as the old file or benchmarks/README.md recorded it).
    budget_keys: the old top-level fields that are the budget (sizes,
      repeats); they move into `budget`.
    code_version: the commit the old file was measured at.
    converted_from: `<old file>@<the commit that committed it>`.
    machine_at_end: the old script described the machine after its timings,
      so its load average is the one at the end.
  """
  from sngm_optax.harness import sweep  # pylint: disable=import-outside-toplevel
  old = dict(old)
  described = old.pop("machine", None)
  machine = (dict(described) if isinstance(described, Mapping)
             else {"description": described})
  for key in ("cpu_count", "jax", "backend"):
    if key in old:
      machine.setdefault(key, old.pop(key))
  if "load_average" in machine and machine_at_end:
    machine["load_average_end"] = machine.pop("load_average")
  if "load_average" in old:
    machine["load_average_end"] = list(old.pop("load_average"))
  if "load_average_start" in old:
    machine["load_average"] = list(old.pop("load_average_start"))
  if "load_average_end" in old:
    machine["load_average_end"] = list(old.pop("load_average_end"))
  old.pop("benchmark", None)
  old.pop("command", None)
  budget = {key: old.pop(key) for key in budget_keys if key in old}
  record = sweep.results_record(
      benchmark, claim=claim, command=command, machine=machine,
      budget=budget, contenders=[{"name": name} for name in contenders],
      trial_budget=None, **old)
  record["code_version"] = code_version
  record["converted_from"] = converted_from
  return record


def load_text(machine: Mapping[str, Any]) -> str:
  """The load average (1, 5, 15 min) a timing JSON recorded, as words, and
  the cores it was pinned to, if any."""
  def triple(values):
    return ", ".join(f"{value:.1f}" for value in values)
  start, end = machine.get("load_average"), machine.get("load_average_end")
  if start and end:
    text = (f"load average {triple(start)} at the start, {triple(end)} at "
            "the end (1, 5, 15 min)")
  elif start or end:
    text = (f"load average {triple(start or end)} (1, 5, 15 min) at the "
            f"{'start' if start else 'end'}")
  else:
    text = "no load average recorded"
  cores = machine.get("cpu_affinity")
  if cores and len(cores) < machine.get("cpu_count", 0):
    text += f"; pinned to core {', '.join(map(str, cores))}"
  return text


def times_less(before: float, after: float) -> float:
  """How many times smaller `after` is than `before` (a cross-run figure,
  e.g. an overhead before and after a fix)."""
  return before / after


def write_json(path: str | os.PathLike, payload: Any) -> pathlib.Path:
  """Writes `payload` as indented JSON, creating parent directories."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
  return path


def pyplot():
  """`matplotlib.pyplot` on the file-only Agg backend; None if not installed."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("matplotlib is not installed: no figure", file=sys.stderr)
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot  # pylint: disable=import-outside-toplevel
  return matplotlib.pyplot


def save_figure(figure, path: str | os.PathLike, dpi: int = 120) -> None:
  """Lays out `figure`, writes it to `path` (a PNG) and closes it."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.tight_layout()
  figure.savefig(path, dpi=dpi)
  pyplot().close(figure)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: str = "") -> str:
  """A Markdown table of preformatted cells.

  Args:
    header: the column titles.
    rows: one sequence of cells per row (`str()` of each).
    align: one letter per column, `l` (default) or `r` (numbers).
  """
  align = align.ljust(len(header), "l")
  rule = ["---:" if letter == "r" else "---" for letter in align]
  return "\n".join(map(markdown_row, [header, rule, *rows]))


def markdown_row(cells: Sequence[Any]) -> str:
  """One row of a Markdown table (printed as soon as it is measured)."""
  return "| " + " | ".join(map(str, cells)) + " |"
