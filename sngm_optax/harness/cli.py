"""Command line: `sngm-optax compare` (the main job), `sngm-optax train` and
`sngm-optax noise-scale`.

  sngm-optax compare --quick          # ~1.5 minutes on 2 CPU cores
  sngm-optax compare --out runs/cmp   # the benchmark preset (30 epochs)
  sngm-optax train --optimizer sngm --batch-size 4096 --lr 0.4 --epochs 30
  sngm-optax train --optimizer adadagrad_norm --lr 1 --adaptive-batch norm \
      --max-batch-size 1024 --initial-batch-size 32
  sngm-optax noise-scale --model cnn --num-samples 20000 --epochs 5 \
      --batch-size 1024 --lr 0.4 --plot runs/noise_scale/noise_scale.png

`noise-scale` trains one run (the options of `train`) with
`sngm_optax.noise_scale_monitor` in place of the device mean, prints the
gradient noise scale B_simple at each epoch's end and the batch sizes it
suggests (`sngm_optax.harness.noise_scale`). The monitor needs 2+ devices:
on CPU the command makes XLA show `--num-devices` host devices (default 8)
before JAX starts.

Exit status: 0 done (or stopped by `max_steps`), 1 non-finite loss, 2 bad
arguments, 75 stopped by SIGTERM after writing a checkpoint (resume with
`--resume DIR`; a second SIGTERM ends the process at once).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import typing

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
  """An argparse `type` converting with `convert` and checking `valid`
  (for `compare`'s own options; `train`'s are `Config`'s, see
  `_config_type`)."""

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


# Config fields whose flag is not `--field-name` (README.md and scripts
# use these spellings).
FLAG_ALIASES = {
    "learning_rate": "--lr",
    "data_path": "--data",
    "checkpoint_every_steps": "--checkpoint-every",
}
# The fields of the `data` group, shared by `train` and `compare`.
DATA_FIELDS = ("data_path", "num_samples", "data_seed", "cache_dir")
# The first batch of an adaptive run when --initial-batch-size is not given
# (Config's batch_size default is a fixed batch's).
ADAPTIVE_INITIAL_BATCH_SIZE = 32
# `noise-scale`'s simulated CPU devices when --num-devices is not given.
NOISE_SCALE_HOST_DEVICES = 8
# Config fields without a `noise-scale` flag: the monitor is on, and it
# measures fixed-batch runs only (Config refuses the others).
NOT_NOISE_SCALE_FIELDS = ("monitor_noise_scale", "adaptive_batch",
                          "max_batch_size", "adaptive_statistics",
                          "batch_ramp")
# `train`'s and `noise-scale`'s rule when --lr is not given.
LEARNING_RATE_DEFAULT = (
    "the benchmark's pick for this optimizer at B=4096, or at B=128 for msgd "
    "at small batches, scaled by the square root of the batch-size ratio")


def _flag(name: str) -> str:
  return FLAG_ALIASES.get(name, "--" + name.replace("_", "-"))


def _value_type(field: dataclasses.Field) -> type:
  """The field's type without `| None`."""
  types = [t for t in typing.get_args(field.type) if t is not type(None)]
  return types[0] if types else field.type


def _config_type(field: dataclasses.Field):
  """An argparse `type` for `field`: converts the text to the field's type
  and applies the field's own check (`Config`'s metadata), so a bad value
  fails while parsing, naming the flag."""
  from sngm_optax.harness import config as config_lib  # pylint: disable=g-import-not-at-top
  value_type = _value_type(field)
  check = field.metadata["check"]
  if value_type is dict:
    convert = json.loads
  elif value_type is bool:
    convert = {"true": True, "false": False}.__getitem__
  else:
    convert = value_type
  choices = config_lib.choices_of(field)
  if check is None:
    return None if choices else convert

  def parse(text: str):
    try:
      value = convert(text)
      check.check(field.name, value)
    except (ValueError, KeyError):
      raise argparse.ArgumentTypeError(
          f"expected {check.description}, got {text!r}") from None
    return value

  return parse


def _add_config_arguments(group, fields, own_defaults=None) -> None:
  """Adds a flag for each `Config` field in `fields`, with the field's type,
  check, choices and help; an absent flag leaves the field to `Config`'s
  default (`argparse.SUPPRESS`: the flag is then missing from the args),
  or to the command's own rule described in `own_defaults[name]`."""
  from sngm_optax.harness import config as config_lib  # pylint: disable=g-import-not-at-top
  own_defaults = own_defaults or {}
  for field in fields:
    help_text = field.metadata["help"]
    if field.name in own_defaults:
      help_text += f" (default: {own_defaults[field.name]})"
    elif field.default not in (None, dataclasses.MISSING):
      help_text += f" (default: {field.default})"
    choices = config_lib.choices_of(field)
    group.add_argument(
        _flag(field.name), dest=field.name, type=_config_type(field),
        choices=choices, default=argparse.SUPPRESS,
        metavar=None if choices else field.name.upper(),
        help=help_text.replace("%", "%%"))


