"""Construction-time validation of hyperparameters.

Values that are schedules (callables) or traced arrays (as passed by
`optax.inject_hyperparams` under `jax.jit`) cannot be checked when the
transformation is built, so they are let through.
"""

import math
from typing import Any

import jax
import numpy as np


def _concrete_value(value: Any) -> float | None:
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  array = np.asarray(value)
  if array.shape != ():
    raise ValueError(f"expected a scalar, got an array of shape {array.shape}")
  return float(array)


def check_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
  """Raises `ValueError` naming `name` unless `value` lies in the interval."""
  try:
    number = _concrete_value(value)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{name} must be a real scalar: {error}") from None
  if number is None:
    return
  above_low = number >= low if low_inclusive else number > low
  below_high = number <= high if high_inclusive else number < high
  if not (above_low and below_high):  # also catches NaN
    interval = (
        ("[" if low_inclusive else "(") + f"{low:g}, {high:g}"
        + ("]" if high_inclusive else ")")
    )
    raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_non_negative(name: str, value: Any) -> None:
  check_range(name, value, 0.0)


def check_positive(name: str, value: Any) -> None:
  check_range(name, value, 0.0, low_inclusive=False)


def check_momentum(name: str, value: Any) -> None:
  check_range(name, value, 0.0, 1.0, high_inclusive=False)


def check_positive_int(name: str, value: Any) -> int | None:
  """Checks an integer >= 1; returns it, or `None` when it is traced.

  `optax.inject_hyperparams` passes integers as 0-d integer arrays, which are
  accepted.
  """
  if isinstance(value, jax.core.Tracer):
    return None
  array = np.asarray(value)
  if (
      isinstance(value, bool)
      or array.shape != ()
      or not np.issubdtype(array.dtype, np.integer)
      or int(array) < 1
  ):
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(array)
