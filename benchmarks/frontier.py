"""Steps to a target at every batch size: the frontier (Shallue et al. 2019).

For each optimizer and each batch size B, the same number of quasi-random
trials (`TRIALS`, scrambled Halton points, `sweep.QuasiRandom`) over the
peak learning rate (log), the weight decay (log) and the length of a linear
decay (in epochs, log), with a linear warm-up of a fixed fraction of that
length. Every trial stops at its decay's end, at the step budget
(`step_budget`: the larger of `BUDGET_EPOCHS` epochs and `BUDGET_STEPS`
steps), or at the first evaluation at or above the declared validation
`target`: its steps to target (null when not reached). The pick at each
point is the trial with the fewest steps to target, rerun on 2 more seeds.

The trials train with `trials.train_trials` (one compiled program per
point, the hyperparameters traced; one trial per program, the fastest on
CPU) and are stored in one `sweep.RunStore` per point
(`results/frontier_runs/<optimizer>/B<batch>.jsonl`), so a stopped run resumes
where it stopped. `run` trains the points in worker processes (2 on the 2
cores: one process keeps about one core busy); `report` builds
`frontier.json` and the figures from the stores alone (points still
missing runs are listed as incomplete), so partial results can be
committed as they land.

Workloads: `cnn` (MNIST-1D, 100k examples with a 10 % validation split, the
harness's CNN, B = 32 ... 16,384, 7 optimizers) and `resnet` (the same data,
the BatchNorm ResNet, B = 256 ... 8,192, 5 optimizers), written to
frontier.json and frontier_resnet.json.

  python benchmarks/frontier.py run --workers 2 --stop-after 15:40
  python benchmarks/frontier.py report
  python benchmarks/frontier.py run --workload resnet --workers 2
  python benchmarks/frontier.py run --optimizers msgd --batch-sizes 256 \\
      --trials 2 --budget-epochs 2 --budget-steps 10 --num-samples 4000 \\
      --out /tmp/frontier   # a quick look
"""

import argparse
import dataclasses
import datetime
import math
import multiprocessing
import pathlib

import _common

_common.force_host_devices(8)  # the noise-scale reference run's devices

from sngm_optax.harness import config as config_lib  # noqa: E402
from sngm_optax.harness import sweep  # noqa: E402

CLAIM = ("steps to a validation target against the batch size, each "
         "optimizer tuned with the same number of trials at every batch "
         "size: where each one stops scaling")
TRIALS = 12
SEEDS = (0, 1, 2)
BUDGET_EPOCHS = 40
BUDGET_STEPS = 1000
WARMUP_FRACTION = 0.1
# The decay lengths searched: from this fraction of the step budget to all
# of it (log). On a first try with 1/20, the pick at B = 32 sat at that end.
SHORTEST_DECAY = 1 / 64
# Evaluations per epoch below B = 4,096; from there every
# `EVAL_EVERY_LARGE_BATCH` steps at most.
EVALS_PER_EPOCH = 4
LARGE_BATCH, EVAL_EVERY_LARGE_BATCH = 4096, 5

# Learning rates (log) wide enough for every batch size; weight decay
# coupled (L2 on the kernels) or decoupled (AdamW, LAMB).
COUPLED_DECAY = sweep.Range(1e-6, 1e-3)
DECOUPLED_DECAY = sweep.Range(1e-4, 1e-1)
SEARCH_SPACE = {
    "msgd": (sweep.Range(5e-3, 1.5), COUPLED_DECAY),
    "nesterov": (sweep.Range(5e-3, 1.5), COUPLED_DECAY),
    "sngm": (sweep.Range(1e-2, 4.0), COUPLED_DECAY),
    "sngm_nesterov": (sweep.Range(1e-2, 4.0), COUPLED_DECAY),
    "lars": (sweep.Range(0.3, 150.0), sweep.Range(1e-7, 1e-3)),
    "lamb": (sweep.Range(5e-4, 0.2), DECOUPLED_DECAY),
    "adamw": (sweep.Range(1e-4, 5e-2), DECOUPLED_DECAY),
}


