"""Tests of the experiment engine: runs, the store, searches and verdicts."""

import datetime
import json
import math

import numpy as np
import pytest
from scipy.stats import qmc

from sngm_optax.harness import config as config_lib
from sngm_optax.harness import data as data_lib
from sngm_optax.harness import sweep


def _run(point, seed=0, accuracy=None, status=None):
  """A stand-in for a training run: val accuracy from `accuracy(point)`."""
  settings = dict(point, seed=seed)
  if status == sweep.DIVERGED:
    return sweep.Run.diverged(settings, "nan")
  value = accuracy(point) if accuracy else 0.5
  return sweep.Run.finished(settings, {"val_accuracy": value,
                                       "test_accuracy": value - seed * 0.01},
                            num_classes=10)


# --- Status.


@pytest.mark.parametrize("accuracy, status", [
    (0.149, sweep.COLLAPSED), (0.15, sweep.COLLAPSED), (0.151, sweep.OK),
    (0.9, sweep.OK), (math.nan, sweep.COLLAPSED)])
def test_a_final_accuracy_within_5_points_of_chance_is_a_collapse(
    accuracy, status):
  assert sweep.status_of({"val_accuracy": accuracy}, 10) == status


def test_collapse_reads_the_test_accuracy_without_a_validation_split():
  assert sweep.status_of({"test_accuracy": 0.55}, 2) == sweep.COLLAPSED
  assert sweep.status_of({"test_accuracy": 0.56}, 2) == sweep.OK
  assert sweep.status_of(None, 10) == sweep.COLLAPSED


def test_a_run_that_is_not_ok_has_no_metric_and_is_counted():
  runs = [_run({"lr": 1.0}), _run({"lr": 2.0}, status=sweep.DIVERGED),
          _run({"lr": 3.0}, accuracy=lambda p: 0.1)]
  assert [run.status for run in runs] == [sweep.OK, sweep.DIVERGED,
                                          sweep.COLLAPSED]
  assert runs[1].metric("val_accuracy") is None
  assert runs[2].metric("val_accuracy") is None
  assert sweep.count_collapsed(runs) == 2
  with pytest.raises(ValueError, match="status must be"):
    sweep.Run({}, "fine")


def test_the_run_key_covers_every_setting_and_ignores_their_order():
  assert sweep.run_key({"a": 1, "b": 2}) == sweep.run_key({"b": 2, "a": 1})
  assert sweep.run_key({"a": 1, "b": 2}) != sweep.run_key({"a": 1, "b": 3})
  base = config_lib.Config()
  settings = sweep.config_settings(base)
  assert "epochs" in settings and "cache_dir" not in settings
  other = sweep.config_settings(config_lib.Config(epochs=base.epochs + 1))
  assert sweep.run_key(settings) != sweep.run_key(other)


# --- The store.


def test_the_store_resumes_from_its_file_without_training_again(tmp_path):
  path = tmp_path / "runs.jsonl"
  budget = {"epochs": 3}
  store = sweep.RunStore(path, budget)
  calls = []

  def train(settings):
    calls.append(settings)
    return sweep.Run.finished(settings, {"val_accuracy": 0.5}, 10)

  first = store.run({"lr": 0.1, "seed": 0, "epochs": 3}, train)
  assert len(calls) == 1
  reopened = sweep.RunStore(path, budget)
  again = reopened.run({"lr": 0.1, "seed": 0, "epochs": 3}, train)
  assert len(calls) == 1 and again == first and len(reopened) == 1


def test_the_store_refuses_another_budget(tmp_path):
  path = tmp_path / "runs.jsonl"
  store = sweep.RunStore(path, {"epochs": 3, "num_samples": 100})
  store.put(_run({"lr": 0.1}))
  with pytest.raises(ValueError, match="another budget.*epochs"):
    sweep.RunStore(path, {"epochs": 6, "num_samples": 100})
  with pytest.raises(ValueError, match="another budget in this store: epochs=6"):
    store.run({"lr": 0.1, "epochs": 6}, _run)


