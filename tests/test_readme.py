"""The README's code examples run and do what they say."""

import pathlib
import re

import jax
import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_readme_training_step_example_trains():
  namespace = {}
  exec(python_blocks()[0], namespace)  # pylint: disable=exec-used
  x = jax.random.normal(jax.random.key(0), (128, 8))
  y = x @ jnp.arange(8.0) + 1.0
  params, opt_state = namespace["params"], namespace["opt_state"]
  first_loss = None
  for _ in range(300):
    params, opt_state, loss = namespace["train_step"](params, opt_state, x, y)
    first_loss = loss if first_loss is None else first_loss
  assert loss < 1e-3 * first_loss


def test_readme_adaptive_batch_example_grows_the_batch():
  namespace = {}
  exec(python_blocks()[1], namespace)  # pylint: disable=exec-used
  import optax  # pylint: disable=g-import-not-at-top
  assert int(optax.tree.get(namespace["opt_state"], "next_batch_size")) > 32


def test_readme_growing_batch_loop_serves_each_example_once_and_compiles_once():
  import numpy as np  # pylint: disable=g-import-not-at-top
  block = next(b for b in python_blocks() if "gradient_accumulator" in b)
  namespace = {}
  exec(block, namespace)  # pylint: disable=exec-used
  served = namespace["served"]
  sizes = [len(indices) for indices in served]
  assert len(set(sizes)) >= 3 and sizes == sorted(sizes), sizes
  everything = np.concatenate(served)
  num_train = len(namespace["x_train"])
  assert len(everything) > 2 * num_train
  for epoch in range(len(everything) // num_train):
    chunk = everything[epoch * num_train:(epoch + 1) * num_train]
    np.testing.assert_array_equal(np.sort(chunk), np.arange(num_train))
  assert namespace["add"]._cache_size() == 1  # pylint: disable=protected-access
