"""Preemption: stop a run cleanly when the scheduler sends SIGTERM.

Cluster schedulers (SLURM, Kubernetes, preemptible cloud VMs) send SIGTERM
some seconds before they kill a job. `StopOnSignal` turns the first such
signal into a request that the training loop reads after each step: the loop
finishes the step, writes a checkpoint and returns, and `sngm-optax train`
exits with `EXIT_PREEMPTED`; `sngm-optax train --resume DIR` then continues
bit-identically. The first signal also restores the signal's default action,
so a second one ends the process at once, even in the middle of a step or of
the checkpoint write (orbax writes to a temporary directory and renames it,
so the previous checkpoint stays good).

Example:
  >>> import os, signal
  >>> from sngm_optax.harness import preemption
  >>> with preemption.StopOnSignal() as stop:
  ...   os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would
  ...   stop.requested, stop.signal_name, preemption.requested()
  (True, 'SIGTERM', True)
  >>> preemption.requested()
  False

Signal handlers belong to the process, so the request is the process's:
`requested()` is what `train.train_and_evaluate` reads after each step, and
any loop run inside a `StopOnSignal` context stops on the signal.
"""

import signal
import sys
import threading
import types

# The exit status of a run stopped by a signal after writing its checkpoint:
# EX_TEMPFAIL of sysexits.h, "try again later", i.e. resume it. Distinct from
# 0 (done), 1 (non-finite loss), 2 (bad arguments) and 128 + N (killed by
# signal N, as a second signal does).
EXIT_PREEMPTED = 75

_ACTIVE: list["StopOnSignal"] = []


def requested() -> bool:
  """Whether a signal caught by an active `StopOnSignal` asked to stop."""
  return any(stop.requested for stop in _ACTIVE)


class StopOnSignal:
  """A context that records the first of `signals` as a stop request.

  Inside the context the first signal sets `requested` and gives the signal
  its default action back (terminate), so a second one stops the process at
  once; leaving the context restores the handlers that were there before.
  Outside the main thread (where Python cannot install handlers) it installs
  nothing and `requested` stays False.

  Args:
    signals: the signals to catch (default SIGTERM only: Ctrl-C keeps raising
      `KeyboardInterrupt`).
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.signals = tuple(signals)
    self.signal_number: int | None = None
    self._previous: dict = {}

  @property
  def requested(self) -> bool:
    """Whether a signal asked the run to stop."""
    return self.signal_number is not None

  @property
  def signal_name(self) -> str | None:
    """The name of the signal received (e.g. `'SIGTERM'`), or None."""
    if self.signal_number is None:
      return None
    return signal.Signals(self.signal_number).name

  def _handle(self, signal_number: int, frame: types.FrameType | None) -> None:
    del frame  # unused
    self.signal_number = signal_number
    signal.signal(signal_number, signal.SIG_DFL)  # the next one terminates
    print(f"received {self.signal_name}: stopping after this step and "
          "writing a checkpoint (send it again to stop at once)",
          file=sys.stderr, flush=True)

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is threading.main_thread():
      for number in self.signals:
        self._previous[number] = signal.signal(number, self._handle)
    _ACTIVE.append(self)
    return self

  def __exit__(self, *exc_info) -> None:
    for number, previous in self._previous.items():
      # None: a handler not set from Python, which cannot be put back.
      signal.signal(number, signal.SIG_DFL if previous is None else previous)
    self._previous = {}
    if self in _ACTIVE:
      _ACTIVE.remove(self)
