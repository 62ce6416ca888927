"""Optimizers by name, as big_vision builds them from the config.

Every factory has the signature `factory(learning_rate, axis_name,
weight_decay, **kwargs)`. It receives per-device gradients and averages over
`axis_name` itself (the optax baselines get
`sngm_optax.average_across_devices` chained in front), so a new optimizer is
one registry line and no change to the loop.

Masks, as optax users expect them with normalized networks (the `resnet`):

- Weight decay covers the kernels only (`_matrices_only`, rank >= 2):
  biases and BatchNorm's scales and biases (vectors) get none, in every
  optimizer that decays.
- LARS and LAMB take no trust ratio on BatchNorm's scales and biases
  (`_outside_batch_norm`, optax's `trust_ratio_mask`; LAMB's chain is
  optax's with the mask added): those follow the plain (momentum or Adam)
  update at the learning rate. Every other leaf, biases included, keeps its
  trust ratio, as before, so models without BatchNorm are unchanged.
- SNGM normalizes by the global norm of the whole gradient, BatchNorm's
  included, as in the paper; GMC and DGC likewise.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import sngm_optax


def _matrices_only(params):
  """Mask selecting kernels (rank >= 2): biases, and BatchNorm's scales and
  biases, get no weight decay."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _in_batch_norm(path) -> bool:
  """Whether a leaf's key path runs through a BatchNorm module (flax names
  them `BatchNorm_0`, `BatchNorm_1`, ... unless told otherwise)."""
  return any("BatchNorm" in str(getattr(key, "key", getattr(key, "name", "")))
             for key in path)


