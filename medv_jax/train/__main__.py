"""``python -m medv_jax.train --config=configs/stage2.py [--config.field=value ...] [--workdir DIR]``.

Trains (or resumes, when the workdir already holds checkpoints) and prints a short summary. A
mistake in the flags or the config (a missing file, an unknown or unset field) is reported in one
line, exit status 2, before a workdir exists; ``--debug`` adds the traceback.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from medv_jax.user_errors import DEBUG_FLAG, UserError, command_name, run_command

COMMAND = "medv_jax.train"
_CONFIG = config_flags.DEFINE_config_file("config", None, "an ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and the model go (default: config.workdir)")
flags.DEFINE_boolean(DEBUG_FLAG[2:], False, "show the full traceback of an error in what was given")


def config_flag_values(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the --config file, the dotted fields of its --config.FIELD=VALUE overrides) in ``argv``."""
    path, fields = None, []
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            fields.append(arg[len("--config."):].split("=", 1)[0])
    return path, fields


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with every mistake a UserError: the config file and each overridden
    field are checked (naming the closest existing fields) before absl applies them."""
    from medv_jax.train.chain import check_field, load_config_file

    path, fields = config_flag_values(argv[1:])
    if any(arg.split("=")[0] in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
        return flags.FLAGS(argv)  # absl prints the help
    if not path:
        raise UserError("--config is not set: give a config file, e.g. --config=configs/demo.py")
    file = path.split(":", 1)[0]  # a config file may take an argument: FILE:ARG
    if not os.path.isfile(file):
        raise UserError(f"--config {path!r}: no such file; the configs are in configs/ (e.g. configs/demo.py)")
    config = load_config_file(file, path.split(":", 1)[1] if ":" in path else None)
    for field in fields:
        check_field(config, field, f"--config.{field}")
    # Parsed afresh on each call (one process may train twice): the override flags an earlier
    # parse registered go first.
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise UserError(str(e)) from None


def _train(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from medv_jax.sharding import DistributedSetupError
    from medv_jax.train.trainer import train

    config = _CONFIG.value
    try:
        summary = train(config, _WORKDIR.value or config.workdir)
    except DistributedSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    printable = {k: v for k, v in summary.items() if k not in ("vqa", "reports")}
    for key in ("vqa", "reports"):
        if key in summary:
            printable[key] = {k: v for k, v in summary[key].items() if k != "examples"}
    print("summary:", json.dumps(printable, indent=2, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    def run(args: list[str]) -> int:
        saved = sys.argv
        command = [saved[0] if saved else command_name(COMMAND), *args]
        sys.argv = command  # config_flags reads its overrides from sys.argv
        try:
            app.run(_train, argv=command, flags_parser=parse_flags)
        except SystemExit as e:  # app.run ends in sys.exit
            # sys.exit() and sys.exit(None) are success; a message (str) is a failure
            return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        finally:
            sys.argv = saved
        return 0

    return run_command(run, argv, COMMAND, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
