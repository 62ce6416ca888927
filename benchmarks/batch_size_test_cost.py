"""Per-step cost of an AdAdaGrad batch-size test, in each statistics mode.

Times one jitted training step of a small MLP (~106k parameters, batch 256)
with and without the batch-size test, for the three sources of per-sample
statistics:

* per_example: per-example gradients from `jax.vmap(jax.grad(...))`; baseline
  is the plain step (`jax.grad` of the mean loss);
* microbatch: K = 8 microbatches of 32 (`lax.scan`); baseline is the same
  scan accumulating the gradient sum, the test keeps the 8 microbatch
  gradients instead;
* moments: the same 8 microbatches, the scan carrying `GradientMoments`
  (sums of microbatch gradients and of their squares: constant memory, any
  number of microbatches) instead of the gradient sum;
* per_device: 8 (simulated CPU) devices under `jax.shard_map` (or
  `--mapper pmap`), 32 samples each; baseline averages the gradients with
  `pmean`, the test does that inside `adaptive_batch_size(axis_name=...)`
  plus one `psum` of three scalars.

"Source only" runs the step with the statistics' inputs computed but no test
(per-example gradients, stacked microbatch gradients, moments). Each
configuration is timed `--repeats` times (interleaved with its baseline), at
least `--steps` steps and `--min-seconds` each; the table shows medians of
wall-clock ratios, and of CPU-time ratios (this process, all threads), which
depend less on other load on a shared machine. Writes JSON and a bar chart.

  PYTHONPATH=. python benchmarks/batch_size_test_cost.py
"""

import argparse
import json

import _common

_common.force_host_devices(8, cpu_only=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sngm_optax  # noqa: E402

CLAIM = ("the per-step cost of the batch-size test in each statistics mode "
         "(per-example, microbatch, moments, per-device) against the same "
         "step without it")
NUM_DEVICES = 8
FEATURES, HIDDEN, CLASSES = 40, 300, 10


def init_mlp(key):
  sizes = [FEATURES, HIDDEN, HIDDEN, CLASSES]
  params = []
  for key, (fan_in, fan_out) in zip(
      jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:])
  ):
    params.append({
        "w": jax.random.normal(key, (fan_in, fan_out)) / np.sqrt(fan_in),
        "b": jnp.zeros(fan_out),
    })
  return params


def loss_fn(params, inputs, labels):
  x = inputs
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  logits = x @ params[-1]["w"] + params[-1]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def single_example_loss(params, inputs, labels):
  return loss_fn(params, inputs[None], labels[None])


def optimizers(test, max_batch, **kwargs):
  """(baseline, with test) for the test's optimizer family."""
  if test == "coordinate":
    return optax.adagrad(0.1), sngm_optax.adadagrad(
        0.1, max_batch, test=test, initial_batch_size=256, **kwargs
    )
  return sngm_optax.adagrad_norm(0.1), sngm_optax.adadagrad_norm(
      0.1, max_batch, test=test, initial_batch_size=256, **kwargs
  )


def apply(tx, params, state, grads, **extra):
  updates, state = tx.update(grads, state, params, **extra)
  return optax.apply_updates(params, updates), state


