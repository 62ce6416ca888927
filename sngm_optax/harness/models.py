"""Small Flax models for MNIST-1D (length-40 signals, 10 classes).

`MLP`, `CNN` and `ResNet` are `flax.linen` modules used by the training
loop in `sngm_optax.harness.train` (pick one by name with `make_model`). The
convolutions of the CNN and the ResNet are `PatchConv`s, `flax.linen.Conv`
computed as one matmul over patches on `[length, channels, batch]` arrays,
with `nn.Conv`'s parameters and results (several times faster on a CPU; see
`CNN`); `reference=True` gives either model its `nn.Conv` formulation, to
check and time against. `ResNet` has BatchNorm: it takes `train=True`
to normalize over the batch and update its running statistics
(`mutable=["batch_stats"]`), and uses the running averages otherwise.
`NnxMLP` is the same MLP written with `flax.nnx`, to show the optimizers
working with `nnx.Optimizer`:

>>> import jax.numpy as jnp, optax
>>> from flax import nnx
>>> from sngm_optax import sngm
>>> from sngm_optax.harness.models import NnxMLP
>>> model = NnxMLP(num_features=40, num_classes=10, rngs=nnx.Rngs(0))
>>> optimizer = nnx.Optimizer(model, sngm(learning_rate=0.1), wrt=nnx.Param)
>>> x, y = jnp.ones((8, 40)), jnp.zeros(8, dtype=jnp.int32)
>>> def loss_fn(model):
...   logits = model(x)
...   return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
>>> loss, grads = nnx.value_and_grad(loss_fn)(model)
>>> _ = optimizer.update(model, grads)
>>> bool(loss_fn(model) < loss)
True
"""

