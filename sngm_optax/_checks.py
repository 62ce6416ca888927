"""Construction-time validation of hyperparameters.

Values that are schedules (callables) or traced arrays (as passed by
`optax.inject_hyperparams` under `jax.jit`) cannot be checked when the
transformation is built, so they are let through.
"""

import math
from typing import Any

import jax
import numpy as np
import optax


def _interval(low: float, high: float, low_inclusive: bool,
              high_inclusive: bool) -> str:
  """`[low, high)`-style text; an infinite end is always open."""
  left = "[" if low_inclusive and math.isfinite(low) else "("
  right = "]" if high_inclusive and math.isfinite(high) else ")"
  return f"{left}{low:g}, {high:g}{right}"


def _concrete_number(name: str, value: Any, interval: str) -> float | None:
  """`value` as a float; `None` for a schedule or a traced value.

  Strings (`'0.1'`), booleans and non-numeric objects are refused here
  rather than converted: `float('0.1')` and `float(True)` would succeed.
  """
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  array = np.asarray(value) if not isinstance(value, str) else None
  if (array is None or isinstance(value, bool)
      # jnp.issubdtype knows bfloat16 (inject_hyperparams' hyperparam_dtype).
      or not jax.numpy.issubdtype(array.dtype, jax.numpy.number)
      or jax.numpy.issubdtype(array.dtype, jax.numpy.complexfloating)):
    kind = type(value).__name__
    raise ValueError(f"{name} must be a real number in {interval}, got "
                     f"{value!r} of type {kind}")
  if array.shape != ():
    raise ValueError(f"{name} must be a real scalar in {interval}, got an "
                     f"array of shape {array.shape}")
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
  """Raises `ValueError` naming `name` unless `value` lies in the interval.

  The value must be a finite real number (not a string, a boolean, NaN or
  an infinity); schedules and traced values pass unchecked, as
  `optax.inject_hyperparams` needs.
  """
  interval = _interval(low, high, low_inclusive, high_inclusive)
  number = _concrete_number(name, value, interval)
  if number is None:
    return
  above_low = number >= low if low_inclusive else number > low
  below_high = number <= high if high_inclusive else number < high
  # `not (...)` also catches NaN.
  if not (math.isfinite(number) and above_low and below_high):
    raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_non_negative(name: str, value: Any) -> None:
  check_range(name, value, 0.0)


def check_positive(name: str, value: Any) -> None:
  check_range(name, value, 0.0, low_inclusive=False)


def check_momentum(name: str, value: Any) -> None:
  check_range(name, value, 0.0, 1.0, high_inclusive=False)


def _check_int_at_least(name: str, value: Any, low: int,
                        description: str) -> int | None:
  if isinstance(value, jax.core.Tracer):
    return None
  array = np.asarray(value)
  if (
      isinstance(value, bool)
      or array.shape != ()
      or not np.issubdtype(array.dtype, np.integer)
      or int(array) < low
  ):
    raise ValueError(f"{name} must be {description}, got {value!r}")
  return int(array)


def check_positive_int(name: str, value: Any) -> int | None:
  """Checks an integer >= 1; returns it, or `None` when it is traced.

  `optax.inject_hyperparams` passes integers as 0-d integer arrays, which are
  accepted.
  """
  return _check_int_at_least(name, value, 1, "a positive integer")


def check_non_negative_int(name: str, value: Any) -> int | None:
  """Checks an integer >= 0; returns it, or `None` when it is traced."""
  return _check_int_at_least(name, value, 0, "an integer >= 0")


def check_axis_name(name: str, value: Any, *, optional: bool = False) -> None:
  """Checks a pmap/shard_map axis name: a non-empty string or tuple of them."""
  if value is None and optional:
    return
  names = value if isinstance(value, tuple) else (value,)
  if not names or not all(isinstance(n, str) and n for n in names):
    allowed = "a non-empty string or tuple of strings"
    raise ValueError(f"{name} must be {allowed}"
                     + (" (or None)" if optional else "") + f", got {value!r}")


def check_params_match(updates: Any, params: Any, where: str) -> None:
  """Raises `ValueError` naming both structures if `params` does not match.

  Compares tree structures and leaf shapes, which are static: free under jit.
  Call it from an `update` function when `params` is given.
  """
  if params is None:
    return
  updates_structure = jax.tree.structure(updates)
  params_structure = jax.tree.structure(params)
  if updates_structure != params_structure:
    raise ValueError(
        f"{where}: the updates and params pytrees differ: updates have "
        f"structure {updates_structure}, params have {params_structure}")
  for path_and_update, param in zip(
      jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params)):
    path, update = path_and_update
    if np.shape(update) != np.shape(param):
      raise ValueError(
          f"{where}: the updates and params differ at "
          f"{jax.tree_util.keystr(path) or 'the root'}: updates have shape "
          f"{np.shape(update)}, params have {np.shape(param)}")


def params_checked(
    transform: optax.GradientTransformation, where: str
) -> optax.GradientTransformationExtraArgs:
  """`transform` with `check_params_match` before its update; same state.

  A chain that starts with `optax.add_decayed_weights` would otherwise meet a
  mismatched params tree there first, and fail with optax's own error.
  """

  def update_fn(updates, state, params=None, **extra_args):
    check_params_match(updates, params, where)
    return transform.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(transform.init, update_fn)


def check_float_params(params: Any, where: str) -> None:
  """Raises `ValueError` at `init` for integer or boolean parameter leaves."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      dtype = np.asarray(leaf).dtype
    if not (jax.numpy.issubdtype(dtype, jax.numpy.floating)
            or jax.numpy.issubdtype(dtype, jax.numpy.complexfloating)):
      raise ValueError(
          f"{where}: params must be floating point, got dtype {dtype} at "
          f"{jax.tree_util.keystr(path) or 'the root'} (cast them, e.g. "
          "jnp.asarray(x, jnp.float32))")