def single_device_steps(mode, test, batch, microbatches):
  """{variant: (step, optimizer)}: baseline, sources (no test), with_test."""
  baseline_tx, test_tx = optimizers(
      test, 4096, microbatch_size=batch // microbatches
  )

  def plain(params, state, inputs, labels):
    grads = jax.grad(loss_fn)(params, inputs, labels)
    return apply(baseline_tx, params, state, grads)

  def per_example(tx, with_test):
    def step(params, state, inputs, labels):
      per_example_grads = jax.vmap(
          jax.grad(single_example_loss), in_axes=(None, 0, 0)
      )(params, inputs, labels)
      # The mean as the statistics compute it (a matrix-vector product; under
      # jit the transform's identical computation is shared and the unused
      # statistics are dead code). XLA:CPU's g.mean(0) is ~30x slower.
      grads, _ = sngm_optax.per_example_statistics(per_example_grads)
      extra = {"per_example_grads": per_example_grads} if with_test else {}
      return apply(tx, params, state, grads, **extra)

    return step

  def split(x):
    return x.reshape((microbatches, -1) + x.shape[1:])

  def accumulated(params, state, inputs, labels):
    def body(total, batch):
      grads = jax.grad(loss_fn)(params, *batch)
      return jax.tree.map(jnp.add, total, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(body, zeros, (split(inputs), split(labels)))
    grads = jax.tree.map(lambda g: g / microbatches, total)
    return apply(baseline_tx, params, state, grads)

  def microbatched(tx, with_test):
    def step(params, state, inputs, labels):
      def body(_, batch):
        return None, jax.grad(loss_fn)(params, *batch)

      _, microbatch_grads = jax.lax.scan(
          body, None, (split(inputs), split(labels))
      )
      grads, _ = sngm_optax.microbatch_statistics(microbatch_grads, 1)
      extra = {"microbatch_grads": microbatch_grads} if with_test else {}
      return apply(tx, params, state, grads, **extra)

    return step

  def with_moments(tx, with_test):
    def step(params, state, inputs, labels):
      def body(moments, batch):
        grads = sngm_optax.gradient_moments(jax.grad(loss_fn)(params, *batch))
        return sngm_optax.add_gradient_moments(moments, grads), None

      zeros = jax.tree.map(
          lambda x: jnp.zeros(x.shape, jnp.float32), params
      )
      moments = sngm_optax.GradientMoments(jnp.int32(0), zeros, zeros)
      moments, _ = jax.lax.scan(body, moments, (split(inputs), split(labels)))
      grads = jax.tree.map(lambda g: g / microbatches, moments.grad_sum)
      extra = {"gradient_moments": moments} if with_test else {}
      return apply(tx, params, state, grads, **extra)

    return step

  baseline, source = {
      "per_example": (plain, per_example),
      "microbatch": (accumulated, microbatched),
      "moments": (accumulated, with_moments),
  }[mode]
  return {
      "baseline": (baseline, baseline_tx),
      "sources": (source(baseline_tx, False), baseline_tx),
      "with_test": (source(test_tx, True), test_tx),
  }


def per_device_steps(test, batch):
  """{variant: (step, optimizer)}; the per-device gradients cost nothing."""
  baseline_tx, test_tx = optimizers(
      test, 4096, axis_name="devices", batch_size_multiple=NUM_DEVICES
  )

  def averaged(params, state, inputs, labels):
    grads = jax.lax.pmean(jax.grad(loss_fn)(params, inputs, labels), "devices")
    return apply(baseline_tx, params, state, grads)

  def tested(params, state, inputs, labels):
    grads = jax.grad(loss_fn)(params, inputs, labels)  # this device's mean
    return apply(test_tx, params, state, grads, batch_size=batch)

  return {"baseline": (averaged, baseline_tx), "with_test": (tested, test_tx)}


def repeated_step(step, params, state, inputs, labels):
  """A zero-argument call of `step` that carries params and state along."""

  def call():
    nonlocal params, state
    params, state = step(params, state, inputs, labels)
    return params

  return call


def measure(mode, test, batch, microbatches, steps, repeats, mapper,
            min_seconds):
  key = jax.random.PRNGKey(0)
  params = init_mlp(key)
  inputs = jax.random.normal(jax.random.PRNGKey(1), (batch, FEATURES))
  labels = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, CLASSES)
  if mode == "per_device" and mapper == "pmap":
    variants = per_device_steps(test, batch)
    replicate = lambda tree: jax.tree.map(
        lambda x: jnp.stack([x] * NUM_DEVICES), tree
    )
    shard = lambda x: x.reshape((NUM_DEVICES, -1) + x.shape[1:])
    inputs, labels = shard(inputs), shard(labels)
    compiled = {
        name: (jax.pmap(step, axis_name="devices"), replicate(params),
               replicate(tx.init(params)))
        for name, (step, tx) in variants.items()
    }
  elif mode == "per_device":
    variants = per_device_steps(test, batch)
    mesh = jax.make_mesh(
        (NUM_DEVICES,), ("devices",),
        axis_types=(jax.sharding.AxisType.Auto,),
    )
    spec = jax.sharding.PartitionSpec
    compiled = {
        name: (jax.jit(jax.shard_map(
            step, mesh=mesh,
            in_specs=(spec(), spec(), spec("devices"), spec("devices")),
            out_specs=(spec(), spec()), check_vma=False,
        )), params, tx.init(params))
        for name, (step, tx) in variants.items()
    }
  else:
    variants = single_device_steps(mode, test, batch, microbatches)
    compiled = {
        name: (jax.jit(step), params, tx.init(params))
        for name, (step, tx) in variants.items()
    }

  # Interleaved, so load changes hit all alike.
  timings = _common.time_interleaved(
      {name: repeated_step(step, p, s, inputs, labels)
       for name, (step, p, s) in compiled.items()},
      repeats, calls=steps, min_seconds=min_seconds)
  ratios = timings.ratios("with_test", "baseline")
  row = {
      "mode": mode,
      "mapper": mapper if mode == "per_device" else None,
      "test": test,
      "ratio_median": timings.median_ratio("with_test", "baseline"),
      "ratio_min": min(ratios),
      "ratio_max": max(ratios),
      "cpu_ratio_median": timings.median_ratio("with_test", "baseline",
                                               cpu=True),
  }
  if "sources" in compiled:
    row["test_only_ratio_median"] = timings.median_ratio("with_test",
                                                         "sources")
  for name, median in timings.medians().items():
    row[f"{name}_ms"] = 1e3 * median
    row[f"{name}_ms_runs"] = [1e3 * t for t in timings.wall[name]]
    row[f"{name}_cpu_ms_runs"] = [1e3 * t for t in timings.cpu[name]]
  return row


