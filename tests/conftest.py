"""Test set-up: 8 simulated CPU devices, so pmap/shard_map tests run anywhere.

Compiled programs are shared across tests, xdist workers, and the processes
the tests start (CLI runs, notebook kernels), through one JAX persistent
compilation cache for the session: many tests build the same train step, and
compiling it dominates their time. Tests that measure compilation itself opt
out with the ``no_compilation_cache`` fixture.
"""

import os
import shutil
import tempfile

# Must happen before JAX is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The xdist controller makes the session's cache directory; the workers and
# every subprocess inherit it through the environment. A directory the user
# set is left as it is.
_OWN_CACHE = ("JAX_COMPILATION_CACHE_DIR" not in os.environ
              and "PYTEST_XDIST_WORKER" not in os.environ)
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="sngm_optax_tests_jax_cache_")
# Cache every program: the tests' programs are small and compile fast.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402
import pytest  # noqa: E402


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def no_compilation_cache():
  """Compiles without the persistent cache for one test, then restores it."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()
