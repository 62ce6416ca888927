"""Tests of the comparison's grids, learning-rate picking and table."""

import math

import pytest

from sngm_optax.harness import compare


def test_grids_have_the_same_size_and_shape_for_every_optimizer():
  grids = [compare.LR_GRIDS[name] for name in (
      *compare.LARGE_BATCH_OPTIMIZERS, *compare.VARIANTS)]
  for grid in [*grids, *compare.QUICK_GRIDS.values()]:
    values = grid.values
    ratios = [b / a for a, b in zip(values, values[1:])]
    assert ratios == pytest.approx([2.0, 2.0])
    # Centred: the pick that set the grid is the middle value.
    assert grid.suggested in (None, values[1])
  for grid in grids:
    decays = grid.weight_decays
    ratios = [b / a for a, b in zip(decays, decays[1:])]
    assert ratios == pytest.approx([10.0, 10.0])


def test_grid_scales_with_the_square_root_of_the_batch_size():
  grid = compare.LearningRateGrid((0.1, 0.2, 0.4, 0.8), reference_batch=4096)
  assert grid.at(4096) == (0.1, 0.2, 0.4, 0.8)
  assert grid.at(16384) == (0.2, 0.4, 0.8, 1.6)
  assert grid.at(1024, size=2) == (0.1, 0.2)      # the middle two
  assert grid.at(1024, size=3) == (0.1, 0.2, 0.4)  # the upper middle three
  assert grid.at(8192)[0] == pytest.approx(0.1 * math.sqrt(2), rel=5e-3)


def test_suggested_learning_rate_uses_the_nearest_reference_batch():
  assert compare.suggested_learning_rate("sngm", 4096) == 0.4
  assert compare.suggested_learning_rate("sngm", 1024) == 0.2
  assert compare.suggested_learning_rate("msgd", 128) == 0.2  # small grid
  assert compare.suggested_learning_rate("msgd", 4096) == 0.25
  with pytest.raises(ValueError, match="no learning-rate grid for 'tr_sgd'"):
    compare.suggested_learning_rate("tr_sgd", 128)


def _run(lr, val, test, diverged=False):
  if diverged:
    return {"learning_rate": lr, "diverged": True, "error": "nan"}
  return {"learning_rate": lr, "diverged": False, "val_accuracy": val,
          "test_accuracy": test, "test_loss": 0.1, "steps": 10,
          "weight_decay": 1e-4,
          "wall_time_s": 2.0, "history": [{"epoch": 1.0,
                                           "test_accuracy": test}]}


def test_table_lists_picked_runs_and_all_diverged():
  result = {"contenders": [
      {"optimizer": "sngm", "batch_size": 4096, "grid_wall_time_s": 9.0,
       "best": _run(0.4, 0.97, 0.965), "runs": [_run(0.4, 0.97, 0.965)]},
      {"optimizer": "msgd", "batch_size": 4096, "grid_wall_time_s": 3.0,
       "best": None, "runs": [_run(1.0, 0, 0, diverged=True)]},
  ]}
  lines = compare.format_table(result).splitlines()
  assert lines[2] == ("| sngm | 4096 | 0.4 | 0.0001 | 96.50 | 97.00 | 10 | 2 "
                      "| 9 |")
  assert lines[3].startswith("| msgd | 4096 | all diverged |")
  compact = compare.without_histories(result)
  assert "history" not in compact["contenders"][0]["runs"][0]
  assert "history" in compact["contenders"][0]["best"]  # the picked run's


def test_run_contender_picks_by_validation_and_survives_divergence(
    monkeypatch):
  outcomes = {0.1: (0.90, 0.95), 0.2: (0.93, 0.91), 0.4: None}

  def fake_train(config, dataset, quiet, log_epochs):
    del dataset, quiet, log_epochs
    outcome = outcomes[config.learning_rate]
    if outcome is None:
      raise compare.train.NonFiniteLossError("non-finite")
    val, test = outcome
    test += 0.01 * config.seed
    record = {"epoch": 1.0, "val_accuracy": val, "test_accuracy": test,
              "test_loss": 0.3}
    return {"final": record, "history": [record], "steps": 5,
            "wall_time_s": 1.0}

  monkeypatch.setattr(compare.train, "train_and_evaluate", fake_train)
  base = compare.train.Config(val_fraction=0.1)
  result = compare.run_contender(base, "sngm", 4096, (0.1, 0.2, 0.4), None,
                                 quiet=True, extra_seeds=2)
  # Picked on validation accuracy (0.2), not on test accuracy (0.1).
  assert result["best"]["learning_rate"] == 0.2
  assert [run["diverged"] for run in result["runs"]] == [False, False, True]
  # The pick retrained with seeds 1 and 2: test accuracy 0.91, 0.92, 0.93.
  assert [(r["learning_rate"], r["seed"]) for r in result["seed_runs"]] == [
      (0.2, 1), (0.2, 2)]
  assert result["num_seeds"] == 3
  assert result["test_accuracy_mean"] == pytest.approx(0.92)
  assert result["test_accuracy_std"] == pytest.approx(0.01)
  table = compare.format_table({"contenders": [result]}).splitlines()
  assert "test acc, 3 seeds (%)" in table[0]
  assert "| 92.00 ± 1.00 |" in table[2]


