"""A smoke run of benchmarks/frontier.py end to end, on the engine."""

import json
import math
import pathlib
import statistics
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import frontier  # noqa: E402  pylint: disable=wrong-import-position

from sngm_optax.harness import sweep  # noqa: E402  pylint: disable=wrong-import-position

TARGET = 0.25


def _store_runs(tmp_path) -> list[sweep.Run]:
  runs = []
  for path in sorted((tmp_path / "frontier_runs").rglob("*.jsonl")):
    lines = path.read_text().splitlines()[1:]
    runs += [sweep.Run.from_json(json.loads(line)) for line in lines]
  return runs


def test_frontier_runs_reports_and_resumes_without_training(tmp_path):
  options = ["--model", "mlp", "--optimizers", "msgd", "--batch-sizes", "256",
             "--trials", "3", "--budget-epochs", "4",
             "--budget-steps", "60", "--num-samples", "2000", "--target",
             str(TARGET), "--adaptive", "sngm norm eta=0.5 +options",
             "--out", str(tmp_path)]
  frontier.main(["run", "--workers", "1", *options])
  frontier.main(["report", *options])
  result = json.loads((tmp_path / "frontier.json").read_text())
  assert result["schema"] == sweep.SCHEMA_VERSION
  assert result["target"] == TARGET and result["trial_budget"] == 3
  assert result["complete"] and (tmp_path / "frontier.png").exists()
  assert result["command"].startswith("python benchmarks/frontier.py run ")

  # Every run's steps to target is its first evaluation at or above the
  # target, recomputed here from its curve.
  runs = {run.key: run for run in _store_runs(tmp_path)}
  for run in runs.values():
    if run.final is None:
      continue
    hits = [r["steps"] for r in run.curve if r["val_accuracy"] >= TARGET]
    assert run.final["steps_to_target"] == (hits[0] if hits else None)

  points = {p["batch_size"]: p for p in result["points"]}
  assert sorted(points) == [256]
  for batch_size, point in points.items():
    assert point["optimizer"] == "msgd" and point["trials"] == 3
    assert len(point["trial_points"]) == point["search"]["trials_used"] == 3
    assert len(point["steps_to_target"]) == len(frontier.SEEDS)
    # The budget: the larger of 4 epochs and 60 steps (1440 examples).
    assert point["step_budget"] == max(-(-4 * 1440 // batch_size), 60)
    reached = [t for t in point["trial_points"]
               if t["steps_to_target"] is not None]
    assert point["trials_reached"] == len(reached)
    if reached:
      fewest = min(reached, key=lambda t: t["steps_to_target"])
      assert point["steps_to_target"][0] == fewest["steps_to_target"]
      assert point["pick"] == {k: fewest[k] for k in point["pick"]}
  (adaptive,) = result["adaptive"]
  assert adaptive["test"] == "norm" and adaptive["max_batch_size"] == 256
  assert len(adaptive["steps_to_target"]) == len(frontier.SEEDS)

  # The noise scale along momentum SGD's pick at B = 256, on 8 devices: a
  # row per evaluation, B_simple late in training the median of the last
  # third of them.
  noise = result["noise_scale"]
  assert noise["num_devices"] == 8 and noise["config"]["learning_rate"] == (
      points[256]["pick"]["learning_rate"])
  values = [row["noise_scale"] for row in noise["rows"]]
  assert len(values) >= 4 and all(value > 0 for value in values)
  late = values[len(values) - math.ceil(len(values) / 3):]
  assert noise["late_noise_scale"] == statistics.median(late)

  # A second run trains nothing: every run comes from the stores.
  count = len(runs)
  frontier.main(["run", "--workers", "1", *options])
  assert len(_store_runs(tmp_path)) == count
  frontier.main(["report", *options])
  again = json.loads((tmp_path / "frontier.json").read_text())
  assert again["points"] == result["points"]
  assert again["adaptive"] == result["adaptive"]
