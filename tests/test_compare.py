"""Tests of the comparison's grids, learning-rate picking and table."""

import json
import math

import pytest

from sngm_optax.harness import compare
from sngm_optax.harness import steps
from sngm_optax.harness import sweep
from sngm_optax.harness import train


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


class _FakeData:
  num_train, num_test, num_classes = 10_000, 1000, 10


def _fake_training(monkeypatch, outcome):
  """Replaces the training loop: `outcome(config)` gives (val, test)
  accuracy, or None for a run whose loss goes non-finite."""
  calls = []

  def fake_train(config, dataset, quiet, log_epochs):
    del dataset, quiet, log_epochs
    calls.append((config.optimizer, config.learning_rate,
                  config.weight_decay, config.seed))
    accuracies = outcome(config)
    if accuracies is None:
      raise steps.NonFiniteLossError("non-finite loss")
    val, test = accuracies
    record = {"epoch": 1.0, "val_accuracy": val, "test_accuracy": test,
              "test_loss": 0.3}
    return {"final": record, "history": [record], "steps": 5,
            "samples_seen": 500, "wall_time_s": 1.0}

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  monkeypatch.setattr(train, "load_dataset", lambda config: _FakeData)
  return calls


def test_compare_picks_by_validation_and_survives_divergence(
    monkeypatch, tmp_path):
  outcomes = {0.2: (0.90, 0.95), 0.4: (0.93, 0.91), 0.8: None,
              # the extension past 0.8 collapses to chance
              1.6: (0.1, 0.1)}

  def outcome(config):
    found = outcomes[config.learning_rate]
    return None if found is None else (found[0], found[1]
                                       + 0.01 * config.seed)

  _fake_training(monkeypatch, outcome)
  result = compare.compare(compare.PRESETS["quick"], optimizers=("sngm",),
                           include_small_batch=False, quiet=True,
                           extra_seeds=2, out_dir=tmp_path)
  (sngm,) = result["contenders"]
  # Picked on validation accuracy (0.4), not on test accuracy (0.2).
  assert sngm["pick"]["point"] == {"learning_rate": 0.4,
                                   "weight_decay": 1e-4}
  assert [t["status"] for t in sngm["trials"]] == [
      sweep.OK, sweep.OK, sweep.DIVERGED]
  assert sngm["collapsed"] == 1 and result["collapsed"] == 1
  # The pick retrained with seeds 1 and 2: test accuracy 0.91, 0.92, 0.93.
  assert [s["seed"] for s in sngm["seeds"]] == [0, 1, 2]
  assert sngm["summary"]["n"] == 3
  assert sngm["summary"]["mean"] == pytest.approx(0.92)
  assert sngm["summary"]["sd"] == pytest.approx(0.01)
  table = compare.format_table(result).splitlines()
  assert "test acc, 3 seeds (%)" in table[0]
  assert "| 92.00 ± 1.00 |" in table[2]  # one contender: no bold
  # The engine's schema, with the trial budget every contender shared.
  written = json.loads((tmp_path / "compare.json").read_text())
  assert written["schema"] == sweep.SCHEMA_VERSION
  assert written["benchmark"] == "compare"
  assert written["trial_budget"] == sngm["search"]["trial_budget"] == 7
  assert written["spread_rule"] == sweep.SPREAD_RULE
  store = sweep.RunStore(tmp_path / "compare_runs.jsonl", written["budget"])
  assert len(store) == written["runs"] == 5


def test_compare_resumes_from_its_run_store(monkeypatch, tmp_path):
  calls = _fake_training(monkeypatch, lambda config: (
      0.9 - abs(math.log(config.learning_rate / 0.4)) / 10, 0.9))
  first = compare.compare(compare.PRESETS["quick"], optimizers=("sngm",),
                          quiet=True, out_dir=tmp_path)
  trained = len(calls)
  again = compare.compare(compare.PRESETS["quick"], optimizers=("sngm",),
                          quiet=True, out_dir=tmp_path)
  assert len(calls) == trained  # every run came from compare_runs.jsonl
  assert again["contenders"] == first["contenders"]