def _fake_score(best, calls):
  """A score peaked at `best` (log distance), recording each call."""

  def score(learning_rate, weight_decay):
    calls.append((learning_rate, weight_decay))
    if learning_rate > 100:
      return None  # diverged
    return -abs(math.log(learning_rate / best[0])) - abs(
        math.log(weight_decay / best[1]))

  return score


def test_grid_search_extends_an_edge_pick_until_it_is_inside():
  calls = []
  result = compare.grid_search(_fake_score((1.6, 1e-3), calls),
                               [(0.2, 0.4, 0.8), (1e-5, 1e-4, 1e-3)],
                               max_extensions=3)
  # 0.8 and 1e-3 are edges: one more value each, a full row and column,
  # then 1.6 is an edge again: 3.2 (and the new corner) show it is inside.
  assert result["axes"] == [[0.2, 0.4, 0.8, 1.6, 3.2], [1e-5, 1e-4, 1e-3,
                                                        1e-2]]
  assert result["extended"] == [(0, 1.6), (1, 1e-2), (0, 3.2)]
  assert result["best"] == (1.6, 1e-3) and not result["on_edge"]
  assert len(calls) == len(set(calls)) == 5 * 4  # every point once


def test_grid_search_edge_pick_at_the_limit_is_flagged():
  calls = []
  result = compare.grid_search(_fake_score((0.01, 1e-4), calls),
                               [(0.2, 0.4, 0.8), (1e-4,)], max_extensions=1)
  assert result["axes"] == [[0.1, 0.2, 0.4, 0.8], [1e-4]]
  assert result["best"] == (0.1, 1e-4) and result["on_edge"]
  # A single-value axis is not tuned, so never extended.
  assert compare.grid_search(_fake_score((0.4, 1.0), []),
                             [(0.2, 0.4, 0.8), (1e-4,)], 2)["extended"] == []


def test_grid_search_counts_a_diverged_neighbour_as_the_edge_checked():
  calls = []
  result = compare.grid_search(_fake_score((1e4, 1e-4), calls),
                               [(25.0, 50.0, 100.0), (1e-4,)],
                               max_extensions=2)
  # 100 is best; 200 diverges, so 100 is inside the grid of tried values.
  assert result["axes"][0] == [25.0, 50.0, 100.0, 200.0]
  assert result["best"] == (100.0, 1e-4) and not result["on_edge"]
  assert result["scores"][(200.0, 1e-4)] is None


def test_compare_never_reports_an_edge_pick_without_extending(monkeypatch):
  """The whole `compare`, with training faked: every optimizer's best
  learning rate lies above its quick grid, so each pick is extended."""
  peaks = {"sngm": 1.6, "lamb": 0.3, "msgd": 2.0}
  calls = []

  def fake_train(config, dataset, quiet, log_epochs):
    del dataset, quiet, log_epochs
    calls.append((config.optimizer, config.learning_rate))
    accuracy = 0.9 - 0.01 * abs(math.log(config.learning_rate /
                                         peaks[config.optimizer]))
    record = {"epoch": 1.0, "val_accuracy": accuracy,
              "test_accuracy": accuracy, "test_loss": 0.3}
    return {"final": record, "history": [record], "steps": 5,
            "wall_time_s": 1.0}

  class FakeData:
    num_train, num_test = 10_000, 1000

  monkeypatch.setattr(compare.train, "train_and_evaluate", fake_train)
  monkeypatch.setattr(compare.train, "load_dataset", lambda config: FakeData)
  result = compare.compare(compare.PRESETS["quick"],
                           optimizers=("sngm", "lamb"), quiet=True)
  by_name = {c["optimizer"]: c for c in result["contenders"]}
  # sngm: 0.2, 0.4, 0.8 -> 1.6 (interior once 3.2 is tried).
  assert by_name["sngm"]["learning_rates"] == [0.2, 0.4, 0.8, 1.6, 3.2]
  assert by_name["sngm"]["best"]["learning_rate"] == 1.6
  # lamb's peak is beyond the two extensions allowed: flagged, not "best".
  assert by_name["lamb"]["learning_rates"] == [0.02, 0.04, 0.08, 0.16, 0.32]
  assert by_name["lamb"]["on_edge"]
  for contender in result["contenders"]:
    best = contender["best"]["learning_rate"]
    inside = min(contender["learning_rates"]) < best < max(
        contender["learning_rates"])
    assert inside or contender["on_edge"]
  rows = {row.split("|")[1].strip(): row
          for row in result["table"].splitlines()[2:]}
  assert "(grid edge)" in rows["lamb"] and "(grid edge)" not in rows["sngm"]
  assert len(calls) == len(set(calls))
