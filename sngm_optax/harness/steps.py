"""The jit-compiled train and evaluation steps (data parallel, shard_map).

The global batch is split over a 1-D mesh of the local devices (axis name
`"data"`) with `jax.shard_map`. Each device computes the gradient of its own
shard; the optimizer averages the gradients itself, as it would under `pmap`.

Batches have the shape `[num_microbatches, microbatch, ...]` plus a weight per
example: the step loops over the microbatches and accumulates the weighted
gradient sum, so a controller that grows the batch can feed a variable number
of fixed-shape microbatches (and pad with weight-0 examples) without
recompiling for every batch size. Every step (fused, accumulating,
evaluation) uses the one loss `classification_loss`, and both train steps
apply the optimizer with `_apply_gradients`. The fused step and the
evaluation also train and evaluate trials side by side, over a leading
trial axis of the state (`map_over_trials`, used by `trials`).

BatchNorm (a model whose variables include `batch_stats`, held by a
`BatchNormTrainState`): the train steps run the model with `train=True`, so
it normalizes over the examples it is given and updates its running
averages, and the evaluation step uses the running averages. Under
`shard_map` each device normalizes over its own shard (the usual large-batch
practice; the model's `cross_device_batch_norm` normalizes over the global
batch instead). With microbatches, each microbatch (this device's slice of
it) is one BatchNorm batch, or, beyond the ResNet's `ghost_batch_size`,
its groups of that size are: it is normalized over itself, and the running
averages are updated once per microbatch (group), in order, as a loop that
accumulates gradients over forward passes would; a weight-0 (padding)
microbatch leaves them as they are. At the end of every step the running
averages are averaged over the devices (`lax.pmean`), so the state stays
replicated, and evaluation and every checkpoint see the average, as after
flax's ImageNet example's `sync_batch_stats`. Because the running averages
are linear in the batch statistics, averaging them every step equals (up to
rounding) averaging them only before evaluations and checkpoints, and it
makes the trajectory independent of when checkpoints are taken, which
bit-identical resumption needs. Models without BatchNorm run as before.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import PartitionSpec as P

import sngm_optax

AXIS = "data"


class NonFiniteLossError(FloatingPointError):
  """Raised when the loss stays NaN/Inf for `max_nonfinite_steps` steps."""


class BatchNormTrainState(train_state.TrainState):
  """flax's `TrainState` and the model's BatchNorm statistics, as in flax's
  ImageNet example: the running averages (`batch_stats` of the model's
  variables), replicated over the devices."""

  batch_stats: Any


def batch_stats_of(state) -> Any:
  """The BatchNorm statistics of `state`; None for a model without them."""
  return getattr(state, "batch_stats", None)


def classification_loss(apply_fn: Callable, params, batch: dict,
                        batch_stats=None, train: bool = False):
  """The harness's one loss: softmax cross-entropy on integer labels.

  Args:
    apply_fn: the model's `apply`, called as `apply_fn({"params": params},
      batch["x"])`, or with `batch_stats` as `apply_fn({"params": params,
      "batch_stats": batch_stats}, batch["x"])` (running averages), with
      `train` as `apply_fn(..., train=True, mutable=["batch_stats"])`.
    params: the model's parameters.
    batch: `x`, `y` (integer labels) and `weight` (1 for a real example, 0
      for padding), with a leading axis of examples.
    batch_stats: the model's BatchNorm statistics; None for a model without
      BatchNorm.
    train: normalize over `batch["x"]` and update `batch_stats` (a model
      with BatchNorm only).

  Returns:
    `(losses, (loss_sum, correct_sum, batch_stats))`: the per-example losses
    (unweighted, the form `sngm_optax.gradient_accumulator` takes), their
    weighted sum, the weighted number of correct predictions (argmax of the
    logits), and the BatchNorm statistics after this batch (as given unless
    `train`; None without BatchNorm).
  """
  if batch_stats is None:
    logits = apply_fn({"params": params}, batch["x"])
  elif train:
    logits, updates = apply_fn(
        {"params": params, "batch_stats": batch_stats}, batch["x"],
        train=True, mutable=["batch_stats"])
    batch_stats = updates["batch_stats"]
  else:
    logits = apply_fn({"params": params, "batch_stats": batch_stats},
                      batch["x"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
  correct = jnp.argmax(logits, -1) == batch["y"]
  weight = batch["weight"]
  return losses, (jnp.sum(weight * losses), jnp.sum(weight * correct),
                  batch_stats)


def _unless_padding(new_stats, old_stats, weight_sum):
  """`new_stats` after a microbatch of total weight `weight_sum`; the old
  ones after a weight-0 (padding) microbatch. None stays None."""
  return jax.tree.map(lambda new, old: jnp.where(weight_sum > 0, new, old),
                      new_stats, old_stats)


def _apply_gradients(state, grads, total_weight, loss_sum, correct, moments,
                     adaptive_statistics, per_device, batch_stats=None):
  """The optimizer step on this device's share `grads`, and the metrics.

  Inside `shard_map`: `total_weight`, `loss_sum` and `correct` are this
  device's sums (`total_weight` already summed over devices), and
  `batch_stats` this device's BatchNorm statistics after its microbatches
  (None without BatchNorm): the state gets their mean over the devices.
  """
  if batch_stats is not None:
    state = state.replace(batch_stats=jax.lax.pmean(batch_stats, AXIS))
  extra_args = {}
  if adaptive_statistics == "per_device":
    extra_args["batch_size"] = jnp.round(total_weight).astype(jnp.int32)
  elif moments is not None:
    extra_args["gradient_moments"] = moments
  updates, opt_state = state.tx.update(grads, state.opt_state,
                                       state.params, **extra_args)
  # The harness's schedules count samples: advance the counter they read.
  seen = optax.tree.get(opt_state, "samples_seen")
  if seen is not None:
    seen = seen + jnp.round(total_weight).astype(seen.dtype)
    opt_state = optax.tree.set(opt_state, samples_seen=seen)
  state = state.replace(step=state.step + 1, opt_state=opt_state,
                        params=optax.apply_updates(state.params, updates))
  metrics = {
      "loss": jax.lax.psum(loss_sum, AXIS) / total_weight,
      "accuracy": jax.lax.psum(correct, AXIS) / total_weight,
  }
  if seen is not None:
    metrics["samples_seen"] = jnp.ravel(seen)[0]
  if adaptive_statistics is not None:
    metrics["next_batch_size"] = optax.tree.get(opt_state,
                                                "next_batch_size")
  # The batch-size test's, or `noise_scale_monitor`'s (`build_program`).
  noise_scale = optax.tree.get(opt_state, "noise_scale")
  if noise_scale is not None:
    metrics["noise_scale"] = noise_scale
  if per_device:
    metrics["bytes_sent"] = jax.lax.pmean(
        jnp.sum(optax.tree.get(state.opt_state, "bytes_sent")), AXIS)
  return state, metrics


def _fused_local_step(state, opt_state, batch, *, num_devices: int,
                      per_device: bool, adaptive_statistics: str | None):
  """One fused train step on this device's shard, inside `shard_map`.

  Returns `(state without opt_state, opt_state, metrics)`.
  """
  state = state.replace(opt_state=opt_state)
  total_weight = jax.lax.psum(jnp.sum(batch["weight"]), AXIS)

  def weighted_loss(params, microbatch, batch_stats):
    _, (loss_sum, correct, batch_stats) = classification_loss(
        state.apply_fn, params, microbatch, batch_stats, train=True)
    return loss_sum, (correct, batch_stats)

  # A Python loop over the (static, bucketed) number of microbatches, i.e.
  # a fully unrolled scan: XLA:CPU runs this model several times slower
  # inside lax.scan.
  grad_sum = optax.tree.zeros_like(state.params)
  loss_sum = correct = jnp.zeros(())
  moments = None
  batch_stats = batch_stats_of(state)
  if adaptive_statistics == "microbatch":
    zeros = optax.tree.zeros_like(state.params, jnp.float32)
    moments = sngm_optax.GradientMoments(
        jnp.zeros((), jnp.int32), zeros, zeros)
  for index in range(batch["x"].shape[0]):
    microbatch = jax.tree.map(lambda array: array[index], batch)
    (loss, (right, new_stats)), grad = jax.value_and_grad(
        weighted_loss, has_aux=True)(state.params, microbatch, batch_stats)
    batch_stats = _unless_padding(new_stats, batch_stats,
                                  jnp.sum(microbatch["weight"]))
    grad_sum = optax.tree.add(grad_sum, grad)
    loss_sum, correct = loss_sum + loss, correct + right
    if moments is not None:
      # This device's slice of the microbatch is one unit; a weight-0
      # (padding) microbatch adds nothing, not even to the count.
      unit_weight = jnp.sum(microbatch["weight"])
      unit = optax.tree.scale(1.0 / jnp.maximum(unit_weight, 1.0), grad)
      moments = sngm_optax.GradientMoments(
          moments.count + (unit_weight > 0).astype(jnp.int32),
          optax.tree.add(moments.grad_sum, unit),
          optax.tree.add(moments.sq_grad_sum,
                         jax.tree.map(jnp.square, unit)))
  # This device's share of the global mean-loss gradient, scaled so that
  # the optimizer's mean over devices is the global-batch gradient.
  grads = optax.tree.scale(num_devices / total_weight, grad_sum)
  state, metrics = _apply_gradients(
      state, grads, total_weight, loss_sum, correct, moments,
      adaptive_statistics, per_device, batch_stats)
  return state.replace(opt_state=None), state.opt_state, metrics


# How a step maps over a leading trial axis: `jax.vmap`, or "unroll": a
# Python loop over the trials, stacked (one copy of the step per trial in
# the program). XLA:CPU runs a convolution vmapped over its kernel as a
# grouped convolution, several times slower than the trials one by one.
TRIAL_MAPS = ("vmap", "unroll")


def map_over_trials(fn: Callable, how: str, in_axes: tuple) -> Callable:
  """`fn` mapped over the leading trial axis of the arguments whose
  `in_axes` entry is 0 (None: shared by every trial), `how` one of
  `TRIAL_MAPS`; the outputs are stacked along a leading trial axis."""
  if how not in TRIAL_MAPS:
    raise ValueError(f"how must be one of {TRIAL_MAPS}, got {how!r}")
  if how == "vmap":
    return jax.vmap(fn, in_axes=in_axes)

  def unrolled(*args):
    mapped = [arg for arg, axis in zip(args, in_axes) if axis == 0]
    num_trials = jax.tree.leaves(mapped)[0].shape[0]
    outputs = [fn(*[jax.tree.map(lambda leaf, i=i: leaf[i], arg)
                    if axis == 0 else arg
                    for arg, axis in zip(args, in_axes)])
               for i in range(num_trials)]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)

  return unrolled


def _over_trials(local_step: Callable, how: str) -> Callable:
  """`local_step(state, opt_state, batch)` over a leading trial axis of the
  state (the batch is shared, see `map_over_trials`); it also takes
  `active` (a `[trials]` bool) and leaves an inactive trial's state as it
  was."""

  def one_trial(state, opt_state, batch, active):
    new_state, new_opt_state, metrics = local_step(state, opt_state, batch)
    keep = functools.partial(
        jax.tree.map, lambda new, old: jnp.where(active, new, old))
    return (keep(new_state, state), keep(new_opt_state, opt_state),
            metrics)

  return map_over_trials(one_trial, how, (0, 0, None, 0))


def make_train_step(mesh: jax.sharding.Mesh, per_device: bool = False,
                    adaptive_statistics: str | None = None,
                    scan: bool = False, trials: str | None = None):
  """Returns `train_step(state, batch) -> (state, metrics)`, jit-compiled.

  With `scan`, it returns `train_steps(state, batches) -> (state, metrics)`
  instead: `lax.scan` of the step over the leading axis of `batches` (K
  steps in one dispatch), with each metric stacked to shape `[K]`.

  `batch` holds `x`, `y` and `weight` of shape `[num_microbatches,
  microbatch, ...]`, sharded over `mesh` along the microbatch axis. The
  state's buffers are donated. With `per_device`, the optimizer state has a
  leading device axis sharded over the mesh (see `per_device_state`), and
  the metrics include `bytes_sent`, the mean over workers of the optimizer
  state's `bytes_sent`. With
  `adaptive_statistics` (`"per_device"` or `"microbatch"`) the optimizer
  holds a batch-size test: its update gets the step's batch size
  (`batch_size=`) or the moments of the microbatch gradients
  (`gradient_moments=`, one unit per device and nonempty microbatch), and the
  metrics hold `next_batch_size` and `noise_scale`; they hold `noise_scale`
  too whenever the optimizer state has one (`noise_scale_monitor`).

  With `trials` (`"vmap"` or `"unroll"`, see `map_over_trials` and the
  module `trials`), every leaf of the state has a leading trial axis, every
  trial trains on the same batch, the step is
  `train_step(state, batch, active)` with `active` a `[trials]` bool (an
  inactive trial's state is kept as it was) and every metric gets a trial
  axis (`[K, trials]` with `scan`). Not with `per_device` or
  `adaptive_statistics`.
  """
  if trials and (per_device or adaptive_statistics):
    raise ValueError("vmapped trials need a fixed batch and a replicated "
                     "optimizer state")
  local_step = functools.partial(
      _fused_local_step, num_devices=mesh.size, per_device=per_device,
      adaptive_statistics=adaptive_statistics)
  # check_vma=False keeps the pmap semantics: the gradient of replicated
  # params is per device, and the optimizer does the averaging.
  opt_spec = P(AXIS) if per_device else P()
  in_specs = (P(), opt_spec, P(None, AXIS))
  if trials:
    local_step, in_specs = _over_trials(local_step, trials), in_specs + (P(),)
  sharded = jax.shard_map(
      local_step, mesh=mesh, in_specs=in_specs,
      out_specs=(P(), opt_spec, P()), check_vma=False)

  def train_step(state, batch, *active):
    # The optimizer state travels apart so that it can have its own spec.
    rest, opt_state, metrics = sharded(
        state.replace(opt_state=None), state.opt_state, batch, *active)
    return rest.replace(opt_state=opt_state), metrics

  if scan:
    return jax.jit(lambda state, batches, *active: jax.lax.scan(
        lambda carry, batch: train_step(carry, batch, *active), state,
        batches), donate_argnums=(0,))
  return jax.jit(train_step, donate_argnums=(0,))


class AccumulatingTrainStep:
  """`train_step(state, batch) -> (state, metrics)` for a growing batch.

  The batch (host arrays `x`, `y`, `weight` of shape `[num_microbatches,
  microbatch, ...]`, any number of microbatches) is fed one microbatch at a
  time to a jitted `sngm_optax.gradient_accumulator` step under `shard_map`
  (each device accumulates its slice), then one jitted step applies the
  optimizer: both compile once, whatever the batch size. Each device's
  accumulated gradient is its unit for per-device statistics; its slices of
  the microbatches are the units of the moments (`"microbatch"`). BatchNorm
  statistics ride in the accumulation's carry, updated once per microbatch
  as in the fused step (see the module docstring).
  """

  def __init__(self, mesh: jax.sharding.Mesh, microbatch_size: int,
               per_device: bool = False,
               adaptive_statistics: str | None = None):
    num_devices = mesh.size
    local_size = microbatch_size // num_devices

    def accumulator(apply_fn, batch_stats=None):
      # The accumulator weights the per-example losses itself; the weighted
      # sums and the BatchNorm statistics ride along as its aux (summed over
      # the microbatches of one `add`: here one, so they come out as they
      # are).
      return sngm_optax.gradient_accumulator(
          functools.partial(classification_loss, apply_fn,
                            batch_stats=batch_stats, train=True),
          local_size, has_aux=True)

    def local_init(rest):
      zeros = jnp.zeros((), jnp.float32)
      carry = (accumulator(rest.apply_fn).init(rest.params), (zeros, zeros),
               batch_stats_of(rest))
      return jax.tree.map(lambda x: x[None], carry)

    def local_add(carry, rest, microbatch):
      accumulation, sums, batch_stats = jax.tree.map(lambda x: x[0], carry)
      accumulation, (loss_sum, correct, new_stats) = accumulator(
          rest.apply_fn, batch_stats).add(
              accumulation, rest.params, microbatch, microbatch["weight"])
      batch_stats = _unless_padding(new_stats, batch_stats,
                                    jnp.sum(microbatch["weight"]))
      return jax.tree.map(
          lambda x: x[None],
          (accumulation, optax.tree.add(sums, (loss_sum, correct)),
           batch_stats))

    def local_apply(rest, opt_state, carry):
      state = rest.replace(opt_state=opt_state)
      accumulation, (loss_sum, correct), batch_stats = jax.tree.map(
          lambda x: x[0], carry)
      total_weight = jax.lax.psum(accumulation.weight_sum, AXIS)
      grads = optax.tree.scale(num_devices / total_weight,
                               accumulation.grad_sum)
      moments = (accumulation.moments
                 if adaptive_statistics == "microbatch" else None)
      state, metrics = _apply_gradients(
          state, grads, total_weight, loss_sum, correct, moments,
          adaptive_statistics, per_device, batch_stats)
      return state.replace(opt_state=None), state.opt_state, metrics

    def mapped(fn, in_specs, out_specs):
      return jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                           out_specs=out_specs, check_vma=False)

    opt_spec = P(AXIS) if per_device else P()
    self._init = jax.jit(mapped(local_init, (P(),), P(AXIS)))
    self._add = jax.jit(mapped(local_add, (P(AXIS), P(), P(AXIS)), P(AXIS)),
                        donate_argnums=(0,))
    self._apply = jax.jit(
        mapped(local_apply, (P(), opt_spec, P(AXIS)),
               (P(), opt_spec, P())), donate_argnums=(0, 1, 2))
    self._sharding = jax.sharding.NamedSharding(mesh, P(AXIS))

  def __call__(self, state, batch):
    rest = state.replace(opt_state=None)
    carry = self._init(rest)
    for index in range(batch["x"].shape[0]):
      microbatch = jax.device_put(
          {key: value[index] for key, value in batch.items()},
          self._sharding)
      carry = self._add(carry, rest, microbatch)
    rest, opt_state, metrics = self._apply(rest, state.opt_state, carry)
    return rest.replace(opt_state=opt_state), metrics

  def _cache_size(self) -> int:
    """Compiled programs in all (the loop reports it as compilations)."""
    return sum(fn._cache_size() for fn in (self._init, self._add,  # pylint: disable=protected-access
                                           self._apply))


def make_eval_step(mesh: jax.sharding.Mesh, apply_fn: Callable,
                   trials: str | None = None):
  """Returns `eval_step(params, x, y, weight, batch_stats=None) ->
  (loss_sum, correct_sum)`; a model with BatchNorm uses the running
  averages `batch_stats`.

  With `trials` (see `make_train_step`), the params (and statistics) have a
  leading trial axis and so do the sums.
  """

  def local_sums(params, batch_stats, x, y, weight):
    _, (loss_sum, correct, _) = classification_loss(
        apply_fn, params, {"x": x, "y": y, "weight": weight}, batch_stats)
    return loss_sum, correct

  if trials:
    local_sums = map_over_trials(local_sums, trials, (0, 0, None, None, None))

  def local_eval(params, batch_stats, x, y, weight):
    return jax.lax.psum(local_sums(params, batch_stats, x, y, weight), AXIS)

  sharded = jax.jit(jax.shard_map(
      local_eval, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)),
      out_specs=(P(), P()), check_vma=False))

  def eval_step(params, x, y, weight, batch_stats=None):
    return sharded(params, batch_stats, x, y, weight)

  return eval_step


def evaluate(eval_step, params, x, y, chunk: int, batch_stats=None) -> dict:
  """Mean loss and accuracy over `(x, y)`, in padded chunks of `chunk` (a
  model with BatchNorm: with the running averages `batch_stats`): floats, or
  lists of one per trial from a vmapped `eval_step`."""
  loss_sum, correct = np.float64(0.0), np.float64(0.0)
  for start in range(0, len(y), chunk):
    xs, ys = x[start:start + chunk], y[start:start + chunk]
    pad = chunk - len(ys)
    weight = np.ones(chunk, np.float32)
    if pad:  # keep one compiled shape: pad with zero-weight examples
      xs = np.concatenate([xs, np.zeros((pad,) + xs.shape[1:], xs.dtype)])
      ys = np.concatenate([ys, np.zeros(pad, ys.dtype)])
      weight[chunk - pad:] = 0.0
    batch_loss, batch_correct = eval_step(params, xs, ys, weight,
                                          batch_stats)
    loss_sum = loss_sum + np.asarray(batch_loss, np.float64)
    correct = correct + np.asarray(batch_correct, np.float64)
  # tolist: a Python float, or a list of them (one per trial).
  return {"loss": (loss_sum / len(y)).tolist(),
          "accuracy": (correct / len(y)).tolist()}
