"""Float64 NumPy references and shared helpers for the batch-size tests.

The references are written from the definitions (explicit per-sample
variances, explicit orthogonal components), not from the library's scalar
shortcuts.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sngm_optax import augmented_inner_product_test
from sngm_optax import coordinate_test
from sngm_optax import inner_product_test
from sngm_optax import microbatch_statistics
from sngm_optax import norm_test
from sngm_optax import orthogonality_test
from sngm_optax import per_example_statistics

NUM_DEVICES = 8
SHAPES = {"w": (3, 2), "b": (2,), "deep": {"k": (4,)}}

# The library's estimators, jitted once per shape for the tests: op-by-op
# dispatch of these small reductions is slow.
jitted_per_example_statistics = jax.jit(
    per_example_statistics, static_argnames="axis_name"
)
jitted_microbatch_statistics = jax.jit(
    microbatch_statistics, static_argnames="axis_name"
)


def flatten(tree, batch_axis=True):
  leaves = jax.tree.leaves(tree)
  if batch_axis:
    return np.concatenate(
        [np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], 1
    )
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def reference_tests(samples, eta, theta, nu, weights=None, scale=1.0):
  """b_new of every test from rows `samples` (b x d); `scale` = m for means."""
  mean = samples.mean(0)
  sq_norm = mean @ mean
  variance = scale * samples.var(0, ddof=1)
  inner = samples @ mean
  inner_variance = scale * inner.var(ddof=1)
  orthogonal = samples - np.outer(inner, mean) / sq_norm
  orthogonal_variance = scale * orthogonal.var(0, ddof=1).sum()
  result = {
      "norm": variance.sum() / (eta**2 * sq_norm),
      "inner_product": inner_variance / (theta**2 * sq_norm**2),
      "orthogonality": orthogonal_variance / (nu**2 * sq_norm),
  }
  result["augmented"] = max(result["inner_product"], result["orthogonality"])
  if weights is not None:
    result["coordinate"] = (variance * weights).sum() / (
        eta**2 * (mean**2 * weights).sum()
    )
  result["trace"] = variance.sum()
  result["sq_norm"] = sq_norm
  return result


def random_per_example(seed, batch, mean_scale=1.0, noise=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda shape: jnp.asarray(
          mean_scale * rng.normal(size=shape)
          + noise * rng.normal(size=(batch,) + shape),
          jnp.float32,
      ),
      SHAPES,
      is_leaf=lambda x: isinstance(x, tuple),
  )


@jax.jit
def all_tests(statistics, eta, theta, nu):
  return {
      "norm": norm_test(statistics, eta),
      "inner_product": inner_product_test(statistics, theta),
      "orthogonality": orthogonality_test(statistics, nu),
      "augmented": augmented_inner_product_test(statistics, theta, nu),
      "coordinate": coordinate_test(statistics, eta),
  }


def stats_close(a, b, rtol=1e-5, atol=1e-6):
  for name, x, y in zip(a._fields, a, b):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)


def pmapped(fn):
  return jax.pmap(fn, axis_name="devices")


def shard_mapped(fn, in_specs=P("devices")):
  mesh = jax.make_mesh(
      (NUM_DEVICES,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  return jax.jit(
      jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P())
  )
