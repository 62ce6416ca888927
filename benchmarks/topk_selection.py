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
the number of distinct indices and the recall against the exact top k (for
'sampled', the lowest over 20 random keys).

Two inputs: 'normal' (i.i.d. Gaussian) and 'layered' (Gaussian entries whose
scale varies by four orders of magnitude across 50 contiguous "layers", as a
flattened gradient pytree does).

  python benchmarks/topk_selection.py            # full run, ~1-3 min on 2 cores
  python benchmarks/topk_selection.py --quick    # 100k / 1M entries, smoke test

Writes benchmarks/results/topk_selection.json and .png.
"""

import argparse

import _common

import jax
import jax.numpy as jnp
import numpy as np

from sngm_optax import num_selected
from sngm_optax import top_k_by_magnitude

CLAIM = ("'sampled' and 'approx' top-k selection against 'exact' "
         "(lax.top_k) on vectors of 1M-10M entries at densities 1% and 0.1%: "
         "time and recall")
SELECTIONS = ("exact", "approx", "sampled")
KEYS = 20  # random keys 'sampled' is checked with


def make_vector(kind, size, seed=0):
  rng = np.random.default_rng(seed)
  v = rng.standard_normal(size, dtype=np.float32)
  if kind == "layered":
    scales = 10.0 ** rng.uniform(-2, 2, size=50)
    v *= np.repeat(scales, -(-size // 50))[:size].astype(np.float32)
  return jnp.asarray(v)


def recall(indices, exact):
  """Fraction of the exact top-k indices found in `indices`."""
  return len(exact & set(np.asarray(indices).tolist())) / len(exact)


def sampled_recall_over_keys(vector, k, exact):
  """The lowest recall of 'sampled' over `KEYS` random keys."""
  select = jax.jit(lambda v, key: top_k_by_magnitude(v, k, "sampled", key))
  return min(recall(select(vector, jax.random.key(i)), exact)
             for i in range(KEYS))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--sizes", nargs="+", type=int, default=None,
                      help="vector sizes (default 1M, 3M, 10M; --quick: "
                           "100k, 1M)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="rounds (default 31 up to 1M entries, 15 above; "
                           "--quick: 5)")
  parser.add_argument("--out",
                      default=str(_common.RESULTS / "topk_selection.json"))
  args = parser.parse_args()
  machine = _common.machine_description()
  sizes = args.sizes or ([100_000, 1_000_000] if args.quick
                         else [1_000_000, 3_000_000, 10_000_000])
  densities = [0.01, 0.001]
  rows = []
  for kind in ("normal", "layered"):
    for size in sizes:
      vector = make_vector(kind, size)
      repeats = args.repeats or (
          5 if args.quick else (31 if size <= 1_000_000 else 15))
      for density in densities:
        k = num_selected(size, density)
        functions = {
            s: jax.jit(lambda v, s=s: top_k_by_magnitude(v, k, s))
            for s in SELECTIONS
        }
        timings = _common.time_interleaved(
            {s: lambda f=f: f(vector) for s, f in functions.items()}, repeats)
        exact = set(np.asarray(functions["exact"](vector)).tolist())
        for s in SELECTIONS:
          indices = np.asarray(functions[s](vector))
          times = timings.wall[s]
          rows.append(dict(
              input=kind, size=size, density=density, k=k, selection=s,
              median_ms=1e3 * timings.medians()[s],
              min_ms=1e3 * min(times), repeats=repeats,
              median_ratio_to_exact=timings.median_ratio(s, "exact"),
              sent=int(len(set(indices.tolist()))),
              recall=recall(indices, exact),
              recall_min_over_keys=(sampled_recall_over_keys(vector, k, exact)
                                    if s == "sampled" else None),
          ))
          r = rows[-1]
          print(f"{kind:8s} {size:>10,d} {density:6.3%} {s:8s} "
                f"{r['median_ms']:9.2f} ms (min {r['min_ms']:8.2f}, "
                f"x{r['median_ratio_to_exact']:.2f} of exact)  "
                f"sent {r['sent']}/{k}  recall {r['recall']:.3f}", flush=True)
  out = _common.write_json(args.out, _common.timing_record(
      "topk_selection", claim=CLAIM, command=_common.command_line(args),
      machine=machine,
      budget={"sizes": sizes, "densities": densities,
              "repeats": sorted({r["repeats"] for r in rows}),
              "recall_keys": KEYS},
      contenders=SELECTIONS, rows=rows))
  table = []
  for kind in ("normal", "layered"):
    for size in sizes:
      for density in densities:
        cell = {r["selection"]: r for r in rows if r["input"] == kind
                and r["size"] == size and r["density"] == density}
        table.append(
            [kind, f"{size:,d}", f"{density:.1%}"]
            + [f"{cell[s]['median_ms']:.1f}" for s in SELECTIONS]
            + [f"{cell[s]['median_ratio_to_exact']:.2f}"
               for s in ("approx", "sampled")]
            + [f"{cell['sampled']['recall_min_over_keys']:.3f}"])
  print(_common.markdown_table(
      ["input", "entries", "density", "exact (ms)", "approx (ms)",
       "sampled (ms)", "approx / exact", "sampled / exact",
       f"sampled recall ({KEYS} keys, min)"], table, align="lrrrrrrrr"))
  plot(rows, machine, out.with_suffix(".png"))


def plot(rows, machine, path):
  plt = _common.pyplot()
  if plt is None:
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
  ax.set_title(f"top-k selection on {machine['device_kind']}, "
               f"{machine['cpu_count']} cores")
  ax.legend()
  _common.save_figure(fig, path)


if __name__ == "__main__":
  main()
