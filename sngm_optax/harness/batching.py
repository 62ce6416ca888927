"""Batch schedules: how big each step's batch is, and when the run ends.

The training loop asks a schedule for the next batch size and the number of
microbatch slots to feed it in, hands it each step's metrics, and asks it
whether the run is done; the fixed-versus-adaptive difference lives here.

- `FixedBatch`: `batch_size` examples a step for `total_steps` steps.
- `GrowingBatch`: the batch-size test in front of the optimizer says the next
  batch size (`next_batch_size` in the step's metrics); the run ends when
  `budget` examples have been seen, the last batch stopping at the budget.
  The batch is a whole number of microbatches, fed one at a time
  (`steps.AccumulatingTrainStep`), so a growing batch compiles once.
- `RampBatch`: a batch that grows by a fixed rule of the samples seen
  (linear or stagewise), the baselines of an adaptive batch.

Example:
  >>> schedule = GrowingBatch(initial_batch_size=16, microbatch_size=16,
  ...                         budget=100, statistics='per_device')
  >>> schedule.observe(16, {'next_batch_size': 48, 'noise_scale': 2.0})
  >>> size = schedule.next_batch_size(samples_seen=16)
  >>> size, schedule.num_slots(size)
  (48, 3)
"""

from typing import Callable, Protocol

from sngm_optax.harness.config import AdaptiveBatch


class BatchSchedule(Protocol):
  """What the training loop asks of a batch schedule."""

  # The progress bar counts `progress_unit`s, `progress_total` in all.
  progress_unit: str
  progress_total: int

  def next_batch_size(self, samples_seen: int) -> int:
    """The size of the next step's batch."""

  def num_slots(self, batch_size: int) -> int:
    """Microbatches the step is fed `batch_size` examples in."""

  def observe(self, batch_size: int, metrics: dict) -> None:
    """Takes a step's metrics (`batch_size` is the batch it used)."""

  def progress(self, steps: int, samples: int) -> int:
    """What `steps` steps of `samples` examples advance the progress bar."""

  def done(self, step: int, samples_seen: int) -> bool:
    """Whether the run has used its budget."""

  def record_fields(self) -> dict:
    """Extra fields of a history record."""

  def state_dict(self) -> dict:
    """The schedule's part of a checkpoint (the same keys for every kind)."""

  def load_state_dict(self, state: dict) -> None:
    """Continues from a `state_dict()`."""

  def result_fields(self, train_step: Callable) -> dict:
    """Extra fields of the run's result."""


class FixedBatch:
  """`batch_size` examples a step, for `total_steps` steps."""

  progress_unit = "step"

  def __init__(self, batch_size: int, microbatch_size: int, total_steps: int):
    self.batch_size = batch_size
    self.microbatch_size = microbatch_size
    self.progress_total = total_steps

  def next_batch_size(self, samples_seen: int) -> int:
    del samples_seen
    return self.batch_size

  def num_slots(self, batch_size: int) -> int:
    return batch_size // self.microbatch_size

  def observe(self, batch_size: int, metrics: dict) -> None:
    del batch_size, metrics

  def progress(self, steps: int, samples: int) -> int:
    del samples
    return steps

  def done(self, step: int, samples_seen: int) -> bool:
    del samples_seen
    return step == self.progress_total

  def record_fields(self) -> dict:
    return {}

  def state_dict(self) -> dict:
    return {"batch_size": self.batch_size, "batch_sizes": [],
            "noise_scales": []}

  def load_state_dict(self, state: dict) -> None:
    del state  # nothing changes during a run

  def result_fields(self, train_step: Callable) -> dict:
    del train_step
    return {}