def test_compare_never_reports_an_edge_pick_without_extending(monkeypatch):
  """The whole `compare`, with training faked: every optimizer's best
  learning rate lies above its quick grid, so each pick is extended."""
  peaks = {"sngm": 1.6, "lamb": 0.3, "msgd": 2.0}

  def outcome(config):
    accuracy = 0.9 - 0.01 * abs(math.log(config.learning_rate /
                                         peaks[config.optimizer]))
    return accuracy, accuracy

  calls = _fake_training(monkeypatch, outcome)
  result = compare.compare(compare.PRESETS["quick"],
                           optimizers=("sngm", "lamb"), quiet=True)
  by_name = {c["optimizer"]: c for c in result["contenders"]}
  # Every contender had the same trial budget: 3 values + 2 extensions
  # each way.
  assert {c["search"]["trial_budget"] for c in result["contenders"]} == {7}
  assert result["trial_budget"] == 7
  # sngm: 0.2, 0.4, 0.8 -> 1.6 (interior once 3.2 is tried).
  sngm = by_name["sngm"]
  assert [t["point"]["learning_rate"] for t in sngm["trials"]] == [
      0.2, 0.4, 0.8, 1.6, 3.2]
  assert sngm["pick"]["point"]["learning_rate"] == 1.6
  assert sngm["search"]["on_edge"] == []
  # lamb's peak is beyond the two extensions allowed: flagged, not "best".
  lamb = by_name["lamb"]
  assert [t["point"]["learning_rate"] for t in lamb["trials"]] == [
      0.02, 0.04, 0.08, 0.16, 0.32]
  assert lamb["search"]["on_edge"] == ["learning_rate"]
  for contender in result["contenders"]:
    tried = [t["point"]["learning_rate"] for t in contender["trials"]]
    best = contender["pick"]["point"]["learning_rate"]
    assert (min(tried) < best < max(tried)) or contender["search"]["on_edge"]
  rows = {row.split("|")[1].strip(): row
          for row in result["table"].splitlines()[2:]}
  assert "(grid edge)" in rows["lamb"] and "(grid edge)" not in rows["sngm"]
  assert len(calls) == len(set(calls))


def test_compare_refuses_contenders_of_different_trial_budgets(monkeypatch):
  _fake_training(monkeypatch, lambda config: (0.9, 0.9))
  monkeypatch.setitem(compare.QUICK_GRIDS, "lamb", compare.LearningRateGrid(
      (0.02, 0.04), 1024))
  with pytest.raises(ValueError, match="same trial budget"):
    compare.compare(compare.PRESETS["quick"], optimizers=("sngm", "lamb"),
                    quiet=True)


def test_the_table_bolds_only_the_leader_and_counts_collapsed_runs():
  def contender(name, mean, sd, collapsed=0, pick=True):
    final = {"val_accuracy": mean, "test_accuracy": mean, "steps": 10}
    return {
        "optimizer": name, "batch_size": 1024, "collapsed": collapsed,
        "search": {"trials_used": 3, "on_edge": []}, "search_time_s": 9.0,
        "summary": {"mean": mean, "sd": sd, "n": 3} if pick else None,
        "pick": {"point": {"learning_rate": 0.4, "weight_decay": 1e-4},
                 "final": final, "run_time_s": 2.0, "compile_time_s": 1.0}
                if pick else None}

  lead = {"contenders": [contender("sngm", 0.97, 0.001),
                         contender("msgd", 0.90, 0.01, collapsed=1),
                         contender("lamb", 0, 0, collapsed=3, pick=False)]}
  lines = compare.format_table(lead).splitlines()
  assert lines[2] == ("| sngm | 1024 | 0.4 | 0.0001 | 97.00 | 97.00 | "
                      "**97.00 ± 0.10** | 10 | 3 | 0 | 3 | 9 |")
  assert lines[3].endswith("| 90.00 ± 1.00 | 10 | 3 | 1 | 3 | 9 |")
  assert lines[4].startswith("| lamb | 1024 | all collapsed |")
  level = {"contenders": [contender("sngm", 0.97, 0.05),
                          contender("msgd", 0.90, 0.05)]}
  assert "**" not in compare.format_table(level, times=False)
