"""Cost of one optimizer update against optax.sgd(momentum) and a copy roofline.

An update is memory-bound: it streams the gradient, the optimizer state and the
params. For each optimizer and parameter tree this times the jit-compiled
`update` + `apply_updates` (params and state donated), takes the median of many
runs, and reports

- the ratio to `optax.sgd(momentum=0.9)` timed in the same run,
- the fraction of the memory roofline: the bytes the update must move (passes
  over the params' size, counted below) divided by the bandwidth of a plain
  copy of a buffer of the same size, over the measured time.

Usage:
  python benchmarks/update_cost.py                       # all trees, f32 + bf16
  python benchmarks/update_cost.py --trees flat_1m --repeats 20
Writes benchmarks/results/update_cost.json and prints a Markdown table.
"""

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sngm_optax

RESULTS = pathlib.Path(__file__).parent / "results"


def resnet50_like():
  """~25.5M parameters in 161 leaves: conv kernels + batch-norm scales/biases."""
  shapes = [(7, 7, 3, 64), (64,), (64,)]
  in_ch = 64
  for blocks, width in [(3, 64), (4, 128), (6, 256), (3, 512)]:
    for block in range(blocks):
      out_ch = width * 4
      shapes += [(1, 1, in_ch, width), (width,), (width,),
                 (3, 3, width, width), (width,), (width,),
                 (1, 1, width, out_ch), (out_ch,), (out_ch,)]
      if block == 0:
        shapes += [(1, 1, in_ch, out_ch), (out_ch,), (out_ch,)]
      in_ch = out_ch
  return shapes + [(2048, 1000), (1000,)]


def transformer_like():
  """~100M parameters in ~200 leaves: 16 pre-LN blocks of width 640."""
  d, vocab = 640, 32000
  shapes = [(vocab, d), (2048, d)]
  for _ in range(16):
    shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
               (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
  return shapes + [(d,), (d,)]


TREES = {
    "flat_1m": lambda: [(1_000_000,)],
    "resnet50_like": resnet50_like,
    "transformer_like": transformer_like,
}

# name -> (factory, passes over the params' bytes an ideal update makes).
# SGD with momentum: read g, m, p; write m, p = 5. A global norm adds a read of
# g. Passes are counted for what the algorithm must touch, not what XLA does.
OPTIMIZERS = {
    "optax.sgd(momentum)": (lambda: optax.sgd(0.1, momentum=0.9), 5),
    "optax.lars": (lambda: optax.lars(0.1), 6),
    "optax.lamb": (lambda: optax.lamb(1e-3), 9),
    "optax.adagrad": (lambda: optax.adagrad(0.1), 5),
    "sngm": (lambda: sngm_optax.sngm(0.1), 6),
}


def make_tree(shapes, dtype, seed):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(s, np.float32), dtype)
          for s in shapes]


def median_seconds(fn, args, repeats, donate):
  """Median wall time of `fn(*args)`; donated outputs feed the next call."""
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn(*(out + args[len(out):] if donate else args))
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_bandwidth(nbytes, repeats):
  """Bytes/s of a plain copy (one read + one write) of `nbytes`."""
  x = jnp.ones(nbytes // 4, jnp.float32)
  copy = jax.jit(lambda x: (x + 1.0,), donate_argnums=0)
  seconds = median_seconds(copy, (x,), repeats, donate=True)
  return 2 * nbytes / seconds


def time_update(factory, params, grads, repeats):
  tx = factory()

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  state = tx.init(params)
  params = jax.tree.map(jnp.copy, params)
  return median_seconds(step, (params, state, grads), repeats, donate=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trees", nargs="+", default=list(TREES),
                      choices=list(TREES))
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=list(OPTIMIZERS))
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--out", type=pathlib.Path,
                      default=RESULTS / "update_cost.json")
  args = parser.parse_args()

  device = jax.devices()[0]
  machine = f"{device.device_kind} ({device.platform}), {platform.processor()}"
  rows = []
  for tree_name in args.trees:
    shapes = TREES[tree_name]()
    for dtype_name in args.dtypes:
      dtype = jnp.dtype(dtype_name)
      params = make_tree(shapes, dtype, 0)
      grads = make_tree(shapes, dtype, 1)
      size = sum(int(np.prod(s)) for s in shapes)
      nbytes = size * dtype.itemsize
      bandwidth = copy_bandwidth(nbytes, args.repeats)
      baseline = None
      for name in args.optimizers:
        factory, passes = OPTIMIZERS[name]
        seconds = time_update(factory, params, grads, args.repeats)
        baseline = baseline or seconds
        roofline_seconds = passes * nbytes / bandwidth
        rows.append({
            "tree": tree_name, "params": size, "leaves": len(shapes),
            "dtype": dtype_name, "optimizer": name, "median_ms": seconds * 1e3,
            "ratio_to_sgd_momentum": seconds / baseline,
            "ideal_passes": passes,
            "fraction_of_roofline": roofline_seconds / seconds,
            "copy_bandwidth_gb_s": bandwidth / 1e9,
        })
        print(f"{tree_name:17s} {dtype_name:9s} {name:22s} "
              f"{seconds * 1e3:9.2f} ms  x{seconds / baseline:5.2f}  "
              f"roofline {roofline_seconds / seconds:5.0%}", flush=True)

  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(
      {"machine": machine, "jax": jax.__version__, "repeats": args.repeats,
       "rows": rows}, indent=1))
  print(f"\nmachine: {machine}, jax {jax.__version__}, median of "
        f"{args.repeats} runs\n")
  print("| tree | dtype | optimizer | median ms | × sgd(momentum) | "
        "% of copy roofline |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['tree']} | {r['dtype']} | {r['optimizer']} | "
          f"{r['median_ms']:.2f} | {r['ratio_to_sgd_momentum']:.2f} | "
          f"{r['fraction_of_roofline']:.0%} |")


if __name__ == "__main__":
  main()