def _config_fields(names=None) -> list:
  from sngm_optax.harness import config as config_lib  # pylint: disable=g-import-not-at-top
  fields = dataclasses.fields(config_lib.Config)
  return [f for f in fields if names is None or f.name in names]


def _add_data_arguments(parser: argparse.ArgumentParser,
                        own_defaults=None) -> None:
  _add_config_arguments(parser.add_argument_group("data"),
                        _config_fields(DATA_FIELDS), own_defaults)


def _add_run_arguments(parser: argparse.ArgumentParser, exclude=(),
                       own_defaults=None):
  """Adds a flag per `Config` field but the data's and `exclude`, in a
  `run` group (returned), and `--set`."""
  run = parser.add_argument_group("run (the fields of Config)")
  _add_config_arguments(
      run, [f for f in _config_fields()
            if f.name not in DATA_FIELDS + tuple(exclude)], own_defaults)
  parser.add_argument(
      "--set", dest="overrides", action="append", default=[],
      metavar="KEY=VALUE",
      help="override any Config field, e.g. --set "
           "'optimizer_kwargs={\"momentum\": 0.95}' (repeatable)")
  return run


def build_parser() -> argparse.ArgumentParser:
  """The `sngm-optax` argument parser."""
  from sngm_optax.harness import compare  # pylint: disable=g-import-not-at-top

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
                   help="model (default: the preset's)")
  _add_config_arguments(cmp, _config_fields(("seed",)))
  cmp.add_argument("--out", default="runs/compare",
                   help="output directory (default runs/compare)")
  cmp.add_argument("--quiet", action="store_true", help="print only the table")
  _add_data_arguments(cmp, {"num_samples": "the preset's"})

  # train ------------------------------------------------------------------
  # One flag per Config field (its type, check, choices and help come from
  # Config), plus the command's own options.
  trn = commands.add_parser(
      "train", help="one training run",
      description="Trains one model with one optimizer and writes "
                  "metrics.json. Options not given take Config's defaults.")
  run = _add_run_arguments(trn, own_defaults={
      "learning_rate": LEARNING_RATE_DEFAULT,
      "adaptive_batch": "none; norm for adadagrad and adadagrad_norm"})
  batch_size, = _config_fields(("batch_size",))
  run.add_argument("--initial-batch-size", type=_config_type(batch_size),
                   default=argparse.SUPPRESS,
                   help="first batch size of an adaptive run, i.e. "
                        "batch_size (default "
                        f"{ADAPTIVE_INITIAL_BATCH_SIZE})")
  trn.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run checkpointed in DIR with its saved "
                        "settings (other options but --out, --quiet and "
                        "--set are ignored)")
  trn.add_argument("--out", default="runs/train",
                   help="output directory (default runs/train)")
  trn.add_argument("--quiet", action="store_true")
  _add_data_arguments(trn)

  # noise-scale ------------------------------------------------------------
  nsc = commands.add_parser(
      "noise-scale",
      help="the gradient noise scale B_simple along one run, and the batch "
           "sizes it suggests",
      description="Trains one model with one optimizer (train's options), "
                  "with sngm_optax.noise_scale_monitor chained first in "
                  "place of the device mean, prints B_simple (McCandlish et "
                  "al.'s simple noise scale, from the per-device and the "
                  "global batch) at each epoch's end and the batch sizes it "
                  "suggests, and writes noise_scale.json. It needs 2+ "
                  "devices: on CPU it simulates them. Options not given "
                  "take Config's defaults.")
  _add_run_arguments(nsc, exclude=NOT_NOISE_SCALE_FIELDS, own_defaults={
      "learning_rate": LEARNING_RATE_DEFAULT,
      "num_devices": f"{NOISE_SCALE_HOST_DEVICES} simulated devices on CPU, "
                     "else all local devices"})
  nsc.add_argument("--plot", default=None, metavar="PATH",
                   help="also save B_simple against samples seen (log "
                        "scale) as a PNG at PATH")
  nsc.add_argument("--out", default="runs/noise_scale",
                   help="output directory of noise_scale.json (default "
                        "runs/noise_scale)")
  nsc.add_argument("--quiet", action="store_true",
                   help="print only the table and the sentence")
  _add_data_arguments(nsc)
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
      "num_samples": getattr(args, "num_samples", None), "model": args.model,
  }
  preset = dataclasses.replace(
      preset, **{k: v for k, v in changes.items() if v is not None})
  optimizers = tuple(name.strip() for name in args.optimizers.split(",")
                     if name.strip())
  if not optimizers:
    parser.error("--optimizers: give at least one optimizer")
  # The data and seed flags given (absent ones keep compare's defaults).
  given = {name: getattr(args, name) for name in (*DATA_FIELDS, "seed")
           if name != "num_samples" and hasattr(args, name)}
  result = compare.compare(
      preset, optimizers=optimizers,
      include_small_batch=not args.no_small_batch, out_dir=args.out,
      quiet=args.quiet, extra_seeds=args.extra_seeds, **given)
  print(result["table"])
  if not args.quiet:
    print(f"wrote {os.path.join(args.out, 'compare.json')} and "
          f"{os.path.join(args.out, 'compare.png')} "
          f"({result['wall_time_s']:.0f} s)")
  return 0


