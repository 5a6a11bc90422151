"""Serve LLaDA-MedV through an OpenAI-compatible API (chat completions with images, streaming by
block, request batching).

    python -m medv_jax.serve.api [--checkpoint DIR --tokenizer DIR] [--host 127.0.0.1 --port 8000]

Without --checkpoint / --tokenizer it serves the demo model (workdir/demo/model, trained by
``python -m medv_jax.train --config=configs/demo.py``) with the demo's settings. The sampler flags
(those of ``python -m medv_jax.generate``) are the defaults of every request, compiled at start-up
for each batch size; a request changes them with extra body fields (medv_jax/serve/openai_compat.py).
Binds to 127.0.0.1 unless --host says otherwise; --api_key (or MEDV_API_KEY) requires
``Authorization: Bearer KEY``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from medv_jax.models.layers import ATTENTION_CHOICES
from medv_jax.sampling import cli as sampling_cli
from medv_jax.sampling.diffusion import SamplerConfig
from medv_jax.serve import cli as serve_cli
from medv_jax.user_errors import CommandParser, UserError, command_name, run_command

COMMAND = "medv_jax.serve.api"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=command_name(COMMAND), description=__doc__.split("\n\n")[0])
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", default=None, help=f"converted checkpoint folder (default: {serve_cli.DEMO_WORKDIR}/model)")
    g.add_argument("--tokenizer", default=None, help=f"tokenizer folder (default: {serve_cli.DEMO_WORKDIR}/tokenizer)")
    sampling_cli.add_tokenizer_mismatch_arg(g)
    g.add_argument("--system_prompt", default=None,
                   help="medical|general|none|TEXT (default: none for the demo model, medical otherwise)")
    g.add_argument("--question_suffix", default="", help="appended to every question")
    g.add_argument("--param_dtype", default=None, help="cast the weights on load (e.g. bfloat16)")
    g.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    g.add_argument("--attention_impl", default=None, choices=ATTENTION_CHOICES)
    g.add_argument("--served_name", default=None, help="the model id clients name (default: the checkpoint folder's name)")
    sampling_cli.add_sampler_args(parser)
    parser.set_defaults(**{name: None for name in serve_cli.SAMPLER_FIELDS})
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    s.add_argument("--api_key", default=os.environ.get("MEDV_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $MEDV_API_KEY; none: open)")
    s.add_argument("--batch_sizes", default="1,2,4,8,16,32",
                   help="batch sizes compiled (a batch is padded to the next; the largest is the most "
                   "requests run together; default: 1,2,4,8,16,32)")
    s.add_argument("--batch_window_ms", type=float, default=20.0,
                   help="how long the first request of a batch waits for others (default: 20)")
    s.add_argument("--max_queue", type=int, default=256,
                   help="requests waiting beyond this are answered 503 with Retry-After (default: 256)")
    s.add_argument("--prompt_bucket", type=int, default=64,
                   help="prompts are padded to a multiple of this (default: 64)")
    s.add_argument("--no_warmup", action="store_true", help="compile on first use instead of at start-up")
    return parser


def batch_sizes_from(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise UserError(f"--batch_sizes {text!r}: give positive whole numbers separated by commas, e.g. 1,4,16") from None
    if not sizes or sizes[0] <= 0:
        raise UserError(f"--batch_sizes {text!r}: give positive whole numbers separated by commas, e.g. 1,4,16")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_serve, argv, COMMAND)


def _serve(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    checkpoint, tokenizer, is_demo = serve_cli.resolve_model_paths(args, parser)
    base = serve_cli.DEMO_SAMPLER if is_demo else SamplerConfig()
    for name in serve_cli.SAMPLER_FIELDS:
        if getattr(args, name) is None:
            setattr(args, name, getattr(base, name))
    defaults = sampling_cli.sampler_config_from(args, parser)
    sizes = batch_sizes_from(args.batch_sizes)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} must be in 0..65535")
    for flag, value in (("--max_queue", args.max_queue), ("--prompt_bucket", args.prompt_bucket)):
        if value <= 0:
            parser.error(f"{flag}={value} must be positive")
    if args.batch_window_ms < 0:
        parser.error(f"--batch_window_ms={args.batch_window_ms} must be >= 0")
    system_prompt = args.system_prompt or (serve_cli.DEMO_SYSTEM_PROMPT if is_demo else "medical")
    try:
        import uvicorn

        from medv_jax.serve import openai_compat as oc
    except ImportError as e:
        raise UserError(f"the API server needs fastapi and uvicorn ({e}): pip install 'medv_jax[serve]'") from None
    from medv_jax.sampling import api

    opened = api.open_checkpoint(
        checkpoint, tokenizer, param_dtype=args.param_dtype, dtype=args.dtype,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch, names=("--checkpoint", "--tokenizer"))
    t0 = time.perf_counter()
    model = api.load(
        checkpoint, tokenizer, opened=opened, system_prompt=system_prompt, question_suffix=args.question_suffix,
        param_dtype=args.param_dtype, dtype=args.dtype, attention_impl=args.attention_impl,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch, prompt_bucket=args.prompt_bucket,
    )
    print(f"loaded {checkpoint} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    batcher = oc.Batcher(model, batch_sizes=sizes, window_s=args.batch_window_ms / 1000, max_queue=args.max_queue)
    if not args.no_warmup:
        seconds = batcher.warm_up(oc.default_warm_up_rows(model), defaults)
        print(f"compiled the default settings for batch sizes {list(sizes)} in {seconds:.1f} s", file=sys.stderr)
    app = oc.build_app(model, batcher, defaults, served_name=args.served_name, api_key=args.api_key)

    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
