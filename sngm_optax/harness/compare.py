"""The main job: SNGM against momentum SGD, LARS and LAMB at a large batch.

Every contender trains the same model for the same number of epochs with a
linear-warmup + cosine learning-rate schedule. Its peak learning rate and
weight decay are picked from a grid of the same size for every optimizer
(`LR_GRIDS`: 3 learning rates x 3 weight decays), by the final accuracy on a
validation split held out from the training set. The experiment runs on the
engine (`sngm_optax.harness.sweep`): each contender's grid is a
`sweep.Grid`, searched by `sweep.tune`, whose pick is never a run that
diverged or collapsed. A pick on an edge of the grid extends the grid by one
value in that direction and the search goes on (`Preset.max_extensions`
times per axis and direction); a pick still on an edge after that is marked
"(grid edge)" in the table, never shown as a plain best. Every contender of
one comparison has the same trial budget (`sweep.check_same_budget`),
recorded in `compare.json`. The table reports the test accuracy of the
picked run, and with extra seeds the mean ± sd of the pick over its seeds.
Every run is kept in `compare_runs.jsonl` beside `compare.json`, so that a
stopped comparison resumes. Momentum SGD at a small batch (128) is the
reference that large-batch training tries to match.

The grids are written down once, below, with the rule that set them. For
another batch size a learning-rate grid is scaled by
`sqrt(batch_size / reference_batch)`, the same rule for every family
(between the linear rule of Goyal et al. for SGD and the batch-size
insensitivity of normalized methods); weight decays are not scaled.

| optimizer | learning rates at B = 4096 | weight decays |
| --- | --- | --- |
| sngm (momentum 0.9) | 0.2, 0.4, 0.8 | 1e-5, 1e-4, 1e-3 (coupled) |
| msgd (momentum 0.9) | 0.125, 0.25, 0.5 | 1e-5, 1e-4, 1e-3 (coupled) |
| lars (trust coefficient 0.001, momentum 0.9) | 20, 40, 80 | 1e-5, 1e-4, 1e-3 |
| lamb | 0.02, 0.04, 0.08 | 1e-3, 1e-2, 1e-1 (decoupled) |
| msgd at B = 128 (not scaled) | 0.1, 0.2, 0.4 | 1e-4 |

The SNGM variants of `VARIANTS` (the paper's, decoupled weight decay,
Nesterov, per-layer normalization) share sngm's learning rates; decoupled
decay uses the decoupled weight decays. The quick preset (`QUICK_GRIDS`)
tunes the learning rate only, on grids centred on its own earlier picks,
with each optimizer's weight decay at the benchmark's pick
(`suggested_weight_decay`). Weight decay applies to the kernels, not the
biases; every run uses the same initialization and batch order.
"""

import dataclasses
import math
import os
import pathlib
import platform
import shlex
import sys
import time

from sngm_optax.harness import data as data_lib
from sngm_optax.harness import sweep


@dataclasses.dataclass(frozen=True)
class LearningRateGrid:
  """Peak learning rates at `reference_batch`; scaled for other batches."""

  values: tuple[float, ...]
  reference_batch: int
  power: float = 0.5
  # The value the benchmark picked at reference_batch: `sngm-optax train`'s
  # default learning rate.
  suggested: float | None = None
  # Weight decays of the 2-D grid (not scaled with the batch), and the one
  # the benchmark picked (the quick preset's fixed value).
  weight_decays: tuple[float, ...] = (1e-4,)
  suggested_weight_decay: float = 1e-4

  def suggested_at(self, batch_size: int) -> float:
    """`suggested` (else the grid's third value) scaled to `batch_size`."""
    value = self.suggested if self.suggested is not None else self.values[2]
    scale = (batch_size / self.reference_batch) ** self.power
    return float(f"{value * scale:.3g}")

  def at(self, batch_size: int, size: int | None = None) -> tuple[float, ...]:
    """The grid for `batch_size`; `size` < len keeps the middle values
    (the upper middle when the count left out is odd)."""
    values = self.values
    if size is not None and size < len(values):
      start = (len(values) - size + 1) // 2
      values = values[start:start + size]
    scale = (batch_size / self.reference_batch) ** self.power
    return tuple(float(f"{value * scale:.3g}") for value in values)


