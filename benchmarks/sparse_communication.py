"""GMC and DGC sparse communication against dense momentum SGD, 8 workers.

Trains an MNIST-1D MLP of 222,218 parameters (hidden 512, 384; `--hidden`)
with the shared harness (`sngm_optax.harness.train`) on 8 simulated CPU
devices, each holding one eighth of the global batch:

- `msgd`: dense data-parallel momentum SGD (gradients averaged with an
  all-reduce, 4·d bytes per worker per step);
- `gmc` (global momentum compression) and `dgc` (Deep Gradient Compression,
  with momentum correction, momentum factor masking and weight decay applied
  densely outside the message, as its authors do) at densities 1 %, 0.5 % and
  0.1 %, each without and with DGC's density warm-up (25 %, 6.25 %, 1.56 %,
  0.39 %, those above the target, over the first `--density-warmup-epochs`):
  each worker sends its k = density·d largest entries as (int32 index,
  float32 value) pairs, 8·k bytes per step.

Tuning, the same budget for every contender: the learning-rate grid `--lrs`
(peak of a 1-epoch warmup + cosine decay; momentum 0.9; weight decay 1e-4 on
kernels) on the first seed, extended by a factor 2 past an edge that wins
(up to `--grid-extensions` points); the best peak (final accuracy on a
validation split, 10 % of the training set, never on the test set) is
then run on the other seeds, and the table reports the mean ± sd over all `--seeds`
at that peak (the first seed's run took part in the pick). Every run is in
the JSON.

Time per step: measured after the first epoch (compilation), including the
short per-epoch evaluation; the median over a contender's runs. The
simulated devices share one host's memory: there is no network, so it
measures compute (top-k selection, all-gather, scatter-add), not the
communication that the byte counts would save on a real cluster.

Bytes: one worker's message per step, from `bytes_sent` in the optimizer
state: after the warm-up (`final`) and the mean over all steps of the run
(`mean`, larger with warm-up), against 4·d for the dense gradient. With
16-bit values (`value_dtype='bfloat16'`) each entry costs 6 bytes, not 8
(the column "16-bit"; the runs themselves send float32 values).

  python benchmarks/sparse_communication.py          # see benchmarks/README.md
  python benchmarks/sparse_communication.py --quick  # a smoke test

Writes benchmarks/results/sparse_communication.json (after every run; a
restarted run resumes from it unless `--fresh`) and .png.
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

from sngm_optax.harness import config as config_lib  # noqa: E402
from sngm_optax.harness import data  # noqa: E402
from sngm_optax.harness import models  # noqa: E402
from sngm_optax.harness import steps as steps_lib  # noqa: E402
from sngm_optax.harness import train  # noqa: E402

NUM_WORKERS = 8
VAL_FRACTION = 0.1  # the learning rate is picked on it
# Run order: the most compressed first, in case the time runs out.
DENSITIES = (0.001, 0.01, 0.005)


def contenders():
  """(label, optimizer, density, warm-up): dense first, then the grid."""
  rows = [("msgd", "msgd", None, False)]
  for density in DENSITIES:
    for warm_up in (False, True):
      for name in ("gmc", "dgc"):
        label = f"{name} {density:.1%}" + (" warm-up" if warm_up else "")
        rows.append((label, name, density, warm_up))
  return rows


def step_time(history):
  """Seconds per step after the first epoch (which includes compilation)."""
  first, last = history[0], history[-1]
  if last["steps"] == first["steps"]:
    return float("nan")
  return ((last["wall_time_s"] - first["wall_time_s"])
          / (last["steps"] - first["steps"]))


def run_one(args, dataset, contender, lr, seed):
  """Trains one contender at one peak learning rate and seed: a JSON row."""
  label, name, density, warm_up = contender
  kwargs = {}
  if density is not None:
    kwargs["density"] = density
    if warm_up:
      kwargs["density_warmup_steps"] = round(
          args.density_warmup_epochs * (1 - VAL_FRACTION) * dataset.num_train
          / args.batch_size)
  config = config_lib.Config(
      optimizer=name, learning_rate=lr, model="mlp",
      model_kwargs=args.model_kwargs,
      optimizer_kwargs=kwargs, batch_size=args.batch_size,
      epochs=args.epochs, seed=seed, num_devices=NUM_WORKERS,
      warmup_epochs=1.0, weight_decay=1e-4, val_fraction=VAL_FRACTION)
  row = {"label": label, "optimizer": name, "density": density,
         "warm_up": warm_up, "learning_rate": lr, "seed": seed}
  load_before = os.getloadavg()[0]
  try:
    result = train.train_and_evaluate(config, dataset=dataset, quiet=True)
  except steps_lib.NonFiniteLossError as error:
    print(f"{label} lr={lr:g} seed={seed}: {error}")
    return {**row, "diverged": True, "test_accuracy": 0.0,
            "val_accuracy": 0.0,
            "step_time_s": float("nan"), "history": []}
  return {
      **row,
      "test_accuracy": result["final"]["test_accuracy"],
      "val_accuracy": result["final"]["val_accuracy"],
      "train_loss": result["final"]["train_loss"],
      "steps": result["steps"],
      "bytes_sent_per_step": result.get("bytes_sent_per_step"),
      "bytes_sent_mean_per_step": result.get("bytes_sent_mean_per_step"),
      "step_time_s": step_time(result["history"]),
      "wall_time_s": result["wall_time_s"],
      "load_average": [load_before, os.getloadavg()[0]],
      "history": [{k: h[k] for k in ("epoch", "test_accuracy", "train_loss")}
                  for h in result["history"]],
  }


def tried_learning_rates(runs, label, seed):
  return [r["learning_rate"] for r in runs
          if r["label"] == label and r["seed"] == seed]


def best_learning_rate(runs, label, seed):
  """The grid's best peak for `label` on the tuning `seed` (validation
  accuracy), or None."""
  tuned = [r for r in runs if r["label"] == label and r["seed"] == seed]
  if not tuned:
    return None
  return max(tuned, key=lambda r: r["val_accuracy"])["learning_rate"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--num-samples", type=int, default=10_000)
  parser.add_argument("--batch-size", type=int, default=1024)
  parser.add_argument("--epochs", type=float, default=20)
  parser.add_argument("--density-warmup-epochs", type=float, default=3)
  parser.add_argument("--lrs", type=float, nargs="+", default=[0.4, 0.8, 1.6])
  parser.add_argument("--grid-extensions", type=int, default=2,
                      help="points added past a grid edge that wins")
  parser.add_argument("--hidden", type=int, nargs="+", default=[512, 384])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out",
                      default=str(_common.RESULTS / "sparse_communication"),
                      help="path of the results without .json / .png")
  parser.add_argument("--fresh", action="store_true",
                      help="discard the runs already in the output JSON")
  parser.add_argument("--only", nargs="+", default=None,
                      help="train only these contenders (labels, e.g. msgd "
                      "'gmc 0.5%% warm-up'), e.g. for a pilot")
  args = parser.parse_args()
  if args.quick:
    args.num_samples, args.epochs, args.lrs, args.seeds = 2_000, 2, [0.1], [0]
    args.density_warmup_epochs = 1
  args.model_kwargs = {"hidden_sizes": list(args.hidden)}

  assert jax.local_device_count() >= NUM_WORKERS, jax.devices()
  dataset = data.load_mnist1d(args.num_samples)
  out = pathlib.Path(args.out)
  runs = []
  if not args.fresh and out.with_suffix(".json").exists():
    runs.extend(json.loads(out.with_suffix(".json").read_text())["runs"])
  payload = {
      "command": _common.command_line(
          args, exclude=("quick", "out", "fresh", "model_kwargs")),
      "machine": _common.machine_description(),
      "workers": f"{NUM_WORKERS} simulated XLA CPU devices (no network)",
      "jax": jax.__version__,
      "settings": vars(args),
      "runs": runs,
  }
  start = time.perf_counter()

  def record(contender, lr, seed):
    if any(r["label"] == contender[0] and r["learning_rate"] == lr
           and r["seed"] == seed for r in runs):
      return
    run = run_one(args, dataset, contender, lr, seed)
    runs.append(run)
    print(f"{run['label']:20s} lr={lr:g} seed={seed}: test acc "
          f"{run['test_accuracy']:.4f}, bytes/step "
          f"{run.get('bytes_sent_per_step')}, "
          f"{run['step_time_s'] * 1e3:.1f} ms/step "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    payload["elapsed_s"] = time.perf_counter() - start
    payload["summary"] = summarize(runs, args, dataset)
    _common.write_json(out.with_suffix(".json"), payload)

  tune_seed = args.seeds[0]
  # Contender by contender, so that its compiled step is reused (the peak
  # learning rate is a value in the optimizer state).
  for contender in contenders():
    if args.only is not None and contender[0] not in args.only:
      continue
    for lr in args.lrs:  # the grid, on the tuning seed
      record(contender, lr, tune_seed)
    # A pick on the grid's edge: one more point past it (x2 or /2), twice at
    # most, so that no pick sits on an edge of what was tried.
    for _ in range(args.grid_extensions):
      tried = sorted(tried_learning_rates(runs, contender[0], tune_seed))
      best = best_learning_rate(runs, contender[0], tune_seed)
      if best not in (tried[0], tried[-1]):
        break
      record(contender, best * 2 if best == tried[-1] else best / 2,
             tune_seed)
    for seed in args.seeds[1:]:  # the other seeds, at the pick
      record(contender, best_learning_rate(runs, contender[0], tune_seed),
             seed)
  payload["summary"] = summarize(runs, args, dataset)
  _common.write_json(out.with_suffix(".json"), payload)
  print_table(payload["summary"])
  plot(payload, out.with_suffix(".png"))


def _num_params(args, dataset):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  network = models.make_model("mlp", dataset.num_classes,
                              **args.model_kwargs)
  params = network.init(jax.random.key(0), jnp.asarray(dataset.x[:1]))
  return sum(x.size for x in jax.tree.leaves(params))


def summarize(runs, args, dataset):
  """Per contender: the pick, accuracy over seeds, bytes and time."""
  d = _num_params(args, dataset)
  dense = 4 * d
  rows = []
  for label, name, density, warm_up in contenders():
    best_lr = best_learning_rate(runs, label, args.seeds[0])
    if best_lr is None:
      continue
    picked = [r for r in runs
              if r["label"] == label and r["learning_rate"] == best_lr]
    accuracies = [r["test_accuracy"] for r in picked]
    final = picked[0].get("bytes_sent_per_step") or dense
    mean = picked[0].get("bytes_sent_mean_per_step") or dense
    times = [r["step_time_s"] for r in runs if r["label"] == label]
    rows.append({
        "method": label, "optimizer": name, "density": density,
        "warm_up": warm_up, "best_learning_rate": best_lr,
        "pick_on_grid_edge": best_lr in (
            min(tried_learning_rates(runs, label, args.seeds[0])),
            max(tried_learning_rates(runs, label, args.seeds[0]))),
        "tuning_val_accuracy_per_lr": {
            str(r["learning_rate"]): r["val_accuracy"] for r in runs
            if r["label"] == label and r["seed"] == args.seeds[0]},
        "test_accuracy": float(np.mean(accuracies)),
        "test_accuracy_sd": float(np.std(accuracies, ddof=1))
                            if len(accuracies) > 1 else float("nan"),
        "seeds": len(accuracies),
        "bytes_per_step": final, "bytes_per_step_mean": mean,
        "bytes_per_step_16bit": final if density is None else final * 6 / 8,
        "dense_bytes": dense, "reduction": dense / final,
        "reduction_mean": dense / mean,
        "step_time_ms": float(np.nanmedian(times)) * 1e3,
    })
  rows.sort(key=lambda r: (r["density"] is not None, -(r["density"] or 0),
                           r["warm_up"]))
  dense_rows = [r for r in rows if r["optimizer"] == "msgd"]
  for row in rows:
    if dense_rows:
      base = dense_rows[0]
      row["vs_dense_points"] = 100 * (row["test_accuracy"]
                                      - base["test_accuracy"])
      row["step_time_vs_msgd"] = row["step_time_ms"] / base["step_time_ms"]
  return {"num_params": d, "rows": rows,
          "plateau": _plateau(runs, args.seeds[0])}


def _plateau(runs, seed):
  """Dense momentum SGD's test accuracy at 75 % and 100 % of its epochs.

  The mean over the seeds at its picked learning rate.
  """
  best_lr = best_learning_rate(runs, "msgd", seed)
  dense = [r for r in runs if r["label"] == "msgd" and r.get("history")
           and r["learning_rate"] == best_lr]
  if not dense:
    return None
  curves = np.array([[h["test_accuracy"] for h in r["history"]]
                     for r in dense])
  mean = curves.mean(0)
  return {"at_75_percent": float(mean[int(0.75 * (len(mean) - 1))]),
          "final": float(mean[-1]), "runs": len(dense)}


def print_table(summary):
  print(f"\nd = {summary['num_params']} parameters; dense momentum SGD "
        f"plateau: {summary['plateau']}")
  table = [[row["method"], f"{row['best_learning_rate']:g}"
            + (" (edge)" if row["pick_on_grid_edge"] else ""),
            f"{row['test_accuracy']:.4f} ± {row['test_accuracy_sd']:.4f}",
            f"{row.get('vs_dense_points', 0):+.1f}",
            f"{row['bytes_per_step']:,.0f} ({row['reduction']:.0f}×)",
            f"{row['bytes_per_step_mean']:,.0f} ({row['reduction_mean']:.0f}×)",
            f"{row['bytes_per_step_16bit']:,.0f}",
            f"{row['step_time_ms']:.1f}",
            f"{row.get('step_time_vs_msgd', float('nan')):.2f}"]
           for row in summary["rows"]]
  print(_common.markdown_table(
      ["method", "peak LR", f"test acc. (mean ± sd, {summary['rows'][0]['seeds']}"
       " seeds)", "vs dense (points)", "bytes/step/worker, final (less)",
       "mean over run (less)", "16-bit values", "ms/step", "time vs msgd"],
      table, align="llrrrrrrr"))


def plot(payload, path):
  plt = _common.pyplot()
  if plt is None:
    return
  rows = payload["summary"]["rows"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = {"gmc": "tab:blue", "dgc": "tab:orange", "msgd": "black"}
  for row in rows:
    marker = "o" if row["warm_up"] else "s"
    left.errorbar(row["bytes_per_step"], row["test_accuracy"],
                  yerr=row["test_accuracy_sd"], fmt=marker,
                  color=colors[row["optimizer"]],
                  mfc=colors[row["optimizer"]] if row["warm_up"] else "none",
                  label=row["method"] if row["density"] in (None, 0.001)
                  else None, capsize=3)
  left.set_xscale("log")
  left.set_xlabel("bytes sent per worker per step (after warm-up)")
  left.set_ylabel("final test accuracy (mean ± sd over seeds)")
  left.set_title(f"MNIST-1D MLP, d = {payload['summary']['num_params']:,}, "
                 "8 workers")
  left.legend(fontsize=8, title="filled: warm-up", title_fontsize=8)
  for row in rows:
    if row["density"] not in (None, 0.001):
      continue
    picked = [r for r in payload["runs"] if r["label"] == row["method"]
              and r["learning_rate"] == row["best_learning_rate"]
              and r.get("history")]
    curves = np.array([[h["test_accuracy"] for h in r["history"]]
                       for r in picked])
    epochs = [h["epoch"] for h in picked[0]["history"]]
    right.plot(epochs, curves.mean(0), color=colors[row["optimizer"]],
               ls="-" if row["warm_up"] or row["density"] is None else "--",
               label=row["method"])
  right.set_xlabel("epoch")
  right.set_ylabel("test accuracy (mean over seeds)")
  right.set_title("learning curves at 0.1 % density")
  right.legend(fontsize=8)
  _common.save_figure(fig, path)


if __name__ == "__main__":
  main()
