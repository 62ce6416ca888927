"""The gradient noise scale along a training run, and the batches it suggests.

`measure(config)` trains `config` with `Config.monitor_noise_scale`:
`sngm_optax.noise_scale_monitor` stands first in the optimizer's chain, in
place of the device mean, and estimates McCandlish et al.'s simple noise
scale ``B_simple = tr(Σ)/|G|²`` each step from the devices' own gradients
(B_small = one device's batch, B_big = the global batch; EMAs over about the
last 100 steps). The result holds one row per evaluation (each epoch's end,
or `Config.evals_per_epoch` an epoch), B_simple late in training and
`suggested_batch_range`'s batch sizes for it. `sngm-optax noise-scale` is its
command line.

Example:
  >>> suggested_batch_range(300.0)
  (256, 512)
  >>> suggested_batch_range(0.2)
  (1, 1)
"""

import dataclasses
import math
import pathlib
import statistics

from sngm_optax.harness import data as data_lib
from sngm_optax.harness import train
from sngm_optax.harness.config import Config

# A row's fields, those a history record has (val_* with a validation split).
ROW_FIELDS = ("epoch", "samples_seen", "steps", "noise_scale", "train_loss",
              "test_loss", "test_accuracy", "val_loss", "val_accuracy")

RULE = ("the powers of two within B_simple/2 ... 2 B_simple, where "
        "McCandlish et al.'s model S = S_min (1 + B_noise/B), E = E_min (1 + "
        "B/B_noise) keeps the steps S and the samples E each within 3x of "
        "their minimum")


def suggested_batch_range(noise_scale: float) -> tuple[int, int]:
  r"""The batch sizes that suit a gradient noise scale: `(lo, hi)`.

  McCandlish et al. model the steps :math:`S` and the samples :math:`E`
  that reach a given loss at batch size :math:`B` as

  .. math::
    S = S_{min}\,(1 + B_{noise}/B), \qquad E = E_{min}\,(1 + B/B_{noise}),

  so that :math:`(S/S_{min} - 1)(E/E_{min} - 1) = 1`, with :math:`B_{simple}`
  the estimate of :math:`B_{noise}`. Over :math:`B_{simple}/2 \le B \le
  2B_{simple}` both stay within 3x of their minima: :math:`B = B_{noise}/2`
  gives :math:`S = 3S_{min}`, :math:`E = 1.5E_{min}`, and :math:`B =
  2B_{noise}` gives :math:`S = 1.5S_{min}`, :math:`E = 3E_{min}`; a smaller
  batch wastes steps, a larger one samples. The range returned is the
  powers of two inside that window, from the smallest (`lo`, the window's
  start rounded up) to the largest (`hi`, its end rounded down): a window
  of a factor 4 holds at least two of them, so both keep the 3x guarantee
  and `lo < hi` for :math:`B_{simple} \ge 1`. Neither goes below 1: below
  :math:`B_{simple} = 1` the range is `(1, 1)` (below 1/2 even a batch of
  1 is past :math:`2B_{simple}`).

  Args:
    noise_scale: :math:`B_{simple}`, a positive finite number.

  Returns:
    `(lo, hi)`, powers of two with `lo <= hi`.

  Raises:
    ValueError: `noise_scale` is not positive and finite (e.g. +inf, the
      monitor's value when no gradient signal was measured).

  Example:
    >>> suggested_batch_range(1000.0), suggested_batch_range(1024.0)
    ((512, 1024), (512, 2048))

  References:
    McCandlish, Kaplan, Amodei et al., `An Empirical Model of Large-Batch
    Training <https://arxiv.org/abs/1812.06162>`_, 2018
  """
  value = float(noise_scale)
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"noise_scale must be a positive finite number, got "
                     f"{noise_scale!r}")
  lo = 2 ** max(0, math.ceil(math.log2(value / 2)))
  hi = 2 ** max(0, math.floor(math.log2(2 * value)))
  return lo, hi


def late_noise_scale(rows: list[dict]) -> float | None:
  """The median `noise_scale` of the last third of `rows` (at least the
  last one); None without rows."""
  if not rows:
    return None
  late = rows[-math.ceil(len(rows) / 3):]
  return float(statistics.median(row["noise_scale"] for row in late))