def _run_train(args, parser) -> int:
  from sngm_optax.harness import config as config_lib  # pylint: disable=g-import-not-at-top

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
  given = _given_config_fields(args)
  _apply_adaptive_flags(given, args, parser)
  _default_learning_rate(given, parser)
  config = config_lib.Config(**given)
  return _train_and_report(config_lib.override(config, args.overrides), args)


def _given_config_fields(args) -> dict:
  """The Config fields whose flags were given."""
  return {f.name: getattr(args, f.name) for f in _config_fields()
          if hasattr(args, f.name)}


def _default_learning_rate(given: dict, parser) -> None:
  """Sets `given["learning_rate"]` by `LEARNING_RATE_DEFAULT` unless --lr
  was given."""
  from sngm_optax.harness import compare  # pylint: disable=g-import-not-at-top
  if "learning_rate" in given:
    return
  optimizer = given.get("optimizer", _config_default("optimizer"))
  if not (optimizer in compare.LR_GRIDS
          or optimizer in compare.SMALL_BATCH_GRIDS):
    parser.error(f"--lr is required for {optimizer} (no benchmark "
                 "pick to default to)")
  given["learning_rate"] = compare.suggested_learning_rate(
      optimizer, given.get("batch_size", _config_default("batch_size")))


def _config_default(name: str):
  from sngm_optax.harness import config as config_lib  # pylint: disable=g-import-not-at-top
  return getattr(config_lib.Config(), name)


def _apply_adaptive_flags(given: dict, args, parser) -> None:
  """The command's rules for a growing batch, applied to `given` (the
  Config fields from flags): adadagrad(_norm) default to the norm test, and
  an adaptive run's first batch is `--initial-batch-size`, not
  `--batch-size`."""
  from sngm_optax.harness import optimizers  # pylint: disable=g-import-not-at-top
  initial = getattr(args, "initial_batch_size", None)
  optimizer = given.get("optimizer", _config_default("optimizer"))
  if ("adaptive_batch" not in given
      and optimizer in optimizers.ADAPTIVE_OPTIMIZERS):
    given["adaptive_batch"] = "norm"
  if given.get("adaptive_batch") is None:
    if "max_batch_size" in given and "batch_ramp" not in given:
      parser.error("--max-batch-size needs --adaptive-batch (or "
                   "--batch-ramp)")
    if initial is not None:
      parser.error("--initial-batch-size needs --adaptive-batch")
    if "adaptive_statistics" in given:
      parser.error("--adaptive-statistics needs --adaptive-batch")
    return
  if "batch_size" in given:
    parser.error("--batch-size is fixed; with --adaptive-batch give "
                 "--initial-batch-size")
  if "max_batch_size" not in given:
    parser.error("--adaptive-batch needs --max-batch-size")
  given["batch_size"] = (ADAPTIVE_INITIAL_BATCH_SIZE if initial is None
                         else initial)


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


def _use_host_devices(count: int) -> str:
  """Makes the CPU show `count` XLA devices if JAX has not started yet
  (`jax_num_cpu_devices`, XLA's `--xla_force_host_platform_device_count`);
  returns JAX's default platform.

  Raises:
    ValueError: JAX already runs on the CPU with fewer devices.
  """
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backends have started: too late to change
    pass
  platform, available = jax.default_backend(), jax.local_device_count()
  if platform == "cpu" and available < count:
    raise ValueError(
        f"JAX has already started with {available} CPU device(s), fewer "
        f"than {count}: set XLA_FLAGS=--xla_force_host_platform_device_count="
        f"{count} before Python starts (or ask for --num-devices "
        f"{available})")
  return platform


def _run_noise_scale(args, parser) -> int:
  from sngm_optax.harness import config as config_lib  # pylint: disable=g-import-not-at-top
  from sngm_optax.harness import noise_scale  # pylint: disable=g-import-not-at-top
  from sngm_optax.harness import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from sngm_optax.harness import train  # pylint: disable=g-import-not-at-top

  given = _given_config_fields(args)
  _default_learning_rate(given, parser)
  # Before anything starts JAX: the CPU's devices are fixed from then on.
  count = given.get("num_devices") or NOISE_SCALE_HOST_DEVICES
  if _use_host_devices(count) == "cpu":
    given.setdefault("num_devices", count)
  config = config_lib.override(
      config_lib.Config(**given, monitor_noise_scale=True), args.overrides)
  try:
    result = noise_scale.measure(config, quiet=args.quiet)
  except steps_lib.NonFiniteLossError as error:
    print(f"sngm-optax noise-scale: error: {error}", file=sys.stderr)
    return 1
  print(noise_scale.format_table(result))
  print(noise_scale.summary(result))
  path = os.path.join(args.out, "noise_scale.json")
  train.write_json(pathlib.Path(path), result)
  if args.plot:
    noise_scale.save_plot(result, args.plot)
  if not args.quiet:
    plot = f" and {args.plot}" if args.plot else ""
    print(f"wrote {path}{plot} ({result['wall_time_s']:.0f} s)")
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
  handlers = {"compare": _run_compare, "train": _run_train,
              "noise-scale": _run_noise_scale}
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
