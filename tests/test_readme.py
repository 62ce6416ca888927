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
