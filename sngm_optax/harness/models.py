"""Small Flax models for MNIST-1D (length-40 signals, 10 classes).

`MLP`, `CNN` and `ResNet` are `flax.linen` modules used by the training
loop in `sngm_optax.harness.train` (pick one by name with `make_model`).
`ResNet` has BatchNorm: it takes `train=True` to normalize over the batch
and update its running statistics (`mutable=["batch_stats"]`), and uses the
running averages otherwise. `NnxMLP` is the same
MLP written with `flax.nnx`, to show the optimizers working with
`nnx.Optimizer`:

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
from typing import Callable, Sequence

import flax.linen as nn
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


class CNN(nn.Module):
  """1-D convolutional network, after the MNIST-1D paper's `ConvBase`.

  Three stride-2 convolutions (kernel 5, 3, 3) with ReLU, then a linear
  classifier on the flattened features; about 5k parameters at 25 channels.

  Attributes:
    num_classes: number of output logits.
    channels: channels of every convolution.
  """

  num_classes: int = 10
  channels: int = 25

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim == 2:  # [batch, length] -> [batch, length, 1 channel]
      x = x[..., None]
    for kernel in (5, 3, 3):
      x = nn.relu(nn.Conv(self.channels, (kernel,), strides=(2,))(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


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
  """

  channels: int
  strides: int = 1
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, axis_name=self.axis_name)
    conv = functools.partial(nn.Conv, self.channels, use_bias=False)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.channels:
      shortcut = norm()(conv((1,), strides=(self.strides,))(x))
    y = nn.relu(norm()(conv((3,), strides=(self.strides,))(x)))
    y = norm(scale_init=nn.initializers.zeros)(conv((3,))(y))
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Residual 1-D CNN with BatchNorm: the papers' kind of model, small.

  A stride-2 kernel-5 stem of `width` channels (length 40 -> 20), then
  `stages` stages of `width * widening ** stage` channels (16, 64 at the
  defaults), each `depth` `ResidualBlock`s, the first of stride 2 (20 ->
  10 -> 5), then global average pooling and a linear classifier: 19.4k
  parameters at the defaults. Most of them work at length 5, where they
  are cheap: a training step costs 2.2-2.7x the `CNN`'s at B = 128-4096 on
  a CPU, and 10 epochs on 4,000 MNIST-1D examples reach 94.8 % test
  accuracy against the CNN's 89.2 % (sngm, each at its best learning rate;
  `benchmarks/resnet_cost.py`). BatchNorm's momentum is 0.9, as in flax's
  ImageNet ResNet. Call it with `train=True` and `mutable=["batch_stats"]`
  to train.

  BatchNorm statistics: in training each device normalizes over its own
  examples (flax's default); with `cross_device_batch_norm` over the
  examples of every device on the axis `axis_name` (which only exists
  inside the harness's `shard_map`, so such a model trains there only).

  Attributes:
    num_classes: number of output logits.
    width: channels of the stem and the first stage.
    depth: residual blocks per stage.
    stages: number of stages.
    widening: the channels grow by this factor from one stage to the next.
    cross_device_batch_norm: normalize over the global batch (BatchNorm's
      `axis_name`) instead of each device's shard.
    axis_name: the device axis of `cross_device_batch_norm` (the harness's
      mesh axis).
  """

  num_classes: int = 10
  width: int = 16
  depth: int = 1
  stages: int = 2
  widening: int = 4
  cross_device_batch_norm: bool = False
  axis_name: str = "data"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if x.ndim == 2:  # [batch, length] -> [batch, length, 1 channel]
      x = x[..., None]
    axis_name = self.axis_name if self.cross_device_batch_norm else None
    x = nn.Conv(self.width, (5,), strides=(2,), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     axis_name=axis_name)(x)
    x = nn.relu(x)
    for stage in range(self.stages):
      for block in range(self.depth):
        x = ResidualBlock(self.width * self.widening ** stage,
                          strides=2 if block == 0 else 1,
                          axis_name=axis_name)(x, train)
    x = jnp.mean(x, axis=1)
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
