"""Fuzz-style tests of the command line and of the .npz loader.

Random and malformed argv: status 2 with exactly one line on stderr and no
traceback (or, when the arguments happen to be valid, a call of the stubbed
training function). Malformed .npz files: a `ValueError` from the library,
and one line with status 2 through the CLI.
"""

import contextlib
import io
import zipfile
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sngm_optax.harness import cli
from sngm_optax.harness import compare
from sngm_optax.harness import data
from sngm_optax.harness import train

OPTIONS = [
    "--optimizer", "--batch-size", "--lr", "--epochs", "--model",
    "--weight-decay", "--warmup-epochs", "--num-microbatches", "--num-devices",
    "--seed", "--set", "--out", "--quiet", "--data", "--num-samples",
    "--data-seed", "--cache-dir", "--checkpoint-dir", "--checkpoint-every",
    "--resume", "--quick", "--small-batch-size", "--grid-size",
    "--optimizers", "--extra-seeds", "--no-small-batch", "--help-me", "-x",
]
VALUES = [
    "0", "-1", "1", "2", "1.5", "1e400", "nan", "inf", "-inf", "", " ",
    "sngm", "adam2", "mlp", "cnn", "abc", "epochs=", "=1", "batch_size=0",
    "optimizer_kwargs={", "optimizer_kwargs=[1]", "max_steps=-1",
    "learning_rate=1e999", "num_devices=99", "\x00", "é", "--", "-",
    "/nonexistent/dir", "keep_checkpoints=0", "checkpoint_every_steps=true",
]

argv_strategy = st.tuples(
    st.sampled_from(["train", "compare", "fly", "", "--version"]),
    st.lists(st.one_of(st.sampled_from(OPTIONS), st.sampled_from(VALUES),
                       st.text(max_size=6)), max_size=8),
).map(lambda t: [t[0], *t[1]])


class _Stubbed(Exception):
  """Raised by the stubs: the arguments were valid and training would run."""


def _run(argv):
  err, out = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    try:
      status = cli.main(argv)
    except SystemExit as exit_:
      status = exit_.code
    except _Stubbed:
      status = "stubbed"
  return status, out.getvalue(), err.getvalue()


def _stub(*args, **kwargs):
  raise _Stubbed


@settings(max_examples=150, deadline=None)
@given(argv_strategy)
def test_random_argv_exits_2_with_one_line_or_reaches_training(argv):
  with mock.patch.object(train, "train_and_evaluate", _stub), \
       mock.patch.object(compare, "compare", _stub), \
       mock.patch.object(data, "load_mnist1d", _stub):
    status, _, err = _run(argv)
  assert "Traceback" not in err
  if status == "stubbed":
    return  # valid arguments: training would have started
  if status == 0:  # --help of a subcommand
    assert "-h" in argv or "--help" in argv
    return
  assert status == 2, (argv, status, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1, (argv, err)
  assert lines[0].startswith("sngm-optax"), lines


def _valid():
  rng = np.random.default_rng(0)
  return {"x": rng.normal(size=(40, 5)), "y": np.arange(40) % 3,
          "x_test": rng.normal(size=(10, 5)), "y_test": np.arange(10) % 3}


def _write(path, arrays):
  with open(path, "wb") as stream:
    np.savez(stream, **arrays)
  return path


MALFORMED = {
    "missing key": lambda a: a.pop("x_test"),
    "wrong shape": lambda a: a.update(x_test=a["x_test"][:, :3]),
    "labels out of range": lambda a: a.update(y=a["y"] + 2**40 * (a["y"] == 2)),
    "negative labels": lambda a: a.update(y_test=a["y_test"] - 1),
    "NaN x": lambda a: a.update(x=np.where(a["x"] > 1, np.nan, a["x"])),
    "object arrays": lambda a: a.update(y=a["y"].astype(object)),
    "float labels": lambda a: a.update(y=a["y"] + 0.25),
    "scalar x": lambda a: a.update(x=np.float64(1.0)),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_npz_is_a_value_error_and_exit_2(tmp_path, kind):
  arrays = _valid()
  MALFORMED[kind](arrays)
  path = tmp_path / "bad.npz"
  _write(path, arrays)  # object arrays are pickled by savez
  with pytest.raises(ValueError, match="bad.npz"):
    data.load_npz(path)
  status, out, err = _run(["train", "--data", str(path), "--lr", "0.1"])
  assert status == 2 and out == ""
  assert len(err.strip().splitlines()) == 1 and "bad.npz" in err, err
  assert "Traceback" not in err


@pytest.mark.parametrize("content", [
    b"", b"\x00" * 100, b"PK\x03\x04garbage", b"\x93NUMPY\x01\x00garbage",
])
def test_not_an_npz_is_a_value_error_and_exit_2(tmp_path, content):
  path = tmp_path / "junk.npz"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="junk.npz"):
    data.load_npz(path)
  status, _, err = _run(["train", "--data", str(path), "--lr", "0.1"])
  assert status == 2 and len(err.strip().splitlines()) == 1, err


def test_a_directory_or_a_plain_npy_is_refused(tmp_path):
  npy = tmp_path / "single.npz"
  with open(npy, "wb") as stream:
    np.save(stream, np.zeros(3))
  for path in (tmp_path, npy):
    with pytest.raises(ValueError):
      data.load_npz(path)
    status, _, err = _run(["train", "--data", str(path), "--lr", "0.1"])
    assert status == 2 and len(err.strip().splitlines()) == 1, err


@settings(max_examples=25, deadline=None)
@given(st.floats(0.0, 0.999), st.booleans())
def test_truncated_or_damaged_npz_is_a_value_error(tmp_path_factory, fraction,
                                                   flip):
  directory = tmp_path_factory.mktemp("npz")
  good = _write(directory / "good.npz", _valid())
  content = bytearray(good.read_bytes())
  if flip:  # damage one byte in place (CRC / header / data)
    index = int(fraction * len(content))
    content[index] ^= 0xFF
  else:
    content = content[:int(fraction * len(content))]
  path = directory / "damaged.npz"
  path.write_bytes(bytes(content))
  try:
    loaded = data.load_npz(path)
  except ValueError as error:
    assert "damaged.npz" in str(error)
    status, _, err = _run(["train", "--data", str(path), "--lr", "0.1",
                           "--epochs", "1e-9"])
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    return
  # A flipped byte in a float payload may leave a valid file: then it loads
  # as a well-formed dataset.
  assert flip and loaded.x.shape == (40, 5)
  assert zipfile.is_zipfile(path)
