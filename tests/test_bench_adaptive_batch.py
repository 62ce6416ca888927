"""benchmarks/adaptive_batch.py end to end on a tiny budget, on the engine.

The script forces its host devices at import, so it runs in a subprocess.
"""

import json
import os
import pathlib
import subprocess
import sys

from sngm_optax.harness import sweep

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--num-samples", "600", "--epochs", "1", "--warmup-epochs", "0.125",
        "--families", "SNGM", "--contenders", "norm eta=0.5 +options",
        "--lrs-sngm", "0.3", "--max-extensions", "0", "--seeds", "1",
        "--max-batch-size", "128", "--model", "mlp"]


def _run(out):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)  # the script sets its own devices
  return subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "adaptive_batch.py"), *TINY,
       "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=True)


def test_a_tiny_run_writes_the_engine_record_and_resumes(tmp_path):
  out = tmp_path / "adaptive_batch.json"
  _run(out)
  record = json.loads(out.read_text())
  assert record["schema"] == sweep.SCHEMA_VERSION
  assert record["benchmark"] == "adaptive_batch"
  assert record["spread_rule"] == sweep.SPREAD_RULE
  # One point and no extension: a trial budget of 1 for every contender.
  assert record["trial_budget"] == 1
  entries = {c["name"]: c for c in record["contenders"]}
  family = record["families"]["SNGM"]
  assert family["headline"] == "norm eta=0.5 +options"
  final_b = family["final_batch_size"]
  steps = family["equal_steps"]
  assert {
      "fixed 32", "fixed 32 for 2x the samples", "norm eta=0.5 +options",
      f"fixed {final_b}", f"linear ramp 32->{final_b}",
      f"stagewise ramp 32->{final_b}", f"fixed 32 for {steps} steps",
      f"fixed {final_b} for {steps} steps"} <= set(entries)
  fixed = [c for c in entries.values() if c["kind"] == "fixed"]
  equal = [c for c in entries.values() if c["kind"] == "equal_steps"]
  assert sorted(c["base"] for c in equal) == sorted(c["name"] for c in fixed)
  for entry in entries.values():
    assert entry["family"] == "SNGM"
    assert entry["pick"]["point"] == {"learning_rate": 0.3}
    assert [s["status"] for s in entry["seeds"]][0] in (
        sweep.OK, sweep.DIVERGED, sweep.COLLAPSED)
    if entry["kind"] in ("plateau", "equal_steps"):
      assert entry["search"] is None and entry["base"]
    else:
      assert entry["search"]["trial_budget"] == 1
      assert entry["search"]["trials_used"] == 1
    assert entry["collapsed"] == sum(
        t["status"] != sweep.OK for t in entry.get("trials") or entry["seeds"])
    if entry["summary"] is not None:
      assert entry["summary"]["n"] == 1
      assert entry["statistics"]["steps"]["n"] == 1
  # Every run is in the store, the growing ones with their batch sizes.
  store = sweep.RunStore(tmp_path / "adaptive_batch_runs.jsonl",
                         {k: record["budget"][k] for k in (
                             "benchmark", "data_seed", "model", "num_devices",
                             "num_samples", "sample_budget_epochs",
                             "schedule", "val_fraction",
                             "warmup_epochs_at_budget", "weight_decay")})
  assert len(store) == len(entries)
  runs = {run.key: run for run in store}
  adaptive = runs[entries["norm eta=0.5 +options"]["pick"]["key"]]
  assert adaptive.extra["batch_sizes"][0] == 32
  assert adaptive.curve and adaptive.code_version
  # A second run trains nothing: every run comes from the store.
  before = (tmp_path / "adaptive_batch_runs.jsonl").read_text()
  _run(out)
  assert (tmp_path / "adaptive_batch_runs.jsonl").read_text() == before
  assert json.loads(out.read_text())["contenders"] == record["contenders"]