# The grids, written down once. The rule, the same for every optimizer:
# learning rates are 3 values a factor of 2 apart centred on `p`, the value
# the earlier benchmark (30 epochs, 60k examples, weight decay 1e-4, 4-value
# grid) picked at B = 4096 for the optimizer's family; weight decays are 3
# values a factor of 10 apart centred on the conventional value of the
# decay's kind: 1e-4 for L2 decay coupled into the gradient (momentum SGD,
# LARS, the paper's SNGM), 1e-2 for decoupled decay (LAMB, as in its paper;
# SNGM with `decoupled_weight_decay`). A pick on an edge extends the grid by
# one value in that direction (`sweep.Grid`).
_COUPLED_DECAYS = (1e-5, 1e-4, 1e-3)
_DECOUPLED_DECAYS = (1e-3, 1e-2, 1e-1)
LR_GRIDS: dict[str, LearningRateGrid] = {
    "sngm": LearningRateGrid((0.2, 0.4, 0.8), 4096, suggested=0.4,
                             weight_decays=_COUPLED_DECAYS),
    "msgd": LearningRateGrid((0.125, 0.25, 0.5), 4096, suggested=0.25,
                             weight_decays=_COUPLED_DECAYS),
    "lars": LearningRateGrid((20.0, 40.0, 80.0), 4096, suggested=40.0,
                             weight_decays=_COUPLED_DECAYS),
    "lamb": LearningRateGrid((0.02, 0.04, 0.08), 4096, suggested=0.04,
                             weight_decays=_DECOUPLED_DECAYS),
    # SNGM variants (VARIANTS): the same learning rates as sngm.
    "sngm_paper": LearningRateGrid((0.2, 0.4, 0.8), 4096, suggested=0.4,
                                   weight_decays=_COUPLED_DECAYS),
    "sngm_decoupled": LearningRateGrid((0.2, 0.4, 0.8), 4096,
                                       weight_decays=_DECOUPLED_DECAYS),
    "sngm_nesterov": LearningRateGrid((0.2, 0.4, 0.8), 4096,
                                      weight_decays=_COUPLED_DECAYS),
    "sngm_per_layer": LearningRateGrid((0.2, 0.4, 0.8), 4096,
                                       weight_decays=_COUPLED_DECAYS),
    # Not tuned: sgd as msgd, adamw as lamb.
    "sgd": LearningRateGrid((0.125, 0.25, 0.5), 4096),
    "adamw": LearningRateGrid((0.01, 0.02, 0.04), 4096,
                              weight_decays=_DECOUPLED_DECAYS,
                              suggested_weight_decay=1e-2),
}
# The small-batch reference has its own grid (no scaling across 32x).
SMALL_BATCH_GRIDS: dict[str, LearningRateGrid] = {
    "msgd": LearningRateGrid((0.1, 0.2, 0.4), 128, suggested=0.2,
                             weight_decays=_COUPLED_DECAYS),
}
# The quick preset (20 epochs of 16k examples at B = 1024 and 128): the
# same rule, centred on the quick preset's own picks (not scaled from 4096:
# at 1024 the sqrt rule put every pick at the grid's top edge), with each
# optimizer's weight decay fixed at its `suggested_weight_decay`.
QUICK_GRIDS: dict[str, LearningRateGrid] = {
    "sngm": LearningRateGrid((0.2, 0.4, 0.8), 1024),
    "msgd": LearningRateGrid((0.125, 0.25, 0.5), 1024),
    "lars": LearningRateGrid((20.0, 40.0, 80.0), 1024),
    "lamb": LearningRateGrid((0.02, 0.04, 0.08), 1024),
}
QUICK_SMALL_BATCH_GRIDS: dict[str, LearningRateGrid] = {
    "msgd": LearningRateGrid((0.1, 0.2, 0.4), 128),
}
# Contenders that are a registry optimizer with fixed keyword arguments.
_PAPER = {"nesterov": False, "decoupled_weight_decay": False,
          "per_layer": False}
