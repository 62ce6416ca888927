"""GMC and DGC sparse communication against dense momentum SGD, 8 workers.

Trains an MNIST-1D MLP (hidden 512, 384; `--hidden`) with the shared harness
on 8 simulated CPU devices, each holding one eighth of the global batch:

- `msgd`: dense data-parallel momentum SGD (gradients averaged with an
  all-reduce, 4·d bytes per worker per step);
- `gmc` (global momentum compression) and `dgc` (Deep Gradient Compression,
  with momentum correction, momentum factor masking and weight decay applied
  densely outside the message, as its authors do) at densities 1 %, 0.5 % and
  0.1 %, each without and with DGC's density warm-up (25 %, 6.25 %, 1.56 %,
  0.39 %, those above the target, over the first `--density-warmup-epochs`):
  each worker sends its k = density·d largest entries as (int32 index,
  float32 value) pairs, 8·k bytes per step.

On the experiment engine (`sngm_optax.harness.sweep`), the same budget for
every contender: a `sweep.Grid` over the peak learning rate `--lrs` (of a
1-epoch warm-up + cosine decay; momentum 0.9; weight decay 1e-4 on kernels)
on the first seed, extended past an edge pick by the grid's own ratio, at
most `--grid-extensions` points (the trial budget is `len(--lrs)` plus
that, recorded in the JSON); `sweep.tune` picks on a validation split (10 %
of the training set, never the test set; a diverged or collapsed run is
never picked) and reruns the pick on the other `--seeds`. Every run is kept
in the run store `<--out>_runs.jsonl`, so a stopped run resumes.

Time per step: a run's `run_time_s` (compilation kept apart in
`compile_time_s`) over its steps, the median over a contender's runs. The
simulated devices share one host's memory: there is no network, so it
measures compute (top-k selection, all-gather, scatter-add), not the
communication that the byte counts would save on a real cluster.

Bytes: one worker's message per step (`bytes_sent_per_step` in each run's
`extra`): after the warm-up and the mean over all steps of the run (larger
with warm-up), against 4·d for the dense gradient. With 16-bit values
(`value_dtype='bfloat16'`) each entry costs 6 bytes, not 8 (the runs
themselves send float32 values).

  python benchmarks/sparse_communication.py          # see benchmarks/README.md
  python benchmarks/sparse_communication.py --quick  # a smoke test
  python benchmarks/sparse_communication.py --convert-legacy OLD_JSON --out X

Writes <--out>.json (`sweep.results_record`; after every contender), its run
store and <--out>.png, and prints the table.
"""

import argparse
import dataclasses
import json
import pathlib
import statistics
import subprocess
import types

import _common

# Eight simulated workers.
_common.force_host_devices(8)

import jax  # noqa: E402

import report  # noqa: E402

from sngm_optax.harness import config as config_lib  # noqa: E402
from sngm_optax.harness import data  # noqa: E402
from sngm_optax.harness import models  # noqa: E402
from sngm_optax.harness import sweep  # noqa: E402

NUM_WORKERS = 8
VAL_FRACTION = 0.1  # the learning rate is picked on it
# Run order: the most compressed first, in case the time runs out.
DENSITIES = (0.001, 0.01, 0.005)
CLAIM = ("GMC and DGC send ~100x fewer bytes per step than dense momentum "
         "SGD without losing accuracy, and GMC is at least as accurate as DGC")


def contenders():
  """(label, optimizer, density, warm-up): dense first, then the grid."""
  rows = [("msgd", "msgd", None, False)]
  for density in DENSITIES:
    for warm_up in (False, True):
      for name in ("gmc", "dgc"):
        label = f"{name} {density:.1%}" + (" warm-up" if warm_up else "")
        rows.append((label, name, density, warm_up))
  return rows


