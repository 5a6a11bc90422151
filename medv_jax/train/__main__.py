"""``python -m medv_jax.train --config=configs/stage2.py [--config.field=value ...] [--workdir DIR]``.

Trains (or resumes, when the workdir already holds checkpoints) and prints a short summary.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "an ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and the model go (default: config.workdir)")


def main(argv):
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


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
