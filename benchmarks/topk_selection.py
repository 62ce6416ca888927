"""Speed of the three top-k selections used by GMC/DGC on large vectors.

Times `sngm_optax.top_k_by_magnitude(v, k, selection)` (jit-compiled, |v|
included) for `selection` in 'exact' (`lax.top_k`), 'approx'
(`lax.approx_max_k`, recall target 0.95) and 'sampled' (threshold estimated
from a random sample, candidates compacted by blocks, exact fallback), on
vectors of 1M, 3M and 10M entries at densities 1% and 0.1%. Calls are
interleaved round-robin; the table gives the median time and the median of
the per-round ratio to 'exact' (robust to load that drifts on a shared
machine). Every selection returns exactly k
indices (the exchanged buffers have a static size); the script also reports
the recall against the exact top k.

Two inputs: 'normal' (i.i.d. Gaussian) and 'layered' (Gaussian entries whose
scale varies by four orders of magnitude across 50 contiguous "layers", as a
flattened gradient pytree does).

  python benchmarks/topk_selection.py            # full run, ~1-3 min on 2 cores
  python benchmarks/topk_selection.py --quick    # 100k / 1M entries, smoke test

Writes benchmarks/results/topk_selection.json and .png.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sngm_optax import top_k_by_magnitude
from sngm_optax._compression import _sampled_plan
from sngm_optax._compression import _top_k_from_sampled_threshold

SELECTIONS = ("exact", "approx", "sampled")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def make_vector(kind, size, seed=0):
  rng = np.random.default_rng(seed)
  v = rng.standard_normal(size, dtype=np.float32)
  if kind == "layered":
    scales = 10.0 ** rng.uniform(-2, 2, size=50)
    v *= np.repeat(scales, -(-size // 50))[:size].astype(np.float32)
  return jnp.asarray(v)


def time_round_robin(functions, vector, repeats):
  for f in functions.values():
    jax.block_until_ready(f(vector))  # compile
  times = {name: [] for name in functions}
  for _ in range(repeats):
    for name, f in functions.items():
      start = time.perf_counter()
      jax.block_until_ready(f(vector))
      times[name].append(time.perf_counter() - start)
  return times


def sampled_fast_path_rate(vector, k, trials=20):
  """Fraction of random keys for which 'sampled' needs no exact fallback.

  None where 'sampled' statically uses the exact selection (small vectors).
  """
  plan = _sampled_plan(vector.shape[0], k)
  if plan is None:
    return None
  check = jax.jit(
      lambda v, key: _top_k_from_sampled_threshold(jnp.abs(v), k, key, plan)[1]
  )
  hits = [bool(check(vector, jax.random.key(i))) for i in range(trials)]
  return sum(hits) / trials


def _rate(rate):
  return "exact (small)" if rate is None else f"{rate:.0%}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default=str(RESULTS / "topk_selection.json"))
  args = parser.parse_args()
  load_average = os.getloadavg()
  sizes = ([100_000, 1_000_000] if args.quick
           else [1_000_000, 3_000_000, 10_000_000])
  densities = [0.01, 0.001]
  rows = []
  for kind in ("normal", "layered"):
    for size in sizes:
      vector = make_vector(kind, size)
      repeats = 5 if args.quick else (31 if size <= 1_000_000 else 15)
      for density in densities:
        k = round(density * size)
        functions = {
            s: jax.jit(lambda v, s=s: top_k_by_magnitude(v, k, s))
            for s in SELECTIONS
        }
        times = time_round_robin(functions, vector, repeats)
        exact = set(np.asarray(functions["exact"](vector)).tolist())
        fast_rate = sampled_fast_path_rate(vector, k)
        for s in SELECTIONS:
          indices = np.asarray(functions[s](vector))
          rows.append(dict(
              input=kind, size=size, density=density, k=k, selection=s,
              median_ms=1e3 * statistics.median(times[s]),
              min_ms=1e3 * min(times[s]), repeats=repeats,
              # Robust to load that drifts between rounds on a shared machine.
              median_ratio_to_exact=statistics.median(
                  t / e for t, e in zip(times[s], times["exact"])),
              sent=int(len(set(indices.tolist()))),
              recall=len(exact & set(indices.tolist())) / k,
              sampled_fast_path_rate=fast_rate if s == "sampled" else None,
          ))
          r = rows[-1]
          print(f"{kind:8s} {size:>10,d} {density:6.3%} {s:8s} "
                f"{r['median_ms']:9.2f} ms (min {r['min_ms']:8.2f}, "
                f"x{r['median_ratio_to_exact']:.2f} of exact)  "
                f"sent {r['sent']}/{k}  recall {r['recall']:.3f}", flush=True)
  machine = dict(
      platform=platform.platform(), processor=platform.processor(),
      cpu_count=os.cpu_count(), jax=jax.__version__,
      device=str(jax.devices()[0].device_kind),
      load_average_at_start=load_average,
  )
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(machine=machine, rows=rows), indent=1))
  print("| input | entries | density | exact (ms) | approx (ms) | sampled (ms) "
        "| approx / exact | sampled / exact | sampled fast path |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for kind in ("normal", "layered"):
    for size in sizes:
      for density in densities:
        cell = {r["selection"]: r for r in rows if r["input"] == kind
                and r["size"] == size and r["density"] == density}
        print(f"| {kind} | {size:,d} | {density:.1%} | "
              + " | ".join(f"{cell[s]['median_ms']:.1f}" for s in SELECTIONS)
              + "".join(f" | {cell[s]['median_ratio_to_exact']:.2f}"
                        for s in ("approx", "sampled"))
              + f" | {_rate(cell['sampled']['sampled_fast_path_rate'])} |")
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  labels = sorted({(r["input"], r["size"], r["density"]) for r in rows})
  fig, ax = plt.subplots(figsize=(10, 4))
  width = 0.27
  for i, s in enumerate(SELECTIONS):
    medians = [next(r["median_ms"] for r in rows if r["selection"] == s and
                    (r["input"], r["size"], r["density"]) == label)
               for label in labels]
    ax.bar(np.arange(len(labels)) + (i - 1) * width, medians, width, label=s)
  ax.set_xticks(np.arange(len(labels)))
  ax.set_xticklabels([f"{a}\n{b/1e6:g}M\n{c:.1%}" for a, b, c in labels],
                     fontsize=8)
  ax.set_ylabel("median time (ms)")
  ax.set_yscale("log")
  ax.set_title(f"top-k selection on {machine['device']}, "
               f"{machine['cpu_count']} cores")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
  main()