VARIANTS: dict[str, tuple[str, dict]] = {
    "sngm_paper": ("sngm", _PAPER),
    "sngm_decoupled": ("sngm", {**_PAPER, "decoupled_weight_decay": True}),
    "sngm_nesterov": ("sngm", {**_PAPER, "nesterov": True}),
    "sngm_per_layer": ("sngm", {**_PAPER, "per_layer": True}),
}


def suggested_learning_rate(optimizer: str, batch_size: int) -> float:
  """The benchmark's pick for `optimizer`, from the grid whose reference batch
  is nearest to `batch_size` (on a log scale), scaled to `batch_size`."""
  grids = [grid for grid in (LR_GRIDS.get(optimizer),
                             SMALL_BATCH_GRIDS.get(optimizer)) if grid]
  if not grids:
    raise ValueError(f"no learning-rate grid for {optimizer!r}")
  nearest = min(grids, key=lambda grid: abs(
      math.log(batch_size / grid.reference_batch)))
  return nearest.suggested_at(batch_size)


@dataclasses.dataclass(frozen=True)
class Preset:
  """Sizes of a comparison; `default` is the benchmark's."""

  num_samples: int
  epochs: float
  large_batch: int
  small_batch: int
  grid_size: int
  warmup_epochs: float
  model: str = "cnn"
  val_fraction: float = 0.1
  # The weight decay of an optimizer without a grid entry.
  weight_decay: float = 1e-4
  # Which grids ("default": LR_GRIDS, "quick": QUICK_GRIDS); whether the
  # weight decay is tuned too (else each grid's suggested_weight_decay);
  # how often a grid may grow per axis and direction (`sweep.Grid`).
  grids: str = "default"
  tune_weight_decay: bool = True
  max_extensions: int = 1


PRESETS = {
    "default": Preset(num_samples=60_000, epochs=30, large_batch=4096,
                      small_batch=128, grid_size=3, warmup_epochs=2),
    # A few minutes on 2 CPU cores, data generation included.
    "quick": Preset(num_samples=20_000, epochs=20, large_batch=1024,
                    small_batch=128, grid_size=3, warmup_epochs=1,
                    grids="quick", tune_weight_decay=False,
                    max_extensions=2),
}
LARGE_BATCH_OPTIMIZERS = ("sngm", "msgd", "lars", "lamb")
SMALL_BATCH_OPTIMIZER = "msgd"


_GRID_SETS = {"default": (LR_GRIDS, SMALL_BATCH_GRIDS),
              "quick": (QUICK_GRIDS, QUICK_SMALL_BATCH_GRIDS)}


def _grid(optimizer: str, batch_size: int, small: bool, preset: Preset):
  """(learning rates, weight decays) of `optimizer` for `preset`."""
  grids = _GRID_SETS[preset.grids][small]
  benchmark = (SMALL_BATCH_GRIDS if small else LR_GRIDS).get(optimizer)
  grid = grids.get(optimizer, benchmark)
  if grid is None:
    raise ValueError(f"no learning-rate grid for {optimizer!r} at "
                     f"{'small' if small else 'large'} batch")
  if preset.tune_weight_decay:  # the middle grid_size values
    decays = grid.weight_decays
    start = max(0, (len(decays) - preset.grid_size + 1) // 2)
    decays = decays[start:start + preset.grid_size]
  else:  # the benchmark's pick
    decays = ((benchmark or grid).suggested_weight_decay,)
  return grid.at(batch_size, preset.grid_size), decays



def contender_search(optimizer: str, batch_size: int, small: bool,
                     preset: Preset) -> sweep.Grid:
  """The `sweep.Grid` of `optimizer` at `batch_size`: its learning rates x
  weight decays for `preset`, extended `preset.max_extensions` times at
  most per axis and direction."""
  learning_rates, decays = _grid(optimizer, batch_size, small, preset)
  return sweep.Grid({"learning_rate": learning_rates,
                     "weight_decay": decays},
                    max_extensions=preset.max_extensions)


def _machine() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
          "python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(),
          "device_kind": devices[0].device_kind,
          "device_count": len(devices)}