class GrowingBatch:
  """The batch size the batch-size test asks for, until `budget` samples.

  Records, per step, the batch size it used and the noise scale after it.
  """

  progress_unit = "sample"

  def __init__(self, initial_batch_size: int, microbatch_size: int,
               budget: int, statistics: str):
    self.batch_size = initial_batch_size
    self.microbatch_size = microbatch_size
    self.progress_total = self.budget = budget
    self.statistics = statistics
    self.batch_sizes, self.noise_scales = [], []

  def next_batch_size(self, samples_seen: int) -> int:
    # The last batch stops at the budget (in whole microbatches).
    remaining = self.budget - samples_seen
    microbatch = self.microbatch_size
    return min(self.batch_size, -(-remaining // microbatch) * microbatch)

  def num_slots(self, batch_size: int) -> int:
    return -(-batch_size // self.microbatch_size)

  def observe(self, batch_size: int, metrics: dict) -> None:
    self.batch_sizes.append(batch_size)
    self.noise_scales.append(float(metrics["noise_scale"]))
    self.batch_size = int(metrics["next_batch_size"])

  def progress(self, steps: int, samples: int) -> int:
    del steps
    return samples

  def done(self, step: int, samples_seen: int) -> bool:
    del step
    return samples_seen >= self.budget

  def record_fields(self) -> dict:
    return {"next_batch_size": self.batch_size,
            "noise_scale": self.noise_scales[-1]}

  def state_dict(self) -> dict:
    return {"batch_size": self.batch_size, "batch_sizes": self.batch_sizes,
            "noise_scales": self.noise_scales}

  def load_state_dict(self, state: dict) -> None:
    self.batch_size = state["batch_size"]
    self.batch_sizes = state["batch_sizes"]
    self.noise_scales = state["noise_scales"]

  def result_fields(self, train_step: Callable) -> dict:
    return {
        "batch_sizes": self.batch_sizes,
        "noise_scales": self.noise_scales,
        "adaptive_statistics": self.statistics,
        # A growing batch compiles once (init, add and apply).
        "train_step_compilations": train_step._cache_size(),  # pylint: disable=protected-access
    }


class RampBatch(GrowingBatch):
  r"""A batch size that grows with the samples seen by a fixed rule (no test).

  With :math:`s` the samples seen, :math:`S` the budget, :math:`b_0` the
  initial and :math:`b_1` the final batch size, rounded up to a whole number
  of microbatches:

  - `"linear"`: :math:`b(s) = b_0 + (b_1 - b_0)\, s / S`;
  - `"stagewise"`: `stages` equal parts of the budget, the batch multiplied
    by the same factor at each, :math:`b(s) = b_0 (b_1/b_0)^{\lfloor
    \text{stages}\, s/S \rfloor / (\text{stages} - 1)}`.
  """

  def __init__(self, kind: str, initial_batch_size: int,
               final_batch_size: int, microbatch_size: int, budget: int,
               stages: int = 4):
    super().__init__(initial_batch_size, microbatch_size, budget, "none")
    self.kind, self.stages = kind, stages
    self.initial, self.final = initial_batch_size, final_batch_size

  def _rule(self, samples_seen: int) -> int:
    fraction = min(samples_seen / self.budget, 1.0)
    if self.kind == "linear":
      size = self.initial + (self.final - self.initial) * fraction
    else:
      stage = min(int(self.stages * fraction), self.stages - 1)
      size = self.initial * (self.final / self.initial) ** (
          stage / (self.stages - 1))
    microbatch = self.microbatch_size
    size = -(-round(size, 6) // microbatch) * microbatch
    return int(min(max(size, self.initial), self.final))

  def next_batch_size(self, samples_seen: int) -> int:
    self.batch_size = self._rule(samples_seen)
    return super().next_batch_size(samples_seen)

  def observe(self, batch_size: int, metrics: dict) -> None:
    del metrics
    self.batch_sizes.append(batch_size)

  def record_fields(self) -> dict:
    return {"next_batch_size": self.batch_size}

  def result_fields(self, train_step: Callable) -> dict:
    fields = super().result_fields(train_step)
    del fields["noise_scales"], fields["adaptive_statistics"]
    return {**fields, "batch_ramp": self.kind}


def make_batch_schedule(adaptive: AdaptiveBatch | None, batch_size: int,
                        microbatch_size: int, total_steps: int,
                        budget: int, ramp: str | None = None,
                        final_batch_size: int | None = None) -> BatchSchedule:
  """A `GrowingBatch` for `adaptive` settings, a `RampBatch` for a `ramp`
  (`"linear"` or `"stagewise"`, to `final_batch_size`), else a
  `FixedBatch`."""
  if ramp is not None:
    return RampBatch(ramp, batch_size, final_batch_size, microbatch_size,
                     budget)
  if adaptive is None:
    return FixedBatch(batch_size, microbatch_size, total_steps)
  return GrowingBatch(adaptive.initial_batch_size, adaptive.microbatch_size,
                      budget, adaptive.statistics)