TABLE_HEADER = (
    "mode", "test", "baseline (ms/step)", "statistics source only (ms/step)",
    "with test (ms/step)", "with test / baseline, median [min, max]",
    "with test / source only", "CPU-time ratio with test / baseline")


def table_cells(row):
  name = row["mode"] + (f" ({row['mapper']})" if row["mapper"] else "")
  sources = row.get("sources_ms")
  return [
      name, row["test"], f"{row['baseline_ms']:.2f}",
      f"{sources:.2f}" if sources else "—", f"{row['with_test_ms']:.2f}",
      f"{row['ratio_median']:.2f} "
      f"[{row['ratio_min']:.2f}, {row['ratio_max']:.2f}]",
      f"{row['test_only_ratio_median']:.2f}" if sources else "—",
      f"{row['cpu_ratio_median']:.2f}",
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--microbatches", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--min-seconds", type=float, default=0.5,
                      help="each timing runs at least this long")
  parser.add_argument("--tests", default="norm,coordinate")
  parser.add_argument("--modes",
                      default="per_example,microbatch,moments,per_device")
  parser.add_argument("--mapper", choices=("shard_map", "pmap"),
                      default="shard_map")
  parser.add_argument("--out",
                      default=str(_common.RESULTS / "batch_size_test_cost"),
                      help="path of the results without .json / .png")
  parser.add_argument("--replot", metavar="JSON",
                      help="only redraw the chart of an earlier run")
  args = parser.parse_args()
  if args.replot:
    with open(args.replot) as f:
      plot(json.load(f), args.replot.removesuffix(".json") + ".png")
    return
  machine = _common.machine_description()

  num_params = sum(x.size for x in jax.tree.leaves(init_mlp(jax.random.PRNGKey(0))))
  rows = []
  for test in args.tests.split(","):
    for mode in args.modes.split(","):
      row = measure(mode, test, args.batch, args.microbatches, args.steps,
                    args.repeats, args.mapper, args.min_seconds)
      rows.append(row)
      print(_common.markdown_row(table_cells(row)), flush=True)

  result = _common.timing_record(
      "batch_size_test_cost", claim=CLAIM,
      command=_common.command_line(args, exclude=("replot",)),
      machine=machine,
      budget={"tests": args.tests.split(","), "modes": args.modes.split(","),
              "batch": args.batch, "microbatches": args.microbatches,
              "devices": NUM_DEVICES, "mapper": args.mapper,
              "steps": args.steps, "min_seconds": args.min_seconds,
              "repeats": args.repeats},
      contenders=("baseline", "sources", "with_test"),
      num_params=int(num_params), rows=rows)
  _common.write_json(args.out + ".json", result)
  print("\n" + _common.markdown_table(TABLE_HEADER,
                                      [table_cells(row) for row in rows]))
  plot(result, args.out + ".png")


def plot(result, path):
  """A bar chart of the median wall-clock ratios (log scale)."""
  plt = _common.pyplot()
  if plt is None:
    return
  rows = result["rows"]
  fig, ax = plt.subplots(figsize=(8, 3.4))
  labels = [f"{r['mode']}\n{r['test']}" for r in rows]
  ax.bar(labels, [r["ratio_median"] for r in rows], color="tab:blue")
  ax.axhline(1.0, color="black", linewidth=0.8)
  ax.set_yscale("log")
  ax.set_ylabel("step time / baseline")
  ax.set_title(
      f"batch-size test cost ({result['num_params'] // 1000}k params, "
      f"B={result['budget']['batch']}, {result['machine']['backend']})"
  )
  ax.tick_params(axis="x", labelsize=7)
  _common.save_figure(fig, path)


if __name__ == "__main__":
  main()