def test_the_store_skips_a_last_line_cut_off_by_a_stop(tmp_path):
  path = tmp_path / "runs.jsonl"
  store = sweep.RunStore(path, {})
  store.put(_run({"lr": 0.1}))
  store.put(_run({"lr": 0.2}))
  text = path.read_text()
  path.write_text(text[:-20])  # the second run half written
  assert len(sweep.RunStore(path, {})) == 1
  lines = text.splitlines()
  path.write_text("\n".join([lines[0], "not json", lines[1]]) + "\n")
  with pytest.raises(ValueError, match="runs.jsonl:2: not a run record"):
    sweep.RunStore(path, {})


def test_the_store_starts_no_run_after_its_deadline(tmp_path):
  past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
      minutes=1)
  store = sweep.RunStore(tmp_path / "r.jsonl", {}, stop_after=past)
  store.put(_run({"lr": 0.1}))
  assert store.run({"lr": 0.1, "seed": 0}, _run).ok  # stored: no new run
  with pytest.raises(sweep.DeadlineReached):
    store.run({"lr": 0.2, "seed": 0}, _run)


# --- Searches.


def test_grid_extends_past_an_edge_pick_until_it_is_interior():
  trained = []

  def score(point):
    trained.append(point["lr"])
    return -abs(math.log(point["lr"] / 0.8))  # best at 0.8

  result = sweep.Grid({"lr": [0.1, 0.2, 0.4]}, max_extensions=3).search(score)
  # 0.4 is an edge: +0.8, still an edge: +1.6, then 0.8 is interior.
  assert trained == [0.1, 0.2, 0.4, 0.8, 1.6]
  assert result["best"] == {"lr": 0.8}
  assert result["search"]["extended"] == [{"lr": 0.8}, {"lr": 1.6}]
  assert result["search"]["on_edge"] == []
  assert result["search"]["trials_used"] == 5


def test_grid_reports_an_edge_pick_when_extensions_or_budget_run_out():
  score = lambda point: point["lr"]  # best always at the top
  capped = sweep.Grid({"lr": [1.0, 2.0]}, max_extensions=2).search(score)
  assert capped["best"] == {"lr": 8.0}
  assert capped["search"]["on_edge"] == ["lr"]
  budgeted = sweep.Grid({"lr": [1.0, 2.0]}, max_extensions=5,
                        trial_budget=3).search(score)
  assert budgeted["search"]["trials_used"] == 3
  assert budgeted["search"]["trial_budget"] == 3
  assert budgeted["best"] == {"lr": 4.0}


def test_grid_in_two_dimensions_extends_one_axis_by_a_whole_row():
  def score(point):  # best at lr 0.4, wd 1e-4
    return -abs(math.log(point["lr"] / 0.4)) - abs(
        math.log(point["wd"] / 1e-4))

  grid = sweep.Grid({"lr": [0.1, 0.2], "wd": [1e-5, 1e-4, 1e-3]},
                    max_extensions=1)
  result = grid.search(score)
  assert result["best"] == {"lr": 0.4, "wd": 1e-4}
  assert result["search"]["trials_used"] == 9  # 2x3, then a row of 3
  assert result["search"]["on_edge"] == ["lr"]  # 1 extension allowed
  assert grid.budget == 4 * 5


def test_a_search_never_picks_a_failed_run():
  score = lambda point: None if point["lr"] > 0.15 else point["lr"]
  result = sweep.Grid({"lr": [0.1, 0.2, 0.4]}).search(score)
  assert result["best"] == {"lr": 0.1}
  nothing = sweep.Grid({"lr": [0.1, 0.2]}).search(lambda point: None)
  assert nothing["best"] is None


def test_quasi_random_points_are_scipys_halton_points_mapped_to_the_ranges():
  ranges = {"lr": sweep.Range(1e-3, 10.0),
            "decay": sweep.Range(1.0, 5.0, log=False)}
  search = sweep.QuasiRandom(ranges, trial_budget=16, seed=3)
  units = qmc.Halton(d=2, scramble=True, seed=3).random(16)
  expected_lr = np.exp(np.log(1e-3) + units[:, 0] * np.log(1e4))
  expected_decay = 1.0 + 4.0 * units[:, 1]
  points = search.points()
  np.testing.assert_allclose([p["lr"] for p in points], expected_lr,
                             rtol=5e-3)
  np.testing.assert_allclose([p["decay"] for p in points], expected_decay,
                             rtol=5e-3)
  assert points == sweep.QuasiRandom(ranges, 16, seed=3).points()
  assert points != sweep.QuasiRandom(ranges, 16, seed=4).points()


