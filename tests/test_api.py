"""The public API, pinned: changing it means editing this file on purpose."""

import importlib
import importlib.util
import inspect
import pathlib
import pkgutil

import pytest

import sngm_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent

PUBLIC_NAMES = [
    "AccumulationState",
    "AdaptiveBatchSizeState",
    "GradientAccumulator",
    "GradientMoments",
    "GradientNoiseStatistics",
    "NoiseScaleMonitorState",
    "ScaleByAdagradNormState",
    "ScaleByDgcState",
    "ScaleByGmcState",
    "TrajectoryRegularizedState",
    "adadagrad",
    "adadagrad_norm",
    "adagrad_norm",
    "adaptive_batch_size",
    "add_gradient_moments",
    "augmented_inner_product_test",
    "average_across_devices",
    "coordinate_test",
    "dgc",
    "global_norm",
    "gmc",
    "gradient_accumulator",
    "gradient_moments",
    "inner_product_test",
    "microbatch_statistics",
    "moment_statistics",
    "next_batch_size",
    "noise_scale_monitor",
    "norm_test",
    "normalize_by_global_norm",
    "num_selected",
    "orthogonality_test",
    "per_device_state",
    "per_device_statistics",
    "per_example_statistics",
    "scale_by_adagrad_norm",
    "scale_by_dgc",
    "scale_by_gmc",
    "scale_by_sngm",
    "sngm",
    "top_k_by_magnitude",
    "tr_adam",
    "tr_sgd",
    "trajectory_regularized",
]

CONSOLE_SCRIPTS = {"sngm-optax": "sngm_optax.harness.cli:main"}


def _pyproject():
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)


def test_all_is_the_pinned_list_of_names():
  assert PUBLIC_NAMES == sorted(PUBLIC_NAMES)
  assert len(set(sngm_optax.__all__)) == len(sngm_optax.__all__)
  assert sorted(sngm_optax.__all__) == PUBLIC_NAMES


def test_star_import_gives_exactly_all():
  namespace = {}
  exec("from sngm_optax import *", namespace)  # pylint: disable=exec-used
  assert sorted(set(namespace) - {"__builtins__"}) == PUBLIC_NAMES


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_each_name_is_importable_and_defined_in_a_private_module(name):
  namespace = {}
  exec(f"from sngm_optax import {name}", namespace)  # pylint: disable=exec-used
  value = namespace[name]
  assert value is getattr(sngm_optax, name)
  # The library layer: private modules (sngm_optax._*), re-exported.
  module = value.__module__
  assert module.startswith("sngm_optax._"), (name, module)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_no_public_name_is_a_module(name):
  assert not inspect.ismodule(getattr(sngm_optax, name))
  assert importlib.util.find_spec(f"sngm_optax.{name}") is None


def test_no_submodule_is_named_like_a_public_name():
  modules = [m.name for m in pkgutil.walk_packages(sngm_optax.__path__,
                                                   "sngm_optax.")]
  assert "sngm_optax.harness" in modules  # (the walk sees the subpackages)
  clashes = [m for m in modules if m.rsplit(".", 1)[-1] in PUBLIC_NAMES]
  assert not clashes


def test_console_script_and_version():
  project = _pyproject()["project"]
  assert project["scripts"] == CONSOLE_SCRIPTS
  # Defined once, in sngm_optax/__init__.py; the build reads it from there.
  assert "version" not in project and "version" in project["dynamic"]
  assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {
      "attr": "sngm_optax.__version__"}
  assert sngm_optax.__version__.count(".") == 2


def test_console_script_resolves_to_a_function():
  pytest.importorskip("flax")  # the harness's dependencies ([harness] extra)
  module_name, function_name = CONSOLE_SCRIPTS["sngm-optax"].split(":")
  main = getattr(importlib.import_module(module_name), function_name)
  assert inspect.isfunction(main)