def _outside_batch_norm(params):
  """Mask selecting every leaf but BatchNorm's scales and biases: the
  leaves that get LARS's and LAMB's trust ratio."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not _in_batch_norm(path), params)


def _device_mean(axis_name, tx):
  if axis_name is None:
    return tx
  return optax.chain(sngm_optax.average_across_devices(axis_name), tx)


# The recipe is the paper's (coupled weight decay, heavy-ball momentum, one
# global norm): in benchmarks/large_batch.py (B = 4096, 3 seeds) no variant
# beat it by more than the seed spread (Nesterov +0.8 +- 2-3 points,
# decoupled decay -1.6), and per-layer normalization lost 6.5 points.
def _sngm(learning_rate, axis_name, weight_decay=0.0, momentum=0.9,
          nesterov=False, decoupled_weight_decay=False, per_layer=False,
          **kw):
  return sngm_optax.sngm(
      learning_rate, momentum=momentum, weight_decay=weight_decay,
      weight_decay_mask=_matrices_only, axis_name=axis_name,
      nesterov=nesterov, decoupled_weight_decay=decoupled_weight_decay,
      per_layer=per_layer, **kw)


def _msgd(learning_rate, axis_name, weight_decay=0.0, momentum=0.9, **kw):
  return _device_mean(axis_name, optax.chain(
      optax.add_decayed_weights(weight_decay, _matrices_only),
      optax.sgd(learning_rate, momentum=momentum, **kw)))


def _nesterov(learning_rate, axis_name, weight_decay=0.0, momentum=0.9, **kw):
  return _msgd(learning_rate, axis_name, weight_decay, momentum,
               nesterov=True, **kw)


def _sngm_nesterov(learning_rate, axis_name, weight_decay=0.0, **kw):
  return _sngm(learning_rate, axis_name, weight_decay, nesterov=True, **kw)


def _sgd(learning_rate, axis_name, weight_decay=0.0, **kw):
  return _msgd(learning_rate, axis_name, weight_decay, momentum=0.0, **kw)


def _lars(learning_rate, axis_name, weight_decay=0.0, momentum=0.9, **kw):
  # Trust ratio on every leaf but BatchNorm's (see the module docstring), as
  # LAMB: excluding biases too leaves them at the raw, large LARS learning
  # rate.
  kw.setdefault("trust_ratio_mask", _outside_batch_norm)
  return _device_mean(axis_name, optax.lars(
      learning_rate, weight_decay=weight_decay, momentum=momentum,
      weight_decay_mask=_matrices_only, **kw))


def _lamb(learning_rate, axis_name, weight_decay=0.0, b1=0.9, b2=0.999,
          eps=1e-6, eps_root=0.0):
  # optax.lamb's chain, with a trust-ratio mask (optax.lamb has none).
  return _device_mean(axis_name, optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
      optax.add_decayed_weights(weight_decay, _matrices_only),
      optax.masked(optax.scale_by_trust_ratio(), _outside_batch_norm),
      optax.scale_by_learning_rate(learning_rate)))


def _adamw(learning_rate, axis_name, weight_decay=0.0, **kw):
  return _device_mean(axis_name, optax.adamw(
      learning_rate, weight_decay=weight_decay, mask=_matrices_only, **kw))


def _adagrad(learning_rate, axis_name, weight_decay=0.0, **kw):
  return _device_mean(axis_name, optax.chain(
      optax.add_decayed_weights(weight_decay, _matrices_only),
      optax.adagrad(learning_rate, **kw)))


def _adagrad_norm(learning_rate, axis_name, weight_decay=0.0, **kw):
  return _device_mean(axis_name, optax.chain(
      optax.add_decayed_weights(weight_decay, _matrices_only),
      sngm_optax.adagrad_norm(learning_rate, **kw)))


def _adaptive(library_optimizer):
  """Registry entry for AdAdaGrad(-Norm): L2 weight decay in front of the
  library optimizer, so the test and AdaGrad see the same gradient."""

  def factory(learning_rate, axis_name, weight_decay=0.0, **kw):
    return optax.chain(
        optax.add_decayed_weights(weight_decay, _matrices_only),
        library_optimizer(learning_rate, axis_name=axis_name, **kw))

  return factory


def _adam(learning_rate, axis_name, weight_decay=0.0, **kw):
  # Coupled L2 (as TR-Adam), not AdamW's decoupled decay.
  return _device_mean(axis_name, optax.chain(
      optax.add_decayed_weights(weight_decay, _matrices_only),
      optax.adam(learning_rate, **kw)))


@dataclasses.dataclass(frozen=True)
class PeakTimesSchedule:
  """`peak * unit_schedule(count)`: the loop's learning rate, which knows its
  peak, so TR can take the authors' lambda_0 = 0.1 * eta_0 at the peak
  (with a warm-up the schedule is 0 at step 0)."""

  peak: Any
  unit_schedule: Callable

  def __call__(self, count):
    return self.peak * self.unit_schedule(count)


def _tr_strength(learning_rate, strength):
  """The authors' default lambda_0 = 0.1 * the peak learning rate; `None`
  (the library's 0.1 * learning_rate(0)) when the peak is unknown."""
  if strength is not None or not isinstance(learning_rate, PeakTimesSchedule):
    return strength
  return 0.1 * learning_rate.peak


# TR in the harness follows the authors' runs: lambda = lambda_0 / eta_t
# coupled to the schedule (lambda_0 = 0.1 * peak), S = 10, momentum 0.9,
# coupled weight decay 1e-4 on the kernels, and the inner window restarted
# at each epoch (the loop passes `steps_per_epoch`, see EPOCH_AWARE).
def _tr_sgd(learning_rate, axis_name, weight_decay=1e-4, momentum=0.9,
            strength=None, **kw):
  return _device_mean(axis_name, sngm_optax.tr_sgd(
      learning_rate, strength=_tr_strength(learning_rate, strength),
      momentum=momentum, weight_decay=weight_decay,
      weight_decay_mask=_matrices_only, **kw))


def _tr_adam(learning_rate, axis_name, weight_decay=1e-4, strength=None,
             **kw):
  return _device_mean(axis_name, sngm_optax.tr_adam(
      learning_rate, strength=_tr_strength(learning_rate, strength),
      weight_decay=weight_decay, weight_decay_mask=_matrices_only, **kw))


def _density_warmup(density, warmup_steps):
  """DGC's density warm-up and its levels, or (density, None) for none.

  25 %, 6.25 %, 1.56 %, 0.39 % (those above `density`), each for an equal
  share of `warmup_steps`, then `density` (Lin et al. 2018, section 3.3).
  """
  stages = [0.25 * 4.0**-i for i in range(4) if 0.25 * 4.0**-i > density]
  if not warmup_steps or not stages:
    return density, None
  values = jnp.asarray(stages + [density], jnp.float32)
  per_stage = max(1, warmup_steps // len(stages))

  def schedule(step):
    return values[jnp.minimum(step // per_stage, len(stages))]

  return schedule, tuple(stages) + (density,)


def _gmc(learning_rate, axis_name, weight_decay=0.0, momentum=0.9,
         density=0.01, density_warmup_steps=0, **kw):
  density, levels = _density_warmup(density, density_warmup_steps)
  return sngm_optax.gmc(learning_rate, momentum=momentum, density=density,
             axis_name=axis_name, weight_decay=weight_decay,
             weight_decay_mask=_matrices_only, density_levels=levels, **kw)


def _dgc(learning_rate, axis_name, weight_decay=0.0, momentum=0.9,
         density=0.01, density_warmup_steps=0, **kw):
  density, levels = _density_warmup(density, density_warmup_steps)
  return sngm_optax.dgc(learning_rate, momentum=momentum, density=density,
             axis_name=axis_name, weight_decay=weight_decay,
             weight_decay_mask=_matrices_only, density_levels=levels, **kw)


OptimizerFactory = Callable[..., optax.GradientTransformation]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    # adadagrad(_norm) need the loop's batch-size arguments (max_batch_size,
    # test, ...): use them with Config.adaptive_batch.
    "adadagrad": _adaptive(sngm_optax.adadagrad),
    "adadagrad_norm": _adaptive(sngm_optax.adadagrad_norm),
    "adagrad": _adagrad,
    "adagrad_norm": _adagrad_norm,
    "adam": _adam,   # coupled L2 weight decay
    "adamw": _adamw,
    "dgc": _dgc,     # Deep Gradient Compression (sparse exchange)
    "gmc": _gmc,     # global momentum compression (sparse exchange)
    "lamb": _lamb,
    "lars": _lars,
    "msgd": _msgd,   # heavy-ball momentum SGD
    "nesterov": _nesterov,   # momentum SGD with Nesterov momentum
    "sgd": _sgd,
    "sngm": _sngm,
    "sngm_nesterov": _sngm_nesterov,
    "tr_adam": _tr_adam,   # trajectory-regularized (small batches)
    "tr_sgd": _tr_sgd,
}

# Optimizers that take `steps_per_epoch`: a fixed-batch run passes its own
# (unless optimizer_kwargs set it; null counts straight through epochs).
EPOCH_AWARE = frozenset({"tr_adam", "tr_sgd"})

# Optimizers whose state differs between devices (error-feedback memory):
# their state gets a leading device axis, sharded over the mesh
# (`per_device_state`), while the params stay replicated.
PER_DEVICE_STATE = frozenset({"dgc", "gmc"})


# The optimizers that include the batch-size test themselves.
ADAPTIVE_OPTIMIZERS = ("adadagrad", "adadagrad_norm")
ADAPTIVE_TESTS = ("norm", "inner_product", "orthogonality", "augmented",
                  "coordinate")


def make_adaptive_optimizer(
    name: str, learning_rate: optax.ScalarOrSchedule, *, test: str,
    max_batch_size: int, initial_batch_size: int, batch_size_multiple: int,
    microbatch_size: int | None, axis_name: str | None,
    weight_decay: float = 0.0, **kwargs) -> optax.GradientTransformation:
  """The optimizer `name` with the batch-size `test` in front of it.

  `adadagrad` / `adadagrad_norm` are the library's AdAdaGrad(-Norm); any
  other registered optimizer gets `sngm_optax.adaptive_batch_size(...)`
  chained in front, which also averages the gradient over `axis_name` (so the
  optimizer itself is built without it). E.g. `sngm` with the norm test is
  the two seeds combined.
  """
  batch_kwargs = dict(
      test=test, max_batch_size=max_batch_size,
      initial_batch_size=initial_batch_size,
      batch_size_multiple=batch_size_multiple,
      microbatch_size=microbatch_size)
  if name in ADAPTIVE_OPTIMIZERS:
    return make_optimizer(name, learning_rate, axis_name, weight_decay,
                          **batch_kwargs, **kwargs)
  # The tests' constants and the controller's options go to the test, the
  # rest to the optimizer.
  for constant in ("eta", "theta", "nu", "max_growth_factor", "smoothing",
                   "test_interval"):
    if constant in kwargs:
      batch_kwargs[constant] = kwargs.pop(constant)
  return optax.chain(
      sngm_optax.adaptive_batch_size(axis_name=axis_name, **batch_kwargs),
      make_optimizer(name, learning_rate, None, weight_decay, **kwargs))


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule,
                   axis_name: str | None = None, weight_decay: float = 0.0,
                   **kwargs) -> optax.GradientTransformation:
  """Builds the optimizer registered under `name` (see `OPTIMIZERS`)."""
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; choose one of "
                     f"{', '.join(sorted(OPTIMIZERS))}")
  try:
    return OPTIMIZERS[name](learning_rate, axis_name,
                            weight_decay=weight_decay, **kwargs)
  except TypeError as error:  # an unknown keyword in optimizer_kwargs
    raise ValueError(f"optimizer {name!r}: {error}") from None


# Learning-rate schedules, `fn(peak, total, warmup)`. The harness counts
# `total` and `warmup` in samples seen and calls the schedule with the samples
# seen before each step, so a growing batch and a fixed one with the same
# budget follow the same curve.
def _warmup_cosine(peak, total, warmup):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=total, end_value=0.0)


