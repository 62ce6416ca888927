"""How much of the machine's matmul FLOP/s the CNN's large-batch step uses.

Times, interleaved (`_common.time_interleaved`), a bare jitted training step
of the harness CNN (`jax.grad` of the mean softmax cross-entropy, then
`optax.sgd(0.01, momentum=0.9)`; B = 8,192 random MNIST-1D-shaped inputs) in
each formulation, and a 1024x1024 float32 matmul:

- `nn.Conv CNN (before)`: `CNN(reference=True)`, `flax.linen.Conv` on the
  whole batch (the harness's CNN until `PatchConv`);
- `PatchConv CNN, whole batch`: `CNN(chunk_size=None)`;
- `PatchConv CNN (after)`: `CNN()`, the harness's CNN now: `PatchConv`s
  on `[length, channels, batch]` arrays, the batch in chunks of 128
  (`nn.scan`) recomputed in the backward pass (`nn.remat`); with
  `--chunk-sizes`, other chunk sizes too.

FLOP/s are XLA's cost analysis of the compiled nn.Conv step (1,518 MFLOP at
B = 8,192) over each step's median time: the same arithmetic in every
formulation (a chunked step's own cost analysis counts its scan body once,
and its remat adds a forward pass, ~515 MFLOP, that is not counted). The
fraction of the matmul is taken per round (both timed in the same round),
then the median. `--pieces` times the forward, forward+loss,
forward+backward and the optimizer update alone. Last, the harness loop
(`train.train_and_evaluate`, msgd, one epoch of `--loop-steps` steps of
8,192) against as many bare steps, interleaved: samples/s from its
`run_time_s` (compile time excluded; init, data and the final evaluation
of 16 examples included).

Where the time went (B = 8,192, one core of the 2-core Xeon, per-op
profile from `jax.profiler.trace` of the compiled step, load 6-13):

- Not the loss nor the optimizer: the update costs 0.1 ms of a 180-300 ms
  step, forward+loss takes the forward's time, and the classifier with the
  loss's passes is under 2 %. It is the three convolutions, the backward
  three quarters of them.
- XLA:CPU runs nn.Conv's 1-D convolutions ([batch, length, 25 channels])
  through its generic convolution: the forward ones took 23 % of the step
  (Conv_0, one input channel: 41 MFLOP at 2 GFLOP/s), the data-gradient
  (input-dilated) ones 18 %, the kernel-gradient ones (window-dilated,
  contracting the batch) 10 %, and the transposes XLA inserts to give those
  a batch-minor layout 31 % (`transpose_copy_fusion` of each activation to
  [channels, length, batch]); bias + ReLU passes most of the rest.
- Memory: an activation at B = 8,192 is 16 MB (8,192 x 20 x 25 float32),
  far beyond a core's 2 MB L2, and an elementwise pass over one runs at
  ~6 GB/s here (3-5 ms); the whole-batch step makes some twenty.
- A patches-times-matrix rewrite on the whole batch gives 1.5-1.8x: in the
  batch-minor layout ([length, channels, batch], one batched dot over the
  output positions per layer, the batch the vectorized dimension) the
  transposes go and the dots run at 50-90 GFLOP/s, but the memory passes
  stay (gathering the patches, 24 MB for Conv_1; bias, ReLU and padding
  passes; dots that read 25 MB of patches to write 25 rows). Channels-last
  patches ([batch * length, k * 25] @ [k * 25, 25]) gave only 1.0-1.2x:
  matmuls 25 columns wide vectorize badly.
- Cache-sized chunks are most of the way: 128 examples at a time (0.25-0.5
  MB an activation) with remat make the step 4.6-5x nn.Conv's. Without
  remat (each chunk's residuals go to memory) it was 2x; chunks of 64: 4x,
  256: 4.3-4.8x. nn.Conv in the same chunks is slower than on the whole
  batch (0.4x): its per-op overheads and transposes remain.
- What is left in the chunked step: the batched forward and data-gradient
  dots ~35 %, the kernel-gradient dots (batched over positions, then a
  reduce) ~25 %, patches, padding and ReLU passes ~20 %, the scan's
  per-iteration overhead the rest. A custom VJP with one dot contracting
  positions and batch for the kernel gradient was slower (0.88x), as was an
  unbatched einsum (0.39x). bfloat16 is not an option (float32 results).
- The harness loop reached 0.90x (one core) and 0.93x (both cores) of the
  bare steps' samples/s with the faster step, short of 0.95x (with nn.Conv:
  0.97-1.01x). Of the ~100 ms per 16 steps: ~30 ms a run outside the steps
  (initial state, the epoch's permutation, the final evaluation), ~27 ms
  for `_unstack`'s copy of the stacked 21 MB chunk, the rest inside the
  steps' execution (not pinned down). Gathering the rows with `np.take`
  instead of fancy indexing saved ~11 ms a run.

  PYTHONPATH=. taskset -c 1 python benchmarks/step_efficiency.py \\
      --chunk-sizes 64 128 256 --pieces
  PYTHONPATH=. python benchmarks/step_efficiency.py --repeats 9
"""

