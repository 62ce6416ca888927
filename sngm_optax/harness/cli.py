"""Command line: `sngm-optax compare` (the main job) and `sngm-optax train`.

  sngm-optax compare --quick          # ~1.5 minutes on 2 CPU cores
  sngm-optax compare --out runs/cmp   # the benchmark preset (30 epochs)
  sngm-optax train --optimizer sngm --batch-size 4096 --lr 0.4 --epochs 30
  sngm-optax train --optimizer adadagrad_norm --lr 1 --adaptive-batch norm \
      --max-batch-size 1024 --initial-batch-size 32

Exit status: 0 done (or stopped by `max_steps`), 1 non-finite loss, 2 bad
arguments, 75 stopped by SIGTERM after writing a checkpoint (resume with
`--resume DIR`; a second SIGTERM ends the process at once).
"""

import argparse
import dataclasses
import os
import sys

from sngm_optax.harness import data as data_lib

_NO_DEFAULT = None


def _one_line(text: str) -> str:
  """`text` with control characters (newlines, ...) escaped: one line."""
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class _ArgumentParser(argparse.ArgumentParser):
  """Reports usage errors in one line (status 2), without the usage block."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} "
                 "--help)\n")


def _checked(convert, description: str, valid):
  """An argparse `type` converting with `convert` and checking `valid`."""

  def parse(text: str):
    try:
      value = convert(text)
    except ValueError:
      value = None
    if value is None or not valid(value):
      raise argparse.ArgumentTypeError(
          f"expected {description}, got {text!r}")
    return value

  return parse


_positive_int = _checked(int, "a positive integer", lambda v: v >= 1)
_non_negative_int = _checked(int, "an integer >= 0", lambda v: v >= 0)
_positive_float = _checked(float, "a positive number",
                           lambda v: 0 < v < float("inf"))


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("data")
  group.add_argument(
      "--data", metavar="PATH.npz", default=None,
      help="your own dataset: an .npz with x, y, x_test, y_test "
           "(default: MNIST-1D generated locally and cached)")
  group.add_argument(
      "--num-samples", type=_positive_int, default=_NO_DEFAULT,
      help="MNIST-1D size, train + test (80/20 split)")
  group.add_argument("--data-seed", type=_non_negative_int,
                     default=data_lib.DEFAULT_SEED,
                     help="seed of the generated MNIST-1D")
  group.add_argument(
      "--cache-dir", default=None,
      help="MNIST-1D cache directory (default: $SNGM_OPTAX_CACHE, else "
           "$XDG_CACHE_HOME/sngm_optax or ~/.cache/sngm_optax)")


def build_parser() -> argparse.ArgumentParser:
  """The `sngm-optax` argument parser."""
  from sngm_optax.harness import compare  # pylint: disable=g-import-not-at-top
  from sngm_optax.harness import optimizers  # pylint: disable=g-import-not-at-top

  parser = _ArgumentParser(
      prog="sngm-optax",
      description="Train MNIST-1D models with SNGM and large-batch "
                  "baselines.")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND")
  commands.required = True

  # compare ----------------------------------------------------------------
  cmp = commands.add_parser(
      "compare",
      help="the main job: SNGM vs momentum SGD, LARS and LAMB at a large "
           "batch, and momentum SGD at batch 128",
      description="Trains the same model with SNGM, momentum SGD, LARS and "
                  "LAMB at a large batch, and momentum SGD at a small batch, "
                  "each with the best learning rate from a grid of the same "
                  "size (picked on a validation split), then prints a table "
                  "and writes compare.json and compare.png.")
  cmp.add_argument("--quick", action="store_true",
                   help="small preset: 20k examples, batch 1024 vs 128, 20 "
                        "epochs, 3 learning rates each, a grid extended "
                        "where the pick is at its edge (a few minutes on 2 "
                        "CPU cores)")
  cmp.add_argument("--batch-size", type=_positive_int, default=_NO_DEFAULT,
                   help="the large batch size (default 4096; quick 1024)")
  cmp.add_argument("--small-batch-size", type=_positive_int,
                   default=_NO_DEFAULT,
                   help="batch size of the momentum-SGD reference (128)")
  cmp.add_argument("--epochs", type=_positive_float, default=_NO_DEFAULT,
                   help="training epochs for every run (default 30; quick 20)")
  cmp.add_argument("--grid-size", type=_positive_int, default=_NO_DEFAULT,
                   help="values per grid axis (learning rate, weight "
                        "decay) before any extension (default and at most "
                        "3)")
  cmp.add_argument("--optimizers", default=",".join(
      compare.LARGE_BATCH_OPTIMIZERS),
                   help="comma-separated large-batch optimizers "
                        f"(from {', '.join(sorted(compare.LR_GRIDS))})")
  cmp.add_argument("--extra-seeds", type=_non_negative_int, default=0,
                   help="retrain each picked learning rate with this many "
                        "more seeds and report mean ± sd (default 0)")
  cmp.add_argument("--no-small-batch", action="store_true",
                   help="skip the small-batch reference")
  cmp.add_argument("--model", choices=sorted(_models()), default=None,
                   help="model (default cnn)")
  cmp.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed of initialization and batch order")
  cmp.add_argument("--out", default="runs/compare",
                   help="output directory (default runs/compare)")
  cmp.add_argument("--quiet", action="store_true", help="print only the table")
  _add_data_arguments(cmp)

  # train ------------------------------------------------------------------
  trn = commands.add_parser(
      "train", help="one training run",
      description="Trains one model with one optimizer and writes "
                  "metrics.json.")
  trn.add_argument("--optimizer", choices=sorted(optimizers.OPTIMIZERS),
                   default="sngm", help="optimizer (default sngm)")
  trn.add_argument("--batch-size", type=_positive_int, default=None,
                   help="fixed batch size (default 4096)")
  trn.add_argument("--adaptive-batch", choices=optimizers.ADAPTIVE_TESTS,
                   default=None,
                   help="grow the batch with this AdAdaGrad batch-size test "
                        "in front of the optimizer (default for adadagrad and "
                        "adadagrad_norm: norm)")
  trn.add_argument("--max-batch-size", type=_positive_int, default=None,
                   help="cap of the adaptive batch size (required with "
                        "--adaptive-batch)")
  trn.add_argument("--initial-batch-size", type=_positive_int, default=None,
                   help="first batch size of an adaptive run (default 32)")
  trn.add_argument("--adaptive-statistics",
                   choices=("auto", "per_device", "microbatch"),
                   default="auto",
                   help="statistics of the test: per-device gradients (only "
                        "scalars all-reduced) or microbatch moments (default "
                        "auto: per_device on 2+ devices)")
  trn.add_argument("--lr", type=_positive_float, default=None,
                   help="peak learning rate (default: the benchmark's pick "
                        "for this optimizer at B=4096, or at B=128 for msgd "
                        "at small batches, scaled by the square root of the "
                        "batch-size ratio)")
  trn.add_argument("--epochs", type=_positive_float, default=30.0)
  trn.add_argument("--model", choices=sorted(_models()), default="cnn")
  trn.add_argument("--weight-decay", type=float, default=1e-4)
  trn.add_argument("--warmup-epochs", type=float, default=2.0)
  trn.add_argument("--num-microbatches", type=_positive_int, default=1,
                   help="split each batch into this many microbatches")
  trn.add_argument("--num-devices", type=_non_negative_int, default=0,
                   help="devices to split the batch over (0: all local)")
  trn.add_argument("--seed", type=_non_negative_int, default=0)
  trn.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="override any Config field, e.g. --set "
                        "'optimizer_kwargs={\"momentum\": 0.95}' (repeatable)")
  trn.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="save checkpoints (params, optimizer state, sampler "
                        "position) here at each epoch end, and on SIGTERM "
                        "before exiting with status 75")
  trn.add_argument("--checkpoint-every", type=_non_negative_int, default=0,
                   metavar="N", help="also checkpoint every N steps")
  trn.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run checkpointed in DIR with its saved "
                        "settings (other options but --out, --quiet and "
                        "--set are ignored)")
  trn.add_argument("--out", default="runs/train",
                   help="output directory (default runs/train)")
  trn.add_argument("--quiet", action="store_true")
  _add_data_arguments(trn)
  return parser


def _models():
  from sngm_optax.harness import models  # pylint: disable=g-import-not-at-top
  return models.MODELS


def _run_compare(args, parser) -> int:
  from sngm_optax.harness import compare  # pylint: disable=g-import-not-at-top

  preset = compare.PRESETS["quick" if args.quick else "default"]
  changes = {
      "large_batch": args.batch_size, "small_batch": args.small_batch_size,
      "epochs": args.epochs, "grid_size": args.grid_size,
      "num_samples": args.num_samples, "model": args.model,
  }
  preset = dataclasses.replace(
      preset, **{k: v for k, v in changes.items() if v is not None})
  optimizers = tuple(name.strip() for name in args.optimizers.split(",")
                     if name.strip())
  if not optimizers:
    parser.error("--optimizers: give at least one optimizer")
  result = compare.compare(
      preset, optimizers=optimizers,
      include_small_batch=not args.no_small_batch, data_path=args.data,
      cache_dir=args.cache_dir, seed=args.seed, data_seed=args.data_seed,
      out_dir=args.out, quiet=args.quiet, extra_seeds=args.extra_seeds)
  print(result["table"])
  if not args.quiet:
    print(f"wrote {os.path.join(args.out, 'compare.json')} and "
          f"{os.path.join(args.out, 'compare.png')} "
          f"({result['wall_time_s']:.0f} s)")
  return 0


def _run_train(args, parser) -> int:
  from sngm_optax.harness import compare  # pylint: disable=g-import-not-at-top
  from sngm_optax.harness import config as config_lib  # pylint: disable=g-import-not-at-top
  from sngm_optax.harness import optimizers  # pylint: disable=g-import-not-at-top

  if args.resume is not None:
    from sngm_optax.harness import checkpoint  # pylint: disable=g-import-not-at-top
    saved = checkpoint.saved_config(args.resume)
    saved.update(checkpoint_dir=args.resume, max_steps=0)
    try:
      config = config_lib.Config(**saved)
    except TypeError as error:
      raise ValueError(f"{args.resume}: incompatible checkpoint ({error})"
                       ) from None
    return _train_and_report(config_lib.override(config, args.overrides), args,
                             resume=True)
  adaptive_test = args.adaptive_batch
  if adaptive_test is None and args.optimizer in optimizers.ADAPTIVE_OPTIMIZERS:
    adaptive_test = "norm"
  adaptive = {}
  if adaptive_test is None:
    for flag in ("max_batch_size", "initial_batch_size"):
      if getattr(args, flag) is not None:
        parser.error(f"--{flag.replace('_', '-')} needs --adaptive-batch")
    if args.adaptive_statistics != "auto":
      parser.error("--adaptive-statistics needs --adaptive-batch")
    batch_size = 4096 if args.batch_size is None else args.batch_size
  else:
    if args.batch_size is not None:
      parser.error("--batch-size is fixed; with --adaptive-batch give "
                   "--initial-batch-size")
    if args.max_batch_size is None:
      parser.error("--adaptive-batch needs --max-batch-size")
    batch_size = args.initial_batch_size or 32
    adaptive = dict(adaptive_batch=adaptive_test,
                    max_batch_size=args.max_batch_size,
                    adaptive_statistics=args.adaptive_statistics)
  args.batch_size = batch_size
  learning_rate = args.lr
  if learning_rate is None:
    if not (args.optimizer in compare.LR_GRIDS
            or args.optimizer in compare.SMALL_BATCH_GRIDS):
      parser.error(f"--lr is required for {args.optimizer} (no benchmark "
                   "pick to default to)")
    learning_rate = compare.suggested_learning_rate(args.optimizer,
                                                    args.batch_size)
  config = config_lib.Config(
      data_path=args.data, data_seed=args.data_seed, cache_dir=args.cache_dir,
      model=args.model, optimizer=args.optimizer, learning_rate=learning_rate,
      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
      batch_size=args.batch_size, num_microbatches=args.num_microbatches,
      epochs=args.epochs, seed=args.seed, num_devices=args.num_devices,
      checkpoint_dir=args.checkpoint_dir,
      checkpoint_every_steps=args.checkpoint_every,
      **adaptive, **({} if args.num_samples is None
         else {"num_samples": args.num_samples}))
  return _train_and_report(config_lib.override(config, args.overrides), args)


def _train_and_report(config, args, resume: bool = False) -> int:
  from sngm_optax.harness import preemption  # pylint: disable=g-import-not-at-top
  from sngm_optax.harness import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from sngm_optax.harness import train  # pylint: disable=g-import-not-at-top

  try:
    # SIGTERM: finish the step, checkpoint, exit EXIT_PREEMPTED.
    with preemption.StopOnSignal() as stop_signal:
      result = train.train_and_evaluate(config, args.out, quiet=args.quiet,
                                        resume=resume)
  except steps_lib.NonFiniteLossError as error:
    print(f"sngm-optax train: error: {error}", file=sys.stderr)
    return 1
  if result["interrupted"] and stop_signal.requested:
    print(_preempted_line(stop_signal.signal_name, result, config))
    return preemption.EXIT_PREEMPTED
  if result["interrupted"]:
    print(f"stopped after step {result['steps']} of {result['total_steps']};"
          f" continue with: sngm-optax train --resume {config.checkpoint_dir}")
    return 0
  final = result["final"]
  if config.adaptive_batch:
    print(f"{config.optimizer} + {config.adaptive_batch} test: batch size "
          f"{config.batch_size} -> {max(result['batch_sizes'])}")
  print(f"{config.optimizer} B={config.batch_size} lr={config.learning_rate:g}"
        f": test accuracy {100 * final['test_accuracy']:.2f}% after "
        f"{result['steps']} steps ({result['wall_time_s']:.0f} s); wrote "
        f"{os.path.join(args.out, 'metrics.json')}")
  return 0


def _preempted_line(signal_name: str, result: dict, config) -> str:
  saved = (f"checkpoint in {config.checkpoint_dir}; continue with: "
           f"sngm-optax train --resume {config.checkpoint_dir}"
           if config.checkpoint_dir else
           "nothing saved (no --checkpoint-dir)")
  return (f"stopped by {signal_name} after step {result['steps']} of "
          f"{result['total_steps']}; {saved}")


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `sngm-optax` console script."""
  parser = build_parser()
  args = parser.parse_args(argv)
  handlers = {"compare": _run_compare, "train": _run_train}
  try:
    return handlers[args.command](args, parser)
  except ValueError as error:
    # Bad values found after parsing (batch larger than the data, a
    # malformed .npz, ...): one line, status 2, like argparse's own errors.
    subparser = f"{parser.prog} {args.command}"
    print(f"{subparser}: error: {_one_line(error)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