def contender_config(args, num_train: int, contender) -> config_lib.Config:
  """The contender's `Config`, but for the learning rate and seed.

  `num_train` is the dataset's training set before the validation split.
  """
  _, name, density, warm_up = contender
  kwargs = {}
  if density is not None:
    kwargs["density"] = density
    if warm_up:
      kwargs["density_warmup_steps"] = round(
          args.density_warmup_epochs * (1 - VAL_FRACTION) * num_train
          / args.batch_size)
  return config_lib.Config(
      optimizer=name, model="mlp", model_kwargs=args.model_kwargs,
      optimizer_kwargs=kwargs,
      num_samples=args.num_samples, batch_size=args.batch_size,
      epochs=args.epochs, seed=args.seeds[0], num_devices=NUM_WORKERS,
      warmup_epochs=1.0, weight_decay=1e-4, val_fraction=VAL_FRACTION)


def budget(args) -> dict:
  """What every run of the store shares."""
  return {"benchmark": "sparse_communication",
          "num_samples": args.num_samples, "batch_size": args.batch_size,
          "epochs": args.epochs, "model": "mlp",
          "model_kwargs": args.model_kwargs,
          "density_warmup_epochs": args.density_warmup_epochs,
          "num_devices": NUM_WORKERS, "val_fraction": VAL_FRACTION,
          "warmup_epochs": 1.0, "weight_decay": 1e-4}


def grid(args) -> sweep.Grid:
  return sweep.Grid({"learning_rate": list(args.lrs)},
                    max_extensions=args.grid_extensions,
                    trial_budget=len(args.lrs) + args.grid_extensions)


def store_path(out: pathlib.Path) -> pathlib.Path:
  return out.with_name(out.name + "_runs.jsonl")


def described(result: dict, contender, store: sweep.RunStore) -> dict:
  """A `tune` result with the contender's fields, its bytes per step (of
  the pick's first run) and its median time per step (`run_time_s` over
  steps, over its ok runs)."""
  _, name, density, warm_up = contender
  runs = {run.key: run for run in store}
  mine = [runs[t["key"]] for t in result["trials"]] + [
      runs[s["key"]] for s in result["seeds"]]
  times = [run.run_time_s / run.final["steps"] for run in mine
           if run.ok and run.final.get("steps")]
  pick = runs[result["pick"]["key"]] if result["pick"] else None
  return {**result, "optimizer": name, "density": density,
          "warm_up": warm_up,
          "bytes_sent_per_step": pick and pick.extra.get("bytes_sent_per_step"),
          "bytes_sent_mean_per_step": pick and pick.extra.get(
              "bytes_sent_mean_per_step"),
          "ms_per_step": 1e3 * statistics.median(times) if times else None,
          "steps": sorted({run.final["steps"] for run in mine if run.ok})}


def plateau(store: sweep.RunStore, tuned: list[dict]) -> dict | None:
  """Dense momentum SGD's test accuracy at 75 % and 100 % of its epochs,
  the mean over the seeds of its pick."""
  dense = next((r for r in tuned if r["optimizer"] == "msgd" and r["pick"]),
               None)
  if dense is None:
    return None
  runs = {run.key: run for run in store}
  curves = [[h["test_accuracy"] for h in runs[s["key"]].curve]
            for s in dense["seeds"] if s["status"] == sweep.OK]
  if not curves or not all(curves):
    return None
  mean = [statistics.fmean(column) for column in zip(*curves)]
  return {"at_75_percent": mean[int(0.75 * (len(mean) - 1))],
          "final": mean[-1], "runs": len(curves), "epochs": len(mean)}


def num_params(model_kwargs: dict, dataset) -> int:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  network = models.make_model("mlp", dataset.num_classes, **model_kwargs)
  params = network.init(jax.random.key(0), jnp.asarray(dataset.x[:1]))
  return sum(x.size for x in jax.tree.leaves(params))


def data_fields(dataset) -> dict:
  num_val = max(1, round(VAL_FRACTION * dataset.num_train))
  return {"num_train": dataset.num_train - num_val, "num_val": num_val,
          "num_test": dataset.num_test}