@dataclasses.dataclass(frozen=True)
class Workload:
  model: str
  optimizers: tuple[str, ...]
  batch_sizes: tuple[int, ...]
  target: float
  target_reason: str
  out: str


WORKLOADS = {
    "cnn": Workload(
        "cnn", ("msgd", "sngm", "lars", "lamb", "nesterov", "sngm_nesterov",
                "adamw"),
        tuple(2 ** k for k in range(5, 15)), 0.975,
        "what tuned momentum SGD at B = 256 reaches in a few epochs (its "
        "epochs to target are this file's msgd B=256 point), below the "
        "test accuracy it plateaus at in large_batch.json, so that the "
        "frontier measures speed, not the plateau", "frontier"),
    "resnet": Workload(
        "resnet", ("msgd", "sngm", "lars", "lamb", "sngm_nesterov"),
        (256, 1024, 4096, 8192), 0.975,
        "the CNN frontier's target, so that the two workloads' steps "
        "compare", "frontier_resnet"),
}


def step_budget(batch_size: int, num_train: int, epochs: float,
                steps: int) -> int:
  """The larger of `epochs` epochs and `steps` steps."""
  return max(math.ceil(epochs * num_train / batch_size), steps)


def eval_every(batch_size: int, num_train: int) -> int:
  """`EVALS_PER_EPOCH` evaluations an epoch, and at most
  `EVAL_EVERY_LARGE_BATCH` steps apart from B = `LARGE_BATCH`."""
  every = max(1, round(num_train / batch_size / EVALS_PER_EPOCH))
  if batch_size >= LARGE_BATCH:
    every = min(every, EVAL_EVERY_LARGE_BATCH)
  return every


@dataclasses.dataclass(frozen=True)
class Point:
  """One (optimizer, batch size) of the frontier and its declared search."""

  optimizer: str
  batch_size: int
  settings: argparse.Namespace

  @property
  def num_train(self) -> int:
    total_train = self.settings.num_samples * 4 // 5  # MNIST-1D's 80/20
    return total_train - round(total_train * self.settings.val_fraction)

  @property
  def budget_steps(self) -> int:
    return step_budget(self.batch_size, self.num_train,
                       self.settings.budget_epochs, self.settings.budget_steps)

  @property
  def eval_every(self) -> int:
    return eval_every(self.batch_size, self.num_train)

  def search(self) -> sweep.QuasiRandom:
    learning_rate, weight_decay = SEARCH_SPACE[self.optimizer]
    longest = self.budget_steps * self.batch_size / self.num_train
    return sweep.QuasiRandom(
        {"learning_rate": learning_rate, "weight_decay": weight_decay,
         "epochs": sweep.Range(longest * SHORTEST_DECAY, longest)},
        trial_budget=self.settings.trials, seed=0)

  def base(self) -> config_lib.Config:
    return config_lib.Config(
        model=self.settings.model, optimizer=self.optimizer,
        batch_size=self.batch_size, num_samples=self.settings.num_samples,
        val_fraction=self.settings.val_fraction,
        data_seed=self.settings.data_seed, schedule="warmup_linear",
        num_devices=1)

  def store_path(self) -> pathlib.Path:
    return (pathlib.Path(self.settings.out)
            / f"{WORKLOADS[self.settings.workload].out}_runs"
            / self.optimizer / f"B{self.batch_size}.jsonl")

  def options(self) -> dict:
    return {"eval_every": self.eval_every, "max_steps": self.budget_steps,
            "target": self.settings.target, "early_stop": True,
            "test_every_eval": False, "warmup_fraction": WARMUP_FRACTION,
            "trials_per_program": 1}

  def budget(self) -> dict:
    return {"model": self.settings.model, "optimizer": self.optimizer,
            "batch_size": self.batch_size,
            "num_samples": self.settings.num_samples,
            "val_fraction": self.settings.val_fraction,
            "step_budget": self.budget_steps, "target": self.settings.target}


