"""Tests of sngm_optax.harness.data: MNIST-1D cache, .npz validation, epoch sampler."""

import os
import pathlib
import warnings

import numpy as np
import pytest

from sngm_optax.harness import data

NUM_SAMPLES = 200  # generation takes ~0.1 s


@pytest.fixture(name="cache_dir")
def fixture_cache_dir(tmp_path) -> pathlib.Path:
  return tmp_path / "cache"


def _cache_file(cache_dir: pathlib.Path) -> pathlib.Path:
  (path,) = cache_dir.glob("*.npz")
  return path


def test_generated_dataset_has_expected_shapes_and_labels(cache_dir):
  dataset = data.load_mnist1d(NUM_SAMPLES, seed=3, cache_dir=cache_dir)
  assert dataset.x.shape == (160, 40) and dataset.x.dtype == np.float32
  assert dataset.x_test.shape == (40, 40)
  assert dataset.y.dtype == np.int32 and dataset.y_test.shape == (40,)
  # The generator makes the same number of examples per class.
  counts = np.bincount(np.concatenate([dataset.y, dataset.y_test]),
                       minlength=10)
  np.testing.assert_array_equal(counts, np.full(10, NUM_SAMPLES // 10))
  assert dataset.num_classes == 10


def test_cache_round_trip_returns_identical_arrays(cache_dir):
  first = data.load_mnist1d(NUM_SAMPLES, seed=3, cache_dir=cache_dir)
  path = _cache_file(cache_dir)
  assert "n200" in path.name and "seed3" in path.name
  modified = path.stat().st_mtime_ns
  second = data.load_mnist1d(NUM_SAMPLES, seed=3, cache_dir=cache_dir)
  assert path.stat().st_mtime_ns == modified  # read, not regenerated
  for key in ("x", "y", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(first, key), getattr(second, key))
  assert not list(cache_dir.glob("*.tmp"))  # no temporary file left over


def test_cache_is_keyed_by_size_and_seed(cache_dir):
  a = data.load_mnist1d(NUM_SAMPLES, seed=1, cache_dir=cache_dir)
  b = data.load_mnist1d(NUM_SAMPLES, seed=2, cache_dir=cache_dir)
  c = data.load_mnist1d(300, seed=1, cache_dir=cache_dir)
  assert len(list(cache_dir.glob("*.npz"))) == 3
  assert not np.array_equal(a.x, b.x)
  assert c.num_train == 240


def test_environment_variable_selects_the_cache_directory(tmp_path,
                                                          monkeypatch):
  monkeypatch.setenv("SNGM_OPTAX_CACHE", str(tmp_path / "from_env"))
  assert data.default_cache_dir() == tmp_path / "from_env"
  data.load_mnist1d(NUM_SAMPLES)
  assert len(list((tmp_path / "from_env").glob("*.npz"))) == 1
  monkeypatch.delenv("SNGM_OPTAX_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert data.default_cache_dir() == tmp_path / "xdg" / "sngm_optax"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle",
                                    "missing_key", "wrong_shape"])
def test_corrupt_cache_is_regenerated_with_a_warning(cache_dir, damage):
  reference = data.load_mnist1d(NUM_SAMPLES, seed=0, cache_dir=cache_dir)
  path = _cache_file(cache_dir)
  if damage == "truncate":
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  elif damage == "garbage":
    path.write_bytes(os.urandom(1000))
  elif damage == "pickle":
    with open(path, "wb") as stream:
      np.save(stream, np.array([{"a": 1}], dtype=object), allow_pickle=True)
  elif damage == "missing_key":
    _save(path, x=reference.x, y=reference.y, x_test=reference.x_test)
  elif damage == "wrong_shape":
    _save(path, x=reference.x[:, :20], y=reference.y,
          x_test=reference.x_test[:, :20], y_test=reference.y_test)
  with pytest.warns(UserWarning, match="regenerating"):
    dataset = data.load_mnist1d(NUM_SAMPLES, seed=0, cache_dir=cache_dir)
  np.testing.assert_array_equal(dataset.x, reference.x)
  # The cache was repaired: the next load is silent.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    data.load_mnist1d(NUM_SAMPLES, seed=0, cache_dir=cache_dir)


def _save(path, **arrays):
  with open(path, "wb") as stream:
    np.savez(stream, **arrays)
  return path


def _valid_arrays():
  rng = np.random.default_rng(0)
  return {
      "x": rng.normal(size=(12, 5)).astype(np.float32),
      "y": np.arange(12) % 3,
      "x_test": rng.normal(size=(6, 5)),
      "y_test": np.arange(6) % 3,
  }


def test_load_npz_accepts_a_valid_file(tmp_path):
  path = _save(tmp_path / "ok.npz", **_valid_arrays())
  dataset = data.load_npz(path)
  assert dataset.num_classes == 3
  assert dataset.x.dtype == np.float32 and dataset.x_test.dtype == np.float32
  assert dataset.y.dtype == np.int32
  np.testing.assert_allclose(dataset.x_test, _valid_arrays()["x_test"],
                             rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("y_test"), "missing key.*y_test"),
    (lambda a: a.update(x=a["x"][:, 0]), "'x' must have rank >= 2"),
    (lambda a: a.update(x_test=a["x_test"][:, :4]), "'x_test' has feature"),
    (lambda a: a.update(y=a["y"][:, None]), "'y' must have rank 1"),
    (lambda a: a.update(y=a["y"][:-1]), "'y' has 11 labels but 'x' has 12"),
    (lambda a: a.update(y_test=a["y_test"] + 0.5), "'y_test' must hold int"),
    (lambda a: a.update(y=a["y"] - 1), "'y' has labels outside"),
    (lambda a: a.update(x=np.where(a["x"] > 1, np.nan, a["x"])),
     "'x' contains non-finite"),
    (lambda a: a.update(x_test=np.full((6, 5), np.inf)),
     "'x_test' contains non-finite"),
    (lambda a: a.update(x=a["x"].astype(str)), "'x' must hold real numbers"),
    (lambda a: a.update(y=a["y"][:0], x=a["x"][:0]), "'y' is empty"),
])
def test_load_npz_names_the_offending_key(tmp_path, change, message):
  arrays = _valid_arrays()
  change(arrays)
  path = _save(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match=message):
    data.load_npz(path)


