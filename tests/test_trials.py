"""Vmapped trials (sngm_optax.harness.trials) against single runs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sngm_optax.harness import checkpoint as checkpoint_lib
from sngm_optax.harness import config as config_lib
from sngm_optax.harness import data
from sngm_optax.harness import optimizers
from sngm_optax.harness import sweep
from sngm_optax.harness import train
from sngm_optax.harness import trials

BATCH = 64
EVAL_EVERY = 5  # steps per epoch: 320 training examples / 64


@pytest.fixture(name="dataset", scope="module")
def fixture_dataset(tmp_path_factory) -> data.Dataset:
  # 400 training examples, 80 of them held out for validation; 100 test.
  cache = tmp_path_factory.mktemp("cache")
  return data.load_mnist1d(500, seed=0, cache_dir=cache)


def _base(**changes) -> config_lib.Config:
  defaults = dict(model="mlp", optimizer="msgd", learning_rate=0.05,
                  weight_decay=1e-4, batch_size=BATCH, epochs=3.0,
                  warmup_epochs=0.5, schedule="warmup_linear",
                  val_fraction=0.2, num_devices=1)
  defaults.update(changes)
  return config_lib.Config(**defaults)


def _single_run(config, dataset, directory):
  """`train_and_evaluate`'s history and its final params (checkpointed)."""
  config = dataclasses.replace(config, checkpoint_dir=str(directory))
  result = train.train_and_evaluate(config, dataset=dataset, quiet=True)
  program = train.build_program(train.ProgramSpec.from_config(
      config, result["num_train"], jax.local_devices()[:config.num_devices
                                                       or None]))
  template = train.initial_state(program, config, dataset.x[:1])
  with checkpoint_lib.Checkpointer(directory) as checkpointer:
    _, state, _ = checkpointer.restore_latest(template)
  return result, state.params


def test_warmup_linear_rises_then_decays_to_zero_with_traced_lengths():
  unit = optimizers.SCHEDULES["warmup_linear"](2.0, 100, 20)
  values = [float(unit(count)) for count in (0, 10, 20, 60, 100, 150)]
  np.testing.assert_allclose(values, [0.0, 1.0, 2.0, 1.0, 0.0, 0.0],
                             atol=1e-6)
  traced = jax.jit(lambda total, warmup, count: optimizers.SCHEDULES[
      "warmup_linear"](2.0, total, warmup)(count))
  counts = jnp.arange(0, 120, 7)
  np.testing.assert_allclose(
      traced(jnp.float32(100), jnp.float32(20), counts),
      jax.vmap(unit)(counts), rtol=1e-6)
  no_warmup = optimizers.SCHEDULES["warmup_linear"](1.0, 10, 0)
  assert float(no_warmup(0)) == 1.0


@pytest.mark.parametrize("trial_map", ["vmap", "unroll"])
@pytest.mark.parametrize("optimizer, learning_rates", [
    ("msgd", (0.05, 0.2)), ("sngm", (0.1, 0.4))])
def test_each_vmapped_trial_equals_its_single_run(dataset, tmp_path,
                                                  optimizer, learning_rates,
                                                  trial_map):
  # Two trials that differ in all three traced settings: learning rate,
  # weight decay and the length of the linear decay.
  points = [{"learning_rate": learning_rates[0], "weight_decay": 1e-4,
             "epochs": 3.0},
            {"learning_rate": learning_rates[1], "weight_decay": 1e-3,
             "epochs": 2.0}]
  base = _base(optimizer=optimizer)
  configs = [trials.trial_config(base, point, warmup_fraction=0.2)
             for point in points]
  runs, state = trials.train_program(configs, dataset, eval_every=EVAL_EVERY,
                                     trial_map=trial_map)
  assert runs[0].extra["program"]["trial_map"] == trial_map
  assert [run.final["steps"] for run in runs] == [15, 10]
  finals = []
  for index, (config, run) in enumerate(zip(configs, runs)):
    result, params = _single_run(config, dataset, tmp_path / str(index))
    trial_params = jax.tree.map(lambda leaf, i=index: leaf[i], state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=2e-5, atol=2e-6), trial_params, params)
    history = result["history"]
    assert [r["steps"] for r in run.curve] == [r["steps"] for r in history]
    for key in ("val_accuracy", "test_accuracy", "samples_seen", "epoch"):
      assert [r[key] for r in run.curve] == pytest.approx(
          [r[key] for r in history], abs=1e-9), key
    for key in ("val_loss", "train_loss", "learning_rate"):
      assert [r[key] for r in run.curve] == pytest.approx(
          [r[key] for r in history], rel=1e-5), key
    assert run.final["samples_seen"] == result["samples_seen"]
    assert run.status == sweep.status_of(result["final"], 10)
    finals.append(run.final["val_loss"])
  # The hyperparameters really differ per trial.
  assert finals[0] != pytest.approx(finals[1], rel=1e-3)


