"""The run configuration: one frozen dataclass, checked when it is made.

`Config` is the one source of the defaults, the help texts and the checks
of a run's settings: each field's metadata holds its help, its `FieldCheck`
(a check of `sngm_optax._checks`) and its choices; `Config.__post_init__`
applies them, and `sngm-optax train` builds its options from them.

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
import typing
from typing import Any, Callable, NamedTuple

from sngm_optax import _checks
from sngm_optax.harness import data as data_lib
from sngm_optax.harness import models
from sngm_optax.harness.optimizers import ADAPTIVE_OPTIMIZERS
from sngm_optax.harness.optimizers import ADAPTIVE_TESTS
from sngm_optax.harness.optimizers import OPTIMIZERS
from sngm_optax.harness.optimizers import PER_DEVICE_STATE
from sngm_optax.harness.optimizers import SCHEDULES


class AdaptiveBatch(NamedTuple):
  """A run's adaptive-batch settings, resolved for its number of devices.

  The field order is that of `train.ProgramSpec.adaptive`.
  """

  test: str
  max_batch_size: int
  initial_batch_size: int
  microbatch_size: int
  # "per_device" or "microbatch" ("auto" resolved).
  statistics: str


class FieldCheck(NamedTuple):
  """How a `Config` field's value is checked, alone."""

  # `check(name, value)` raises ValueError for a bad value (a check of
  # `sngm_optax._checks`).
  check: Callable[[str, Any], Any]
  # What a good value is, e.g. "a positive integer" (the command line's
  # "expected ..." message).
  description: str


