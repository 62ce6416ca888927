"""Datasets for the harness: MNIST-1D generated locally, `.npz` files, sampling.

MNIST-1D (Greydanus 2020) is a 1-D analogue of MNIST: length-40 signals in 10
classes, small enough to train on a laptop CPU yet hard enough to separate
optimizers. It is generated here by the `mnist1d` package (a pure Python
loop, roughly 1 s per 4k samples on one core), never downloaded, and cached
as an `.npz` under the user's cache directory so that later runs start in
seconds.

The cache directory is, in order: the `cache_dir` argument, the environment
variable `SNGM_OPTAX_CACHE`, `$XDG_CACHE_HOME/sngm_optax`,
`~/.cache/sngm_optax`.
"""

import dataclasses
import os
import pathlib
import tempfile
import warnings
import numpy as np

SIGNAL_LENGTH = 40
NUM_CLASSES = 10
DEFAULT_NUM_SAMPLES = 60_000
DEFAULT_SEED = 0
_ARRAY_KEYS = ("x", "y", "x_test", "y_test")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test splits as NumPy arrays.

  Attributes:
    x: training inputs, float32, shape `[n, *feature_shape]`.
    y: training labels, int32 in `[0, num_classes)`, shape `[n]`.
    x_test: test inputs, float32, shape `[n_test, *feature_shape]`.
    y_test: test labels, int32, shape `[n_test]`.
    num_classes: number of classes.
  """

  x: np.ndarray
  y: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  @property
  def num_train(self) -> int:
    return len(self.y)

  @property
  def num_test(self) -> int:
    return len(self.y_test)

  def split_validation(self, fraction: float, seed: int = 0) -> tuple[
      "Dataset", tuple[np.ndarray, np.ndarray]]:
    """Holds out a random `fraction` of the training set for validation.

    Returns:
      `(dataset_without_validation, (x_val, y_val))`.
    """
    if not 0.0 < fraction < 1.0:
      raise ValueError(f"val_fraction must be in (0, 1), got {fraction!r}")
    order = np.random.default_rng(seed).permutation(self.num_train)
    num_val = max(1, int(round(fraction * self.num_train)))
    if num_val >= self.num_train:
      raise ValueError(
          f"val_fraction={fraction} leaves no training examples"
          f" out of {self.num_train}")
    val, train = order[:num_val], order[num_val:]
    rest = dataclasses.replace(self, x=self.x[train], y=self.y[train])
    return rest, (self.x[val], self.y[val])


def default_cache_dir() -> pathlib.Path:
  """The directory where generated datasets are cached (see module doc)."""
  if os.environ.get("SNGM_OPTAX_CACHE"):
    return pathlib.Path(os.environ["SNGM_OPTAX_CACHE"]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base).expanduser() / "sngm_optax"


def _mnist1d_cache_path(
    num_samples: int, seed: int, cache_dir: str | os.PathLike | None
) -> pathlib.Path:
  directory = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
  return directory / f"mnist1d_n{num_samples}_seed{seed}.npz"


def generate_mnist1d(num_samples: int, seed: int = DEFAULT_SEED) -> Dataset:
  """Generates MNIST-1D with the `mnist1d` package (80/20 train/test split).

  Args:
    num_samples: total number of examples (train + test); rounded down to a
      multiple of 10 by the generator, which makes the same number per class.
    seed: the generator's random seed.

  Returns:
    A `Dataset` with float32 inputs of shape `[n, 40]`.
  """
  if isinstance(num_samples, bool) or not isinstance(
      num_samples, (int, np.integer)) or num_samples < 20:
    raise ValueError(
        f"num_samples must be an integer >= 20, got {num_samples!r}")
  try:
    from mnist1d import data as mnist1d_data  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "generating MNIST-1D needs the `mnist1d` package: "
        'pip install "sngm-optax[harness]"') from error
  args = mnist1d_data.get_dataset_args(as_dict=False)
  args.num_samples = int(num_samples)
  args.seed = int(seed)
  # make_dataset only generates; get_dataset would try to download.
  raw = mnist1d_data.make_dataset(args)
  return Dataset(
      x=raw["x"].astype(np.float32),
      y=raw["y"].astype(np.int32),
      x_test=raw["x_test"].astype(np.float32),
      y_test=raw["y_test"].astype(np.int32),
      num_classes=NUM_CLASSES,
  )


def _save_npz_atomically(path: pathlib.Path, dataset: Dataset) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  # A temporary name in the same directory, then an atomic rename: readers
  # never see a partial file, and concurrent writers do not collide.
  handle, temporary = tempfile.mkstemp(
      dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
  try:
    with os.fdopen(handle, "wb") as stream:
      np.savez(stream, x=dataset.x, y=dataset.y, x_test=dataset.x_test,
               y_test=dataset.y_test)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates files as 0600
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def load_mnist1d(
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = DEFAULT_SEED,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
  """Returns MNIST-1D from the cache, generating and caching it if needed.

  A cache file that cannot be read or does not hold the expected arrays
  (a partial write, a corrupt file) is regenerated with a warning.

  Args:
    num_samples: total number of examples (train + test).
    seed: the generator's random seed.
    cache_dir: cache directory; by default `default_cache_dir()`.

  Returns:
    A `Dataset` with 80% of the examples for training, 20% for testing.
  """
  path = _mnist1d_cache_path(num_samples, seed, cache_dir)
  if path.exists():
    try:
      return load_npz(path, num_classes=NUM_CLASSES,
                      expected_sizes=_split_sizes(num_samples),
                      expected_feature_shape=(SIGNAL_LENGTH,))
    except ValueError as error:
      warnings.warn(f"regenerating the unreadable dataset cache {path}: "
                    f"{error}", stacklevel=2)
  dataset = generate_mnist1d(num_samples, seed)
  _save_npz_atomically(path, dataset)
  return dataset


def _split_sizes(num_samples: int) -> tuple[int, int]:
  total = (num_samples // NUM_CLASSES) * NUM_CLASSES
  num_train = int(total * 0.8)  # the generator's train_split
  return num_train, total - num_train


# Labels must be class indices 0..k-1 with k below this (when k is inferred).
MAX_INFERRED_CLASSES = 2**16


def load_npz(
    path: str | os.PathLike,
    num_classes: int | None = None,
    expected_sizes: tuple[int, int] | None = None,
    expected_feature_shape: tuple[int, ...] | None = None,
) -> Dataset:
  """Loads and validates a dataset saved as `.npz` with x, y, x_test, y_test.

  Args:
    path: the file; `x` and `x_test` are float arrays `[n, ...]` with the same
      feature shape, `y` and `y_test` integer labels `[n]`.
    num_classes: number of classes; by default `max(label) + 1`.
    expected_sizes: if given, the required `(n_train, n_test)`.
    expected_feature_shape: if given, the required shape of one input.

  Returns:
    A validated `Dataset` (float32 inputs, int32 labels).

  Raises:
    ValueError: naming the file and the offending key, for a missing or
      unreadable file, a missing key, a wrong rank or shape, mismatched
      lengths, non-integer or out-of-range labels, non-finite inputs.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"{path}: no such file")
  try:
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
      raise ValueError("a single array, not an .npz archive")
    with archive:
      arrays = {key: archive[key] for key in _ARRAY_KEYS
                if key in archive.files}
  except Exception as error:  # pylint: disable=broad-except
    # Truncated or corrupt files fail in many ways (zipfile, zlib, pickle
    # refusal, reshape errors); all mean the same thing to the caller.
    raise ValueError(f"{path}: not a readable .npz file ({error})") from None
  missing = [key for key in _ARRAY_KEYS if key not in arrays]
  if missing:
    raise ValueError(
        f"{path}: missing key(s) {', '.join(missing)}; an .npz dataset "
        f"needs {', '.join(_ARRAY_KEYS)}")
  return _validate(path, arrays, num_classes, expected_sizes,
                   expected_feature_shape)


