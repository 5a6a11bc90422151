"""Command line: ``python -m tools.convert_weights --src DIR --dst DIR`` (see --help)."""
from __future__ import annotations

import os
import sys
import time

from medv_jax.user_errors import CommandParser, UserError, command_name, existing_path, run_command
from tools.convert_weights.convert import VISION_VARIANTS, ConversionError, export_checkpoint, import_checkpoint

COMMAND = "tools.convert_weights"


def main(argv: list[str] | None = None) -> int:
    return run_command(_convert, argv, COMMAND, user_errors=(ConversionError, FileExistsError, FileNotFoundError))


def _convert(argv: list[str]) -> int:
    parser = CommandParser(
        prog=command_name(COMMAND),
        description="Convert a Hugging Face LLaDA / LLaDA-V / LLaDA-MedV / SigLIP checkpoint folder "
        "into a medv_jax checkpoint (orbax params + config.json), or export one back with --export.",
    )
    parser.add_argument("--src", required=True, help="source folder")
    parser.add_argument("--dst", required=True, help="destination folder (must not exist unless --overwrite)")
    parser.add_argument("--export", action="store_true",
                        help="export a medv_jax checkpoint (--src) to Hugging Face safetensors (--dst)")
    parser.add_argument("--dtype", default="auto",
                        help="parameter dtype of the converted checkpoint: auto (the source's), float32, bfloat16")
    parser.add_argument("--vision_config", default=None,
                        help="SigLIP config.json (or its folder) for a multimodal checkpoint whose config only "
                        "names its vision tower; default: the config's vision_config, else the so400m preset")
    parser.add_argument("--vision_variant", default="llada_v", choices=VISION_VARIANTS,
                        help="for a SigLIP checkpoint: llada_v drops the last layer and post-LN (as LLaDA-V/MedV), "
                        "full keeps every layer and post-LN")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="--export: safetensors shard size")
    parser.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    args = parser.parse_args(argv)
    existing_path("--src", args.src, "folder")
    if os.path.exists(os.path.expanduser(args.dst)) and not args.overwrite:
        raise UserError(f"--dst {args.dst!r} already exists: choose a new folder or pass --overwrite")
    if args.dtype != "auto":
        import jax.numpy as jnp

        try:
            jnp.dtype(args.dtype)
        except TypeError:
            raise UserError(f"--dtype {args.dtype!r} is not a dtype: use auto, float32 or bfloat16") from None
    if args.max_shard_gb <= 0:
        raise UserError(f"--max_shard_gb={args.max_shard_gb} must be positive")
    start = time.time()
    if args.export:
        config = export_checkpoint(args.src, args.dst, args.overwrite, int(args.max_shard_gb * 1024**3))
    else:
        config = import_checkpoint(args.src, args.dst, args.dtype, args.vision_config,
                                   args.vision_variant, args.overwrite, progress=True)
    print(f"wrote {args.dst} ({type(config).__name__}) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
