"""Adaptive batch sizes (AdAdaGrad) against fixed small and large batches.

On MNIST-1D (the package's embedded data), starting at B = 32:

* AdaGrad-Norm: fixed B = 32; AdAdaGrad-Norm with the norm test and with the
  inner-product test; fixed B = the final size the norm-test run reached;
* AdaGrad: the same four runs (AdAdaGrad);
* SNGM: fixed B = 32; SNGM with the norm test in front (the two seeds
  combined); fixed B = its final size.

All runs of a family see the same number of samples (`--epochs` epochs) with
a constant learning rate (an adaptive run's step count is not known in
advance, so a step-based decay would not end where it should). The
statistics are per-device (`--devices` simulated CPU devices, only scalars
all-reduced). Reported per run: optimizer steps and wall time until the test
accuracy first reaches the fixed-B=32 run's final accuracy (checked once per
epoch; wall time includes compilation), final test accuracy, the final batch
size. The per-step cost of the test is not re-measured: the figures of
benchmarks/batch_size_test_cost.py (results/batch_size_test_cost.json) are
copied into the output. Writes results/adaptive_batch.json and a PNG of the
batch size over training.

  PYTHONPATH=. python benchmarks/adaptive_batch.py
"""

import argparse
import json
import os
import pathlib
import time

import _common