def _command_line() -> str:
  """The `sngm-optax compare ...` command that runs this process, if any."""
  if sys.argv[1:2] == ["compare"]:
    return shlex.join(["sngm-optax", *sys.argv[1:]])
  return "sngm_optax.harness.compare.compare(...)"


def compare(
    preset: Preset,
    *,
    optimizers=LARGE_BATCH_OPTIMIZERS,
    include_small_batch: bool = True,
    data_path: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    data_seed: int = data_lib.DEFAULT_SEED,
    out_dir: str | os.PathLike | None = None,
    quiet: bool = False,
    extra_seeds: int = 0,
    command: str | None = None,
) -> dict:
  """Runs the comparison on the engine; writes its results to `out_dir`.

  Every contender (each large-batch optimizer, then momentum SGD at the
  small batch) is a `sweep.tune` of its `contender_search` grid; all share
  one trial budget (`sweep.check_same_budget`). Its runs go through a
  `sweep.RunStore` at `out_dir/compare_runs.jsonl` (in memory without
  `out_dir`), so a second call with the same `out_dir` and settings reuses
  them instead of training again.

  Args:
    preset: sizes (see `PRESETS`).
    optimizers: the large-batch contenders (names in `LR_GRIDS`).
    include_small_batch: also train momentum SGD at `preset.small_batch`.
    data_path: a user's `.npz` instead of generated MNIST-1D.
    cache_dir: MNIST-1D cache directory.
    seed: seed of initialization and batch order of the search.
    data_seed: seed of the generated dataset and the validation split.
    out_dir: where to write `compare.json`, `compare_runs.jsonl` and
      `compare.png` (nothing written if None).
    quiet: no progress output.
    extra_seeds: retrain each pick with this many more seeds (`seed + 1`,
      ...) and summarize the test accuracy over all its seeds.
    command: the command recorded in the JSON (default: this process's
      `sngm-optax compare ...` line).

  Returns:
    `sweep.results_record("compare", ...)`: the engine's results schema,
    whose `contenders` are `sweep.tune` results with the contender's
    `optimizer`, `batch_size` and the picked run's `final` metrics; plus
    `preset`, `seeds`, the data sizes, `table` and `wall_time_s`.
  """
  from sngm_optax.harness import config as config_lib  # pylint: disable=g-import-not-at-top
  from sngm_optax.harness import train  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  for name in optimizers:
    if name not in LR_GRIDS:
      raise ValueError(f"unknown optimizer {name!r} for compare; choose from "
                       f"{', '.join(sorted(LR_GRIDS))}")
  base = config_lib.Config(
      data_path=data_path, num_samples=preset.num_samples,
      data_seed=data_seed, cache_dir=None if cache_dir is None
      else str(cache_dir), val_fraction=preset.val_fraction,
      model=preset.model, weight_decay=preset.weight_decay,
      warmup_epochs=preset.warmup_epochs, epochs=preset.epochs, seed=seed)
  dataset = train.load_dataset(base)
  usable = dataset.num_train - max(1, round(preset.val_fraction *
                                            dataset.num_train))
  for batch_size in (preset.large_batch, preset.small_batch):
    if batch_size > usable:
      raise ValueError(f"batch size {batch_size} is larger than the training "
                       f"set ({usable} examples after the validation split)")
  if not quiet:
    num_val = dataset.num_train - usable
    print(f"data: {usable} train + {num_val} validation / "
          f"{dataset.num_test} test examples; {preset.epochs:g} epochs, "
          f"model {preset.model}", flush=True)

  entries = [(name, preset.large_batch, False) for name in optimizers]
  if include_small_batch:
    entries.append((SMALL_BATCH_OPTIMIZER, preset.small_batch, True))
  searches = {(name, batch_size): contender_search(name, batch_size, small,
                                                   preset)
              for name, batch_size, small in entries}
  trial_budget = sweep.check_same_budget(
      {f"{name} B={batch_size}": search
       for (name, batch_size), search in searches.items()})
  budget = {"data_path": data_path, "num_samples": preset.num_samples,
            "data_seed": data_seed, "val_fraction": preset.val_fraction,
            "model": preset.model, "epochs": preset.epochs,
            "warmup_epochs": preset.warmup_epochs}
  out_dir = None if out_dir is None else pathlib.Path(out_dir)
  store = sweep.RunStore(
      None if out_dir is None else out_dir / "compare_runs.jsonl", budget)
  seeds = tuple(seed + offset for offset in range(extra_seeds + 1))

  contenders = []
  for (name, batch_size), search in searches.items():
    registry_name, kwargs = VARIANTS.get(name, (name, {}))
    contender_base = dataclasses.replace(
        base, optimizer=registry_name, batch_size=batch_size,
        optimizer_kwargs={**base.optimizer_kwargs, **kwargs})
    trainer = sweep.harness_trainer(store, contender_base, dataset)
    if not quiet:
      trainer = _printing(trainer, name, batch_size)
    result = sweep.tune(name, trainer, search, seeds=seeds,
                        objective="val_accuracy" if preset.val_fraction > 0
                        else "test_accuracy")
    contenders.append(with_pick_run(result, store, name, registry_name,
                                     kwargs, batch_size))
  result = sweep.results_record(
      "compare",
      claim="SNGM at a large batch against momentum SGD, LARS and LAMB at "
            "the same batch and momentum SGD at a small batch, each on its "
            "best grid point picked on validation",
      command=command or _command_line(), machine=_machine(), budget=budget,
      contenders=contenders, trial_budget=trial_budget,
      preset=dataclasses.asdict(preset), seeds=list(seeds),
      data=data_path or f"mnist1d(num_samples={preset.num_samples}, "
                        f"seed={data_seed})",
      num_train=dataset.num_train, num_val=dataset.num_train - usable,
      num_test=dataset.num_test, runs=len(store),
      collapsed=sweep.count_collapsed(store),
      wall_time_s=time.perf_counter() - start)
  result["table"] = format_table(result)
  if out_dir is not None:
    train.write_json(out_dir / "compare.json", result)
    plot(result, out_dir / "compare.png")
  return result


