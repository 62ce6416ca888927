"""Runs the examples in the docstrings of every module, harness included."""

import doctest
import importlib
import pkgutil

import pytest

import sngm_optax

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(sngm_optax.__path__, "sngm_optax.")
)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
  module = importlib.import_module(module_name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0, f"{result.failed} docstring examples failed"