def _validate(path, arrays, num_classes, expected_sizes,
              expected_feature_shape) -> Dataset:
  for key in ("x", "x_test"):
    array = arrays[key]
    if array.ndim < 2:
      raise ValueError(f"{path}: key '{key}' must have rank >= 2 "
                       f"[examples, features...], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(
        array.dtype, np.complexfloating):
      raise ValueError(
          f"{path}: key '{key}' must hold real numbers, got {array.dtype}")
    if not np.all(np.isfinite(array)):
      raise ValueError(f"{path}: key '{key}' contains non-finite values")
  if arrays["x"].shape[1:] != arrays["x_test"].shape[1:]:
    raise ValueError(
        f"{path}: key 'x_test' has feature shape {arrays['x_test'].shape[1:]}"
        f" but 'x' has {arrays['x'].shape[1:]}")
  if (expected_feature_shape is not None
      and arrays["x"].shape[1:] != tuple(expected_feature_shape)):
    raise ValueError(
        f"{path}: key 'x' has feature shape {arrays['x'].shape[1:]}, "
        f"expected {tuple(expected_feature_shape)}")
  for key in ("y", "y_test"):
    labels = arrays[key]
    if labels.ndim != 1:
      raise ValueError(f"{path}: key '{key}' must have rank 1 [examples], "
                       f"got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(
          f"{path}: key '{key}' must hold integer labels, got {labels.dtype}")
  for inputs, labels in (("x", "y"), ("x_test", "y_test")):
    if len(arrays[inputs]) != len(arrays[labels]):
      raise ValueError(
          f"{path}: key '{labels}' has {len(arrays[labels])} labels but "
          f"'{inputs}' has {len(arrays[inputs])} examples")
    if len(arrays[labels]) == 0:
      raise ValueError(f"{path}: key '{labels}' is empty")
  if expected_sizes is not None:
    sizes = (len(arrays["y"]), len(arrays["y_test"]))
    if sizes != tuple(expected_sizes):
      raise ValueError(f"{path}: key 'y' / 'y_test' have {sizes} examples, "
                       f"expected {tuple(expected_sizes)}")
  if num_classes is None:
    largest = int(max(arrays["y"].max(), arrays["y_test"].max()))
    if largest >= MAX_INFERRED_CLASSES:
      # Most likely corrupt or unencoded labels (ids, hashes): a classifier
      # head with that many outputs would not fit in memory anyway.
      raise ValueError(
          f"{path}: labels go up to {largest}, beyond "
          f"{MAX_INFERRED_CLASSES - 1}: encode them as 0..k-1")
    num_classes = largest + 1
  for key in ("y", "y_test"):
    labels = arrays[key]
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(
          f"{path}: key '{key}' has labels outside [0, {num_classes}): "
          f"min {labels.min()}, max {labels.max()}")
  return Dataset(
      x=arrays["x"].astype(np.float32),
      y=arrays["y"].astype(np.int32),
      x_test=arrays["x_test"].astype(np.float32),
      y_test=arrays["y_test"].astype(np.int32),
      num_classes=int(num_classes),
  )