import argparse
import dataclasses
import functools
import os
import statistics

import _common

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from sngm_optax.harness import config as config_lib  # noqa: E402
from sngm_optax.harness import data as data_lib  # noqa: E402
from sngm_optax.harness import models  # noqa: E402
from sngm_optax.harness import sweep  # noqa: E402
from sngm_optax.harness import train  # noqa: E402

FEATURES, CLASSES = 40, 10
MATMUL = "matmul 1024x1024 f32"
BEFORE, AFTER = "nn.Conv CNN (before)", "PatchConv CNN (after)"
CLAIM = ("The harness's large-batch CNN step (B = 8,192, optax.sgd(momentum))"
         " runs at 25 % or more of a 1024x1024 float32 matmul's FLOP/s, and "
         "the harness loop at 0.95x or more of the bare jitted step's "
         "samples/s.")


def formulations(chunk_sizes) -> dict[str, dict]:
  """name -> the CNN's keyword arguments (`make_model("cnn", **kwargs)`)."""
  result = {BEFORE: {"reference": True},
            "PatchConv CNN, whole batch": {"chunk_size": None}}
  default = models.CNN.chunk_size
  for chunk in chunk_sizes:
    name = AFTER if chunk == default else f"PatchConv CNN, chunks of {chunk}"
    result[name] = {"chunk_size": chunk}
  return result


def make_data(batch_size: int):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch_size, FEATURES)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, batch_size), jnp.int32)
  return x, y


def bare_pieces(kwargs: dict, x, y, learning_rate=0.01, momentum=0.9):
  """The bare jitted step and its pieces: name -> (jitted fn, args)."""
  network = models.make_model("cnn", CLASSES, **kwargs)
  params = network.init(jax.random.key(0), x[:1])["params"]
  tx = optax.sgd(learning_rate, momentum=momentum)

  def logits(params, x):
    return network.apply({"params": params}, x)

  def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits(params, x), y).mean()

  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def step(params, opt_state, x, y):
    return update(jax.grad(loss)(params, x, y), opt_state, params)

  opt_state = tx.init(params)
  grads = jax.grad(loss)(params, x, y)
  return {
      "forward": (jax.jit(logits), (params, x)),
      "forward+loss": (jax.jit(loss), (params, x, y)),
      "forward+backward": (jax.jit(jax.grad(loss)), (params, x, y)),
      "optimizer update": (jax.jit(update), (grads, opt_state, params)),
      "step": (jax.jit(step), (params, opt_state, x, y)),
  }


def stepper(step, args, steps: int = 1):
  """A zero-argument call of `steps` steps that carries (params, opt_state)."""
  params, opt_state, x, y = args
  state = [params, opt_state]

  def call():
    for _ in range(steps):
      state[:] = step(*state, x, y)
    return state[0]

  return call