def test_trials_on_two_devices_match_one(dataset):
  points = [{"learning_rate": 0.05}, {"learning_rate": 0.2}]
  one = trials.train_trials(_base(), points, dataset, eval_every=EVAL_EVERY)
  two = trials.train_trials(_base(num_devices=2), points, dataset,
                            eval_every=EVAL_EVERY)
  for a, b in zip(one, two):
    assert [r["val_loss"] for r in a.curve] == pytest.approx(
        [r["val_loss"] for r in b.curve], rel=1e-5)


def test_steps_to_target_is_the_first_evaluation_at_or_above_it(dataset):
  points = [{"learning_rate": 0.1}, {"learning_rate": 0.3}]
  reference = trials.train_trials(_base(epochs=4.0), points, dataset,
                                  eval_every=2)
  accuracies = [r["val_accuracy"] for r in reference[1].curve]
  target = sorted(set(accuracies))[-2]  # reached, but not at once
  runs = trials.train_trials(_base(epochs=4.0), points, dataset,
                             eval_every=2, target=target)
  for run in runs:
    hits = [r for r in run.curve if r["val_accuracy"] >= target]
    expected = hits[0]["steps"] if hits else None
    assert run.final["steps_to_target"] == expected
    assert run.final["samples_to_target"] == (
        None if expected is None else expected * BATCH)
    assert run.settings["target"] == target
  assert runs[1].final["steps_to_target"] is not None
  assert [r["steps"] for r in runs[1].curve] == list(range(2, 21, 2))


def test_early_stop_when_every_trial_still_training_reached_the_target(
    dataset):
  points = [{"learning_rate": 0.2}, {"learning_rate": 0.3}]
  full = trials.train_trials(_base(epochs=4.0), points, dataset,
                             eval_every=2)
  target = min(max(r["val_accuracy"] for r in run.curve[:5]) for run in full)
  runs = trials.train_trials(_base(epochs=4.0), points, dataset,
                             eval_every=2, target=target, early_stop=True)
  stop = max(run.final["steps_to_target"] for run in runs)
  assert stop < 20
  for run, whole in zip(runs, full):
    assert run.final["steps"] == stop
    assert run.curve == [
        dict(r, wall_time_s=c["wall_time_s"])
        for r, c in zip(whole.curve[:len(run.curve)], run.curve)]
    assert run.extra["program"]["stopped_early"]


@pytest.mark.parametrize("early_stop", [False, True])
def test_without_test_every_eval_the_test_split_is_in_the_last_record_only(
    dataset, early_stop):
  # The first trial ends at its own length (10 steps), the second at 20 or,
  # with early_stop, at the first evaluation at or above the target.
  points = [{"learning_rate": 0.2, "epochs": 2.0}, {"learning_rate": 0.3}]
  full = trials.train_trials(_base(epochs=4.0), points, dataset,
                             eval_every=2)
  target = max(r["val_accuracy"] for r in full[1].curve[:7])
  options = dict(target=target, early_stop=True) if early_stop else {}
  runs = trials.train_trials(_base(epochs=4.0), points, dataset,
                             eval_every=2, test_every_eval=False, **options)
  if early_stop:
    assert runs[1].extra["program"]["stopped_early"]
    assert runs[1].final["steps"] < 20
  for run, whole in zip(runs, full):
    assert run.settings["test_every_eval"] is False
    assert [r["val_accuracy"] for r in run.curve] == [
        r["val_accuracy"] for r in whole.curve[:len(run.curve)]]
    assert all("test_accuracy" not in r for r in run.curve[:-1])
    last = whole.curve[len(run.curve) - 1]
    assert run.final["test_accuracy"] == last["test_accuracy"]
    assert run.final["test_loss"] == pytest.approx(last["test_loss"],
                                                   rel=1e-6)