def _printing(trainer, name: str, batch_size: int):
  """`trainer`, printing one line per run it returns."""

  def train_and_print(point: dict, seed: int) -> sweep.Run:
    run = trainer(point, seed)
    if run.ok:
      val = run.final.get("val_accuracy")
      outcome = (f"val acc {float('nan') if val is None else val:.4f}  test "
                 f"acc {run.final['test_accuracy']:.4f}  "
                 f"({run.run_time_s + run.compile_time_s:.0f} s)")
    else:
      outcome = run.status
    print(f"  {name:>5s} B={batch_size:<5d} lr={point['learning_rate']:<8g} "
          f"wd={point['weight_decay']:<7g} seed {seed}  {outcome}",
          flush=True)
    return run

  return train_and_print


def with_pick_run(result: dict, store: sweep.RunStore, name: str,
                   registry_name: str, kwargs: dict, batch_size: int) -> dict:
  """A `sweep.tune` result with the contender's identity, the picked
  run's final metrics, times and curve, and the time of all its trials."""
  by_key = {run.key: run for run in store}
  trial_runs = [by_key[trial["key"]] for trial in result["trials"]]
  result = {"optimizer": name, "registry_optimizer": registry_name,
            "optimizer_kwargs": kwargs, "batch_size": batch_size, **result,
            "search_time_s": sum(run.run_time_s + run.compile_time_s
                                 for run in trial_runs)}
  if result["pick"] is not None:
    run = by_key[result["pick"]["key"]]
    result["pick"] = dict(result["pick"], final=run.final,
                          run_time_s=run.run_time_s,
                          compile_time_s=run.compile_time_s, curve=run.curve)
  return result