import functools
import itertools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nn.Module):
  """Fully connected ReLU network on flattened inputs.

  Attributes:
    num_classes: number of output logits.
    hidden_sizes: widths of the hidden layers.
  """

  num_classes: int = 10
  hidden_sizes: Sequence[int] = (128, 128)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden_sizes:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def _window(length: int, kernel: int, stride: int,
            padding: str) -> tuple[int, int, int]:
  """(output length, padding before, padding after), as `lax.conv` pads."""
  if padding == "VALID":
    return (length - kernel) // stride + 1, 0, 0
  out = -(-length // stride)
  total = max((out - 1) * stride + kernel - length, 0)
  return out, total // 2, total - total // 2


def conv1d_batch_minor(x: jnp.ndarray, kernel: jnp.ndarray,
                       bias: jnp.ndarray | None, stride: int = 1,
                       padding: str = "SAME") -> jnp.ndarray:
  """A 1-D convolution on `[length, features, batch]` arrays, as a matmul.

  The patches `P[o] = x[stride * o : stride * o + k]` (each a `[k * in,
  batch]` block, the window's rows one after another) are gathered with k
  strided slices, and every output position is one `[out_features, k * in]
  @ [k * in, batch]` product: a batched dot over the output positions.
  With the batch as the minor dimension the products vectorize over the
  batch, and no transpose is needed between layers.

  Args:
    x: `[length, in_features, batch]`.
    kernel: `[k, in_features, out_features]` (`flax.linen.Conv`'s layout).
    bias: `[out_features]`, or None for none.
    stride: the stride.
    padding: `"SAME"` or `"VALID"`, as in `jax.lax.conv_general_dilated`.

  Returns:
    `[output length, out_features, batch]`.
  """
  k, in_features, out_features = kernel.shape
  out, before, after = _window(x.shape[0], k, stride, padding)
  x = jnp.pad(x, ((before, after), (0, 0), (0, 0)))
  patches = jnp.concatenate(
      [x[j:j + stride * (out - 1) + 1:stride] for j in range(k)], axis=1)
  # The kernel is broadcast over the positions (tiny) so that the dot is
  # batched over them and lands in [position, feature, batch] order.
  weights = jnp.broadcast_to(kernel.reshape(k * in_features, out_features).T,
                             (out, out_features, k * in_features))
  y = jax.lax.dot_general(weights, patches, (((2,), (1,)), ((0,), (0,))))
  return y if bias is None else y + bias[:, None]


class PatchConv(nn.Module):
  """`flax.linen.Conv` in 1-D, computed as one matmul over patches.

  Same parameters (`kernel` of shape `(k, in_features, features)` from
  `lecun_normal`, `bias` of zeros unless `use_bias=False`: the same tree
  and, from the same key, the same values) and the same results, to float32
  rounding, as `nn.Conv(features, (k,), strides=(stride,), padding=padding,
  use_bias=use_bias)`. See `conv1d_batch_minor` for the computation.

  Attributes:
    features: output features.
    kernel_size: the window, an int or a 1-tuple.
    strides: the stride, an int or a 1-tuple.
    padding: `"SAME"` (`nn.Conv`'s default) or `"VALID"`.
    use_bias: add a learned bias (`nn.Conv`'s default).
    batch_minor: inputs and outputs are `[length, features, batch]` (the
      layout the computation uses) instead of `nn.Conv`'s `[batch, length,
      features]`; a stack of such layers transposes only once.
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: str = "SAME"
  use_bias: bool = True
  batch_minor: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    (kernel_size,) = _one(self.kernel_size, "kernel_size")
    (stride,) = _one(self.strides, "strides")
    if self.padding not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME' or 'VALID', got {self.padding!r}")
    if x.ndim != 3:
      raise ValueError(f"PatchConv takes a [batch, length, features] array "
                       f"(or [length, features, batch]), got shape {x.shape}")
    in_features = x.shape[1] if self.batch_minor else x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kernel_size, in_features, self.features))
    bias = (self.param("bias", nn.initializers.zeros_init(), (self.features,))
            if self.use_bias else None)
    if self.batch_minor:
      return conv1d_batch_minor(x, kernel, bias, stride, self.padding)
    y = conv1d_batch_minor(jnp.transpose(x, (1, 2, 0)), kernel, bias, stride,
                           self.padding)
    return jnp.transpose(y, (2, 0, 1))


def _one(value: int | Sequence[int], name: str) -> tuple[int]:
  value = (value,) if isinstance(value, int) else tuple(value)
  if len(value) != 1:
    raise ValueError(f"PatchConv is 1-D: {name} must be an int or a 1-tuple, "
                     f"got {value}")
  return value


def _conv_layer(reference: bool) -> Callable[..., nn.Module]:
  """`nn.Conv` (reference), or `PatchConv` on `[length, channels, batch]`."""
  return (nn.Conv if reference
          else functools.partial(PatchConv, batch_minor=True))


class CNN(nn.Module):
  """1-D convolutional network, after the MNIST-1D paper's `ConvBase`.

  Three stride-2 convolutions (kernel 5, 3, 3, 'SAME' padding) with ReLU,
  then a linear classifier on the flattened features; about 5k parameters
  at 25 channels. The parameter tree is that of `nn.Conv` layers named
  `Conv_0`..`Conv_2` and `Dense_0`, whatever the formulation.

  The convolutions are `PatchConv`s on `[length, channels, batch]` arrays,
  and a batch larger than `chunk_size` goes through the network
  `chunk_size` examples at a time (`nn.scan`, padded to whole chunks), with
  the activations recomputed in the backward pass (`nn.remat`). A chunk's
  activations fit in a core's L2 cache, where the whole batch's (16 MB per
  activation at B = 8,192) went to memory several times per layer: on a
  CPU the large-batch training step is about 4x faster than with
  `nn.Conv` on the whole batch (`benchmarks/step_efficiency.py`). Outputs
  and gradients are the same to float32 rounding.

  Attributes:
    num_classes: number of output logits.
    channels: channels of every convolution.
    chunk_size: examples per chunk; None runs the whole batch at once.
    reference: `nn.Conv` layers on the whole batch (the formulation before
      `PatchConv`; slower, kept to check and time against).
  """

  num_classes: int = 10
  channels: int = 25
  chunk_size: int | None = 128
  reference: bool = False

  def setup(self):
    conv = _conv_layer(self.reference)
    # The attribute names are the parameter tree's keys: nn.Conv's
    # automatic names in a compact module.
    self.Conv_0 = conv(self.channels, (5,), strides=(2,))  # pylint: disable=invalid-name
    self.Conv_1 = conv(self.channels, (3,), strides=(2,))  # pylint: disable=invalid-name
    self.Conv_2 = conv(self.channels, (3,), strides=(2,))  # pylint: disable=invalid-name
    self.Dense_0 = nn.Dense(self.num_classes)  # pylint: disable=invalid-name

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim == 2:  # [batch, length] -> [batch, length, 1 channel]
      x = x[..., None]
    batch, chunk = x.shape[0], self.chunk_size
    if self.reference:
      return self._reference_logits(x)
    if not chunk or batch <= chunk or self.is_initializing():
      return self._logits(x)
    chunks = -(-batch // chunk)
    x = jnp.pad(x, ((0, chunks * chunk - batch),) + ((0, 0),) * (x.ndim - 1))
    x = x.reshape((chunks, chunk) + x.shape[1:])
    body = nn.remat(lambda module, carry, xs: (carry, module._logits(xs)))  # pylint: disable=protected-access
    _, logits = nn.scan(body, variable_broadcast="params",
                        split_rngs={"params": False})(self, None, x)
    return logits.reshape((chunks * chunk,) + logits.shape[2:])[:batch]

  def _logits(self, x: jnp.ndarray) -> jnp.ndarray:
    x = jnp.transpose(x, (1, 2, 0))  # [length, channels, batch]
    for conv in (self.Conv_0, self.Conv_1, self.Conv_2):
      x = nn.relu(conv(x))
    # [length * channels, batch]: the flattening order of [batch, length,
    # channels], so that Dense_0's kernel means what it means for nn.Conv.
    return self.Dense_0(x.reshape((-1, x.shape[-1])).T)

  def _reference_logits(self, x: jnp.ndarray) -> jnp.ndarray:
    for conv in (self.Conv_0, self.Conv_1, self.Conv_2):
      x = nn.relu(conv(x))
    return self.Dense_0(x.reshape((x.shape[0], -1)))


def _named_convs(reference: bool, features: int) -> Callable[..., nn.Module]:
  """Makes bias-free convolutions `conv(kernel, strides)` named `Conv_0`,
  `Conv_1`, ... in the order they are made: `nn.Conv`'s automatic names in
  a compact module (which a `PatchConv` would not get), so that both
  formulations have the same parameter tree."""
  layer, count = _conv_layer(reference), itertools.count()

  def conv(kernel: int, strides: int = 1) -> nn.Module:
    return layer(features, (kernel,), strides=(strides,), use_bias=False,
                 name=f"Conv_{next(count)}")
  return conv


def _batch_norm(train: bool, reference: bool,
                axis_name: str | None) -> Callable[..., nn.BatchNorm]:
  """The models' BatchNorm: over the batch and the length in training, of
  the channel axis (last for `reference`, else that of `[length, channels,
  batch]`)."""
  return functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=0.9, axis=-1 if reference else 1,
                           axis_name=axis_name)


class ResidualBlock(nn.Module):
  """Two kernel-3 convolutions with BatchNorm, and the shortcut (ResNet v1).

  `relu(x' + shortcut(x))` with `x' = BN(conv(relu(BN(conv(x)))))`; the
  shortcut is the identity, or a 1x1 convolution with BatchNorm when the
  block changes the channels or the length (stride 2). The last BatchNorm's
  scale starts at 0, so each block starts as its shortcut (Goyal et al.
  2017, section 5.1).

  Attributes:
    channels: output channels.
    strides: 2 halves the length (first block of a stage), else 1.
    axis_name: the device axis BatchNorm averages its statistics over (None:
      each device normalizes over its own examples).
    reference: `nn.Conv` layers on `[batch, length, channels]` arrays;
      otherwise `PatchConv`s on `[length, channels, batch]` ones (inputs and
      outputs in that layout), with the same parameters and results.
  """

  channels: int
  strides: int = 1
  axis_name: str | None = None
  reference: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    norm = _batch_norm(train, self.reference, self.axis_name)
    conv = _named_convs(self.reference, self.channels)
    shortcut = x
    if self.strides != 1 or x.shape[-1 if self.reference else 1] != (
        self.channels):
      shortcut = norm()(conv(1, self.strides)(x))
    y = nn.relu(norm()(conv(3, self.strides)(x)))
    y = norm(scale_init=nn.initializers.zeros)(conv(3)(y))
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Residual 1-D CNN with BatchNorm: the papers' kind of model, small.

  A stride-2 kernel-5 stem of `width` channels (length 40 -> 20), then
  `stages` stages of `width * widening ** stage` channels (16, 64 at the
  defaults), each `depth` `ResidualBlock`s, the first of stride 2 (20 ->
  10 -> 5), then global average pooling and a linear classifier: 19.4k
  parameters at the defaults. Most of them work at length 5, where they
  are cheap. In a short run on 4,000 MNIST-1D examples it reaches clearly
  higher test accuracy than the CNN, at a few times its step cost (both
  measured by `benchmarks/resnet_cost.py`). BatchNorm's momentum is 0.9, as in flax's
  ImageNet ResNet. Call it with `train=True` and `mutable=["batch_stats"]`
  to train.

  As in the `CNN`, the convolutions are `PatchConv`s and the network works
  on `[length, channels, batch]` arrays from the stem to the pooling (one
  transpose in, one out), BatchNorm normalizing the channel axis over the
  length and the batch. The parameter and `batch_stats` trees are those of
  `nn.Conv` and `nn.BatchNorm` layers on `[batch, length, channels]`
  (`reference=True`), and the outputs, running statistics and gradients
  the same to float32 rounding.

  Ghost BatchNorm (Hoffer et al. 2017, "Train longer, generalize better",
  section 4): in training, a batch larger than `ghost_batch_size` goes
  through the network in groups of that many examples, in order (the last
  group takes the rest), and each group is one BatchNorm batch, normalized
  over itself, its statistics updating the running averages after the
  previous group's, as separate forward passes would. So BatchNorm sees the
  same number of examples whatever the batch, as in the large-batch
  experiments of Goyal et al. (2017, 32 per worker) and Hoffer et al. (128).
  It also keeps the large-batch step cheap: the groups run as a loop
  (`nn.scan`), with their activations recomputed in the backward pass
  (`nn.remat`), as the CNN's chunks do, so the step holds one group's
  activations instead of the whole batch's. Evaluation (`train=False`)
  uses the running averages, so it runs on the whole batch at once.

  BatchNorm statistics: in training each device normalizes over its own
  examples (flax's default), in groups as above; with
  `cross_device_batch_norm` over the examples of every device on the axis
  `axis_name` (each group's, on every device), which only exists inside
  the harness's `shard_map`, so such a model trains there only.

  Attributes:
    num_classes: number of output logits.
    width: channels of the stem and the first stage.
    depth: residual blocks per stage.
    stages: number of stages.
    widening: the channels grow by this factor from one stage to the next.
    ghost_batch_size: examples per BatchNorm batch in training (a positive
      integer), or None for the whole batch (of each device).
    cross_device_batch_norm: normalize over the global batch (BatchNorm's
      `axis_name`) instead of each device's shard.
    axis_name: the device axis of `cross_device_batch_norm` (the harness's
      mesh axis).
    reference: `nn.Conv` layers on `[batch, length, channels]` arrays (the
      formulation before `PatchConv`; slower, kept to check and time
      against).
  """

  num_classes: int = 10
  width: int = 16
  depth: int = 1
  stages: int = 2
  widening: int = 4
  ghost_batch_size: int | None = 128
  cross_device_batch_norm: bool = False
  axis_name: str = "data"
  reference: bool = False

  def __post_init__(self):
    if self.ghost_batch_size is not None and (
        isinstance(self.ghost_batch_size, bool)
        or not isinstance(self.ghost_batch_size, int)
        or self.ghost_batch_size < 1):
      raise ValueError("ghost_batch_size must be a positive integer or None, "
                       f"got {self.ghost_batch_size!r}")
    super().__post_init__()

  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if x.ndim == 2:  # [batch, length] -> [batch, length, 1 channel]
      x = x[..., None]
    batch, group = x.shape[0], self.ghost_batch_size
    if not train or not group or batch <= group or self.is_initializing():
      return self._logits(x, train)
    groups, rest = divmod(batch, group)
    whole = x[:groups * group]
    if self.reference:  # one group after the other, as written
      logits = [self._logits(xs, train)
                for xs in jnp.split(whole, groups)]
    else:  # the same as a loop over the groups, compiled once
      body = nn.remat(lambda module, carry, xs: (
          carry, module._logits(xs, train)))  # pylint: disable=protected-access
      _, stacked = nn.scan(body, variable_broadcast="params",
                           variable_carry="batch_stats",
                           split_rngs={"params": False})(
                               self, None,
                               whole.reshape((groups, group) + x.shape[1:]))
      logits = [stacked.reshape((-1,) + stacked.shape[2:])]
    if rest:  # the last, smaller group
      logits.append(self._logits(x[groups * group:], train))
    return jnp.concatenate(logits)

  @nn.compact
  def _logits(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """The network on `[batch, length, channels]`: one BatchNorm batch."""
    if not self.reference:
      x = jnp.transpose(x, (1, 2, 0))  # [length, channels, batch]
    axis_name = self.axis_name if self.cross_device_batch_norm else None
    x = _named_convs(self.reference, self.width)(5, 2)(x)
    x = nn.relu(_batch_norm(train, self.reference, axis_name)()(x))
    for stage in range(self.stages):
      for block in range(self.depth):
        x = ResidualBlock(self.width * self.widening ** stage,
                          strides=2 if block == 0 else 1,
                          axis_name=axis_name, reference=self.reference)(
                              x, train)
    if self.reference:
      x = jnp.mean(x, axis=1)
    else:
      x = jnp.mean(x, axis=0).T  # [channels, batch] -> [batch, channels]
    return nn.Dense(self.num_classes)(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": CNN,
    "mlp": MLP,
    "resnet": ResNet,
}


def make_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
  """Returns the linen model registered under `name` (see `MODELS`).

  `kwargs` go to its constructor (e.g. `hidden_sizes=(64,)` for the MLP,
  `channels=` for the CNN); `Config.model_kwargs` holds them for a run.
  Lists become tuples (JSON has no tuples, and flax fields hash).
  """
  if name not in MODELS:
    raise ValueError(
        f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
  kwargs = {key: tuple(value) if isinstance(value, list) else value
            for key, value in kwargs.items()}
  return MODELS[name](num_classes=num_classes, **kwargs)


class NnxMLP(nnx.Module):
  """The `MLP` above written with `flax.nnx`."""

  def __init__(self, num_features: int, num_classes: int = 10,
               hidden_sizes: Sequence[int] = (128, 128), *, rngs: nnx.Rngs):
    sizes = [num_features, *hidden_sizes]
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])
    self.output = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x.reshape((x.shape[0], -1))
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.output(x)