def _score(run: sweep.Run) -> float | None:
  """Fewer steps to target is better; a trial that missed it has none."""
  steps = run.metric("steps_to_target") if run.ok else None
  return None if steps is None else -steps


class _Missing(Exception):
  """`report` found a point's store without one of its runs."""


class _StoredOnly:
  """A `VmappedTrainer` that never trains: the report's reader."""

  def __init__(self, trainer: sweep.VmappedTrainer):
    self.trainer = trainer

  def __call__(self, point, seed):
    run = self.trainer.store.get(self.trainer.settings(point, seed))
    if run is None:
      raise _Missing(f"{self.trainer.store.path}: no run of {point}, seed "
                     f"{seed}")
    return run


_DATASETS = {}


def _dataset(settings):
  from sngm_optax.harness import data  # pylint: disable=g-import-not-at-top
  key = (settings.num_samples, settings.data_seed)
  if key not in _DATASETS:
    _DATASETS[key] = data.load_mnist1d(settings.num_samples,
                                       settings.data_seed)
  return _DATASETS[key]


def _trainer(point: Point, stop_after=None, dataset=None):
  store = sweep.RunStore(point.store_path(), point.budget(),
                         stop_after=stop_after)
  return sweep.VmappedTrainer(store, point.base(), dataset, point.options())


def tune_point(point: Point, stop_after=None, train=True) -> dict:
  """The point's search and its pick's seeds (`sweep.tune`), trained or
  (`train=False`) read from its store."""
  trainer = _trainer(point, stop_after,
                     _dataset(point.settings) if train else None)
  return sweep.tune(f"{point.optimizer} B={point.batch_size}",
                    trainer if train else _StoredOnly(trainer),
                    point.search(), seeds=SEEDS, score=_score,
                    report="steps_to_target")


def _work(job) -> str:
  point, stop_after = job
  try:
    result = tune_point(point, stop_after)
  except sweep.DeadlineReached:
    return f"{point.optimizer} B={point.batch_size}: stopped (deadline)"
  steps = [seed["steps_to_target"] for seed in result["seeds"]]
  return (f"{point.optimizer} B={point.batch_size}: steps to target "
          f"{steps}")


def points_of(args) -> list[Point]:
  """Every point, an optimizer's whole frontier after another's (in
  `--optimizers` order), so that partial results hold whole curves."""
  return [Point(optimizer, batch_size, args)
          for optimizer in args.optimizers
          for batch_size in args.batch_sizes]


def run(args) -> None:
  stop_after = _stop_time(args.stop_after)
  jobs = [(point, stop_after) for point in points_of(args)]
  if args.workers <= 1:
    results = map(_work, jobs)
  else:
    pool = multiprocessing.get_context("spawn").Pool(args.workers)
    results = pool.imap_unordered(_work, jobs)
  for line in results:
    print(line, flush=True)


def _stop_time(text: str | None):
  if not text:
    return None
  now = datetime.datetime.now(datetime.timezone.utc)
  hour, minute = map(int, text.split(":"))
  stop = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
  return stop if stop > now else stop + datetime.timedelta(days=1)


# ----------------------------------------------------------------------------
# The report: frontier.json from the stores.