def test_a_diverging_trial_is_diverged_and_leaves_the_others_alone(dataset):
  points = [{"learning_rate": 0.2}, {"learning_rate": 1e5},
            {"learning_rate": 0.3}]
  runs = trials.train_trials(_base(), points, dataset, eval_every=EVAL_EVERY,
                             trial_map="vmap")
  assert [run.status for run in runs][1] == sweep.DIVERGED
  assert "non-finite" in runs[1].error and runs[1].final is None
  alone = trials.train_trials(_base(), [points[0], points[2]], dataset,
                              eval_every=EVAL_EVERY, trial_map="vmap")
  for run, reference in zip([runs[0], runs[2]], alone):
    assert run.status == sweep.OK
    assert run.final["steps"] == 15
    assert run.final["val_loss"] == pytest.approx(
        reference.final["val_loss"], rel=1e-6)


def test_run_records_split_the_program_times_and_key_like_single_runs(
    dataset):
  points = [{"learning_rate": 0.05}, {"learning_rate": 0.1, "seed": 1}]
  runs = trials.train_trials(_base(), points, dataset, eval_every=5,
                             max_steps=7)
  # Another seed draws other batches: a program of its own.
  assert [run.extra["program"]["trials"] for run in runs] == [1, 1]
  assert [run.final["steps"] for run in runs] == [7, 7]
  for run, point in zip(runs, points):
    config = dataclasses.replace(_base(), **point)
    assert run.settings == {**sweep.config_settings(config), "eval_every": 5,
                            "step_budget": 7, "target": None,
                            "early_stop": False}
    program = run.extra["program"]
    assert run.run_time_s == pytest.approx(program["run_time_s"])
    assert run.compile_time_s == pytest.approx(program["compile_time_s"])
  split = trials.train_trials(_base(), [{"learning_rate": 0.05},
                                        {"learning_rate": 0.1}], dataset,
                              eval_every=5, max_steps=7, trials_per_program=1)
  assert [run.extra["program"]["trials"] for run in split] == [1, 1]
  assert split[0].final == dict(runs[0].final, wall_time_s=pytest.approx(
      split[0].final["wall_time_s"]))
  with pytest.raises(ValueError, match="fixed batch"):
    trials.train_trials(_base(adaptive_batch="norm", max_batch_size=128,
                              num_microbatches=2), points[:1], dataset,
                        eval_every=5)


def test_tune_together_trains_the_missing_trials_as_one_program(
    dataset, tmp_path, monkeypatch):
  search = sweep.QuasiRandom(
      {"learning_rate": sweep.Range(0.02, 0.5),
       "epochs": sweep.Range(1.0, 3.0, log=False)}, trial_budget=4)
  calls = []
  real = trials.train_program

  def counted(configs, *args, **kwargs):
    calls.append(len(configs))
    return real(configs, *args, **kwargs)

  monkeypatch.setattr(trials, "train_program", counted)
  store = sweep.RunStore(tmp_path / "runs.jsonl", {"batch_size": BATCH})
  trainer = sweep.VmappedTrainer(store, _base(), dataset,
                                 dict(eval_every=2, target=0.2,
                                      warmup_fraction=0.1))
  # One trial already in the store: only the other three train.
  trainer.train_together(search.points()[:1], seed=0)
  assert calls == [1]
  result = sweep.tune_together("msgd", trainer, search, seeds=(0, 1))
  assert calls == [1, 3, 1]  # the three missing; the pick's second seed
  assert result["search"]["trials_used"] == 4 and len(store) == 5
  pick = result["pick"]["point"]
  assert store.get(trainer.settings(pick, 0)).key == result["pick"]["key"]
  run = store.get(trainer.settings(pick, 0))
  assert run.settings["warmup_epochs"] == pytest.approx(
      0.1 * pick["epochs"])
  # Everything is stored now: nothing trains again, even after a reopen.
  reopened = sweep.VmappedTrainer(
      sweep.RunStore(tmp_path / "runs.jsonl", {"batch_size": BATCH}),
      _base(), dataset, trainer.options)
  again = sweep.tune_together("msgd", reopened, search, seeds=(0, 1))
  assert calls == [1, 3, 1] and again == result