def results(*, args, tuned, store, d, data_split, command, machine,
            skipped=(), **fields) -> dict:
  return sweep.results_record(
      "sparse_communication", claim=CLAIM, command=command, machine=machine,
      budget=budget(args), contenders=tuned,
      trial_budget=sweep.check_same_budget(
          {c[0]: grid(args) for c in contenders()}),
      workers=f"{NUM_WORKERS} simulated XLA CPU devices (no network)",
      num_params=d, dense_bytes=4 * d, data=data_split,
      seeds=list(args.seeds), lrs=list(args.lrs),
      grid_extensions=args.grid_extensions,
      density_warmup_epochs=args.density_warmup_epochs,
      plateau=plateau(store, tuned), num_runs=len(store),
      collapsed_runs=sweep.count_collapsed(store),
      run_time_s=sum(run.run_time_s + run.compile_time_s for run in store),
      runs=store.path.name, skipped=list(skipped), **fields)


def parse(argv=None):
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
                      help="discard the runs already in the run store")
  parser.add_argument("--only", nargs="+", default=None,
                      help="train only these contenders (labels, e.g. msgd "
                      "'gmc 0.5%% warm-up'), e.g. for a pilot")
  parser.add_argument("--convert-legacy", type=pathlib.Path, default=None,
                      metavar="OLD_JSON",
                      help="convert a JSON written before the engine (this "
                      "script's, or compression.py's) into --out")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  if args.convert_legacy:
    convert_legacy(args.convert_legacy, pathlib.Path(args.out))
    return
  if args.quick:
    args.num_samples, args.epochs, args.lrs, args.seeds = 2_000, 2, [0.1], [0]
    args.density_warmup_epochs = 1
  args.model_kwargs = {"hidden_sizes": list(args.hidden)}

  assert jax.local_device_count() >= NUM_WORKERS, jax.devices()
  dataset = data.load_mnist1d(args.num_samples)
  out = pathlib.Path(args.out)
  if args.fresh:
    store_path(out).unlink(missing_ok=True)
  store = sweep.RunStore(store_path(out), budget(args))
  d = num_params(args.model_kwargs, dataset)
  command = _common.command_line(
      args, exclude=("quick", "out", "fresh", "model_kwargs",
                     "convert_legacy"))
  tuned = []

  def write():
    record = results(args=args, tuned=tuned, store=store, d=d,
                     data_split=data_fields(dataset), command=command,
                     machine=_common.machine_description(), jax=jax.__version__)
    _common.write_json(out.with_suffix(".json"), record)
    return record

  # Contender by contender, so that its compiled step is reused (the peak
  # learning rate is a value in the optimizer state).
  for contender in contenders():
    if args.only is not None and contender[0] not in args.only:
      continue
    config = contender_config(args, dataset.num_train, contender)
    result = sweep.tune(contender[0],
                        sweep.harness_trainer(store, config, dataset),
                        grid(args), seeds=args.seeds)
    tuned.append(described(result, contender, store))
    print(f"{contender[0]:20s} {report.sparse_cell(tuned[-1])}", flush=True)
    write()
  record = write()
  print("\n" + report.sparse_table(record))
  plot(record, store, out.with_suffix(".png"))