def measure(config: Config, dataset: data_lib.Dataset | None = None,
            quiet: bool = True) -> dict:
  """Trains `config` with the noise-scale monitor and reports B_simple.

  Args:
    config: the run (`monitor_noise_scale` is set here); a fixed batch, not
      GMC or DGC, on 2+ devices (see `Config.monitor_noise_scale`).
    dataset: a `Dataset` to use instead of the one `config` names.
    quiet: no progress bar.

  Returns:
    A JSON-serializable dict: `rows` (one per evaluation: `epoch`,
    `samples_seen`, `steps`, `noise_scale` (B_simple after the step
    before the evaluation), `train_loss`, `test_loss`, `test_accuracy` and `val_*` with
    a validation split), `late_noise_scale` (`late_noise_scale` of the
    rows), `suggested_batch_range` (`[lo, hi]` of `suggested_batch_range`,
    None when B_simple is not positive and finite or there are no rows),
    `rule` (that range's rule, in words), `num_devices`, `steps`,
    `wall_time_s`, `compile_time_s` and `config`.

  Raises:
    ValueError: the config cannot be monitored or does not fit the data.
    NonFiniteLossError: the loss stayed non-finite (see `train`).
  """
  config = dataclasses.replace(config, monitor_noise_scale=True)
  result = train.train_and_evaluate(config, dataset=dataset, quiet=quiet,
                                    log_epochs=False)
  rows = [{key: record[key] for key in ROW_FIELDS if key in record}
          for record in result["history"]]
  late = late_noise_scale(rows)
  measured = late is not None and math.isfinite(late) and late > 0
  suggested = list(suggested_batch_range(late)) if measured else None
  return {
      "rows": rows,
      "late_noise_scale": late,
      "suggested_batch_range": suggested,
      "rule": RULE,
      "num_devices": result["num_devices"],
      "steps": result["steps"],
      "wall_time_s": result["wall_time_s"],
      "compile_time_s": result["compile_time_s"],
      "config": result["config"],
  }


def format_table(result: dict) -> str:
  """`measure`'s rows as a text table: epoch, samples seen, steps,
  B_simple and the accuracy (validation, else test)."""
  split = "val" if any("val_accuracy" in row for row in result["rows"]) else (
      "test")
  lines = [f"{'epoch':>6} {'samples seen':>13} {'steps':>7} "
           f"{'B_simple':>10} {split + ' acc':>9}"]
  for row in result["rows"]:
    lines.append(f"{row['epoch']:6.2f} {row['samples_seen']:13,d} "
                 f"{row['steps']:7d} {row['noise_scale']:10.4g} "
                 f"{row[split + '_accuracy']:9.4f}")
  return "\n".join(lines)


def summary(result: dict) -> str:
  """One sentence: B_simple late in training and the batches it suggests."""
  late, rows = result["late_noise_scale"], result["rows"]
  if late is None:
    return "No evaluation finished: no noise scale to report."
  where = (f"median of the last {math.ceil(len(rows) / 3)} of {len(rows)} "
           "evaluations")
  batch = result["config"]["batch_size"]
  if result["suggested_batch_range"] is None:
    return (f"B_simple late in training ({where}) is {late:.4g}, so no batch "
            f"size can be suggested (the run's batch is {batch}).")
  lo, hi = result["suggested_batch_range"]
  return (f"B_simple late in training ({where}) is {late:.4g}: suggested "
          f"batch sizes {lo} to {hi} (the run's batch is {batch}), "
          f"{RULE}.")


def save_plot(result: dict, path: str | pathlib.Path) -> None:
  """Saves B_simple against samples seen (log y) as a PNG, with the run's
  batch size as a dashed line (matplotlib's Agg backend)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  config, rows = result["config"], result["rows"]
  figure, axes = plt.subplots(figsize=(6.4, 4.2))
  axes.plot([row["samples_seen"] for row in rows],
            [row["noise_scale"] for row in rows], marker="o",
            label="B_simple")
  axes.axhline(config["batch_size"], color="gray", linestyle="--",
               label=f"batch size {config['batch_size']}")
  axes.set_yscale("log")
  # Plain numbers; minor ticks labelled only over a narrow range.
  axes.yaxis.set_major_formatter(
      ticker.FuncFormatter(lambda value, _: f"{value:g}"))
  axes.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
  axes.set_xlabel("samples seen")
  axes.set_ylabel("gradient noise scale B_simple")
  axes.set_title(f"{config['model']} with {config['optimizer']}, B = "
                 f"{config['batch_size']} on {result['num_devices']} devices")
  axes.legend()
  figure.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=120)
  plt.close(figure)