def test_load_npz_rejects_labels_beyond_num_classes(tmp_path):
  path = _save(tmp_path / "ok.npz", **_valid_arrays())
  with pytest.raises(ValueError, match="'y' has labels outside \\[0, 2\\)"):
    data.load_npz(path, num_classes=2)


@pytest.mark.parametrize("content", [b"", b"not a zip file", None])
def test_load_npz_unreadable_or_missing_file(tmp_path, content):
  path = tmp_path / "broken.npz"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(ValueError, match="broken.npz"):
    data.load_npz(path)


def test_split_validation_is_disjoint_and_complete():
  dataset = data.Dataset(x=np.arange(20, dtype=np.float32)[:, None],
                         y=np.arange(20, dtype=np.int32) % 10,
                         x_test=np.zeros((2, 1), np.float32),
                         y_test=np.zeros(2, np.int32), num_classes=10)
  rest, (x_val, _) = dataset.split_validation(0.25, seed=1)
  assert len(x_val) == 5 and rest.num_train == 15
  combined = np.sort(np.concatenate([rest.x[:, 0], x_val[:, 0]]))
  np.testing.assert_array_equal(combined, np.arange(20))


def _served(sampler, batch_sizes):
  return np.concatenate([sampler.next_batch(b) for b in batch_sizes])


@pytest.mark.parametrize("batch_sizes", [
    [7] * 20,                      # batches straddle epoch boundaries
    [1, 2, 3, 5, 8, 13, 21, 34, 3, 50],  # growing mid-epoch, > num_examples
    [23] * 6,
])
def test_sampler_serves_each_example_once_per_epoch(batch_sizes):
  num_examples = 23
  sampler = data.EpochSampler(num_examples, seed=5)
  served = _served(sampler, batch_sizes)
  assert sampler.samples_seen == len(served) == sum(batch_sizes)
  complete = len(served) // num_examples
  for epoch in range(complete):
    chunk = served[epoch * num_examples:(epoch + 1) * num_examples]
    np.testing.assert_array_equal(np.sort(chunk), np.arange(num_examples))
  rest = served[complete * num_examples:]
  assert len(set(rest.tolist())) == len(rest)  # partial epoch: no repeats
  assert sampler.state.epoch == complete
  assert sampler.state.position == len(rest)


def test_sampler_shuffles_differently_each_epoch_and_per_seed():
  epochs = _served(data.EpochSampler(50, seed=0), [50, 50]).reshape(2, 50)
  assert not np.array_equal(epochs[0], epochs[1])
  other = _served(data.EpochSampler(50, seed=1), [50])
  assert not np.array_equal(epochs[0], other)
  assert not np.array_equal(epochs[0], np.arange(50))


def test_sampler_state_restores_the_same_sequence():
  sampler = data.EpochSampler(31, seed=9)
  _served(sampler, [4, 9, 30])  # stop mid-epoch 1
  saved = sampler.state
  expected = _served(sampler, [6, 17, 40])
  resumed = data.EpochSampler(31, state=saved)
  np.testing.assert_array_equal(_served(resumed, [6, 17, 40]), expected)
  # A different batch split from the same state serves the same stream.
  resplit = data.EpochSampler(31, state=saved)
  np.testing.assert_array_equal(_served(resplit, [63]), expected)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_sampler_rejects_bad_batch_sizes(bad):
  with pytest.raises(ValueError, match="batch_size must be a positive"):
    data.EpochSampler(10).next_batch(bad)


def test_sampler_rejects_bad_sizes_and_states():
  with pytest.raises(ValueError, match="num_examples"):
    data.EpochSampler(0)
  with pytest.raises(ValueError, match="position"):
    data.EpochSampler(10, state=data.SamplerState(seed=0, position=10))