def test_quasi_random_reports_a_pick_near_a_range_end():
  ranges = {"lr": sweep.Range(1e-3, 1.0)}
  result = sweep.QuasiRandom(ranges, 32).search(lambda point: point["lr"])
  assert result["search"]["on_edge"] == ["lr"]
  assert result["search"]["trials_used"] == 32
  middle = sweep.QuasiRandom(ranges, 32).search(
      lambda point: -abs(math.log(point["lr"] / 0.03)))
  assert middle["search"]["on_edge"] == []


def test_every_contender_of_a_comparison_has_the_same_trial_budget():
  grid = sweep.Grid({"lr": [1.0, 2.0, 4.0]}, max_extensions=1)
  assert sweep.check_same_budget({"a": grid, "b": grid}) == 5
  with pytest.raises(ValueError, match="same trial budget"):
    sweep.check_same_budget({"a": grid, "b": sweep.QuasiRandom(
        {"lr": sweep.Range(1.0, 4.0)}, trial_budget=8)})


@pytest.mark.parametrize("bad, match", [
    (lambda: sweep.Grid({"lr": []}), "non-empty and positive"),
    (lambda: sweep.Grid({"lr": [0.0, 1.0]}), "non-empty and positive"),
    (lambda: sweep.Grid({"lr": [1.0, 2.0]}, trial_budget=1), "smaller"),
    (lambda: sweep.Range(1.0, 1.0), "low < high"),
    (lambda: sweep.Range(0.0, 1.0), "low > 0"),
    (lambda: sweep.QuasiRandom({"lr": sweep.Range(1.0, 2.0)}, 0),
     "trial_budget must be a positive integer"),
])
def test_bad_search_settings_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    bad()


# --- Summaries and the verdict rule.


def test_summarize_is_numpys_mean_and_sample_sd():
  values = [0.91, 0.87, 0.95, None]
  summary = sweep.summarize(values)
  assert summary.n == 3
  assert summary.mean == pytest.approx(np.mean([0.91, 0.87, 0.95]))
  assert summary.sd == pytest.approx(np.std([0.91, 0.87, 0.95], ddof=1))
  assert sweep.summarize([0.5]).sd == 0.0
  assert sweep.summarize([None]) is None


@pytest.mark.parametrize("a, b, higher, word", [
    ((0.90, 0.01, 3), (0.85, 0.02, 3), True, "beats"),     # 0.05 > 0.03
    ((0.90, 0.02, 3), (0.87, 0.02, 3), True, "level"),     # 0.03 < 0.04
    ((0.80, 0.01, 3), (0.90, 0.01, 3), True, "behind"),
    ((0.90, 0.00, 1), (0.50, 0.01, 3), True, "no verdict"),
    ((100, 5, 3), (200, 10, 3), False, "beats"),         # fewer steps
])
def test_the_verdict_compares_the_gap_with_the_sum_of_the_sds(
    a, b, higher, word):
  result = sweep.verdict(sweep.Summary(*a), sweep.Summary(*b), higher)
  assert result.word == word
  assert result.spread == pytest.approx(a[1] + b[1])


def test_the_leader_must_beat_every_other_contender():
  s = sweep.Summary
  assert sweep.leader({"a": s(0.9, 0.01, 3), "b": s(0.8, 0.01, 3),
                       "c": s(0.7, 0.01, 3)}) == "a"
  # a leads b by 0.9 points with a spread of 2.35: no bold.
  assert sweep.leader({"a": s(0.947, 0.0034, 3),
                       "b": s(0.938, 0.0201, 3)}) is None
  assert sweep.leader({"a": s(0.9, 0.01, 3), "b": None}) is None


# --- tune.


def test_tune_reruns_the_pick_on_every_seed_and_summarizes_them():
  accuracy = lambda point: 1.0 - abs(point["lr"] - 0.2)
  failing = lambda point, seed: _run(
      point, seed, accuracy,
      status=sweep.DIVERGED if point["lr"] > 0.3 else None)
  result = sweep.tune("toy", failing, sweep.Grid({"lr": [0.1, 0.2, 0.4]}),
                      seeds=(0, 1, 2))
  assert result["pick"]["point"] == {"lr": 0.2}
  assert result["collapsed"] == 1
  assert [s["seed"] for s in result["seeds"]] == [0, 1, 2]
  values = [1.0 - 0.01 * seed for seed in range(3)]
  assert result["summary"]["mean"] == pytest.approx(np.mean(values))
  assert result["summary"]["sd"] == pytest.approx(np.std(values, ddof=1))
  json.dumps(result)  # a record the reports read back


