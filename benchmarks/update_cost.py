"""Cost of one optimizer update against optax.sgd(momentum) and a copy roofline.

An update is memory-bound: it streams the gradient, the optimizer state and the
params. For each optimizer and parameter tree this times the jit-compiled
`update` + `apply_updates` (params and state donated) in `--rounds` rounds
over all optimizers, each the median of `--repeats` calls, and reports the
median over rounds of

- the time, and its ratio to `optax.sgd(momentum=0.9)` of the same round,
- the fraction of the memory roofline: the bytes the update must move (passes
  over the params' size, counted below) divided by the bandwidth of a plain
  copy of a buffer of the same size, over the measured time.

Per-device transforms (`gmc`, the adaptive-batch chain fed per-device
statistics, and `sngm`/sgd(momentum) with their gradient mean) run under
`jax.pmap` over 8 simulated CPU devices (`--devices`); their baseline is
`average_across_devices` + `optax.sgd(momentum)` under the same pmap, and the
time is that of one pmapped step (all devices). On a CPU the 8 devices share
the host's cores, so that time is ~8 devices' work, not a speed-up.

Usage:
  PYTHONPATH=. python benchmarks/update_cost.py          # all trees, f32 + bf16
  PYTHONPATH=. python benchmarks/update_cost.py --trees flat_1m --rounds 5
Writes benchmarks/results/update_cost.json (`_common.timing_record`) and
prints a Markdown table.
"""

import argparse
import pathlib
import statistics

import _common

_common.force_host_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sngm_optax  # noqa: E402


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


def layers_4m():
  """4M parameters in 40 leaves: 20 kernels of 640x300 and 20 vectors of 8000."""
  return [(640, 300)] * 20 + [(8000,)] * 20


CLAIM = ("sngm costs at most 1.25x optax.sgd(momentum) per update and gmc "
         "at most 2x under pmap, on trees of 1M-100M parameters; each "
         "update's fraction of a copy's bandwidth")

TREES = {
    "flat_1m": lambda: [(1_000_000,)],
    "resnet50_like": resnet50_like,
    "transformer_like": transformer_like,
    "layers_4m": layers_4m,  # only when asked for (issue 27's sparse tree)
}
DEFAULT_TREES = ["flat_1m", "resnet50_like", "transformer_like"]

# name -> (factory, passes over the params' bytes an ideal update makes).
# SGD with momentum: read g, m, p; write m, p = 5. A global norm adds a read of
# g. Passes are counted for what the algorithm must touch, not what XLA does:
# - lars: norms of p and g (one read each, fusable into one pass over g and p
#   with the rest: 6 counting the extra read of g for the norm);
# - lamb: read g, m, v, p; write m, v, p = 7, plus a pass over the Adam
#   direction and p for the per-leaf trust-ratio norms = 9;
# - adagrad_norm: no momentum: read g for the norm, then read g, p and
#   write p = 4;
# - tr_sgd: read g, p, anchor, m; write m, p = 6, plus the anchor reset
#   (a write of p every `inner_steps` = 10 steps) = 6.1.
OPTIMIZERS = {
    "optax.sgd(momentum)": (lambda: optax.sgd(0.1, momentum=0.9), 5),
    "optax.lars": (lambda: optax.lars(0.1), 6),
    "optax.lamb": (lambda: optax.lamb(1e-3), 9),
    "optax.adagrad": (lambda: optax.adagrad(0.1), 5),
    "sngm": (lambda: sngm_optax.sngm(0.1), 6),
    "adagrad_norm": (lambda: sngm_optax.adagrad_norm(0.1), 4),
    "tr_sgd": (lambda: sngm_optax.tr_sgd(0.1, weight_decay=0.0), 6.1),
}