def plot(record: dict, store: sweep.RunStore, path: pathlib.Path) -> None:
  plt = _common.pyplot()
  if plt is None:
    return
  rows = [r for r in record["contenders"] if r["summary"]]
  runs = {run.key: run for run in store}
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = {"gmc": "tab:blue", "dgc": "tab:orange", "msgd": "black"}
  for row in rows:
    marker = "o" if row["warm_up"] else "s"
    left.errorbar(row["bytes_sent_per_step"] or record["dense_bytes"],
                  row["summary"]["mean"], yerr=row["summary"]["sd"],
                  fmt=marker, color=colors[row["optimizer"]],
                  mfc=colors[row["optimizer"]] if row["warm_up"] else "none",
                  label=row["name"] if row["density"] in (None, 0.001)
                  else None, capsize=3)
  left.set_xscale("log")
  left.set_xlabel("bytes sent per worker per step (after warm-up)")
  left.set_ylabel("final test accuracy (mean ± sd over seeds)")
  left.set_title(f"MNIST-1D MLP, d = {record['num_params']:,}, "
                 f"{NUM_WORKERS} workers")
  left.legend(fontsize=8, title="filled: warm-up", title_fontsize=8)
  for row in rows:
    if row["density"] not in (None, min(DENSITIES)):
      continue
    curves = [[h["test_accuracy"] for h in runs[s["key"]].curve]
              for s in row["seeds"] if s["status"] == sweep.OK]
    if not curves or not curves[0]:
      continue
    epochs = [h["epoch"] for h in runs[row["seeds"][0]["key"]].curve]
    mean = [statistics.fmean(column) for column in zip(*curves)]
    right.plot(epochs, mean, color=colors[row["optimizer"]],
               ls="-" if row["warm_up"] or row["density"] is None else "--",
               label=row["name"])
  right.set_xlabel("epoch")
  right.set_ylabel("test accuracy (mean over seeds)")
  right.set_title(f"learning curves at {min(DENSITIES):.1%} density")
  right.legend(fontsize=8)
  _common.save_figure(fig, path)


# ----------------------------------------------------------------------------
# Converting the JSON written before the engine (kept in git history).

# The code that ran each committed file (benchmarks/README.md says so for the
# batch-256 run; the others ran at their own commit).
LEGACY_CODE_VERSIONS = {"sparse_communication_b256.json": "eceeb31"}


def _git_commit(path: pathlib.Path) -> str:
  """The last commit of `path` ("uncommitted" outside git)."""
  found = subprocess.run(["git", "log", "--format=%h", "-1", "--",
                          path.name], cwd=path.parent, capture_output=True,
                         text=True, check=False).stdout.strip()
  return found or "uncommitted"


def _legacy_run(settings, old, code_version, converted_from) -> sweep.Run:
  extra = {"converted_from": converted_from,
           "bytes_sent_per_step": old.get("bytes_sent_per_step"),
           "bytes_sent_mean_per_step": old.get("bytes_sent_mean_per_step"),
           "load_average": old.get("load_average")}
  if old.get("diverged"):
    return sweep.Run.diverged(settings, "non-finite loss (old record)",
                              code_version=code_version, extra=extra)
  wall, steps = old["wall_time_s"], old["steps"]
  # The old per-step time was measured after the first epoch (which
  # includes compilation): the rest of the wall time counts as compilation.
  run_time = min(wall, old["step_time_s"] * steps)
  extra["note"] = ("compile_time_s estimated as the wall time minus steps x "
                   "the per-step time measured after the first epoch")
  final = {k: old[k] for k in ("val_accuracy", "test_accuracy", "train_loss",
                               "steps") if k in old}
  return sweep.Run.finished(
      settings, final, num_classes=10, curve=old.get("history", []),
      run_time_s=run_time, compile_time_s=wall - run_time,
      code_version=code_version, extra=extra)


def _compression_config(args, num_train, contender) -> config_lib.Config:
  """What the first version of this script (compression.py) trained."""
  del num_train  # no warm-up
  _, name, density, _ = contender
  return config_lib.Config(
      optimizer=name, model="mlp", model_kwargs=args.model_kwargs,
      optimizer_kwargs={} if density is None else {"density": density},
      num_samples=args.num_samples, batch_size=args.batch_size,
      epochs=args.epochs, seed=args.seeds[0], num_devices=NUM_WORKERS,
      warmup_epochs=1.0)


