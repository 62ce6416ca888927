"""A tiny end-to-end run of benchmarks/sparse_communication.py on the engine
(in a subprocess: the script sets up 8 host devices before importing JAX)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_sparse_communication_writes_the_engine_record(tmp_path):
  out = tmp_path / "sparse"
  command = [sys.executable,
             str(ROOT / "benchmarks" / "sparse_communication.py"),
             "--num-samples", "800", "--batch-size", "64", "--epochs", "1",
             "--density-warmup-epochs", "0.5", "--lrs", "0.1", "0.2",
             "--grid-extensions", "0", "--hidden", "16", "--seeds", "0", "1",
             "--only", "msgd", "gmc 1.0% warm-up", "--out", str(out)]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
  env.pop("XLA_FLAGS", None)
  subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=300,
                 capture_output=True)
  record = json.loads(out.with_suffix(".json").read_text())
  assert record["benchmark"] == "sparse_communication"
  assert record["trial_budget"] == 2  # two values, no extension
  names = [c["name"] for c in record["contenders"]]
  assert names == ["msgd", "gmc 1.0% warm-up"]
  dense, gmc = record["contenders"]
  for contender in (dense, gmc):
    assert contender["search"]["trial_budget"] == 2
    assert {t["status"] for t in contender["trials"]} <= {
        "ok", "diverged", "collapsed"}
  assert gmc["bytes_sent_per_step"] < record["dense_bytes"]
  assert record["data"]["num_val"] > 0
  runs = [json.loads(line) for line in out.with_name(
      "sparse_runs.jsonl").read_text().splitlines()[1:]]
  sparse = [r for r in runs if r["settings"]["optimizer"] == "gmc"]
  assert sparse and all("bytes_sent_per_step" in r["extra"] for r in sparse)
