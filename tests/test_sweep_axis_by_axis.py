"""Tests of `sweep.AxisByAxis`: a grid searched one axis at a time."""

import math

import pytest

from sngm_optax.harness import sweep


def _peak(best, calls):
  def score(point):
    calls.append((point["learning_rate"], point["weight_decay"]))
    if point["learning_rate"] > 100:
      return None  # diverged
    return -abs(math.log(point["learning_rate"] / best[0])) - abs(
        math.log(point["weight_decay"] / best[1]))
  return score


def test_axis_by_axis_searches_each_axis_at_the_best_of_the_others():
  calls = []
  search = sweep.AxisByAxis({"learning_rate": (0.2, 0.4, 0.8),
                             "weight_decay": (1e-5, 1e-4, 1e-3)},
                            max_extensions=3)
  assert search.budget == 9 + 9 - 1
  result = search.search(_peak((1.6, 1e-6), calls))
  # The learning rates at the middle decay, 0.8 an edge: 1.6, then 3.2;
  # then the decays at 1.6: 1e-5 an edge, 1e-6, then 1e-7.
  assert calls == [(0.2, 1e-4), (0.4, 1e-4), (0.8, 1e-4), (1.6, 1e-4),
                   (3.2, 1e-4), (1.6, 1e-5), (1.6, 1e-3), (1.6, 1e-6),
                   (1.6, 1e-7)]
  assert result["best"] == {"learning_rate": 1.6, "weight_decay": 1e-6}
  assert result["search"]["trials_used"] == len(calls) <= search.budget
  assert result["search"]["extended"] == [
      {"learning_rate": 1.6}, {"learning_rate": 3.2},
      {"weight_decay": 1e-6}, {"weight_decay": 1e-7}]
  assert result["search"]["on_edge"] == []
  assert result["search"]["kind"] == "axis_by_axis"


def test_axis_by_axis_reports_an_edge_and_tunes_through_tune():
  search = sweep.AxisByAxis({"learning_rate": (0.2, 0.4, 0.8),
                             "weight_decay": (1e-4,)}, max_extensions=1)
  assert search.budget == 5 + 1 - 1
  calls = []
  result = search.search(_peak((0.01, 1e-4), calls))
  assert result["best"] == {"learning_rate": 0.1, "weight_decay": 1e-4}
  assert result["search"]["on_edge"] == ["learning_rate"]

  def train(point, seed):
    value = -abs(math.log(point["learning_rate"] / 0.4))
    return sweep.Run.finished(dict(point, seed=seed), {
        "val_accuracy": 0.9 + value / 100, "test_accuracy": 0.9},
        num_classes=10)

  tuned = sweep.tune("x", train, search, seeds=(0, 1))
  assert tuned["pick"]["point"]["learning_rate"] == 0.4
  assert tuned["search"]["trial_budget"] == 5
  assert sweep.check_same_budget({"a": search, "b": sweep.Grid(
      {"learning_rate": (1.0, 2.0, 4.0)}, max_extensions=1)}) == 5
  with pytest.raises(ValueError, match="non-empty and positive"):
    sweep.AxisByAxis({"learning_rate": ()})
