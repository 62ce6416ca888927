"""Tests of the comparison's grids, learning-rate picking and table."""

import math

import pytest

from sngm_optax.harness import compare


def test_grids_have_the_same_size_and_shape_for_every_optimizer():
  for name in compare.LARGE_BATCH_OPTIMIZERS:
    values = compare.LR_GRIDS[name].values
    assert len(values) == 4
    ratios = [b / a for a, b in zip(values, values[1:])]
    assert ratios == pytest.approx([2.0, 2.0, 2.0])
    # The benchmark's pick is the third value: [p/4, p/2, p, 2p].
    assert compare.LR_GRIDS[name].suggested == values[2]


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
  assert compare.suggested_learning_rate("msgd", 128) == 0.1  # small grid
  assert compare.suggested_learning_rate("msgd", 4096) == 0.25
  with pytest.raises(ValueError, match="no learning-rate grid for 'tr_sgd'"):
    compare.suggested_learning_rate("tr_sgd", 128)


def _run(lr, val, test, diverged=False):
  if diverged:
    return {"learning_rate": lr, "diverged": True, "error": "nan"}
  return {"learning_rate": lr, "diverged": False, "val_accuracy": val,
          "test_accuracy": test, "test_loss": 0.1, "steps": 10,
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
  assert lines[2] == "| sngm | 4096 | 0.4 | 96.50 | 97.00 | 10 | 2 | 9 |"
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
