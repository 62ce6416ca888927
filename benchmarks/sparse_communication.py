"""GMC and DGC sparse communication against dense momentum SGD, 8 workers.

Trains the MNIST-1D MLP (`--model`, default `mlp`, 23,050 parameters) with the
shared harness (`sngm_optax.harness.train`) on 8 simulated CPU devices, each holding
one eighth of the global batch:

- `msgd`: dense data-parallel momentum SGD (gradients averaged with an
  all-reduce, 4·d bytes per worker per step);
- `gmc` (global momentum compression) and `dgc` (Deep Gradient Compression)
  at density 1% and 0.1%: each worker sends its k = density·d largest entries
  as (int32 index, float32 value) pairs, 8·k bytes per step.

Every optimizer runs the same learning-rate grid (`--lrs`, the same peak for
all: GMC, DGC and momentum SGD all take a step of learning rate x momentum
buffer, so one scale fits all) with warmup + cosine decay, momentum 0.9 and
weight decay 1e-4 on kernels; the table reports the best peak of the grid per
optimizer (by final test accuracy, mean over `--seeds`) and every run is in
the JSON. (With a
schedule, GMC scales by the rate before the momentum, D = lr·g + β·D, and
`optax.sgd` after it; with a constant rate they are the same method.) The
time per step is measured after the first epoch (compilation), including the
short per-epoch evaluation, and is the median over the grid's runs.

Bytes: the size of one worker's message per step (`bytes_sent` in the GMC/DGC
state, read through the harness), against 4·d for the dense gradient. The
simulated devices share one host's memory: there is no network, so the wall
time per step measures compute (top-k selection, all-gather, scatter-add) and
not the communication that the byte counts would save on a real cluster.

  python benchmarks/sparse_communication.py            # ~12 min on a loaded 2-core box
  python benchmarks/sparse_communication.py --quick    # a smoke test, ~1 min

Writes benchmarks/results/compression.json and .png (the JSON after every
run, so an interrupted run keeps its finished part).
"""

import argparse
import json
import os
import pathlib
import time

import _common

# Eight simulated workers.
_common.force_host_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sngm_optax.harness import data  # noqa: E402
from sngm_optax.harness import train  # noqa: E402
from sngm_optax.harness import config as config_lib  # noqa: E402
from sngm_optax.harness import steps as steps_lib  # noqa: E402

METHODS = (("msgd", None), ("gmc", 0.01), ("dgc", 0.01), ("gmc", 0.001),
           ("dgc", 0.001))


def step_time(history):
  """Seconds per step after the first epoch (which includes compilation)."""
  first, last = history[0], history[-1]
  if last["steps"] == first["steps"]:
    return float("nan")
  return ((last["wall_time_s"] - first["wall_time_s"])
          / (last["steps"] - first["steps"]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--num-samples", type=int, default=10_000)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--epochs", type=float, default=20)
  parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.2, 0.4, 0.8, 1.6])
  parser.add_argument("--model", default="mlp")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--out", default=str(_common.RESULTS / "compression"),
                      help="path of the results without .json / .png")
  parser.add_argument("--resume", action="store_true",
                      help="keep the runs already in the output JSON")
  args = parser.parse_args()
  if args.quick:
    args.num_samples, args.epochs, args.lrs, args.seeds = 2_000, 2, [0.1], [0]

  num_devices = 8
  assert jax.local_device_count() >= num_devices, jax.devices()
  dataset = data.load_mnist1d(args.num_samples)
  runs = []
  payload = {
      "command": _common.command_line(args,
                                      exclude=("quick", "out", "resume")),
      "machine": _common.machine_description(),
      "workers": f"{num_devices} simulated XLA CPU devices (no network)",
      "jax": jax.__version__,
      "settings": vars(args),
      "runs": runs,
  }
  out = pathlib.Path(args.out)
  if args.resume and out.with_suffix(".json").exists():
    runs.extend(json.loads(out.with_suffix(".json").read_text())["runs"])
  done = {(r["optimizer"], r["density"], r["learning_rate"], r["seed"])
          for r in runs}
  start = time.perf_counter()
  for name, density in METHODS:
    for lr, seed in [(lr, seed) for lr in args.lrs for seed in args.seeds]:
      if (name, density, lr, seed) in done:
        continue
      config = config_lib.Config(
          optimizer=name, learning_rate=lr, model=args.model,
          optimizer_kwargs={} if density is None else {"density": density},
          batch_size=args.batch_size, epochs=args.epochs, seed=seed,
          num_devices=num_devices, warmup_epochs=1.0)
      load_before = os.getloadavg()[0]
      try:
        result = train.train_and_evaluate(config, dataset=dataset,
                                          quiet=True)
      except steps_lib.NonFiniteLossError as error:
        # Diverged: counts as chance-level accuracy in the pick.
        print(f"{name} density={density} lr={lr:g} seed={seed}: {error}")
        runs.append({"optimizer": name, "density": density,
                     "learning_rate": lr, "seed": seed, "diverged": True,
                     "test_accuracy": 0.0, "step_time_s": float("nan"),
                     "bytes_sent_per_step": None, "history": []})
        continue
      run = {
          "optimizer": name, "density": density, "learning_rate": lr,
          "seed": seed,
          "test_accuracy": result["final"]["test_accuracy"],
          "train_loss": result["final"]["train_loss"],
          "steps": result["steps"],
          "bytes_sent_per_step": result.get("bytes_sent_per_step"),
          "step_time_s": step_time(result["history"]),
          "wall_time_s": result["wall_time_s"],
          "load_average": [load_before, os.getloadavg()[0]],
          "history": [{k: h[k] for k in ("epoch", "test_accuracy",
                                         "train_loss")}
                      for h in result["history"]],
      }
      runs.append(run)
      print(f"{name:4s} density={density} lr={lr:g} seed={seed}: test acc "
            f"{run['test_accuracy']:.4f}, bytes/step "
            f"{run['bytes_sent_per_step']}, {run['step_time_s'] * 1e3:.1f} "
            f"ms/step ({time.perf_counter() - start:.0f} s)", flush=True)
      payload["elapsed_s"] = time.perf_counter() - start
      payload["summary"] = summarize(runs, args.model, dataset)
      _common.write_json(out.with_suffix(".json"), payload)
  payload["summary"] = summarize(runs, args.model, dataset)
  _common.write_json(out.with_suffix(".json"), payload)
  print_table(payload["summary"])
  plot(payload, out.with_suffix(".png"))