def test_a_recorded_search_replays_its_points_and_never_picks_a_failure():
  trained = []

  def train(point, seed):
    trained.append((point["lr"], seed))
    return _run(point, seed, lambda p: 1.0 - abs(p["lr"] - 0.4),
                status=sweep.DIVERGED if point["lr"] == 0.4 else None)

  declared = sweep.Grid({"lr": [0.1, 0.2]}, max_extensions=1).describe()
  search = sweep.Recorded(declared, [{"lr": 0.1}, {"lr": 0.2}, {"lr": 0.4}],
                          extended=[{"lr": 0.4}])
  result = sweep.tune("old", train, search, seeds=(0, 1))
  assert trained == [(0.1, 0), (0.2, 0), (0.4, 0), (0.2, 0), (0.2, 1)]
  assert result["pick"]["point"] == {"lr": 0.2}
  assert result["search"]["trial_budget"] == 4
  assert result["search"]["trials_used"] == 3
  assert result["search"]["extended"] == [{"lr": 0.4}]
  assert result["search"]["on_edge"] == []
  assert result["collapsed"] == 1


def test_train_config_records_ok_diverged_and_collapsed_runs():
  dataset = data_lib.generate_mnist1d(1000)
  base = config_lib.Config(model="mlp", optimizer="msgd", batch_size=50,
                           epochs=2, warmup_epochs=0.0, num_devices=1,
                           schedule="constant")
  config = config_lib.override(base, ["learning_rate=0.1"])
  good = sweep.train_config(config, dataset)
  assert good.ok and len(good.curve) == 2
  assert good.final["steps"] == 2 * 800 // 50
  assert good.code_version and good.run_time_s > 0
  assert good.settings == sweep.config_settings(config)
  diverged = sweep.train_config(
      config_lib.override(base, ["learning_rate=1e30"]), dataset)
  assert diverged.status == sweep.DIVERGED and "non-finite" in diverged.error
  still = sweep.train_config(
      config_lib.override(base, ["learning_rate=1e-12"]), dataset)
  assert still.status == sweep.COLLAPSED


def test_harness_trainer_trains_a_point_once_through_the_store(tmp_path):
  dataset = data_lib.generate_mnist1d(600)
  base = config_lib.Config(model="mlp", optimizer="msgd", batch_size=60,
                           epochs=1, warmup_epochs=0.0, num_devices=1)
  store = sweep.RunStore(tmp_path / "runs.jsonl", {"epochs": 1})
  train = sweep.harness_trainer(store, base, dataset)
  first = train({"learning_rate": 0.1, "weight_decay": 1e-4}, 3)
  assert first.settings["seed"] == 3 and first.settings["weight_decay"] == 1e-4
  reopened = sweep.RunStore(tmp_path / "runs.jsonl", {"epochs": 1})
  assert len(reopened) == 1
  assert sweep.harness_trainer(reopened, base, dataset)(
      {"learning_rate": 0.1, "weight_decay": 1e-4}, 3) == first


def test_rerun_trains_the_point_on_every_seed_and_counts_collapses():
  def train(point, seed):
    accuracy = 0.1 if seed == 2 else 0.9 + seed / 100  # seed 2 at chance
    return sweep.Run.finished(dict(point, seed=seed),
                              {"val_accuracy": accuracy,
                               "test_accuracy": accuracy}, num_classes=10)

  result = sweep.rerun("x", train, {"learning_rate": 0.1}, seeds=(0, 1, 2))
  assert result["search"] is None
  assert result["pick"]["point"] == {"learning_rate": 0.1}
  assert [s["status"] for s in result["seeds"]] == [
      sweep.OK, sweep.OK, sweep.COLLAPSED]
  assert result["collapsed"] == 1
  assert result["summary"]["n"] == 2
  assert json.loads(json.dumps(result)) == result
