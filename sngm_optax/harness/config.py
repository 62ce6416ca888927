"""The run configuration: one frozen dataclass, checked when it is made.

The adaptive-batch settings that depend on the number of devices are
resolved once, by `Config.adaptive_settings`.

Configs are plain Python with command-line overrides (`override`), as in the
Flax examples.

Example:
  >>> from sngm_optax.harness import config as config_lib
  >>> config_lib.override(config_lib.Config(), ['batch_size=128']).batch_size
  128
"""

import dataclasses
import json
import math
from typing import Any, NamedTuple

from sngm_optax.harness import data as data_lib
from sngm_optax.harness import models
from sngm_optax.harness.optimizers import ADAPTIVE_OPTIMIZERS
from sngm_optax.harness.optimizers import ADAPTIVE_TESTS
from sngm_optax.harness.optimizers import OPTIMIZERS
from sngm_optax.harness.optimizers import SCHEDULES


class AdaptiveBatch(NamedTuple):
  """A run's adaptive-batch settings, resolved for its number of devices.

  The field order is `build_program`'s `adaptive` key.
  """

  test: str
  max_batch_size: int
  initial_batch_size: int
  microbatch_size: int
  # "per_device" or "microbatch" ("auto" resolved).
  statistics: str


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a run; override fields with `override`.

  Budgets are in epochs (samples seen / training-set size), so runs at
  different batch sizes see the same number of examples.
  """

  # Data: a user's .npz (keys x, y, x_test, y_test), or MNIST-1D generated
  # with `num_samples` examples (80% train, 20% test) and `data_seed`.
  data_path: str | None = None
  num_samples: int = data_lib.DEFAULT_NUM_SAMPLES
  data_seed: int = data_lib.DEFAULT_SEED
  cache_dir: str | None = None
  # Fraction of the training set held out for validation (0: none).
  val_fraction: float = 0.0
  model: str = "cnn"
  # Optimizer, looked up in OPTIMIZERS, with its peak learning rate.
  optimizer: str = "sngm"
  learning_rate: float = 0.4
  weight_decay: float = 1e-4
  # Extra keyword arguments for the optimizer factory (e.g. momentum).
  optimizer_kwargs: dict = dataclasses.field(default_factory=dict)
  # "warmup_cosine": linear warmup to the peak, cosine decay to 0; "step":
  # linear warmup, then x0.1 at 50 % and 75 % of the budget; "constant".
  schedule: str = "warmup_cosine"
  warmup_epochs: float = 2.0
  batch_size: int = 4096
  # The batch is fed as num_microbatches x (batch_size / num_microbatches).
  num_microbatches: int = 1
  epochs: float = 30.0
  seed: int = 0
  # Devices to split the batch over; 0 means all local devices.
  num_devices: int = 0
  eval_batch_size: int = 4096
  # Stop after this many consecutive steps with a non-finite loss.
  max_nonfinite_steps: int = 5
  # Adaptive batch size: a test name from ADAPTIVE_TESTS puts that
  # batch-size test in front of the optimizer; `batch_size` is then the
  # initial batch size and the batch grows up to `max_batch_size`.
  adaptive_batch: str | None = None
  max_batch_size: int | None = None
  # Where the test's statistics come from: "per_device", "microbatch", or
  # "auto" (per_device on two or more devices, else microbatch).
  adaptive_statistics: str = "auto"
  # A batch that grows by a fixed rule instead of a test: "linear" or
  # "stagewise" (4 stages) from `batch_size` to `max_batch_size` over the
  # budget (see batching.RampBatch).
  batch_ramp: str | None = None
  # Checkpoints (see sngm_optax.harness.checkpoint): saved to
  # `checkpoint_dir` every `checkpoint_every_steps` steps (0: not by steps)
  # and/or at epoch ends,
  # keeping the newest `keep_checkpoints`. `max_steps` > 0 stops the run
  # (with a checkpoint) after that many steps, as a preemption would.
  checkpoint_dir: str | None = None
  checkpoint_every_steps: int = 0
  checkpoint_at_epoch_end: bool = True
  keep_checkpoints: int = 3
  max_steps: int = 0
  # Fixed-batch steps run per dispatch with `lax.scan` (1: one dispatch a
  # step; 0: the measured choice, see `train.steps_per_dispatch`).
  steps_per_dispatch: int = 0

  def __post_init__(self):
    _check_positive_int("batch_size", self.batch_size)
    _check_positive_int("num_microbatches", self.num_microbatches)
    _check_positive_int("eval_batch_size", self.eval_batch_size)
    _check_positive_int("max_nonfinite_steps", self.max_nonfinite_steps)
    _check_positive_int("num_samples", self.num_samples)
    _check_positive_int("keep_checkpoints", self.keep_checkpoints)
    for name in ("checkpoint_every_steps", "max_steps",
                 "steps_per_dispatch"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not isinstance(self.checkpoint_at_epoch_end, bool):
      raise ValueError("checkpoint_at_epoch_end must be true or false, got "
                       f"{self.checkpoint_at_epoch_end!r}")
    if not (isinstance(self.num_devices, int) and self.num_devices >= 0):
      raise ValueError(
          f"num_devices must be an integer >= 0, got {self.num_devices!r}")
    _check_real("epochs", self.epochs, 0.0, low_inclusive=False)
    _check_real("learning_rate", self.learning_rate, 0.0, low_inclusive=False)
    _check_real("weight_decay", self.weight_decay, 0.0)
    _check_real("warmup_epochs", self.warmup_epochs, 0.0)
    _check_real("val_fraction", self.val_fraction, 0.0, 1.0)
    if not isinstance(self.optimizer_kwargs, dict):
      raise ValueError("optimizer_kwargs must be a dict, got "
                       f"{self.optimizer_kwargs!r}")
    if self.batch_size % self.num_microbatches:
      raise ValueError(
          f"batch_size={self.batch_size} is not divisible by "
          f"num_microbatches={self.num_microbatches}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of "
                       f"{', '.join(sorted(OPTIMIZERS))}")
    if self.model not in models.MODELS:
      raise ValueError(f"unknown model {self.model!r}; choose one of "
                       f"{', '.join(sorted(models.MODELS))}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown schedule {self.schedule!r}; choose one of "
                       f"{', '.join(sorted(SCHEDULES))}")
    self._check_adaptive()

  @property
  def microbatch_size(self) -> int:
    """Examples per microbatch: `batch_size / num_microbatches`."""
    return self.batch_size // self.num_microbatches

  @property
  def fixed_batch(self) -> bool:
    """Whether every step has `batch_size` examples: no adaptive batch and
    no ramp (`batching.FixedBatch`)."""
    return self.adaptive_batch is None and self.batch_ramp is None

  def adaptive_settings(self, num_devices: int) -> AdaptiveBatch | None:
    """The adaptive-batch settings on `num_devices`, None for a fixed batch.

    Raises:
      ValueError: the statistics the test needs do not exist on
        `num_devices` devices.
    """
    test = self.adaptive_batch
    if test is None:
      return None
    statistics = self.adaptive_statistics
    if statistics == "auto":
      statistics = "per_device" if num_devices > 1 else "microbatch"
    if statistics == "per_device" and num_devices < 2:
      raise ValueError("adaptive_statistics='per_device' needs at least 2 "
                       "devices; use 'microbatch'")
    if statistics == "microbatch" and test not in _MICROBATCH_TESTS:
      raise ValueError(f"adaptive_batch={test!r} needs per-device "
                       "statistics, i.e. at least 2 devices")
    if statistics == "microbatch" and num_devices * self.num_microbatches < 2:
      raise ValueError(
          "adaptive_statistics='microbatch' needs at least two units a step: "
          "set num_microbatches >= 2 (or use 2+ devices)")
    return AdaptiveBatch(test, self.max_batch_size, self.batch_size,
                         self.microbatch_size, statistics)

  def _check_adaptive(self):
    """Raises ValueError for an inconsistent adaptive-batch setting."""
    test = self.adaptive_batch
    if self.batch_ramp is not None:
      self._check_ramp()
      return
    if test is None:
      if self.optimizer in ADAPTIVE_OPTIMIZERS:
        raise ValueError(f"optimizer {self.optimizer!r} needs adaptive_batch "
                         f"(one of {', '.join(ADAPTIVE_TESTS)})")
      if self.max_batch_size is not None:
        raise ValueError("max_batch_size is only used with adaptive_batch")
      return
    if test not in ADAPTIVE_TESTS:
      raise ValueError(f"unknown adaptive_batch {test!r}; choose one of "
                       f"{', '.join(ADAPTIVE_TESTS)}")
    if test == "coordinate" and self.optimizer != "adadagrad":
      raise ValueError("adaptive_batch='coordinate' is AdaGrad's own test: "
                       "use it with optimizer 'adadagrad'")
    if self.max_batch_size is None:
      raise ValueError("adaptive_batch needs max_batch_size")
    _check_positive_int("max_batch_size", self.max_batch_size)
    microbatch = self.microbatch_size
    if (self.max_batch_size < self.batch_size
        or self.max_batch_size % microbatch):
      raise ValueError(
          f"max_batch_size={self.max_batch_size} must be at least the initial "
          f"batch_size={self.batch_size} and a multiple of the microbatch "
          f"size {microbatch} (batch_size / num_microbatches)")
    if self.adaptive_statistics not in ("auto", "per_device", "microbatch"):
      raise ValueError("adaptive_statistics must be 'auto', 'per_device' or "
                       f"'microbatch', got {self.adaptive_statistics!r}")
    if (self.adaptive_statistics == "microbatch"
        and test not in _MICROBATCH_TESTS):
      raise ValueError(
          f"adaptive_batch={test!r} needs per-device statistics (the "
          "microbatch moments serve only the norm and coordinate tests)")


  def _check_ramp(self):
    """Raises ValueError for an inconsistent batch ramp."""
    if self.batch_ramp not in ("linear", "stagewise"):
      raise ValueError("batch_ramp must be 'linear' or 'stagewise', got "
                       f"{self.batch_ramp!r}")
    if self.adaptive_batch is not None or (
        self.optimizer in ADAPTIVE_OPTIMIZERS):
      raise ValueError("batch_ramp grows the batch by a fixed rule: use it "
                       "without adaptive_batch, with a plain optimizer")
    _check_positive_int("max_batch_size", self.max_batch_size)
    if (self.max_batch_size < self.batch_size
        or self.max_batch_size % self.microbatch_size):
      raise ValueError(
          f"max_batch_size={self.max_batch_size} must be at least the initial "
          f"batch_size={self.batch_size} and a multiple of the microbatch "
          f"size {self.microbatch_size} (batch_size / num_microbatches)")


# The tests that can run on the moments of the microbatch gradients.
_MICROBATCH_TESTS = ("norm", "coordinate")


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_real(name: str, value: Any, low: float, high: float = math.inf,
                *, low_inclusive: bool = True) -> None:
  """Raises ValueError unless `value` is a finite number in [low, high)."""
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not (is_number and math.isfinite(value) and value < high
          and (value >= low if low_inclusive else value > low)):
    interval = (("[" if low_inclusive else "(") + f"{low:g}, {high:g})")
    raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def override(config: Config, assignments: list[str]) -> Config:
  """Returns `config` with `KEY=VALUE` strings applied (command-line style).

  Values are parsed as JSON when possible (numbers, `null`, `{...}` for
  dicts), else taken as strings.

  Example:
    >>> override(Config(), ['batch_size=128', 'optimizer=msgd']).batch_size
    128
  """
  fields = {field.name for field in dataclasses.fields(Config)}
  changes = {}
  for assignment in assignments:
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or key not in fields:
      raise ValueError(f"bad override {assignment!r}: expected KEY=VALUE with "
                       f"KEY one of {', '.join(sorted(fields))}")
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      value = text
    default = getattr(config, key)
    if isinstance(default, float) and isinstance(value, int):
      value = float(value)
    changes[key] = value
  return dataclasses.replace(config, **changes)