@dataclasses.dataclass(frozen=True)
class SamplerState:
  """Where an `EpochSampler` is: save it with a checkpoint to resume.

  Attributes:
    seed: the seed of the per-epoch permutations.
    epoch: the current epoch (0-based).
    position: how many examples of the current epoch were already served.
  """

  seed: int
  epoch: int = 0
  position: int = 0


class EpochSampler:
  """Serves index batches that visit every example exactly once per epoch.

  Each epoch is a fresh permutation of `range(num_examples)` drawn from
  `(seed, epoch)`, so the order is reproducible and a saved `state` resumes
  the same sequence. The batch size is chosen per call, so a controller may
  grow it mid-epoch; a batch that runs past the end of an epoch continues
  with the next epoch's permutation (batches keep their size and no example
  is skipped or repeated within an epoch).

  Example:
    >>> sampler = EpochSampler(num_examples=5, seed=0)
    >>> first = sampler.next_batch(3); second = sampler.next_batch(2)
    >>> sorted(first.tolist() + second.tolist())
    [0, 1, 2, 3, 4]
    >>> sampler.samples_seen, sampler.state.epoch
    (5, 1)
  """

  def __init__(self, num_examples: int, seed: int = 0,
               state: SamplerState | None = None):
    if isinstance(num_examples, bool) or not isinstance(
        num_examples, (int, np.integer)) or num_examples < 1:
      raise ValueError(
          f"num_examples must be a positive integer, got {num_examples!r}")
    self.num_examples = int(num_examples)
    self._state = SamplerState(seed=int(seed)) if state is None else state
    if not 0 <= self._state.position < self.num_examples:
      raise ValueError(f"state.position must be in [0, {self.num_examples}),"
                       f" got {self._state.position}")
    self._order = self._permutation(self._state.epoch)

  def _permutation(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._state.seed, epoch])
    return rng.permutation(self.num_examples)

  @property
  def state(self) -> SamplerState:
    return self._state

  @property
  def samples_seen(self) -> int:
    """Examples served since epoch 0 began."""
    return self._state.epoch * self.num_examples + self._state.position

  @property
  def epochs_seen(self) -> float:
    return self.samples_seen / self.num_examples

  def next_batch(self, batch_size: int) -> np.ndarray:
    """Returns the next `batch_size` example indices (int64)."""
    if isinstance(batch_size, bool) or not isinstance(
        batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(
          f"batch_size must be a positive integer, got {batch_size!r}")
    pieces = []
    needed = int(batch_size)
    epoch, position = self._state.epoch, self._state.position
    while needed:
      take = min(needed, self.num_examples - position)
      pieces.append(self._order[position:position + take])
      position += take
      needed -= take
      if position == self.num_examples:
        epoch, position = epoch + 1, 0
        self._order = self._permutation(epoch)
    self._state = dataclasses.replace(self._state, epoch=epoch,
                                      position=position)
    return np.concatenate(pieces)