_common.force_host_devices(8, cpu_only=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sngm_optax.harness import data  # noqa: E402
from sngm_optax.harness import train  # noqa: E402
from sngm_optax.harness import config as config_lib  # noqa: E402

# (family, fixed optimizer, adaptive optimizer, learning rate, tests)
FAMILIES = [
    ("AdaGrad-Norm", "adagrad_norm", "adadagrad_norm", 1.0,
     ("norm", "inner_product")),
    ("AdaGrad", "adagrad", "adadagrad", 0.05, ("norm", "inner_product")),
    ("SNGM", "sngm", "sngm", 0.2, ("norm",)),
]


def steps_to_reach(result, target):
  for record in result["history"]:
    if record["test_accuracy"] >= target:
      return record["steps"], record["wall_time_s"], record["epoch"]
  return None, None, None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num-samples", type=int, default=4000)
  parser.add_argument("--epochs", type=float, default=10.0)
  parser.add_argument("--model", default="mlp")
  parser.add_argument("--devices", type=int, default=4)
  parser.add_argument("--initial-batch-size", type=int, default=32)
  parser.add_argument("--max-batch-size", type=int, default=256)
  parser.add_argument("--eta", type=float, default=0.5,
                      help="eta (norm test) and theta (inner product)")
  parser.add_argument("--families", default="AdaGrad-Norm,AdaGrad,SNGM")
  parser.add_argument("--out",
                      default=str(_common.RESULTS / "adaptive_batch.json"))
  args = parser.parse_args()

  dataset = data.generate_mnist1d(args.num_samples, seed=0)
  out = pathlib.Path(args.out)
  payload = {
      "benchmark": "adaptive_batch",
      "command": _common.command_line(args, exclude=("out",)),
      "args": vars(args),
      "num_train": dataset.num_train,
      "num_test": dataset.num_test,
      "jax": jax.__version__,
      "machine": _common.machine_description(),
      "cpu_count": os.cpu_count(),
      "load_average_start": list(os.getloadavg()),
      "runs": [],
  }
  cost_path = _common.RESULTS / "batch_size_test_cost.json"
  if cost_path.exists():
    cost = json.loads(cost_path.read_text())
    payload["test_cost_from_batch_size_test_cost_json"] = [
        {key: row.get(key) for key in ("mode", "mapper", "test",
                                       "ratio_median", "cpu_ratio_median")}
        for row in cost["rows"]]

  def run(family, optimizer, batch_size, test, lr):
    adaptive = {} if test is None else dict(
        adaptive_batch=test, max_batch_size=args.max_batch_size,
        adaptive_statistics="per_device",
        optimizer_kwargs={"eta": args.eta, "theta": args.eta})
    config = config_lib.Config(
        model=args.model, optimizer=optimizer, learning_rate=lr,
        batch_size=batch_size, epochs=args.epochs, schedule="constant",
        weight_decay=0.0, num_devices=args.devices, seed=0, **adaptive)
    start = time.perf_counter()
    result = train.train_and_evaluate(config, dataset=dataset, quiet=True)
    row = {
        "family": family, "optimizer": optimizer,
        "batch": "adaptive" if test else "fixed", "test": test,
        "initial_batch_size": batch_size, "learning_rate": lr,
        "steps": result["steps"], "samples_seen": result["samples_seen"],
        "wall_time_s": time.perf_counter() - start,
        "final_test_accuracy": result["final"]["test_accuracy"],
        "history": result["history"],
    }
    if test:
      row["final_batch_size"] = result["batch_sizes"][-2] if len(
          result["batch_sizes"]) > 1 else result["batch_sizes"][-1]
      row["batch_sizes"] = result["batch_sizes"]
      row["noise_scales"] = result["noise_scales"]
      row["train_step_compilations"] = result["train_step_compilations"]
    print(f"{family:12s} {optimizer:15s} {row['batch']:8s} {test or '':13s} "
          f"B0={batch_size:4d} steps={row['steps']:5d} "
          f"acc={row['final_test_accuracy']:.4f} "
          f"final_B={row.get('final_batch_size', batch_size)} "
          f"{row['wall_time_s']:.0f}s", flush=True)
    return row

  wanted = args.families.split(",")
  for family, fixed, adaptive_name, lr, tests in FAMILIES:
    if family not in wanted:
      continue
    small = run(family, fixed, args.initial_batch_size, None, lr)
    rows = [small]
    for test in tests:
      rows.append(run(family, adaptive_name, args.initial_batch_size, test,
                      lr))
    final_b = rows[1]["final_batch_size"]
    rows.append(run(family, fixed, final_b, None, lr))
    target = small["final_test_accuracy"]
    for row in rows:
      steps, wall, epoch = steps_to_reach(row, target)
      row.update(target_accuracy=target, steps_to_target=steps,
                 wall_time_to_target_s=wall, epochs_to_target=epoch)
    payload["runs"].extend(rows)
    payload["load_average_end"] = list(os.getloadavg())
    _common.write_json(out, payload)  # partial results
    plot(payload, out.with_suffix(".png"))
  print_table(payload)


def plot(payload, path):
  plt = _common.pyplot()
  if plt is None:
    return
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for row in payload["runs"]:
    if row["batch"] != "adaptive":
      continue
    seen = np.cumsum(row["batch_sizes"]) / payload["num_train"]
    label = f"{row['family']} + {row['test']}"
    axes[0].step(seen, row["batch_sizes"], where="post", label=label)
    axes[1].plot(seen, row["noise_scales"], label=label)
  axes[0].set(xlabel="epochs", ylabel="batch size", yscale="log",
              title="batch size over training")
  axes[1].set(xlabel="epochs", ylabel="noise scale tr(Σ)/|G|² (EMA)",
              yscale="log", title="gradient noise scale")
  axes[0].legend(fontsize=8)
  _common.save_figure(fig, path, dpi=100)


def print_table(payload):
  table = []
  for row in payload["runs"]:
    batch = (f"adaptive from {row['initial_batch_size']}"
             if row["batch"] == "adaptive" else f"fixed {row['initial_batch_size']}")
    to_target = row["steps_to_target"]
    wall = row["wall_time_to_target_s"]
    table.append([
        row["family"], batch, row["test"] or "-", row["steps"],
        row.get("final_batch_size", row["initial_batch_size"]),
        "not reached" if to_target is None else to_target,
        "-" if wall is None else f"{wall:.1f}",
        f"{row['final_test_accuracy']:.4f}", f"{row['wall_time_s']:.1f}"])
  print(_common.markdown_table(
      ["family", "batch", "test", "steps", "final B", "steps to target",
       "wall s to target", "final test acc", "wall s"], table))

if __name__ == "__main__":
  main()
