"""Small Flax models for MNIST-1D (length-40 signals, 10 classes).

`MLP` and `CNN` are `flax.linen` modules used by the training loop in
`sngm_optax.harness.train` (pick one by name with `make_model`). `NnxMLP` is the same
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
