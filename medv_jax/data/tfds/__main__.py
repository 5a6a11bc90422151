"""Build the VQA TFDS datasets from manual folders:

    python -m medv_jax.data.tfds build NAME --manual_dir DIR [--data_dir DIR]
    python -m medv_jax.data.tfds show NAME:SPLIT [--data_dir DIR] [-n 3]

NAME: vqa_rad, slake, path_vqa or llava_med.
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

from medv_jax.user_errors import CommandParser, command_name, run_command

COMMAND = "medv_jax.data.tfds"


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_tfds, argv, COMMAND, user_errors=(ValueError, OSError))


def _tfds(argv: list[str]) -> int:
    parser = CommandParser(prog=command_name(COMMAND), description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a dataset from its release in a manual folder")
    b.add_argument("name")
    b.add_argument("--manual_dir", "--manual-dir", required=True, help="folder holding the official release")
    b.add_argument("--data_dir", "--data-dir", default=None, help="TFDS data folder (default ~/tensorflow_datasets)")
    s = sub.add_parser("show", help="print the first records of NAME:SPLIT as read_split gives them")
    s.add_argument("spec")
    s.add_argument("--data_dir", "--data-dir", default=None)
    s.add_argument("-n", type=int, default=3)
    args = parser.parse_args(argv)
    from medv_jax.data import tfds as builders
    from medv_jax.data import tfds_vqa

    if args.command == "build":
        built = builders.build(args.name, args.manual_dir, args.data_dir)
        for split, info in sorted(built.info.splits.items()):
            n_q = len(tfds_vqa.read_split(f"{built.name}:{split}", args.data_dir))
            print(f"{built.name}:{split}: {info.num_examples} examples, {n_q} records")
        print(f"built in {built.data_dir}")
    else:
        if args.n < 0:
            parser.error(f"-n {args.n} must be >= 0")
        for rec in tfds_vqa.read_split(args.spec, args.data_dir)[: args.n]:
            print(json.dumps(rec, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