AXIS = "devices"
# Per-device transforms, timed under jax.pmap. The gradient mean (all-reduce)
# is counted as reading each device's g and writing the mean (2 passes), so
# the baseline pmean + sgd(momentum) is 7. The adaptive-batch chain in the
# per-device mode (what the harness uses; `adaptive_batch_size(axis_name=...)`
# in front of sgd(momentum)) adds ||g_d||^2 (a read of g_d, fusable with the
# all-reduce's read in principle, counted as 1) and ||mean g||^2 (a read of
# the mean, 1) = 9. sngm's norm is a read of the mean = 8. gmc (density 1%):
# read g, e (memory), D_{t-1}, p; write e, p, D = 7 plus the top-k selection
# (at least one read of v) = 8, and the sparse exchange is ~2% of a pass.
PER_DEVICE_OPTIMIZERS = {
    "pmean + optax.sgd(momentum)": (lambda: optax.chain(
        sngm_optax.average_across_devices(AXIS),
        optax.sgd(0.1, momentum=0.9)), 7),
    "sngm(axis_name)": (lambda: sngm_optax.sngm(0.1, axis_name=AXIS), 8),
    "adaptive_batch_size(per-device) + sgd(momentum)": (lambda: optax.chain(
        sngm_optax.adaptive_batch_size(
            max_batch_size=65536, initial_batch_size=256,
            batch_size_multiple=8, axis_name=AXIS),
        optax.sgd(0.1, momentum=0.9)), 9),
    "gmc(density=0.01)": (lambda: sngm_optax.gmc(
        0.1, density=0.01, axis_name=AXIS), 8),
    "gmc(density=0.01, selection='exact')": (lambda: sngm_optax.gmc(
        0.1, density=0.01, axis_name=AXIS, selection="exact"), 8),
    "gmc(density=0.01, selection='sampled')": (lambda: sngm_optax.gmc(
        0.1, density=0.01, axis_name=AXIS, selection="sampled"), 8),
    # Only when asked for: DGC adds its local momentum (read and write m) = 10.
    "dgc(density=0.01, selection='exact')": (lambda: sngm_optax.dgc(
        0.1, density=0.01, axis_name=AXIS, selection="exact"), 10),
    "dgc(density=0.01, selection='sampled')": (lambda: sngm_optax.dgc(
        0.1, density=0.01, axis_name=AXIS, selection="sampled"), 10),
}
DEFAULT_PER_DEVICE_OPTIMIZERS = [
    name for name in PER_DEVICE_OPTIMIZERS if not name.startswith("dgc")]


def make_tree(shapes, dtype, seed):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(s, np.float32), dtype)
          for s in shapes]


def median_seconds(fn, args, repeats, donate, cpu=False):
  """Median wall (or, with `cpu`, also process CPU) time of `fn(*args)`,
  and then the MiB first touched per call (`_common.faulted_mib_per_call`).

  Donated outputs feed the next call.
  """
  out = None

  def call():
    nonlocal out
    out = fn(*(out + args[len(out):] if donate and out is not None else args))
    return out

  timings = _common.time_interleaved({"call": call}, repeats)
  if cpu:
    return (timings.medians()["call"], timings.medians(cpu=True)["call"],
            _common.faulted_mib_per_call(call))
  return timings.medians()["call"]


def copy_bandwidth(nbytes, repeats):
  """Bytes/s of a plain copy (one read + one write) of `nbytes`."""
  x = jnp.ones(nbytes // 4, jnp.float32)
  copy = jax.jit(lambda x: (x + 1.0,), donate_argnums=0)
  seconds = median_seconds(copy, (x,), repeats, donate=True)
  return 2 * nbytes / seconds


def norm_bandwidth(grads, repeats):
  """Bytes/s of `sngm_optax.global_norm` (one read of every leaf).

  SNGM's extra pass; on a CPU a reduction may stream slower than a copy.
  """
  nbytes = sum(g.nbytes for g in jax.tree.leaves(grads))
  norm = jax.jit(sngm_optax.global_norm)
  return nbytes / median_seconds(norm, (grads,), repeats, donate=False)


def time_update(factory, params, grads, repeats):
  """One jitted update + apply_updates (donated): median (wall, CPU)
  seconds, MiB first touched per call and XLA's temp MiB."""
  tx = factory()

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  params = jax.tree.map(jnp.copy, params)
  step = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, grads).compile()
  return (*median_seconds(step, (params, state, grads), repeats, donate=True,
                          cpu=True), _common.temp_mib(step))


