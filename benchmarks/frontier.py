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

On the same plane: adaptive batches (`ADAPTIVE`: SNGM with the norm test,
with and without the controller's growth options, and with the
inner-product test, from B = 32 up to the largest batch), searched as a
point is, their steps to target read from 8 evaluations an epoch; and the
gradient noise scale B_simple along a reference run (momentum SGD's pick at
B = 256, `sngm_optax.noise_scale_monitor` on 8 devices), to set against the
measured knee.

The trials train with `trials.train_trials` (one compiled program per
point, the hyperparameters traced; one trial per program, the fastest on
CPU) and are stored in one `sweep.RunStore` per point
(`results/frontier_runs/<optimizer>/B<batch>.jsonl`), so a stopped run resumes
where it stopped. `run` trains the points in worker processes (2 on the 2
cores: one process keeps about one core busy); `report` builds
`frontier.json` and the figure from the stores alone (points still
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
import sys

import _common

if "jax" not in sys.modules:  # imported by a test: its devices are set up
  _common.force_host_devices(8)  # the noise-scale reference run's devices

from sngm_optax.harness import config as config_lib  # noqa: E402
from sngm_optax.harness import sweep  # noqa: E402
from sngm_optax.harness import trials  # noqa: E402

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
  # Adaptive contenders and the noise-scale reference run (frontier only).
  adaptive_and_noise: bool = True
  # The model's settings, declared in every store's budget, so that the runs
  # of another model are refused rather than read as this one's.
  model_kwargs: tuple[tuple[str, object], ...] = ()


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
        "compare", "frontier_resnet", adaptive_and_noise=False,
        # BatchNorm over groups of 128 examples whatever the batch, as in
        # Hoffer et al. (2017) and Goyal et al. (2017): the large-batch
        # practice, and what keeps the large-batch step cheap.
        model_kwargs=(("ghost_batch_size", 128),)),
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
  def model_kwargs(self) -> dict:
    return dict(WORKLOADS[self.settings.workload].model_kwargs)

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
        model_kwargs=self.model_kwargs,
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
    return {"model": self.settings.model,
            **({"model_kwargs": self.model_kwargs} if self.model_kwargs
               else {}),
            "optimizer": self.optimizer, "batch_size": self.batch_size,
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
  try:
    if isinstance(job, NoiseReference):
      result = job.measure()
      return ("noise scale: " + ("no reference pick yet" if result is None
                                 else f"late B_simple "
                                 f"{result['late_noise_scale']:.0f}"))
    if isinstance(job, Adaptive):
      name, result = job.name, tune_adaptive(job)
    else:
      name = f"{job.optimizer} B={job.batch_size}"
      result = tune_point(job, job.settings.stop_time)
  except sweep.DeadlineReached:
    return f"{name}: stopped (deadline)"
  steps = [seed["steps_to_target"] for seed in result["seeds"]]
  return f"{name}: steps to target {steps}"


# ----------------------------------------------------------------------------
# Adaptive batches on the same plane: SNGM with a batch-size test
# (benchmarks/adaptive_batch.py's strongest settings), from B = 32 up to the
# frontier's largest batch, searched as a fixed point is (the same trials
# over the same ranges, the decay's length in samples), steps to target read
# from `ADAPTIVE_EVALS_PER_EPOCH` evaluations an epoch.

GROWTH_OPTIONS = {"max_growth_factor": 2.0, "smoothing": 0.9,
                  "test_interval": 10}
ADAPTIVE = {
    "sngm norm eta=0.5 +options": ("norm", {"eta": 0.5, **GROWTH_OPTIONS}),
    "sngm norm eta=0.5 (paper rule)": ("norm", {"eta": 0.5}),
    "sngm inner product theta=0.5 +options": (
        "inner_product", {"theta": 0.5, **GROWTH_OPTIONS}),
}
ADAPTIVE_OPTIMIZER = "sngm"
ADAPTIVE_INITIAL_BATCH = 32
ADAPTIVE_DEVICES = 4  # the test's per-device statistics
ADAPTIVE_EVALS_PER_EPOCH = 8


@dataclasses.dataclass(frozen=True)
class Adaptive:
  """One adaptive contender: a batch-size test in front of SNGM."""

  name: str
  settings: argparse.Namespace

  @property
  def max_batch_size(self) -> int:
    return max(self.settings.batch_sizes)

  def search(self) -> sweep.QuasiRandom:
    learning_rate, weight_decay = SEARCH_SPACE[ADAPTIVE_OPTIMIZER]
    longest = self.settings.budget_epochs
    return sweep.QuasiRandom(
        {"learning_rate": learning_rate, "weight_decay": weight_decay,
         "epochs": sweep.Range(longest * SHORTEST_DECAY, longest)},
        trial_budget=self.settings.trials, seed=0)

  def base(self) -> config_lib.Config:
    test, options = ADAPTIVE[self.name]
    return config_lib.Config(
        model=self.settings.model, optimizer=ADAPTIVE_OPTIMIZER,
        adaptive_batch=test, optimizer_kwargs=options,
        batch_size=ADAPTIVE_INITIAL_BATCH,
        max_batch_size=self.max_batch_size,
        num_samples=self.settings.num_samples,
        val_fraction=self.settings.val_fraction,
        data_seed=self.settings.data_seed, schedule="warmup_linear",
        num_devices=ADAPTIVE_DEVICES,
        evals_per_epoch=ADAPTIVE_EVALS_PER_EPOCH)

  def store_path(self) -> pathlib.Path:
    slug = "".join(c if c.isalnum() or c in "=." else "_" for c in self.name)
    return (pathlib.Path(self.settings.out)
            / f"{WORKLOADS[self.settings.workload].out}_runs" / "adaptive"
            / f"{slug}.jsonl")

  def budget(self) -> dict:
    return {"model": self.settings.model, "name": self.name,
            "num_samples": self.settings.num_samples,
            "val_fraction": self.settings.val_fraction,
            "target": self.settings.target}

  def trainer(self, train=True):
    """`train(point, seed)`: the run with its steps to target, trained
    (unless `train` is False) or read from the store."""
    store = sweep.RunStore(self.store_path(), self.budget(),
                           stop_after=self.settings.stop_time)
    base, target = self.base(), self.settings.target

    def run(point, seed):
      config = trials.trial_config(base, dict(point, seed=seed),
                                   WARMUP_FRACTION)
      settings = {**sweep.config_settings(config), "target": target}
      if not train:
        found = store.get(settings)
        if found is None:
          raise _Missing(f"{store.path}: no run of {point}, seed {seed}")
        return found
      return store.run(settings, lambda _: with_steps_to_target(
          sweep.train_config(config, _dataset(self.settings),
                             settings=settings), target))

    return run


def with_steps_to_target(run: sweep.Run, target: float) -> sweep.Run:
  """`run` with `steps_to_target` and `samples_to_target` in its final
  metrics: the first evaluation at or above `target` (None: never)."""
  if run.final is None:
    return run
  hits = [r for r in run.curve if r["val_accuracy"] >= target]
  final = dict(run.final,
               steps_to_target=hits[0]["steps"] if hits else None,
               samples_to_target=hits[0]["samples_seen"] if hits else None)
  return dataclasses.replace(run, final=final)


def tune_adaptive(contender: Adaptive, train=True) -> dict:
  return sweep.tune(contender.name, contender.trainer(train),
                    contender.search(), seeds=SEEDS, score=_score,
                    report="steps_to_target")


# ----------------------------------------------------------------------------
# The gradient noise scale along a reference run: momentum SGD's pick at the
# target's reference batch, trained to its decay's end with
# `sngm_optax.noise_scale_monitor` on `NOISE_DEVICES` devices (B_small = one
# device's share of the batch).

NOISE_REFERENCE = ("msgd", 256)
NOISE_DEVICES = 8
NOISE_EVALS_PER_EPOCH = 4


@dataclasses.dataclass(frozen=True)
class NoiseReference:
  settings: argparse.Namespace

  def path(self) -> pathlib.Path:
    return (pathlib.Path(self.settings.out)
            / f"{WORKLOADS[self.settings.workload].out}_runs"
            / "noise_scale.json")

  def config(self) -> config_lib.Config | None:
    """The reference run, None while its point has no pick."""
    optimizer, batch_size = NOISE_REFERENCE
    point = Point(optimizer, batch_size, self.settings)
    try:
      pick = tune_point(point, train=False)["pick"]
    except (_Missing, FileNotFoundError):
      return None
    if pick is None:
      return None
    return dataclasses.replace(
        trials.trial_config(point.base(), pick["point"], WARMUP_FRACTION),
        num_devices=NOISE_DEVICES, evals_per_epoch=NOISE_EVALS_PER_EPOCH)

  def load(self) -> dict | None:
    """The measurement of the current reference run, None if not made."""
    config = self.config()
    if config is None or not self.path().exists():
      return None
    import json  # pylint: disable=g-import-not-at-top
    saved = json.loads(self.path().read_text())
    current = dataclasses.asdict(config)
    return saved if saved["reference_config"] == current else None

  def measure(self) -> dict | None:
    from sngm_optax.harness import noise_scale  # pylint: disable=g-import-not-at-top
    saved = self.load()
    if saved is not None:
      return saved
    config = self.config()
    if config is None:
      return None
    result = noise_scale.measure(config, _dataset(self.settings))
    optimizer, batch_size = NOISE_REFERENCE
    result["reference"] = (f"{optimizer} at B = {batch_size}, its pick "
                           f"(seed {config.seed})")
    result["code_version"] = sweep.code_version()
    result["reference_config"] = dataclasses.asdict(config)
    _common.write_json(self.path(), result)
    return result


def points_of(args) -> list[Point]:
  """Every point, an optimizer's whole frontier after another's (in
  `--optimizers` order), so that partial results hold whole curves."""
  return [Point(optimizer, batch_size, args)
          for optimizer in args.optimizers
          for batch_size in args.batch_sizes]


def run(args) -> None:
  noise = WORKLOADS[args.workload].adaptive_and_noise
  jobs = {"points": points_of(args), "adaptive": adaptive_of(args),
          "noise": [NoiseReference(args)] if noise else []}
  jobs = [job for part in args.parts for job in jobs[part]]
  if args.workers <= 1:
    results = map(_work, jobs)
  else:
    pool = multiprocessing.get_context("spawn").Pool(args.workers)
    results = pool.imap_unordered(_work, jobs)
  for line in results:
    print(line, flush=True)


PARTS = ["points", "adaptive", "noise"]


def adaptive_of(args) -> list[Adaptive]:
  return [Adaptive(name, args) for name in args.adaptive]


def _stop_time(text: str | None):
  if not text:
    return None
  now = datetime.datetime.now(datetime.timezone.utc)
  hour, minute = map(int, text.split(":"))
  stop = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
  return stop if stop > now else stop + datetime.timedelta(days=1)


# ----------------------------------------------------------------------------
# The report: frontier.json from the stores.


def _tuned_record(tune, store: sweep.RunStore) -> dict:
  """A search's record for the JSON: its pick, the pick's seeds (steps and
  samples to target, test accuracy) and every trial; `complete` False with
  what is `missing` while the store lacks a run."""
  try:
    result = tune()
  except (_Missing, FileNotFoundError) as missing:
    return {"complete": False, "missing": str(missing)}
  runs = {run.key: run for run in store}
  seeds = [runs[seed["key"]] for seed in result["seeds"]]
  used = [runs[t["key"]] for t in result["trials"]] + seeds
  record = dict(
      code_versions=sorted({run.code_version for run in used}),
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


def point_record(point: Point) -> dict:
  """One entry of `points`."""
  return {"optimizer": point.optimizer, "batch_size": point.batch_size,
          "trials": point.settings.trials,
          "step_budget": point.budget_steps, "eval_every": point.eval_every,
          **_tuned_record(lambda: tune_point(point, train=False),
                          sweep.RunStore(point.store_path(), point.budget()))}


def adaptive_record(contender: Adaptive) -> dict:
  """One entry of `adaptive`, with the pick's batch sizes at its target."""
  test, options = ADAPTIVE[contender.name]
  store = sweep.RunStore(contender.store_path(), contender.budget())
  record = {"name": contender.name, "optimizer": ADAPTIVE_OPTIMIZER,
            "test": test, "options": options,
            "initial_batch_size": ADAPTIVE_INITIAL_BATCH,
            "max_batch_size": contender.max_batch_size,
            "num_devices": ADAPTIVE_DEVICES,
            "evals_per_epoch": ADAPTIVE_EVALS_PER_EPOCH,
            "trials": contender.settings.trials,
            **_tuned_record(lambda: tune_adaptive(contender, train=False),
                            store)}
  if record["complete"] and record["pick"]:
    train = contender.trainer(train=False)
    record["batch_size_at_target"] = [
        next((r["batch_size"] for r in run.curve
              if r["steps"] == run.final["steps_to_target"]), None)
        for run in (train(record["pick"], seed) for seed in SEEDS)]
  return record


def report(args) -> None:
  workload = WORKLOADS[args.workload]
  points = [point_record(point) for point in points_of(args)]
  adaptive = [adaptive_record(each) for each in adaptive_of(args)]
  complete = [p for p in points if p["complete"]]
  print(f"{len(complete)} of {len(points)} points complete")
  budget = {"model": args.model,
            **({"model_kwargs": dict(workload.model_kwargs)}
               if workload.model_kwargs else {}),
            "num_samples": args.num_samples,
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
      command=command(args),
      machine=_common.machine_description(), budget=budget,
      contenders=list(args.optimizers), trial_budget=args.trials,
      target=args.target, target_metric="val_accuracy",
      target_reason=workload.target_reason,
      search_space={name: [dataclasses.asdict(r) for r in ranges]
                    for name, ranges in SEARCH_SPACE.items()
                    if name in args.optimizers},
      points=points, adaptive=adaptive,
      noise_scale=(NoiseReference(args).load()
                   if workload.adaptive_and_noise else None),
      complete=all(p["complete"] for p in points + adaptive),
      compute_s=sum(p.get("run_time_s", 0.0) for p in points + adaptive),
      run_code_versions=sorted({v for p in points + adaptive
                                for v in p.get("code_versions", [])}))
  path = _common.write_json(pathlib.Path(args.out) / f"{workload.out}.json",
                            payload)
  print(f"wrote {path}")
  plot(payload, path.with_suffix(".png"))
  for point in complete:
    print(f"{point['optimizer']:>14s} B={point['batch_size']:<6d} "
          f"reached {point['trials_reached']}/{point['trials']}, steps "
          f"{point['steps_to_target']}, pick {point['pick']}")


def command(args) -> str:
  """The `run` command that trains these results (the defaults left out
  where they are long: the results directory and the adaptive list)."""
  exclude = ["stage", "stop_after", "stop_time", "workers", "parts"]
  if args.out == str(_common.RESULTS):
    exclude.append("out")
  if args.adaptive == (list(ADAPTIVE) if WORKLOADS[args.workload]
                       .adaptive_and_noise else []):
    exclude.append("adaptive")
  if args.model == WORKLOADS[args.workload].model:
    exclude.append("model")
  options = _common.command_line(args, exclude=exclude).split(" ", 2)[2:]
  return " ".join(["python benchmarks/frontier.py run", *options])


def _mean_sd(values) -> tuple[float, float] | None:
  summary = sweep.summarize(values)
  return None if summary is None else (summary.mean, summary.sd)


def plot(payload: dict, path: pathlib.Path) -> None:
  """Steps to target against B (log-log, with perfect scaling from the
  first optimizer's smallest batch), samples to target against B, and
  steps against samples with the adaptive picks on the same plane."""
  plt = _common.pyplot()
  if plt is None:
    return
  figure, axes = plt.subplots(1, 3, figsize=(16, 4.8))
  by_optimizer: dict[str, list[dict]] = {}
  for point in payload["points"]:
    if point["complete"]:
      by_optimizer.setdefault(point["optimizer"], []).append(point)
  for optimizer, points in by_optimizer.items():
    rows = [(p["batch_size"], _mean_sd(p["steps_to_target"]),
             _mean_sd(p["samples_to_target"])) for p in points]
    rows = [row for row in rows if row[1] is not None]
    if not rows:
      continue
    sizes = [row[0] for row in rows]
    line = axes[0].errorbar(sizes, [r[1][0] for r in rows],
                            yerr=[r[1][1] for r in rows], marker="o",
                            capsize=2, label=optimizer)
    color = line[0].get_color()
    axes[1].errorbar(sizes, [r[2][0] for r in rows],
                     yerr=[r[2][1] for r in rows], marker="o", capsize=2,
                     color=color, label=optimizer)
    axes[2].plot([r[2][0] for r in rows], [r[1][0] for r in rows],
                 marker="o", color=color, label=optimizer)
  first = next((p for p in payload["points"] if p["complete"]
                and _mean_sd(p["steps_to_target"])), None)
  if first is not None:
    sizes = payload["budget"]["batch_sizes"]
    steps = _mean_sd(first["steps_to_target"])[0]
    axes[0].plot(sizes, [steps * first["batch_size"] / b for b in sizes],
                 "k--", linewidth=1,
                 label=f"perfect scaling from {first['optimizer']}")
  for adaptive in payload["adaptive"]:
    steps = adaptive.get("complete") and _mean_sd(
        adaptive["steps_to_target"])
    if steps:
      samples = _mean_sd(adaptive["samples_to_target"])
      axes[2].errorbar([samples[0]], [steps[0]], xerr=[samples[1]],
                       yerr=[steps[1]], marker="*", markersize=12,
                       linestyle="none", label=adaptive["name"])
  target = f"{100 * payload['target']:g} % validation accuracy"
  for axis, (x, y) in zip(axes, [("batch size", "steps to target"),
                                 ("batch size", "samples to target"),
                                 ("samples to target", "steps to target")]):
    axis.set_xscale("log", base=2 if x == "batch size" else 10)
    axis.set_yscale("log")
    axis.set_xlabel(x)
    axis.set_ylabel(y)
    axis.grid(True, which="both", alpha=0.3)
  axes[0].set_title(f"steps to {target}")
  axes[1].set_title("samples to target")
  axes[2].set_title("steps against samples (stars: adaptive batches)")
  for axis, size in ((axes[0], 7), (axes[2], 6)):
    if axis.get_legend_handles_labels()[0]:
      axis.legend(fontsize=size)
  _common.save_figure(figure, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("stage", choices=("run", "report"))
  parser.add_argument("--workload", choices=list(WORKLOADS), default="cnn")
  parser.add_argument("--model", help="default: the workload's")
  parser.add_argument("--optimizers", nargs="+", choices=list(SEARCH_SPACE))
  parser.add_argument("--batch-sizes", nargs="+", type=int)
  parser.add_argument("--trials", type=int, default=TRIALS)
  parser.add_argument("--target", type=float)
  parser.add_argument("--budget-epochs", type=float, default=BUDGET_EPOCHS)
  parser.add_argument("--budget-steps", type=int, default=BUDGET_STEPS)
  parser.add_argument("--num-samples", type=int, default=100_000)
  parser.add_argument("--val-fraction", type=float, default=0.1)
  parser.add_argument("--data-seed", type=int, default=0)
  parser.add_argument("--adaptive", nargs="+",
                      choices=[*ADAPTIVE, "none"],
                      help="adaptive contenders (default: all of them)")
  parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS,
                      help="what `run` trains (default: all, in this order)")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--stop-after", help="HH:MM (UTC): start no run after")
  parser.add_argument("--out", default=str(_common.RESULTS),
                      help="results directory: <workload>.json and the "
                           "stores <workload>_runs/")
  args = parser.parse_args(argv)
  workload = WORKLOADS[args.workload]
  args.model = args.model or workload.model
  args.optimizers = args.optimizers or list(workload.optimizers)
  args.batch_sizes = args.batch_sizes or list(workload.batch_sizes)
  args.target = workload.target if args.target is None else args.target
  if args.adaptive is None:
    args.adaptive = list(ADAPTIVE) if workload.adaptive_and_noise else []
  elif args.adaptive == ["none"]:
    args.adaptive = []
  args.stop_time = _stop_time(args.stop_after)
  if args.stage == "run":
    run(args)
  else:
    report(args)


if __name__ == "__main__":
  main()