def point_record(point: Point) -> dict:
  """One entry of `points`: the point's search, pick and seeds, or what it
  still misses."""
  record = {"optimizer": point.optimizer, "batch_size": point.batch_size,
            "trials": point.settings.trials,
            "step_budget": point.budget_steps, "eval_every": point.eval_every}
  try:
    result = tune_point(point, train=False)
  except (_Missing, FileNotFoundError) as missing:
    return {**record, "complete": False, "missing": str(missing)}
  store = sweep.RunStore(point.store_path(), point.budget())
  runs = {run.key: run for run in store}
  seeds = [runs[seed["key"]] for seed in result["seeds"]]
  record.update(
      complete=True, pick=result["pick"] and result["pick"]["point"],
      search=result["search"], collapsed=result["collapsed"],
      trials_reached=sum(t["score"] is not None for t in result["trials"]),
      trial_points=[{**t["point"], "steps_to_target": None if t["score"]
                     is None else -t["score"], "status": t["status"]}
                    for t in result["trials"]],
      steps_to_target=[r.metric("steps_to_target") for r in seeds],
      samples_to_target=[r.metric("samples_to_target") for r in seeds],
      test_accuracy=[r.metric("test_accuracy") for r in seeds],
      summary=result["summary"],
      run_time_s=sum(runs[t["key"]].run_time_s for t in result["trials"])
      + sum(r.run_time_s for r in seeds[1:]))
  if not seeds:  # no trial reached the target: no pick to rerun
    record.update(steps_to_target=[None] * len(SEEDS),
                  samples_to_target=[None] * len(SEEDS))
  return record


def report(args) -> None:
  workload = WORKLOADS[args.workload]
  points = [point_record(point) for point in points_of(args)]
  complete = [p for p in points if p["complete"]]
  print(f"{len(complete)} of {len(points)} points complete")
  budget = {"model": args.model, "num_samples": args.num_samples,
            "val_fraction": args.val_fraction, "data_seed": args.data_seed,
            "batch_sizes": list(args.batch_sizes),
            "budget_epochs": args.budget_epochs,
            "budget_steps": args.budget_steps,
            "warmup_fraction": WARMUP_FRACTION,
            "shortest_decay": SHORTEST_DECAY, "seeds": list(SEEDS),
            "evals_per_epoch": EVALS_PER_EPOCH,
            "eval_every_large_batch": EVAL_EVERY_LARGE_BATCH}
  payload = sweep.results_record(
      workload.out, claim=CLAIM,
      command=_common.command_line(args, exclude=("stop_after", "workers")),
      machine=_common.machine_description(), budget=budget,
      contenders=list(args.optimizers), trial_budget=args.trials,
      target=args.target, target_metric="val_accuracy",
      target_reason=workload.target_reason,
      search_space={name: [dataclasses.asdict(r) for r in ranges]
                    for name, ranges in SEARCH_SPACE.items()
                    if name in args.optimizers},
      points=points, complete=len(complete) == len(points),
      compute_s=sum(p.get("run_time_s", 0.0) for p in complete))
  path = _common.write_json(pathlib.Path(args.out) / f"{workload.out}.json",
                            payload)
  print(f"wrote {path}")
  for point in complete:
    print(f"{point['optimizer']:>14s} B={point['batch_size']:<6d} "
          f"reached {point['trials_reached']}/{point['trials']}, steps "
          f"{point['steps_to_target']}, pick {point['pick']}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("stage", choices=("run", "report"))
  parser.add_argument("--workload", choices=list(WORKLOADS), default="cnn")
  parser.add_argument("--optimizers", nargs="+", choices=list(SEARCH_SPACE))
  parser.add_argument("--batch-sizes", nargs="+", type=int)
  parser.add_argument("--trials", type=int, default=TRIALS)
  parser.add_argument("--target", type=float)
  parser.add_argument("--budget-epochs", type=float, default=BUDGET_EPOCHS)
  parser.add_argument("--budget-steps", type=int, default=BUDGET_STEPS)
  parser.add_argument("--num-samples", type=int, default=100_000)
  parser.add_argument("--val-fraction", type=float, default=0.1)
  parser.add_argument("--data-seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--stop-after", help="HH:MM (UTC): start no run after")
  parser.add_argument("--out", default=str(_common.RESULTS),
                      help="results directory: <workload>.json and the "
                           "stores <workload>_runs/")
  args = parser.parse_args()
  workload = WORKLOADS[args.workload]
  args.model = workload.model
  args.optimizers = args.optimizers or list(workload.optimizers)
  args.batch_sizes = args.batch_sizes or list(workload.batch_sizes)
  args.target = workload.target if args.target is None else args.target
  if args.stage == "run":
    run(args)
  else:
    report(args)


if __name__ == "__main__":
  main()
