"""Small Flax models for MNIST-1D (length-40 signals, 10 classes).

`MLP` and `CNN` are `flax.linen` modules used by the training loop in
`sngm_optax.harness.train` (pick one by name with `make_model`). The CNN's
convolutions are `PatchConv`s, `flax.linen.Conv` computed as one matmul over
patches, with `nn.Conv`'s parameters and results (several times faster on a
CPU; see `CNN`). `NnxMLP` is the same MLP written with `flax.nnx`, to show
the optimizers working with `nnx.Optimizer`:

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


def conv1d_batch_minor(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray,
                       stride: int = 1, padding: str = "SAME") -> jnp.ndarray:
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
    bias: `[out_features]`.
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
  return y + bias[:, None]


class PatchConv(nn.Module):
  """`flax.linen.Conv` in 1-D, computed as one matmul over patches.

  Same parameters (`kernel` of shape `(k, in_features, features)` from
  `lecun_normal`, `bias` of zeros: the same tree and, from the same key, the
  same values) and the same results, to float32 rounding, as
  `nn.Conv(features, (k,), strides=(stride,), padding=padding)`. See
  `conv1d_batch_minor` for the computation.

  Attributes:
    features: output features.
    kernel_size: the window, an int or a 1-tuple.
    strides: the stride, an int or a 1-tuple.
    padding: `"SAME"` (`nn.Conv`'s default) or `"VALID"`.
    batch_minor: inputs and outputs are `[length, features, batch]` (the
      layout the computation uses) instead of `nn.Conv`'s `[batch, length,
      features]`; a stack of such layers transposes only once.
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: str = "SAME"
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
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
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
    conv = (nn.Conv if self.reference
            else functools.partial(PatchConv, batch_minor=True))
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


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": CNN,
    "mlp": MLP,
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
