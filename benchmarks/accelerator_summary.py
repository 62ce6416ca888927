"""The figures of `accelerator_check.sh`, from the JSON it left in one folder.

Reads OUT/update_cost.json, OUT/step_throughput*.json and
OUT/large_batch.json and writes OUT/summary.md (also printed), naming the
device:

- the update cost on the large trees: milliseconds, ratio to
  `optax.sgd(momentum)`, the bandwidth each optimizer achieves (the bytes
  an ideal update moves, `ideal passes x params x itemsize`, over its time)
  as a fraction of the measured copy bandwidth and of the device's nominal
  HBM bandwidth (`NOMINAL_HBM_GB_S`, or `--hbm-gb-s`);
- the harness step throughput (samples/s) and whether the batch-size test
  (per-device statistics on 2+ devices, microbatch moments on one) adds
  less than 2 % to a step;
- the short large_batch run's table.

  python benchmarks/accelerator_summary.py runs/accelerator_check/NAME
"""

import argparse
import json
import pathlib

import _common

# Vendor figures of peak memory bandwidth (GB/s), matched in this order
# against the lower-cased `device_kind` that JAX reports.
NOMINAL_HBM_GB_S = [
    ("h200", 4800.0),
    ("h100 pcie", 2000.0),
    ("h100", 3350.0),
    ("a100-sxm4-80gb", 2039.0),
    ("a100", 1555.0),
    ("v100", 900.0),
    ("l4", 300.0),
    ("t4", 320.0),
]
TEST_BUDGET = 0.02  # the batch-size test may add at most 2 % to a step

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def nominal_hbm_gb_s(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for pattern, gb_s in NOMINAL_HBM_GB_S:
    if pattern in kind:
      return gb_s
  return None


def _load(path: pathlib.Path) -> dict | None:
  return json.loads(path.read_text()) if path.exists() else None


def update_cost_section(result: dict, peak: float | None) -> list[str]:
  """The table of achieved bandwidth per optimizer and tree."""
  rows = []
  for row in result["rows"]:
    nbytes = row["params"] * ITEMSIZE[row["dtype"]] * row["devices"]
    achieved = row["ideal_passes"] * nbytes / (row["median_ms"] / 1e3) / 1e9
    rows.append([
        row["tree"], row["dtype"],
        "jit" if row["mode"] == "jit" else f"pmap×{row['devices']}",
        row["optimizer"], f"{row['median_ms']:.3f}",
        f"{row['ratio_to_sgd_momentum']:.2f}", f"{achieved:.0f}",
        f"{row['fraction_of_roofline']:.0%}",
        "n/a" if peak is None else f"{achieved / peak:.0%}"])
  return [
      "## Update cost on the large trees (`update_cost.py`)", "",
      f"Median of {result['budget']['rounds']} rounds of the median of "
      f"{result['budget']['repeats']} calls. *Achieved* is the traffic of an ideal "
      "update (ideal passes × parameter bytes) over its measured time; "
      "the copy bandwidth is that of a plain copy measured in the same run.",
      "",
      _common.markdown_table(
          ["tree", "dtype", "mode", "optimizer", "ms", "× sgd(momentum)",
           "achieved GB/s", "of copy", "of nominal HBM"], rows,
          align="llllrrrrr"), ""]


def step_throughput_section(results: list[dict]) -> list[str]:
  """Samples/s per step, and the batch-size test against its 2 % budget."""
  throughput, tests = [], []
  for result in results:
    for row in result["rows"]:
      microbatches = row.get("microbatches", 1)
      throughput.append([
          row["model"], row["devices"], microbatches, row["batch_size"],
          row["optimizer"], f"{row['step_ms']:.3f}",
          f"{row['samples_per_s']:.0f}"])
      if row["test_overhead"] is not None:
        source = ("per-device" if microbatches == 1
                  else f"{microbatches} microbatches")
        overhead = row["test_overhead"]
        tests.append([row["model"], row["devices"], row["batch_size"],
                      source, f"{overhead:+.1%}",
                      "yes" if overhead < TEST_BUDGET else "**no**"])
  lines = ["## Harness step throughput (`step_throughput.py`)", "",
           _common.markdown_table(
               ["model", "devices", "microbatches", "B", "optimizer",
                "ms/step", "samples/s"], throughput, align="lrrrlrr"), "",
           "### The norm batch-size test against its 2 % budget", ""]
  if tests:
    lines.append(_common.markdown_table(
        ["model", "devices", "B", "statistics", "adds to a step",
         "under 2 %"], tests, align="lrrlrl"))
  else:
    lines.append("Not measured (no `+norm_test` rows).")
  return lines + [""]


def large_batch_section(result: dict, path: pathlib.Path) -> list[str]:
  lines = ["## Short large_batch run (`large_batch.py`)", "",
           f"`{result['command']}`.", ""]
  tables = [run["table"] for run in result.get("results", [])
            if isinstance(run, dict) and "table" in run]
  return lines + (tables or [f"Results: `{path.name}`."]) + [""]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out", type=pathlib.Path,
                      help="the folder accelerator_check.sh wrote")
  parser.add_argument("--hbm-gb-s", type=float, default=None,
                      help="the device's peak memory bandwidth (default: "
                           "from NOMINAL_HBM_GB_S by device kind)")
  args = parser.parse_args()

  update_cost = _load(args.out / "update_cost.json")
  throughputs = [json.loads(path.read_text()) for path in
                 sorted(args.out.glob("step_throughput*.json"))]
  large_batch = _load(args.out / "large_batch.json")
  machine = next((r["machine"] for r in [update_cost, *throughputs,
                                          large_batch] if r), None)
  if machine is None:
    raise SystemExit(f"{args.out}: no results to summarize")
  peak = args.hbm_gb_s or nominal_hbm_gb_s(machine["device_kind"])
  lines = ["# Accelerator check", "",
           f"Device: {machine['device_count']} x {machine['device_kind']} "
           f"({machine['backend']}), {machine['cpu_count']} CPU cores "
           f"({machine['cpu_model']}), jax {machine['jax']}; "
           f"{_common.load_text(machine)}.", "",
           "Nominal HBM bandwidth: "
           + ("unknown for this device (pass --hbm-gb-s)" if peak is None
              else f"{peak:.0f} GB/s"), ""]
  if update_cost:
    lines += update_cost_section(update_cost, peak)
  if throughputs:
    lines += step_throughput_section(throughputs)
  if large_batch:
    lines += large_batch_section(large_batch, args.out / "large_batch.json")
  text = "\n".join(lines)
  (args.out / "summary.md").write_text(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
