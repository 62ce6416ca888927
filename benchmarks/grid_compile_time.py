"""Compilation in a learning-rate x weight-decay grid at one grid point.

A grid point is one (optimizer, batch size, model). Its trials differ in
the peak learning rate and the weight decay; when both are values in the
optimizer state, the point compiles its train step once, whatever the grid.
This script trains a small grid through the harness's loop and counts, for
each run, the XLA compilations and the seconds JAX spent tracing, lowering
and compiling (JAX's own compile events, `jax.monitoring`), so it measures
any checkout of the harness the same way:

  git worktree add /tmp/before f408389   # the harness before the engine
  python benchmarks/grid_compile_time.py --before /tmp/before

Each checkout is measured in a child process that imports its harness.

Writes benchmarks/results/grid_compile_time.json.
"""

import argparse
import itertools
import json
import os
import pathlib
import subprocess
import sys

import _common

_common.force_host_devices(8)

import jax  # noqa: E402
from jax import monitoring  # noqa: E402

from sngm_optax.harness import config as config_lib  # noqa: E402
from sngm_optax.harness import data  # noqa: E402
from sngm_optax.harness import train  # noqa: E402

COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration",
                  "/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration")
_seconds = {"compile": 0.0, "backend_compiles": 0}


def _listen(event, duration, **_):
  if event in COMPILE_EVENTS:
    _seconds["compile"] += duration
  if event == COMPILE_EVENTS[0]:
    _seconds["backend_compiles"] += 1


def measure(args) -> list[dict]:
  """Trains the grid with the harness this process imports; one row a run."""
  monitoring.register_event_duration_secs_listener(_listen)
  dataset = data.generate_mnist1d(args.num_samples)
  rows = []
  for learning_rate, weight_decay in itertools.product(args.learning_rates,
                                                       args.weight_decays):
    before = dict(_seconds)
    config = config_lib.Config(
        optimizer=args.optimizer, model=args.model,
        batch_size=args.batch_size, epochs=1, warmup_epochs=0.5,
        learning_rate=learning_rate, weight_decay=weight_decay)
    train.train_and_evaluate(config, dataset=dataset, quiet=True)
    rows.append({
        "learning_rate": learning_rate, "weight_decay": weight_decay,
        "compile_s": _seconds["compile"] - before["compile"],
        "backend_compiles": (_seconds["backend_compiles"]
                             - before["backend_compiles"])})
  return rows


def _measure_checkout(checkout: pathlib.Path, argv: list[str]) -> list[dict]:
  """`measure` in a child process that imports the harness of `checkout`."""
  env = dict(os.environ, PYTHONPATH=str(checkout.resolve()))
  env.pop("XLA_FLAGS", None)
  child = subprocess.run([sys.executable, __file__, "--child", *argv],
                         env=env, capture_output=True, text=True, check=True)
  return json.loads(child.stdout.splitlines()[-1])


def _describe(checkout: pathlib.Path) -> str:
  """`git describe` of `checkout` ("+dirty" with uncommitted changes)."""
  described = subprocess.run(
      ["git", "describe", "--always", "--dirty=+dirty", "--abbrev=12"],
      cwd=checkout, capture_output=True, text=True, check=True)
  return described.stdout.strip()


def _summary(rows: list[dict]) -> dict:
  later = rows[1:]
  return {"runs": rows, "first_run_compile_s": rows[0]["compile_s"],
          "later_runs_compile_s": sum(row["compile_s"] for row in later),
          "later_runs_backend_compiles": sum(row["backend_compiles"]
                                             for row in later)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--optimizer", default="sngm")
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--batch-size", type=int, default=4096)
  parser.add_argument("--num-samples", type=int, default=6000)
  parser.add_argument("--learning-rates", type=float, nargs="+",
                      default=[0.2, 0.4, 0.8])
  parser.add_argument("--weight-decays", type=float, nargs="+",
                      default=[1e-5, 1e-4, 1e-3])
  parser.add_argument("--before", type=pathlib.Path, default=None,
                      help="another checkout to measure in the same run")
  parser.add_argument("--out", type=pathlib.Path,
                      default=_common.RESULTS / "grid_compile_time.json")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args, _ = parser.parse_known_args()
  if args.child:
    print(json.dumps(measure(args)))
    return
  grid_argv = [word for word in sys.argv[1:] if word != "--child"]
  machine = _common.machine_description()
  checkouts = {"after": pathlib.Path(__file__).resolve().parent.parent}
  if args.before is not None:
    checkouts["before"] = args.before
  results = {name: _summary(_measure_checkout(path, grid_argv))
             for name, path in checkouts.items()}
  record = _common.timing_record(
      "grid_compile_time",
      claim="one compiled train step serves every (learning rate, weight "
            "decay) trial of a grid point",
      command=_common.command_line(args, exclude=("out", "child")),
      machine=machine,
      budget={"optimizer": args.optimizer, "model": args.model,
              "batch_size": args.batch_size, "num_samples": args.num_samples,
              "learning_rates": args.learning_rates,
              "weight_decays": args.weight_decays, "epochs": 1},
      contenders=list(checkouts), checkouts={
          name: _describe(path) for name, path in checkouts.items()},
      jax=jax.__version__, **results)
  _common.write_json(args.out, record)
  for name, result in results.items():
    print(f"{name}: first run {result['first_run_compile_s']:.1f} s of "
          f"compilation; the other {len(result['runs']) - 1} runs "
          f"{result['later_runs_compile_s']:.1f} s "
          f"({result['later_runs_backend_compiles']} XLA compilations)")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