def _constant(peak, total, warmup):
  del total, warmup
  return optax.constant_schedule(peak)


def _step_decay(peak, total, warmup):
  """Linear warm-up from 0, then the peak x0.1 from 50 % and x0.01 from 75 %
  of `total` (the authors' TR runs). Works in any unit of `count`."""

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    factor = (jnp.where(count < 0.5 * total, 1.0, 0.1)
              * jnp.where(count < 0.75 * total, 1.0, 0.1))
    if warmup > 0:
      factor = factor * jnp.minimum(count / warmup, 1.0)
    return peak * factor

  return schedule


def _warmup_linear(peak, total, warmup):
  """Linear warm-up from 0 to the peak over `warmup`, then linear decay to 0
  at `total` (Shallue et al. 2019's linear decay, to 0). `total` and
  `warmup` may be traced values (trials of different decay lengths in one
  compiled program); `warmup < total`."""

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warmed = jnp.where(warmup > 0,
                       jnp.minimum(count / jnp.maximum(warmup, 1), 1.0), 1.0)
    decayed = jnp.clip((total - count) / (total - warmup), 0.0, 1.0)
    return peak * jnp.minimum(warmed, decayed)

  return schedule


SCHEDULES = {"constant": _constant, "step": _step_decay,
             "warmup_cosine": _warmup_cosine, "warmup_linear": _warmup_linear}

# The schedules whose `total` and `warmup` may be traced values: vmapped
# trials (`trials`) of different lengths share one compiled program.
TRACEABLE_SCHEDULES = frozenset({"constant", "warmup_linear"})
