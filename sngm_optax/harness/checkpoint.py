"""Checkpoint and resume for the training loop, with orbax-checkpoint.

A checkpoint holds everything the loop needs to continue as if it had never
stopped: the `TrainState` (step, params and the *whole* optimizer state,
whatever the chain holds: momentum, AdaGrad accumulators, the batch-size
controller, the TR anchor and inner counter, GMC memory, the injected peak
learning rate; a model's BatchNorm statistics, `steps.BatchNormTrainState`,
averaged over the devices as every step leaves them), and a JSON part
with the sampler position (`SamplerState`), the loop's counters and the
metrics history. Resuming on the same devices gives bit-identical
parameters to a run that was never interrupted.

Orbax writes each step to a temporary directory and renames it when complete,
so a crash mid-write never replaces a good checkpoint. A checkpoint that was
damaged afterwards (truncated, deleted files) fails to restore with a clear
`CheckpointError` when it is the only one; otherwise `restore_latest` warns
and falls back to the newest older checkpoint that restores.

Example:
  >>> import tempfile
  >>> import jax.numpy as jnp
  >>> directory = tempfile.mkdtemp()
  >>> with Checkpointer(directory, keep=2) as checkpointer:
  ...   for step in (1, 2, 3):
  ...     checkpointer.save(step, {'w': jnp.full(3, float(step))},
  ...                       {'note': step})
  ...   checkpointer.steps()
  [2, 3]
  >>> with Checkpointer(directory) as checkpointer:
  ...   step, state, meta = checkpointer.restore_latest({'w': jnp.zeros(3)})
  >>> step, state['w'].tolist(), meta['note']
  (3, [3.0, 3.0, 3.0], 3)
"""

import json
import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """No checkpoint in the directory could be restored."""


class Checkpointer:
  """Saves `(state pytree, JSON metadata)` per step, keeping the last `keep`.

  Args:
    directory: where the step directories live (created if missing).
    keep: how many of the newest checkpoints to keep (>= 1).
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep must be a positive integer, got {keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    # Synchronous saves: the loop's next step donates the state's buffers.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True),
        item_names=("state", "meta"))

  def steps(self) -> list[int]:
    """The steps that have a (complete) checkpoint, oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves `state` (a pytree of arrays) and `meta` (JSON-serializable)."""
    self._manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta)),
        force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, template: Any) -> tuple[Any, dict]:
    """Restores checkpoint `step` into the structure/shardings of `template`.

    Raises:
      CheckpointError: the checkpoint is missing, damaged or does not match
        `template` (the original error is chained).
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      restored = self._manager.restore(
          int(step),
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                  meta=ocp.args.JsonRestore()))
    except Exception as error:  # orbax raises many types; name the step
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} cannot be restored "
          f"({type(error).__name__}: {_first_line(error)})") from error
    if restored.meta is None or restored.state is None:
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} is incomplete")
    return restored.state, restored.meta

  def restore_latest(self, template: Any) -> tuple[int, Any, dict]:
    """Restores the newest checkpoint that restores cleanly.

    Damaged newer checkpoints are reported with a warning and skipped (left
    on disk for inspection; the next save at a later step supersedes them).

    Returns:
      `(step, state, meta)`.

    Raises:
      CheckpointError: there is no checkpoint, or none restores.
    """
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    errors = []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, template)
      except CheckpointError as error:
        errors.append(str(error))
        warnings.warn(f"{error}; trying an older checkpoint", RuntimeWarning,
                      stacklevel=2)
        continue
      return step, state, meta
    raise CheckpointError("no checkpoint could be restored: "
                          + "; ".join(errors))

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else "no message"


# Config fields that may differ between a run and its resumption.
_RESUMABLE_CHANGES = frozenset({
    "checkpoint_dir", "checkpoint_every_steps", "checkpoint_at_epoch_end",
    "keep_checkpoints", "max_steps", "max_nonfinite_steps", "cache_dir",
    "eval_batch_size"})


class LoopCheckpoints:
  """The training loop's hook (`train.train_and_evaluate`): when to save,
  what to save, and how to resume.

  The saved JSON part holds `step`, `config`, and the loop's own fields
  (`sampler`, `history`, `epoch_losses`, `nonfinite_in_a_row` and the batch
  schedule's).

  Args:
    directory: where the checkpoints live; None saves none.
    every_steps: save every this many steps (0: not by steps).
    at_epoch_end: save when an epoch ends.
    keep: how many of the newest checkpoints to keep.
    config: the run's configuration (`dataclasses.asdict(config)`), saved
      with each checkpoint; `restore` then refuses one saved with another.
  """

  def __init__(self, directory: str | os.PathLike | None, *,
               every_steps: int = 0,
               at_epoch_end: bool = True, keep: int = 3,
               config: dict | None = None):
    self.every_steps = every_steps
    self.at_epoch_end = at_epoch_end
    # Round-trip through JSON so that tuples/lists compare as saved.
    self.config = None if config is None else json.loads(json.dumps(config))
    self.checkpointer = (None if directory is None
                         else Checkpointer(directory, keep=keep))

  def restore(self, state) -> tuple[Any, dict]:
    """Returns `(state, loop)` from the newest good checkpoint."""
    if self.checkpointer is None:
      raise ValueError("resuming needs a checkpoint_dir")
    _, state, loop = self.checkpointer.restore_latest(state)
    if self.config is None:
      return state, loop
    saved, now = loop.get("config", {}), self.config
    changed = sorted(key for key in set(saved) | set(now)
                     if key not in _RESUMABLE_CHANGES
                     and saved.get(key) != now.get(key))
    if changed:
      raise CheckpointError(
          f"the checkpoint in {self.checkpointer.directory} was written with "
          f"a different configuration ({', '.join(changed)}); resume with "
          "the same settings")
    return state, loop

  def after_step(self, step: int, state, *, epoch_ended: bool, force: bool,
                 **loop) -> bool:
    """Saves a checkpoint if one is due at `step`; returns whether it did."""
    every = self.every_steps
    due = (force or (every and step % every == 0)
           or (epoch_ended and self.at_epoch_end))
    if not due or self.checkpointer is None:
      return False
    meta = {"step": int(step)}
    if self.config is not None:
      meta["config"] = self.config
    meta.update(loop)
    self.checkpointer.save(step, state, meta)
    return True

  def close(self) -> None:
    if self.checkpointer is not None:
      self.checkpointer.close()


def saved_config(directory: str | os.PathLike) -> dict:
  """The `Config` fields saved with the newest checkpoint in `directory`.

  Raises:
    CheckpointError: there is no checkpoint with a readable configuration.
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint found in {directory} (no such "
                          "directory)")
  with Checkpointer(directory) as checkpointer:
    steps = checkpointer.steps()
    for step in reversed(steps):
      try:
        meta = checkpointer._manager.restore(  # pylint: disable=protected-access
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      except Exception:  # pylint: disable=broad-except
        continue  # damaged: restore_latest reports it
      if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
        return meta["config"]
  raise CheckpointError(f"no checkpoint found in {directory}" if not steps
                        else f"no readable checkpoint in {directory}")
