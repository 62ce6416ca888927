"""A smoke run of benchmarks/large_batch.py end to end, on the engine."""

import json
import pathlib
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import large_batch  # noqa: E402  pylint: disable=wrong-import-position

from sngm_optax.harness import sweep  # noqa: E402  pylint: disable=wrong-import-position


def test_large_batch_runs_end_to_end_and_writes_the_engines_schema(tmp_path):
  argv = ["--batch-sizes", "64", "--tune-batch", "64", "--num-samples",
          "1000", "--epochs", "4", "--warmup-epochs", "0.2", "--small-batch",
          "32", "--extra-seeds", "1", "--model", "mlp", "--max-extensions",
          "0", "--reference-size", "1", "--contenders", "sngm_paper",
          "--stages", "tune,reference,plateau", "--quiet",
          "--out", str(tmp_path)]
  large_batch.main(argv)
  result = json.loads((tmp_path / "large_batch.json").read_text())
  assert result["schema"] == sweep.SCHEMA_VERSION
  assert result["benchmark"] == "large_batch"
  assert result["spread_rule"] == sweep.SPREAD_RULE
  assert result["budgets_equal"] and result["skipped"] == []
  by_batch = {c["batch_size"]: c for c in result["contenders"]}
  assert sorted(by_batch) == [32, 64]
  sngm = by_batch[64]
  # 3 learning rates at the middle decay, then 3 decays at the best: 5.
  assert sngm["search"]["kind"] == "axis_by_axis"
  assert result["trial_budget"] == sngm["search"]["trial_budget"] == 5
  assert sngm["search"]["trials_used"] == 5
  assert all(t["status"] in (sweep.OK, sweep.DIVERGED, sweep.COLLAPSED)
             for t in sngm["trials"])
  for contender in result["contenders"]:
    if contender["pick"] is not None:
      assert [s["seed"] for s in contender["seeds"]] == [0, 1]
      assert contender["summary"]["n"] == 2
  # The plateau check: the reference's pick on twice the epochs.
  (doubled,) = result["plateau"]["contenders"]
  assert result["plateau"]["budget"]["epochs"] == 8
  assert doubled["batch_size"] == 32
  store = sweep.RunStore(tmp_path / large_batch.RUNS, result["budget"])
  assert len(store) + 2 == result["runs"]  # + the plateau's two seeds
  # A second call trains nothing: every run comes from the stores.
  large_batch.main(argv)
  again = json.loads((tmp_path / "large_batch.json").read_text())
  assert again["contenders"] == result["contenders"]
