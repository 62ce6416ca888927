"""The shared benchmark helper, and that benchmarks use only public names."""

import argparse
import ast
import mmap
import pathlib
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sngm_optax

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "_common.py")
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402  pylint: disable=wrong-import-position


def test_machine_description_has_the_cpu_model_and_versions():
  machine = _common.machine_description()
  for key in ("cpu_model", "cpu_count", "load_average", "jax", "jaxlib",
              "backend", "device_kind", "device_count"):
    assert machine[key] not in (None, ""), key
  assert len(machine["load_average"]) == 3
  assert machine["cpu_model"] in _common.machine_line(machine)
  touch = machine["first_touch_ms"]
  assert touch["mib"] == 16 and touch["first"] > 0 and touch["again"] > 0


def test_faulted_mib_per_call_counts_the_pages_first_touched():
  def touch_8_mib():
    with mmap.mmap(-1, 8 * 2**20) as fresh:
      np.frombuffer(fresh, np.uint8).fill(1)

  assert 8 <= _common.faulted_mib_per_call(touch_8_mib) < 9
  assert _common.faulted_mib_per_call(lambda: None) < 0.5


def test_temp_mib_is_what_xla_keeps_between_ops():
  x = jnp.ones(2**20, jnp.float32)  # 4 MiB
  fused = jax.jit(lambda x: x + 1).lower(x).compile()
  # The sort's output is materialized before the cumulative sum reads it.
  two_ops = jax.jit(lambda x: jnp.cumsum(jnp.sort(x))).lower(x).compile()
  assert _common.temp_mib(fused) == 0
  assert _common.temp_mib(two_ops) >= 4


def test_force_host_devices_refuses_after_jax_is_imported(monkeypatch):
  import jax  # noqa: F401  pylint: disable=import-outside-toplevel
  monkeypatch.setenv("XLA_FLAGS", "")
  with pytest.raises(RuntimeError, match="before `import jax`"):
    _common.force_host_devices(8)


def test_markdown_table():
  table = _common.markdown_table(["name", "ms"], [["a", 1.5], ["b", 2]],
                                 align="lr")
  assert table == "| name | ms |\n| --- | ---: |\n| a | 1.5 |\n| b | 2 |"


def test_time_interleaved_takes_turns_and_reports_medians():
  calls = []
  functions = {name: (lambda name=name: calls.append(name))
               for name in ("first", "second")}
  timings = _common.time_interleaved(functions, repeats=3, calls=2)
  # One warm-up call each, then rounds of two calls of each in turn.
  assert calls == ["first", "second"] + ["first"] * 2 + ["second"] * 2 + [
      "first"] * 2 + ["second"] * 2 + ["first"] * 2 + ["second"] * 2
  assert {name: len(t) for name, t in timings.wall.items()} == {
      "first": 3, "second": 3}
  assert set(timings.medians()) == {"first", "second"}
  assert len(timings.ratios("second", "first", cpu=True)) == 3


def _private_uses(tree: ast.Module) -> list[str]:
  """Non-public `sngm_optax` names a module imports or reads."""
  public = set(sngm_optax.__all__) | {"harness", "__version__"}
  bound = {}  # local name -> whether it is the package itself
  bad = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] != "sngm_optax":
          continue
        if parts[1:2] and parts[1] != "harness" or any(
            part.startswith("_") for part in parts):
          bad.append(alias.name)
        bound[alias.asname or parts[0]] = alias.asname is None
    elif isinstance(node, ast.ImportFrom) and node.module and (
        node.module.split(".")[0] == "sngm_optax"):
      parts = node.module.split(".")
      for alias in node.names:
        name = f"{node.module}.{alias.name}"
        if parts == ["sngm_optax"]:
          if alias.name not in public:
            bad.append(name)
        elif parts[1] != "harness" or any(
            part.startswith("_") for part in parts + [alias.name]):
          bad.append(name)
        bound[alias.asname or alias.name] = False
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in bound):
      is_package = bound[node.value.id]
      if (node.attr not in public if is_package else
          node.attr.startswith("_") and not node.attr.startswith("__")):
        bad.append(f"{node.value.id}.{node.attr}")
  return bad


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_uses_common_and_only_public_names(script):
  tree = ast.parse(script.read_text(), filename=str(script))
  imported = {alias.name for node in ast.walk(tree)
              if isinstance(node, ast.Import) for alias in node.names}
  assert "_common" in imported
  assert _private_uses(tree) == []


def test_the_public_name_check_catches_private_names():
  tree = ast.parse(
      "import sngm_optax\n"
      "from sngm_optax import _compression\n"
      "from sngm_optax.harness import compare\n"
      "sngm_optax.sngm, sngm_optax._checks, compare._one_run\n")
  assert _private_uses(tree) == ["sngm_optax._compression",
                                 "sngm_optax._checks", "compare._one_run"]


def test_command_line_spells_flags_so_that_it_parses_back():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--fresh", action="store_true")
  parser.add_argument("--lrs", type=float, nargs="+", default=[0.4, 0.8])
  parser.add_argument("--name", default="a b")
  parser.add_argument("--limit", type=int, default=None)
  args = parser.parse_args(["--quick"])
  words = _common.command_line(args).split(" ", 2)[2]
  assert vars(parser.parse_args(shlex.split(words))) == vars(args)
  assert "--fresh" not in words and "--limit" not in words


def test_command_line_gives_paths_in_the_repository_from_its_root():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", type=pathlib.Path,
                      default=_common.RESULTS / "x.json")
  parser.add_argument("--elsewhere", type=pathlib.Path,
                      default=pathlib.Path("/elsewhere/y.json"))
  words = _common.command_line(parser.parse_args([]))
  assert words.endswith(
      "--out benchmarks/results/x.json --elsewhere /elsewhere/y.json")
