"""A tiny end-to-end run of benchmarks/small_batch.py on the engine."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_small_batch_writes_the_engine_record_and_resumes(tmp_path):
  command = [sys.executable, str(ROOT / "benchmarks" / "small_batch.py"),
             "--num-samples", "300", "--epochs", "1", "--batch-sizes", "16",
             "--methods", "adam", "tr_adam", "--extra-seeds", "1",
             "--curve-epochs", "0", "--controls", "16", "--quiet",
             "--out", str(tmp_path)]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
  subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=300,
                 capture_output=True)
  record = json.loads((tmp_path / "small_batch.json").read_text())
  assert record["benchmark"] == "small_batch" and record["schema"] == 1
  assert record["trial_budget"] == 5  # 3 values, one more per side
  assert [c["name"] for c in record["contenders"]] == ["adam", "tr_adam"]
  for contender in record["contenders"]:
    assert contender["search"]["trial_budget"] == 5
    assert 3 <= contender["search"]["trials_used"] <= 5
    assert {t["status"] for t in contender["trials"]} <= {
        "ok", "diverged", "collapsed"}
    if contender["summary"]:
      assert contender["summary"]["n"] <= 2
  if all(c["pick"] for c in record["contenders"]):  # not all collapsed
    assert {c["name"] for c in record["controls"]} == {
        "control: adam at tr_adam's mean step", "control: tr_adam decay only"}
    assert all(c["untuned"] for c in record["controls"])
  lines = (tmp_path / "small_batch_runs.jsonl").read_text().splitlines()
  assert "budget" in json.loads(lines[0])
  # A second run finds every run in the store and trains nothing.
  subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=300,
                 capture_output=True)
  assert (tmp_path / "small_batch_runs.jsonl").read_text().splitlines() == (
      lines)