def summarize(runs, model, dataset):
  """Best learning rate per method, with bytes against dense 4·d."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sngm_optax.harness import models  # pylint: disable=g-import-not-at-top
  network = models.make_model(model, dataset.num_classes)
  params = network.init(jax.random.key(0), jnp.asarray(dataset.x[:1]))
  d = sum(x.size for x in jax.tree.leaves(params))
  dense = 4 * d
  rows = []
  for name, density in METHODS:
    candidates = [r for r in runs
                  if r["optimizer"] == name and r["density"] == density]
    if not candidates:
      continue
    by_lr = {}
    for r in candidates:
      by_lr.setdefault(r["learning_rate"], []).append(r["test_accuracy"])
    best_lr = max(by_lr, key=lambda lr: np.mean(by_lr[lr]))
    best = next(r for r in candidates if r["learning_rate"] == best_lr)
    accuracies = by_lr[best_lr]
    sent = best["bytes_sent_per_step"] or dense
    # Median over the learning-rate grid: the machine's load drifts.
    step_time = float(np.nanmedian([r["step_time_s"] for r in candidates]))
    dense_runs = [r["step_time_s"] for r in runs if r["optimizer"] == "msgd"
                  and not r.get("diverged")]
    dense_time = float(np.median(dense_runs)) if dense_runs else None
    rows.append({
        "method": name if density is None else f"{name} {density:.1%}",
        "optimizer": name, "density": density,
        "best_learning_rate": best["learning_rate"],
        "test_accuracy": float(np.mean(accuracies)),
        "test_accuracy_sd": float(np.std(accuracies)),
        "seeds": len(accuracies),
        "test_accuracy_per_lr": {str(lr): float(np.mean(a))
                                 for lr, a in by_lr.items()},
        "bytes_per_step": sent, "dense_bytes": dense,
        "reduction": dense / sent,
        "step_time_ms": step_time * 1e3,
        "step_time_vs_msgd": step_time / dense_time if dense_time else None,
    })
  return {"num_params": d, "rows": rows}


def print_table(summary):
  print(f"\nd = {summary['num_params']} parameters")
  table = [[row["method"], f"{row['best_learning_rate']:g}",
            f"{row['test_accuracy']:.4f} ± {row['test_accuracy_sd']:.4f}",
            f"{row['bytes_per_step']:.0f}", f"{row['reduction']:.0f}x less",
            f"{row['step_time_ms']:.1f}", f"{row['step_time_vs_msgd']:.2f}"]
           for row in summary["rows"]]
  print(_common.markdown_table(
      ["method", "best peak LR", "test acc. (mean ± sd over seeds)",
       "bytes/step/worker", "vs dense", "ms/step (median)", "time vs msgd"],
      table))


def plot(payload, path):
  plt = _common.pyplot()
  if plt is None:
    return
  rows = payload["summary"]["rows"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for row in rows:
    run = next(r for r in payload["runs"]
               if r["optimizer"] == row["optimizer"]
               and r["density"] == row["density"]
               and r["learning_rate"] == row["best_learning_rate"])
    left.plot([h["epoch"] for h in run["history"]],
              [h["test_accuracy"] for h in run["history"]],
              label=f"{row['method']} (lr {row['best_learning_rate']:g})")
  left.set_xlabel("epoch")
  left.set_ylabel("test accuracy")
  left.set_title("MNIST-1D, 8 workers")
  left.legend()
  right.bar([row["method"] for row in rows],
            [row["bytes_per_step"] for row in rows])
  right.set_yscale("log")
  right.set_ylabel("bytes sent per worker per step")
  right.set_title("communication (dense = 4·d)")
  _common.save_figure(fig, path)


if __name__ == "__main__":
  main()
