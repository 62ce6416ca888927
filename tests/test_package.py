"""The package as a whole: what importing it loads; how long its functions are."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sngm_optax"

# The harness's dependencies ([harness] and [dev] extras), by top-level name.
HARNESS_DEPENDENCIES = {"flax", "orbax", "tqdm", "matplotlib", "mnist1d",
                        "chex"}

_IMPORT_AND_STEP = """
import json, sys
import jax, jax.numpy as jnp
import sngm_optax

tx = sngm_optax.sngm(0.1, momentum=0.9)
params = {"w": jnp.array([3.0, 0.0, -4.0]), "b": jnp.ones(2)}
grads = {"w": jnp.array([3.0, 0.0, -4.0]), "b": jnp.zeros(2)}
step = jax.jit(tx.update)
updates, state = step(grads, tx.init(params), params)
updates, state = step(grads, state, params)
print(json.dumps({
    "file": sngm_optax.__file__,
    "modules": sorted(sys.modules),
    "w": [float(u) for u in updates["w"]],
}))
"""


def test_import_and_a_jitted_sngm_step_load_no_harness_dependency():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  result = subprocess.run(
      [sys.executable, "-c", _IMPORT_AND_STEP], env=env, cwd=ROOT,
      capture_output=True, text=True, timeout=300, check=True)
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert pathlib.Path(report["file"]).resolve() == PACKAGE / "__init__.py"
  loaded = {name.split(".")[0] for name in report["modules"]}
  assert not loaded & HARNESS_DEPENDENCIES
  # The library never imports the harness.
  assert not [m for m in report["modules"] if m.startswith("sngm_optax.harness")]
  # Two steps of g/‖g‖ = (0.6, 0, -0.8) with momentum 0.9: u = 1.9 g/‖g‖.
  np.testing.assert_allclose(report["w"], [-0.1 * 1.9 * 0.6, 0.0,
                                           0.1 * 1.9 * 0.8], rtol=1e-6)


MAX_FUNCTION_LINES = 150


def _function_lengths():
  """(path:line name, lines) of every function, its docstring not counted.

  Nested functions count in their enclosing function too.
  """
  for path in sorted(PACKAGE.rglob("*.py")):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      lines = node.end_lineno - node.lineno + 1
      if ast.get_docstring(node, clean=False) is not None:
        docstring = node.body[0]
        lines -= docstring.end_lineno - docstring.lineno + 1
      where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
      yield where, lines


def test_the_length_check_sees_the_functions():
  lengths = dict(_function_lengths())
  assert any(w.endswith(" sngm") for w in lengths)
  assert any("harness" in w for w in lengths)


def test_no_function_is_longer_than_150_lines():
  long = {where: lines for where, lines in _function_lengths()
          if lines > MAX_FUNCTION_LINES}
  assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


_IMPORT_HARNESS_WITHOUT_FLAX = """
import importlib.util
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: (
    None if name == "flax" else find_spec(name, *a))
try:
  import sngm_optax.harness
except ModuleNotFoundError as error:
  print(error)
"""


def test_the_harness_without_its_extra_says_how_to_install_it():
  result = subprocess.run(
      [sys.executable, "-c", _IMPORT_HARNESS_WITHOUT_FLAX], cwd=ROOT,
      capture_output=True, text=True, timeout=300, check=True)
  assert "sngm_optax.harness needs flax" in result.stdout
  assert 'pip install -e ".[harness]"' in result.stdout
