"""The main job: SNGM against momentum SGD, LARS and LAMB at a large batch.

Every contender trains the same model for the same number of epochs with a
linear-warmup + cosine learning-rate schedule. Its peak learning rate and
weight decay are picked from a grid of the same size for every optimizer
(`LR_GRIDS`: 3 learning rates x 3 weight decays), by the final accuracy on a
validation split held out from the training set (`grid_search`). A pick on
an edge of the grid extends the grid by one value in that direction and the
search goes on (`Preset.max_extensions` times per axis and direction); a
pick still on an edge after that is marked "(grid edge)" in the table, never
shown as a plain best. The table reports the test accuracy of the picked run.
Momentum SGD at a small batch (128) is the reference that large-batch
training tries to match.

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
import itertools
import math
import os
import pathlib
import time
from typing import Callable, Sequence

import numpy as np

from sngm_optax.harness import data as data_lib
from sngm_optax.harness import train
from sngm_optax.harness import config as config_lib
from sngm_optax.harness import steps as steps_lib


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
# one value in that direction (`grid_search`).
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
  # how often a grid may grow per axis and direction (`grid_search`).
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


def _one_run(config: config_lib.Config, dataset, quiet: bool) -> dict:
  """Trains `config`; a summary dict, with `diverged` for non-finite loss."""
  try:
    result = train.train_and_evaluate(config, dataset=dataset, quiet=quiet,
                                      log_epochs=False)
  except steps_lib.NonFiniteLossError as error:
    run = {"learning_rate": config.learning_rate, "seed": config.seed,
           "diverged": True, "error": str(error)}
  else:
    final = result["final"]
    run = {
        "learning_rate": config.learning_rate, "seed": config.seed,
        "diverged": False, "val_accuracy": final.get("val_accuracy"),
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"], "steps": result["steps"],
        "wall_time_s": result["wall_time_s"], "history": result["history"],
    }
  if not quiet:
    outcome = ("diverged" if run["diverged"] else
               f"val acc {run['val_accuracy'] or float('nan'):.4f}  test acc "
               f"{run['test_accuracy']:.4f}  ({run['wall_time_s']:.0f} s)")
    print(f"  {config.optimizer:>5s} B={config.batch_size:<5d} "
          f"lr={config.learning_rate:<8g} wd={config.weight_decay:<7g} "
          f"seed {config.seed}  {outcome}", flush=True)
  return run


def _sig3(value: float) -> float:
  return float(f"{value:.3g}")


def _edges(best: tuple, axes: list[list[float]]) -> list[tuple[int, int]]:
  """(axis, direction) for each axis of 2+ values whose end `best` is on;
  direction -1 is the smallest value, +1 the largest."""
  edges = []
  for axis, values in enumerate(axes):
    if len(values) < 2:
      continue
    if best[axis] == min(values):
      edges.append((axis, -1))
    elif best[axis] == max(values):
      edges.append((axis, +1))
  return edges


def grid_search(score: Callable[..., float | None],
                axes: Sequence[Sequence[float]], max_extensions: int = 0
                ) -> dict:
  """Maximizes `score` over a grid, extending it where the pick is an edge.

  Every point of the grid (the product of `axes`, each a sorted sequence of
  positive values) is scored; `score(*point)` returns None for a run that
  diverged. When the best point lies at the smallest or largest value of
  an axis with 2 or more values, that axis gets one more value in that
  direction (the ratio of its two outermost values again, 3 significant
  digits), every new point is scored, and the search repeats, at most
  `max_extensions` times per axis and direction. Ties go to the point
  scored first.

  Returns:
    A dict: `best` (a point, None if every run diverged), `scores` (point ->
    score, in the order scored), `axes` (the final grid), `extended` (the
    values added, as (axis, value) pairs) and `on_edge` (True if the pick is
    still at an end of an axis: the extension limit was reached).
  """
  axes = [sorted(float(v) for v in values) for values in axes]
  if any(not values or min(values) <= 0 for values in axes):
    raise ValueError(f"axes must be non-empty and positive, got {axes!r}")
  scores, extended, used = {}, [], {}
  while True:
    for point in itertools.product(*axes):
      if point not in scores:
        scores[point] = score(*point)
    finished = [point for point, value in scores.items() if value is not None]
    if not finished:
      return {"best": None, "scores": scores, "axes": axes,
              "extended": extended, "on_edge": False}
    best = max(finished, key=lambda point: scores[point])
    edges = _edges(best, axes)
    todo = [edge for edge in edges if used.get(edge, 0) < max_extensions]
    if not todo:
      return {"best": best, "scores": scores, "axes": axes,
              "extended": extended, "on_edge": bool(edges)}
    for axis, direction in todo:
      used[(axis, direction)] = used.get((axis, direction), 0) + 1
      values = axes[axis]
      if direction > 0:
        value = _sig3(values[-1] * values[-1] / values[-2])
        axes[axis] = values + [value]
      else:
        value = _sig3(values[0] * values[0] / values[1])
        axes[axis] = [value] + values
      extended.append((axis, value))


def run_contender(base: config_lib.Config, optimizer: str, batch_size: int,
                  learning_rates, dataset, quiet: bool,
                  extra_seeds: int = 0, *, weight_decays=None,
                  name: str | None = None, max_extensions: int = 0,
                  done: dict | None = None,
                  on_run: Callable[[str, dict], None] | None = None) -> dict:
  """Tunes one optimizer over learning rate x weight decay; picks the best.

  The pick is the run with the best final validation accuracy (test
  accuracy without a validation split), found by `grid_search` (with
  `max_extensions`, a pick at an edge of the grid extends it). With
  `extra_seeds`, the pick is trained again with that many more seeds
  (initialization and batch order), and `test_accuracy_mean` /
  `test_accuracy_std` summarize all its seeds.

  Args:
    base: the run configuration the grid changes.
    optimizer: a registry name, or a name in `VARIANTS` (a registry name
      with optimizer kwargs).
    batch_size: the batch size of every run.
    learning_rates: the peak learning rates of the grid.
    dataset: the data (`train.load_dataset`).
    quiet: no progress output.
    extra_seeds: retrain the pick with this many more seeds.
    weight_decays: the weight decays of the grid (default: `base`'s).
    name: the contender's name in the result (default `optimizer`).
    max_extensions: see `grid_search`.
    done: finished runs by `run_key` (a resumed benchmark's), reused.
    on_run: called as `on_run(key, run)` after every new run.
  """
  start = time.perf_counter()
  registry_name, kwargs = VARIANTS.get(optimizer, (optimizer, {}))
  base = dataclasses.replace(
      base, optimizer=registry_name, batch_size=batch_size,
      optimizer_kwargs={**base.optimizer_kwargs, **kwargs})
  name = name or optimizer
  key_metric = "val_accuracy" if base.val_fraction > 0 else "test_accuracy"
  runs = {}

  def train_once(learning_rate, weight_decay, seed=base.seed):
    key = run_key(name, batch_size, learning_rate, weight_decay, seed)
    if done is not None and key in done:
      run = done[key]
    else:
      run = _one_run(dataclasses.replace(
          base, learning_rate=learning_rate, weight_decay=weight_decay,
          seed=seed), dataset, quiet)
      run["weight_decay"] = weight_decay
      if on_run is not None:
        on_run(key, run)
    runs[(learning_rate, weight_decay, seed)] = run
    return run

  def score(learning_rate, weight_decay):
    run = train_once(learning_rate, weight_decay)
    return None if run["diverged"] else run[key_metric]

  search = grid_search(score, [learning_rates, weight_decays or
                               (base.weight_decay,)], max_extensions)
  grid_time = time.perf_counter() - start
  best = None if search["best"] is None else runs[(*search["best"],
                                                   base.seed)]
  contender = {
      "optimizer": name,
      "registry_optimizer": registry_name,
      "optimizer_kwargs": kwargs,
      "batch_size": batch_size,
      "learning_rates": search["axes"][0],
      "weight_decays": search["axes"][1],
      "extended": search["extended"],
      "on_edge": search["on_edge"],
      "selected_by": key_metric,
      "best": best,
      "runs": [runs[(*point, base.seed)] for point in search["scores"]],
      "grid_wall_time_s": grid_time,
  }
  if best is not None and extra_seeds:
    seed_runs = [dict(train_once(*search["best"], base.seed + offset))
                 for offset in range(1, extra_seeds + 1)]
    for run in seed_runs:
      run.pop("history", None)
    accuracies = [run["test_accuracy"] for run in [best, *seed_runs]
                  if not run["diverged"]]
    contender.update(
        seed_runs=seed_runs, num_seeds=len(accuracies),
        test_accuracy_mean=float(np.mean(accuracies)),
        test_accuracy_std=float(np.std(accuracies, ddof=1))
        if len(accuracies) > 1 else 0.0)
  return contender


def run_key(name: str, batch_size: int, learning_rate: float,
            weight_decay: float, seed: int) -> str:
  """The name of one run in a benchmark's saved results."""
  return (f"{name} B={batch_size} lr={learning_rate:g} "
          f"wd={weight_decay:g} seed={seed}")


def compare(
    preset: Preset,
    *,
    optimizers=LARGE_BATCH_OPTIMIZERS,
    include_small_batch: bool = True,
    reference: dict | None = None,
    data_path: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    data_seed: int = data_lib.DEFAULT_SEED,
    out_dir: str | os.PathLike | None = None,
    quiet: bool = False,
    extra_seeds: int = 0,
) -> dict:
  """Runs the comparison; writes `compare.json` and `compare.png` to out_dir.

  Args:
    preset: sizes (see `PRESETS`).
    optimizers: the large-batch contenders (names in `LR_GRIDS`).
    include_small_batch: also train momentum SGD at `preset.small_batch`.
    reference: a small-batch contender result from an earlier call, reused
      instead of training it again (same data and epochs).
    data_path: a user's `.npz` instead of generated MNIST-1D.
    cache_dir: MNIST-1D cache directory.
    seed: seed of initialization and batch order.
    data_seed: seed of the generated dataset and the validation split.
    out_dir: where to write the JSON and the plot (nothing written if None).
    quiet: no progress output.
    extra_seeds: retrain each picked learning rate with this many more seeds
      and report the mean and standard deviation of the test accuracy.

  Returns:
    A JSON-serializable dict with `preset`, `contenders` and `wall_time_s`.
  """
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

  contenders = []
  runs = [(name, preset.large_batch, False) for name in optimizers]
  if include_small_batch and reference is None:
    runs.append((SMALL_BATCH_OPTIMIZER, preset.small_batch, True))
  for name, batch_size, small in runs:
    learning_rates, decays = _grid(name, batch_size, small, preset)
    contenders.append(run_contender(
        base, name, batch_size, learning_rates, dataset, quiet, extra_seeds,
        weight_decays=decays, max_extensions=preset.max_extensions))
  if reference is not None:
    contenders.append(reference)
  result = {
      "preset": dataclasses.asdict(preset),
      "seed": seed,
      "data": data_path or f"mnist1d(num_samples={preset.num_samples}, "
                           f"seed={data_seed})",
      "num_train": dataset.num_train,
      "num_test": dataset.num_test,
      "contenders": contenders,
      "wall_time_s": time.perf_counter() - start,
  }
  result["table"] = format_table(result)
  if out_dir is not None:
    out_dir = pathlib.Path(out_dir)
    train.write_json(out_dir / "compare.json", result)
    plot(result, out_dir / "compare.png")
  return result


def format_table(result: dict) -> str:
  """A Markdown table: optimizer, batch, best LR, accuracies, steps, times.

  "run" is the picked run's wall time; "grid" the time of all the
  optimizer's grid runs, which includes compiling its step once (the first
  run of a grid compiles, the others reuse the program). With extra seeds,
  a column gives the test accuracy's mean ± standard deviation over seeds.
  A pick still at an edge of its grid after the allowed extensions is
  marked "(grid edge)": the grid did not bracket the best value.
  """
  seeds = max((c.get("num_seeds", 1) for c in result["contenders"]),
              default=1)
  header = ("| optimizer | batch | best LR | weight decay | test acc (%) "
            "| val acc (%) ")
  rule = "| --- | ---: | ---: | ---: | ---: | ---: "
  if seeds > 1:
    header += f"| test acc, {seeds} seeds (%) "
    rule += "| ---: "
  lines = [header + "| steps | run (s) | grid (s) |",
           rule + "| ---: | ---: | ---: |"]
  for contender in result["contenders"]:
    best = contender["best"]
    cells = [contender["optimizer"], str(contender["batch_size"])]
    if best is None:
      cells += ["all diverged", "-", "-", "-"] + ["-"] * (seeds > 1) + [
          "-", "-"]
    else:
      val = best.get("val_accuracy")
      edge = " (grid edge)" if contender.get("on_edge") else ""
      decay = best.get("weight_decay")
      cells += [f"{best['learning_rate']:g}{edge}",
                "-" if decay is None else f"{decay:g}",
                f"{100 * best['test_accuracy']:.2f}",
                "-" if val is None else f"{100 * val:.2f}"]
      if seeds > 1:
        cells.append(
            f"{100 * contender['test_accuracy_mean']:.2f} ± "
            f"{100 * contender['test_accuracy_std']:.2f}"
            if "test_accuracy_mean" in contender else "-")
      cells += [str(best["steps"]), f"{best['wall_time_s']:.0f}"]
    cells.append(f"{contender['grid_wall_time_s']:.0f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_curves(result: dict, axes) -> None:
  """Draws test accuracy against epoch of every contender's picked run."""
  for contender in result["contenders"]:
    best = contender["best"]
    if best is None:
      continue
    epochs = [record["epoch"] for record in best["history"]]
    accuracy = [100 * record["test_accuracy"] for record in best["history"]]
    axes.plot(epochs, accuracy, marker=".",
              label=f"{contender['optimizer']} B={contender['batch_size']} "
                    f"lr={best['learning_rate']:g}")
  accuracies = [100 * c["best"]["test_accuracy"]
                for c in result["contenders"] if c["best"] is not None]
  if accuracies:
    low = min(accuracies)
    axes.set_ylim(max(0.0, math.floor(low / 5) * 5 - 10), 100)
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


def without_histories(result: dict) -> dict:
  """A copy of a `compare` result keeping only the picked runs' histories."""
  contenders = []
  for contender in result["contenders"]:
    runs = [{k: v for k, v in run.items() if k != "history"}
            for run in contender["runs"]]
    contenders.append(dict(contender, runs=runs))
  return dict(result, contenders=contenders)