def harness_run(kwargs: dict, dataset, batch_size: int, run_times: list):
  """One epoch of `train.train_and_evaluate`; appends its run_time_s."""
  config = config_lib.Config(
      model="cnn", model_kwargs=kwargs, optimizer="msgd", learning_rate=0.01,
      batch_size=batch_size, epochs=1.0, warmup_epochs=0.0,
      schedule="constant", num_devices=1, eval_batch_size=16)

  def call():
    result = train.train_and_evaluate(config, dataset=dataset, quiet=True)
    run_times.append(result["run_time_s"])
    return np.asarray(result["steps"])

  return call


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-size", type=int, default=8192)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--min-seconds", type=float, default=0.5,
                      help="a turn of each bare contender lasts this long")
  parser.add_argument("--chunk-sizes", type=int, nargs="+",
                      default=[models.CNN.chunk_size],
                      help="PatchConv CNN chunk sizes to time")
  parser.add_argument("--loop-steps", type=int, default=16,
                      help="steps in the epoch each harness-loop run trains")
  parser.add_argument("--pieces", action="store_true",
                      help="also time the step's pieces (forward, "
                           "forward+backward, optimizer update)")
  parser.add_argument("--out", default=str(_common.RESULTS /
                                           "step_efficiency.json"))
  args = parser.parse_args()
  load_before = os.getloadavg()
  x, y = make_data(args.batch_size)
  models_kwargs = formulations(args.chunk_sizes)

  # --- FLOPs: XLA's cost analysis of each compiled step. A chunked step's
  # figure counts its loop body once, so every formulation's FLOP/s uses the
  # nn.Conv step's figure: the same arithmetic.
  pieces = {name: bare_pieces(kwargs, x, y)
            for name, kwargs in models_kwargs.items()}
  xla_flops = {name: {piece: _common.flops(fn.lower(*fn_args).compile())
                      for piece, (fn, fn_args) in parts.items()}
               for name, parts in pieces.items()}
  model_flops = xla_flops[BEFORE]["step"]
  a = jnp.asarray(np.random.default_rng(1).normal(size=(1024, 1024)),
                  jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul_flops = _common.flops(matmul.lower(a, a).compile())

  # --- Bare steps and the matmul, interleaved.
  functions = {MATMUL: lambda: matmul(a, a)}
  for name, parts in pieces.items():
    functions[name] = stepper(*parts["step"])
  timings = _common.time_interleaved(functions, args.repeats,
                                     min_seconds=args.min_seconds)
  seconds = timings.medians()
  cpu_seconds = {name: statistics.median(t) for name, t in timings.cpu.items()}
  matmul_rate = matmul_flops / seconds[MATMUL]
  steps = {}
  for name in pieces:
    # Per round: the step's FLOP/s over the matmul's of the same round.
    fraction = [(model_flops / step) / (matmul_flops / mm) for step, mm in
                zip(timings.wall[name], timings.wall[MATMUL])]
    steps[name] = {
        "model_kwargs": models_kwargs[name],
        "xla_flops": xla_flops[name]["step"], "model_flops": model_flops,
        "median_s": seconds[name], "median_cpu_s": cpu_seconds[name],
        "flops_per_s": model_flops / seconds[name],
        "samples_per_s": args.batch_size / seconds[name],
        "fraction_of_matmul": statistics.median(fraction),
        "fraction_of_matmul_cpu": statistics.median(
            [(model_flops / step) / (matmul_flops / mm) for step, mm in
             zip(timings.cpu[name], timings.cpu[MATMUL])]),
        "speedup_over_before": timings.median_ratio(BEFORE, name),
        "wall_s": timings.wall[name], "cpu_s": timings.cpu[name],
    }
    print(f"{name:34s} {seconds[name] * 1e3:8.2f} ms "
          f"{model_flops / seconds[name] / 1e9:6.1f} GFLOP/s "
          f"{steps[name]['fraction_of_matmul']:6.1%} of the matmul "
          f"(CPU time {steps[name]['fraction_of_matmul_cpu']:.1%}) "
          f"x{steps[name]['speedup_over_before']:.2f} over before",
          flush=True)
  print(f"{MATMUL:34s} {seconds[MATMUL] * 1e3:8.2f} ms "
        f"{matmul_rate / 1e9:6.1f} GFLOP/s", flush=True)

  # --- The step's pieces (forward, backward, optimizer), interleaved.
  piece_results = None
  if args.pieces:
    piece_functions = {
        f"{name}: {piece}": functools.partial(fn, *fn_args)
        for name in (BEFORE, AFTER) if name in pieces
        for piece, (fn, fn_args) in pieces[name].items() if piece != "step"}
    piece_timings = _common.time_interleaved(piece_functions, args.repeats,
                                             min_seconds=args.min_seconds)
    piece_results = {}
    for key, piece_seconds in piece_timings.medians().items():
      name, piece = key.split(": ")
      piece_results[key] = {"median_s": piece_seconds,
                            "xla_flops": xla_flops[name][piece]}
      print(f"{key:52s} {piece_seconds * 1e3:8.2f} ms "
            f"{xla_flops[name][piece] / 1e6:8.1f} MFLOP (XLA)", flush=True)

  # --- The harness loop against the bare step, interleaved.
  num_train = args.loop_steps * args.batch_size
  rng = np.random.default_rng(2)
  train_x = rng.normal(size=(num_train, FEATURES)).astype(np.float32)
  train_y = rng.integers(0, CLASSES, num_train).astype(np.int32)
  dataset = data_lib.Dataset(x=train_x, y=train_y, x_test=train_x[:16],
                             y_test=train_y[:16], num_classes=CLASSES)
  loop_functions, run_times = {}, {}
  for name in (BEFORE, AFTER):
    if name not in pieces:
      continue
    run_times[name] = []
    loop_functions[f"{name}: loop"] = harness_run(
        models_kwargs[name], dataset, args.batch_size, run_times[name])
    # As many bare steps a turn as the loop's run trains.
    loop_functions[f"{name}: bare"] = stepper(*pieces[name]["step"],
                                              steps=args.loop_steps)
  loop_timings = _common.time_interleaved(loop_functions, args.repeats)
  loops = {}
  for name, times in run_times.items():
    times = times[-args.repeats:]  # the timed rounds, not the warm-up ones
    bare = loop_timings.wall[f"{name}: bare"]
    loops[name] = {
        "loop_samples_per_s": num_train / statistics.median(times),
        "bare_samples_per_s": num_train / statistics.median(bare),
        # Per round: the loop's samples/s over the bare steps'.
        "loop_over_bare": statistics.median(
            [b / t for t, b in zip(times, bare)]),
        "loop_run_time_s": times, "bare_steps_s": bare,
    }
    print(f"{name:34s} loop {loops[name]['loop_samples_per_s']:9.0f} "
          f"samples/s, bare {loops[name]['bare_samples_per_s']:9.0f}: "
          f"x{loops[name]['loop_over_bare']:.3f}", flush=True)

  machine = _common.machine_description()
  load_after = os.getloadavg()
  record = sweep.results_record(
      "step_efficiency", claim=CLAIM, command=_common.command_line(args),
      machine=machine,
      budget={"batch_size": args.batch_size, "repeats": args.repeats,
              "min_seconds": args.min_seconds, "loop_steps": args.loop_steps,
              "chunk_sizes": args.chunk_sizes},
      contenders=[], trial_budget=None,
      load_average_before=load_before, load_average_after=load_after,
      affinity=sorted(os.sched_getaffinity(0)),
      model_flops=model_flops, model_flops_source=(
          "XLA cost analysis of the compiled nn.Conv step (a chunked "
          "step's own figure counts its scan body once)"),
      matmul={"flops": matmul_flops, "median_s": seconds[MATMUL],
              "median_cpu_s": cpu_seconds[MATMUL],
              "flops_per_s": matmul_rate, "wall_s": timings.wall[MATMUL]},
      steps=steps, pieces=piece_results, harness_loop=loops)
  path = _common.write_json(args.out, record)
  print(f"\nmachine: {_common.machine_line(machine)}; load before "
        f"{', '.join(f'{v:.1f}' for v in load_before)}; wrote {path}")


if __name__ == "__main__":
  main()