def convert_legacy(old_path: pathlib.Path, out: pathlib.Path) -> dict:
  """Converts a pre-engine results JSON into `out`.json and its run store.

  Every old run becomes a `sweep.Run` (status by the engine's rule: a run
  at chance is collapsed); each contender's search is replayed through
  `sweep.tune` with a `sweep.Recorded` search over the learning rates it
  tried on the first seed, so the picks are the engine's. A file without
  validation accuracies (picked on the test set) is replayed on the test
  accuracy, as it was picked. `compression.json` (this script's first
  version: every learning rate on every seed, no warm-up, no validation
  split) is converted the same way.
  """
  old = json.loads(old_path.read_text())
  converted_from = f"{old_path.name}@{_git_commit(old_path)}"
  code_version = LEGACY_CODE_VERSIONS.get(old_path.name,
                                          _git_commit(old_path))
  settings = old["settings"]
  compression = "label" not in old["runs"][0]
  args = types.SimpleNamespace(
      num_samples=settings["num_samples"], batch_size=settings["batch_size"],
      epochs=settings["epochs"], lrs=settings["lrs"],
      grid_extensions=settings.get("grid_extensions", 0),
      seeds=settings["seeds"],
      density_warmup_epochs=settings.get("density_warmup_epochs", 0),
      model_kwargs={"hidden_sizes": list(settings["hidden"])})
  make_config = _compression_config if compression else contender_config
  num_train = data.load_mnist1d(args.num_samples).num_train
  labels = {}
  for run in old["runs"]:
    if compression:
      run = {**run, "warm_up": False, "label": run["optimizer"] + (
          "" if run["density"] is None else f" {run['density']:.1%}")}
    labels.setdefault(run["label"], []).append(run)
  store_path(out).unlink(missing_ok=True)
  run_budget = budget(args)
  if compression:
    run_budget.update(benchmark="compression", val_fraction=0.0,
                      density_warmup_epochs=None)
  store = sweep.RunStore(store_path(out), run_budget)
  objective = ("val_accuracy" if "val_accuracy" in old["runs"][0]
               else "test_accuracy")
  tuned = []
  for label, runs in labels.items():
    first = runs[0]
    contender = (label, first["optimizer"], first["density"],
                 first["warm_up"])
    config = make_config(args, num_train, contender)
    for run in runs:
      store.put(_legacy_run(sweep.config_settings(dataclasses.replace(
          config, learning_rate=run["learning_rate"], seed=run["seed"])),
                            run, code_version, converted_from))
    tried = [run["learning_rate"] for run in runs
             if run["seed"] == args.seeds[0]]
    search = sweep.Recorded(
        grid(args).describe(), [{"learning_rate": lr} for lr in tried],
        extended=[{"learning_rate": lr} for lr in tried
                  if lr not in args.lrs])
    result = sweep.tune(label, sweep.stored_trainer(store, config), search,
                        seeds=args.seeds, objective=objective)
    tuned.append(described(result, contender, store))
  order = [c[0] for c in contenders()]
  tuned.sort(key=lambda r: order.index(r["name"]) if r["name"] in order
             else len(order))
  num_val = (max(1, round(VAL_FRACTION * num_train))
             if objective == "val_accuracy" else 0)
  summary = old["summary"]
  record = results(
      args=args, tuned=tuned, store=store, d=summary["num_params"],
      data_split={"num_train": num_train - num_val, "num_val": num_val,
                  "num_test": args.num_samples - num_train},
      command=old["command"], machine=old["machine"] if isinstance(
          old["machine"], dict) else {"description": old["machine"]},
      converted_from=converted_from, objective=objective,
      elapsed_s=old.get("elapsed_s"), note=old.get("note"))
  record["code_version"] = code_version
  if compression:
    record["benchmark"] = "compression"
    record["budget"] = run_budget
  _common.write_json(out.with_suffix(".json"), record)
  return record


if __name__ == "__main__":
  main()