def format_table(result: dict, times: bool = True) -> str:
  """A Markdown table of a `compare` result: one row per contender.

  The pick's learning rate and weight decay, its test and validation
  accuracy (the search's seed), with more seeds the mean ± sd of its test
  accuracy over them (bold only for `sweep.leader`), its steps, the trials
  the search used and how many of them diverged or collapsed, and with
  `times` the pick's run time and the time of all the trials ("grid"; it
  includes compiling). A pick still at an edge of its grid after the
  allowed extensions is marked "(grid edge)": the grid did not bracket it.
  """
  contenders = result["contenders"]
  seeds = max((c["summary"]["n"] for c in contenders if c["summary"]),
              default=1)
  summaries = {index: None if c["summary"] is None
               else sweep.Summary(**c["summary"])
               for index, c in enumerate(contenders)}
  best = sweep.leader(summaries) if seeds > 1 else None
  header = ["optimizer", "batch", "best LR", "weight decay", "test acc (%)",
            "val acc (%)"]
  if seeds > 1:
    header.append(f"test acc, {seeds} seeds (%)")
  header += ["steps", "trials", "collapsed"]
  if times:
    header += ["run (s)", "grid (s)"]
  lines = ["| " + " | ".join(header) + " |",
           "| --- | " + " | ".join(["---:"] * (len(header) - 1)) + " |"]
  for index, contender in enumerate(contenders):
    pick = contender["pick"]
    cells = [contender["optimizer"], str(contender["batch_size"])]
    if pick is None:
      cells += ["all collapsed", "–", "–", "–"] + ["–"] * (seeds > 1) + ["–"]
    else:
      final = pick["final"]
      edge = " (grid edge)" if contender["search"]["on_edge"] else ""
      val = final.get("val_accuracy")
      cells += [f"{pick['point']['learning_rate']:g}{edge}",
                f"{pick['point']['weight_decay']:g}",
                f"{100 * final['test_accuracy']:.2f}",
                "–" if val is None else f"{100 * val:.2f}"]
      if seeds > 1:
        summary = contender["summary"]
        text = ("–" if summary is None else
                f"{100 * summary['mean']:.2f} ± {100 * summary['sd']:.2f}")
        cells.append(f"**{text}**" if index == best else text)
      cells.append(str(final["steps"]))
    cells += [str(contender["search"]["trials_used"]),
              str(contender["collapsed"])]
    if times:
      cells += ["–" if pick is None else
                f"{pick['run_time_s'] + pick['compile_time_s']:.0f}",
                f"{contender['search_time_s']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_curves(result: dict, axes) -> None:
  """Draws test accuracy against epoch of every contender's picked run."""
  accuracies = []
  for contender in result["contenders"]:
    pick = contender["pick"]
    if pick is None or not pick.get("curve"):
      continue
    curve = pick["curve"]
    axes.plot([record["epoch"] for record in curve],
              [100 * record["test_accuracy"] for record in curve],
              marker=".",
              label=f"{contender['optimizer']} B={contender['batch_size']} "
                    f"lr={pick['point']['learning_rate']:g}")
    accuracies.append(100 * pick["final"]["test_accuracy"])
  if accuracies:
    axes.set_ylim(max(0.0, math.floor(min(accuracies) / 5) * 5 - 10), 100)
  axes.set_xlabel("epoch")
  axes.set_ylabel("test accuracy (%)")
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)


def plot(result: dict, path: str | os.PathLike) -> None:
  """Saves the curves of `plot_curves` as a PNG (matplotlib's Agg backend)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(figsize=(6.4, 4.2))
  plot_curves(result, axes)
  axes.set_title(f"MNIST-1D {result['preset']['model'].upper()}, "
                 f"{result['preset']['epochs']:g} epochs")
  figure.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=120)
  plt.close(figure)
