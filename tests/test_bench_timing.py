"""Each timing benchmark runs end to end at tiny sizes and writes its JSON
with the engine's common top level (no timing value is checked).

The scripts force host devices before importing JAX, so each runs in its
own process; the processes run side by side.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
# The scripts import this checkout's package, not whichever one is installed.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
TOP_LEVEL = ("schema", "benchmark", "claim", "code_version", "command",
             "machine", "budget", "trial_budget", "spread_rule", "contenders")

# name -> the script's tiny command-line arguments (--out is added).
RUNS = {
    "update_cost": [
        "update_cost.py", "--trees", "flat_1m", "--dtypes", "float32",
        "--optimizers", "optax.sgd(momentum)", "sngm",
        "--per-device-optimizers", "pmean + optax.sgd(momentum)",
        "--per-device-trees", "flat_1m", "--devices", "2", "--rounds", "1",
        "--repeats", "1"],
    "topk_selection": ["topk_selection.py", "--sizes", "20000",
                       "--repeats", "1"],
    "step_throughput": [
        "step_throughput.py", "--models", "mlp", "--batch-sizes", "16",
        "--devices", "2", "--repeats", "1", "--steps", "1"],
    "harness_throughput": [
        "harness_throughput.py", "--batch-sizes", "4", "--num-train", "64",
        "--repeats", "1"],
    "batch_size_test_cost": [
        "batch_size_test_cost.py", "--tests", "norm", "--modes",
        "moments,per_device", "--batch", "64", "--steps", "1", "--repeats",
        "1", "--min-seconds", "0"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """name -> (the written JSON, the process's output), all runs at once."""
  out = tmp_path_factory.mktemp("timing")
  processes = {}
  for name, (script, *args) in RUNS.items():
    path = out / name  # batch_size_test_cost adds .json itself
    target = str(path) if name == "batch_size_test_cost" else f"{path}.json"
    processes[name] = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / script), *args, "--out", target],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
  written = {}
  for name, process in processes.items():
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, f"{name}:\n{output[-3000:]}"
    written[name] = (json.loads((out / f"{name}.json").read_text()), output)
  return out, written


@pytest.mark.parametrize("name", RUNS)
def test_a_timing_script_writes_the_common_top_level(results, name):
  payload, _ = results[1][name]
  assert tuple(payload)[:len(TOP_LEVEL)] == TOP_LEVEL
  assert payload["benchmark"] == name
  assert payload["trial_budget"] is None
  assert payload["command"].startswith(f"python benchmarks/{RUNS[name][0]}")
  assert {"cpu_model", "load_average", "load_average_end",
          "jax"} <= set(payload["machine"])
  assert payload["budget"]["repeats"] in (1, [1])
  assert payload["contenders"] and all(
      set(contender) == {"name"} for contender in payload["contenders"])
  assert payload["rows"]


def test_the_accelerator_summary_reads_what_the_scripts_wrote(results):
  out, _ = results
  summary = subprocess.run(
      [sys.executable, str(BENCHMARKS / "accelerator_summary.py"), str(out)],
      capture_output=True, text=True, timeout=60, check=True, env=ENV)
  assert "## Update cost on the large trees" in summary.stdout
  assert "## Harness step throughput" in summary.stdout
  assert (out / "summary.md").exists()


def test_a_legacy_timing_json_keeps_its_measurements():
  sys.path.insert(0, str(BENCHMARKS))
  import _common  # pylint: disable=import-outside-toplevel
  old = {"machine": "cpu (cpu), ", "cpu_count": 2, "load_average": [1, 2, 3],
         "jax": "0.1", "repeats": 9, "steps": 5,
         "rows": [{"optimizer": "sngm", "step_ms": 1.5}]}
  record = _common.legacy_timing_record(
      old, benchmark="step_throughput", claim="c", command="python x.py",
      budget_keys=("repeats", "steps"), code_version="abc1234",
      converted_from="benchmarks/results/x.json@def5678",
      contenders=["sngm"])
  assert tuple(record)[:len(TOP_LEVEL)] == TOP_LEVEL
  assert record["code_version"] == "abc1234"
  assert record["converted_from"] == "benchmarks/results/x.json@def5678"
  assert record["budget"] == {"repeats": 9, "steps": 5}
  assert record["machine"] == {"description": "cpu (cpu), ", "cpu_count": 2,
                               "jax": "0.1", "load_average_end": [1, 2, 3]}
  assert record["rows"] == old["rows"]
  assert "at the end" in _common.load_text(record["machine"])