def time_pmapped_update(factory, params, grads, repeats, num_devices):
  """One pmapped update (all devices), params donated: as `time_update`,
  with the temp of one device's program.

  Every device gets a different gradient (the tree scaled by 1 + d / D), as
  per-device statistics and GMC need.
  """
  tx = factory()

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  scales = 1.0 + jnp.arange(num_devices, dtype=jnp.float32) / num_devices
  grads = jax.tree.map(
      lambda g: (scales.reshape((-1,) + (1,) * g.ndim) * g).astype(g.dtype),
      grads)
  params = jax.tree.map(
      lambda p: jnp.broadcast_to(p, (num_devices,) + p.shape), params)
  state = jax.pmap(tx.init)(params)
  step = jax.pmap(step, axis_name=AXIS, donate_argnums=(0, 1)).lower(
      params, state, grads).compile()
  return (*median_seconds(step, (params, state, grads), repeats, donate=True,
                          cpu=True), _common.temp_mib(step))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trees", nargs="+", default=DEFAULT_TREES,
                      choices=list(TREES))
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=list(OPTIMIZERS))
  parser.add_argument("--per-device-optimizers", nargs="*",
                      default=DEFAULT_PER_DEVICE_OPTIMIZERS,
                      choices=list(PER_DEVICE_OPTIMIZERS))
  parser.add_argument("--per-device-trees", nargs="*",
                      default=["flat_1m", "resnet50_like"], choices=list(TREES),
                      help="trees for the pmapped (per-device) transforms")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=10,
                      help="timed calls per optimizer and round (median)")
  parser.add_argument("--rounds", type=int, default=3,
                      help="rounds over all optimizers (median of rounds)")
  parser.add_argument("--repeats-large", type=int, default=None,
                      help="repeats for transformer_like (default: --repeats)")
  parser.add_argument("--out", type=pathlib.Path,
                      default=_common.RESULTS / "update_cost.json")
  args = parser.parse_args()

  machine = _common.machine_description()
  rows = []
  for tree_name in args.trees:
    shapes = TREES[tree_name]()
    for dtype_name in args.dtypes:
      dtype = jnp.dtype(dtype_name)
      params = make_tree(shapes, dtype, 0)
      grads = make_tree(shapes, dtype, 1)
      size = sum(int(np.prod(s)) for s in shapes)
      nbytes = size * dtype.itemsize
      repeats = args.repeats
      if tree_name == "transformer_like" and args.repeats_large:
        repeats = args.repeats_large
      groups = [("jit", name, *OPTIMIZERS[name]) for name in args.optimizers]
      if tree_name in args.per_device_trees:
        groups += [("pmap", name, *PER_DEVICE_OPTIMIZERS[name])
                   for name in args.per_device_optimizers]
      # Rounds over all optimizers: each ratio is taken against the baseline
      # of its own round, so a slow spell of the machine hits both.
      times = {group[:2]: [] for group in groups}
      cpu_times = {group[:2]: [] for group in groups}
      memory = {}  # (temp MiB, MiB first touched per call), the last round's
      bandwidths, norm_bandwidths = [], []
      for _ in range(args.rounds):
        bandwidths.append(copy_bandwidth(nbytes, repeats))
        norm_bandwidths.append(norm_bandwidth(grads, repeats))
        for mode, name, factory, _ in groups:
          if mode == "jit":
            seconds, cpu, faulted, temp = time_update(factory, params, grads,
                                                      repeats)
          else:
            seconds, cpu, faulted, temp = time_pmapped_update(
                factory, params, grads, repeats, args.devices)
          memory[mode, name] = temp, faulted
          times[mode, name].append(seconds)
          cpu_times[mode, name].append(cpu)
      bandwidth = statistics.median(bandwidths)
      norm_bandwidth_gb_s = statistics.median(norm_bandwidths) / 1e9
      print(f"{tree_name} {dtype_name}: copy {bandwidth / 1e9:.1f} GB/s, "
            f"global_norm {norm_bandwidth_gb_s:.1f} GB/s", flush=True)
      rounds = _common.Timings(wall=times, cpu=cpu_times)
      baselines = {}
      for mode, name, _, passes in groups:
        seconds = rounds.medians()[mode, name]
        cpu_seconds = rounds.medians(cpu=True)[mode, name]
        baseline = baselines.setdefault(mode, (mode, name))
        ratio = rounds.median_ratio((mode, name), baseline)
        devices = 1 if mode == "jit" else args.devices
        roofline_seconds = passes * nbytes * devices / bandwidth
        rows.append({
            "tree": tree_name, "params": size, "leaves": len(shapes),
            "dtype": dtype_name, "mode": mode, "optimizer": name,
            "devices": devices, "repeats": repeats, "rounds": args.rounds,
            "median_ms": seconds * 1e3,
            "round_ms": [t * 1e3 for t in times[mode, name]],
            "ratio_to_sgd_momentum": ratio,
            # Process CPU time (all threads): steadier on a shared machine.
            "median_cpu_ms": cpu_seconds * 1e3,
            "cpu_ratio_to_sgd_momentum": rounds.median_ratio(
                (mode, name), baseline, cpu=True),
            "ideal_passes": passes,
            "fraction_of_roofline": roofline_seconds / seconds,
            "copy_bandwidth_gb_s": bandwidth / 1e9,
            "global_norm_bandwidth_gb_s": norm_bandwidth_gb_s,
            # XLA's temporary buffer of the program (one device's, under
            # pmap) and the MiB this process first touched per call.
            "temp_mib": memory[mode, name][0],
            "faulted_mib_per_call": memory[mode, name][1],
        })
        print(f"{tree_name:17s} {dtype_name:9s} {mode:4s} {name:48s} "
              f"{seconds * 1e3:9.2f} ms  x{ratio:5.2f}  CPU "
              f"x{rows[-1]['cpu_ratio_to_sgd_momentum']:5.2f}  "
              f"roofline {roofline_seconds / seconds:5.0%}", flush=True)

  _common.write_json(args.out, _common.timing_record(
      "update_cost", claim=CLAIM, command=_common.command_line(args),
      machine=machine,
      budget={"trees": args.trees, "dtypes": args.dtypes,
              "per_device_trees": args.per_device_trees,
              "devices": args.devices, "rounds": args.rounds,
              "repeats": args.repeats, "repeats_large": args.repeats_large},
      contenders=[*args.optimizers, *args.per_device_optimizers], rows=rows))
  print(f"\nmachine: {_common.machine_line(machine)}; median of "
        f"{args.rounds} rounds of the median of {args.repeats} calls\n")
  table = [[r["tree"], r["dtype"],
            "jit" if r["mode"] == "jit" else f"pmap×{r['devices']}",
            r["optimizer"], r["ideal_passes"], f"{r['median_ms']:.2f}",
            f"{r['ratio_to_sgd_momentum']:.2f}",
            f"{r['cpu_ratio_to_sgd_momentum']:.2f}",
            f"{r['fraction_of_roofline']:.0%}"] for r in rows]
  print(_common.markdown_table(
      ["tree", "dtype", "mode", "optimizer", "ideal passes", "median ms",
       "× baseline", "CPU time × baseline", "% of copy roofline"], table,
      align="llllrrrrr"))

if __name__ == "__main__":
  main()