def _check_bool(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_fraction(name: str, value: Any) -> None:
  _checks.check_range(name, value, 0.0, 1.0, high_inclusive=False)


def _check_keyword_arguments(name: str, value: Any) -> None:
  if not (isinstance(value, dict) and all(isinstance(key, str)
                                          for key in value)):
    raise ValueError(f"{name} must be a dict of keyword arguments, got "
                     f"{value!r}")


POSITIVE_INT = FieldCheck(_checks.check_positive_int, "a positive integer")
NON_NEGATIVE_INT = FieldCheck(_checks.check_non_negative_int,
                              "an integer >= 0")
POSITIVE = FieldCheck(_checks.check_positive, "a positive number")
NON_NEGATIVE = FieldCheck(_checks.check_non_negative, "a number >= 0")
FRACTION = FieldCheck(_check_fraction, "a number in [0, 1)")
BOOL = FieldCheck(_check_bool, "true or false")
KEYWORD_ARGUMENTS = FieldCheck(_check_keyword_arguments,
                               "a JSON object of keyword arguments")


def _option(default: Any = dataclasses.MISSING, *, doc: str,
            check: FieldCheck | None = None, choices: Any = None,
            default_factory: Any = dataclasses.MISSING):
  """A `Config` field with its help text, its check and its choices (a
  registry whose keys are the allowed values, or a tuple of them), which
  `Config.__post_init__` and the command line (`cli`) both read."""
  return dataclasses.field(
      default=default, default_factory=default_factory,
      metadata={"help": doc, "check": check, "choices": choices})


def choices_of(field: dataclasses.Field) -> tuple | None:
  """The allowed values of `field` (sorted registry keys), None if free."""
  choices = field.metadata.get("choices")
  if choices is None:
    return None
  return tuple(sorted(choices)) if isinstance(choices, dict) else choices


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a run; override fields with `override`.

  Budgets are in epochs (samples seen / training-set size), so runs at
  different batch sizes see the same number of examples. Each field's
  metadata holds its help text, its check and its choices: the one place
  where defaults and validation live (`sngm_optax.harness.cli` builds the
  `train` options from them).
  """

  # --- Data.
  data_path: str | None = _option(
      None, doc="your own dataset: an .npz with x, y, x_test, y_test "
                "(default: MNIST-1D generated locally and cached)")
  num_samples: int = _option(
      data_lib.DEFAULT_NUM_SAMPLES, check=POSITIVE_INT,
      doc="MNIST-1D size, train + test (80/20 split)")
  data_seed: int = _option(data_lib.DEFAULT_SEED, check=NON_NEGATIVE_INT,
                           doc="seed of the generated MNIST-1D (and of the "
                               "validation split)")
  cache_dir: str | None = _option(
      None, doc="MNIST-1D cache directory (default: $SNGM_OPTAX_CACHE, "
                "else $XDG_CACHE_HOME/sngm_optax or ~/.cache/sngm_optax)")
  val_fraction: float = _option(
      0.0, check=FRACTION,
      doc="fraction of the training set held out for validation (0: none)")
  # --- Model and optimizer.
  model: str = _option("cnn", choices=models.MODELS, doc="model")
  model_kwargs: dict = _option(
      default_factory=dict, check=KEYWORD_ARGUMENTS,
      doc='keyword arguments of the model, e.g. \'{"hidden_sizes": [64]}\'')
  optimizer: str = _option("sngm", choices=OPTIMIZERS, doc="optimizer")
  learning_rate: float = _option(0.4, check=POSITIVE,
                                 doc="peak learning rate")
  weight_decay: float = _option(1e-4, check=NON_NEGATIVE,
                                doc="weight decay of the kernels")
  optimizer_kwargs: dict = _option(
      default_factory=dict, check=KEYWORD_ARGUMENTS,
      doc='keyword arguments of the optimizer factory, e.g. '
          '\'{"momentum": 0.95}\'')
  schedule: str = _option(
      "warmup_cosine", choices=SCHEDULES,
      doc="learning-rate schedule: warmup_cosine (linear warmup to the "
          "peak, cosine decay to 0), warmup_linear (linear warmup, linear "
          "decay to 0), step (linear warmup, then x0.1 at 50% and 75% of the "
          "budget) or constant")
  warmup_epochs: float = _option(2.0, check=NON_NEGATIVE,
                                 doc="epochs of linear warmup")
  # --- Batch and budget.
  batch_size: int = _option(4096, check=POSITIVE_INT,
                            doc="fixed batch size")
  num_microbatches: int = _option(
      1, check=POSITIVE_INT,
      doc="feed each batch as this many microbatches of batch_size / "
          "num_microbatches examples")
  epochs: float = _option(30.0, check=POSITIVE, doc="training epochs")
  seed: int = _option(0, check=NON_NEGATIVE_INT,
                      doc="seed of initialization and batch order")
  num_devices: int = _option(
      0, check=NON_NEGATIVE_INT,
      doc="devices to split the batch over (0: all local devices)")
  eval_batch_size: int = _option(4096, check=POSITIVE_INT,
                                 doc="examples per evaluation chunk")
  evals_per_epoch: int = _option(
      1, check=POSITIVE_INT,
      doc="evaluate (one history record) this many times an epoch, at "
          "equal numbers of samples (a step past several of these points "
          "records once)")
  max_nonfinite_steps: int = _option(
      5, check=POSITIVE_INT,
      doc="stop after this many consecutive steps with a non-finite loss")
  # --- A batch that grows.
  adaptive_batch: str | None = _option(
      None, choices=ADAPTIVE_TESTS,
      doc="grow the batch with this AdAdaGrad batch-size test in front of "
          "the optimizer; batch_size is then the initial batch size, grown "
          "up to max_batch_size")
  max_batch_size: int | None = _option(
      None, check=POSITIVE_INT,
      doc="cap of a growing batch (required with adaptive_batch or "
          "batch_ramp)")
  adaptive_statistics: str = _option(
      "auto", choices=("auto", "per_device", "microbatch"),
      doc="statistics of the test: per-device gradients (only scalars "
          "all-reduced) or microbatch moments (auto: per_device on 2+ "
          "devices)")
  batch_ramp: str | None = _option(
      None, choices=("linear", "stagewise"),
      doc="grow the batch by a fixed rule instead of a test, from "
          "batch_size to max_batch_size over the budget (stagewise: 4 "
          "stages; see batching.RampBatch)")
  # --- Checkpoints (see sngm_optax.harness.checkpoint).
  checkpoint_dir: str | None = _option(
      None, doc="save checkpoints (params, optimizer state, sampler "
                "position) here at each epoch end, and on SIGTERM before "
                "exiting with status 75")
  checkpoint_every_steps: int = _option(
      0, check=NON_NEGATIVE_INT,
      doc="also checkpoint every this many steps (0: not by steps)")
  checkpoint_at_epoch_end: bool = _option(
      True, check=BOOL, doc="checkpoint at each epoch end")
  keep_checkpoints: int = _option(3, check=POSITIVE_INT,
                                  doc="checkpoints kept, newest first")
  max_steps: int = _option(
      0, check=NON_NEGATIVE_INT,
      doc="stop (with a checkpoint) after this many steps, as a preemption "
          "would (0: no limit)")
  steps_per_dispatch: int = _option(
      0, check=NON_NEGATIVE_INT,
      doc="fixed-batch steps run per dispatch with lax.scan (1: one "
          "dispatch a step; 0: the measured choice, see "
          "train.steps_per_dispatch)")
  # --- Measurements.
  monitor_noise_scale: bool = _option(
      False, check=BOOL,
      doc="measure the gradient noise scale B_simple with "
          "sngm_optax.noise_scale_monitor chained first, in place of the "
          "device mean (its per-device and global batches are the two batch "
          "sizes of the estimate, so it needs 2+ devices; a fixed batch and "
          "a replicated optimizer state)")

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is None and _is_optional(field):
        continue
      check, choices = field.metadata["check"], choices_of(field)
      if check is not None:
        check.check(field.name, value)
      if choices is not None and value not in choices:
        raise ValueError(f"unknown {field.name} {value!r}; choose one of "
                         f"{', '.join(choices)}")
    if self.batch_size % self.num_microbatches:
      raise ValueError(
          f"batch_size={self.batch_size} is not divisible by "
          f"num_microbatches={self.num_microbatches}")
    try:
      models.make_model(self.model, **self.model_kwargs)
    except TypeError as error:  # an unknown keyword in model_kwargs
      raise ValueError(f"model {self.model!r}: {error}") from None
    self._check_adaptive()
    self._check_noise_scale()

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
    if test == "coordinate" and self.optimizer != "adadagrad":
      raise ValueError("adaptive_batch='coordinate' is AdaGrad's own test: "
                       "use it with optimizer 'adadagrad'")
    if self.max_batch_size is None:
      raise ValueError("adaptive_batch needs max_batch_size")
    microbatch = self.microbatch_size
    if (self.max_batch_size < self.batch_size
        or self.max_batch_size % microbatch):
      raise ValueError(
          f"max_batch_size={self.max_batch_size} must be at least the initial "
          f"batch_size={self.batch_size} and a multiple of the microbatch "
          f"size {microbatch} (batch_size / num_microbatches)")
    if (self.adaptive_statistics == "microbatch"
        and test not in _MICROBATCH_TESTS):
      raise ValueError(
          f"adaptive_batch={test!r} needs per-device statistics (the "
          "microbatch moments serve only the norm and coordinate tests)")


  def _check_ramp(self):
    """Raises ValueError for an inconsistent batch ramp."""
    if self.adaptive_batch is not None or (
        self.optimizer in ADAPTIVE_OPTIMIZERS):
      raise ValueError("batch_ramp grows the batch by a fixed rule: use it "
                       "without adaptive_batch, with a plain optimizer")
    if self.max_batch_size is None:
      raise ValueError("batch_ramp needs max_batch_size")
    if (self.max_batch_size < self.batch_size
        or self.max_batch_size % self.microbatch_size):
      raise ValueError(
          f"max_batch_size={self.max_batch_size} must be at least the initial "
          f"batch_size={self.batch_size} and a multiple of the microbatch "
          f"size {self.microbatch_size} (batch_size / num_microbatches)")

  def _check_noise_scale(self):
    """Raises ValueError for a run the noise-scale monitor cannot measure
    (the device count is checked with the devices, `train._mesh_devices`)."""
    if not self.monitor_noise_scale:
      return
    if self.adaptive_batch is not None:
      raise ValueError(
          "monitor_noise_scale: an adaptive_batch run reports its own "
          "noise_scale (the batch-size test's); leave monitor_noise_scale off")
    if self.batch_ramp is not None:
      raise ValueError(
          "monitor_noise_scale needs a fixed batch: the monitor's per-device "
          "batch size is fixed when the step compiles, not with batch_ramp")
    if self.optimizer in PER_DEVICE_STATE:
      raise ValueError(
          f"monitor_noise_scale: optimizer {self.optimizer!r} exchanges "
          "sparse per-device updates, not a device mean the monitor could "
          "replace; use it with another optimizer")


# The tests that can run on the moments of the microbatch gradients.
_MICROBATCH_TESTS = ("norm", "coordinate")


def _is_optional(field: dataclasses.Field) -> bool:
  """Whether `field` may be None (its type is `X | None`)."""
  return type(None) in typing.get_args(field.type)


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
