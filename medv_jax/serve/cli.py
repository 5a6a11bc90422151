"""Serve LLaDA-MedV in the browser: chat with a medical image and watch the answer unmask.

    python -m medv_jax.serve [--checkpoint DIR --tokenizer DIR] [--host 127.0.0.1 --port 7860]

Without --checkpoint / --tokenizer it serves the model that
``python -m medv_jax.train --config=configs/demo.py`` writes (workdir/demo/model, with its
tokenizer in workdir/demo/tokenizer), opening with the demo's settings (no system prompt, answers of
up to 4 tokens). The model is loaded and compiled once at start-up; requests are queued (one
generation at a time). The server binds to 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from medv_jax.sampling import cli as sampling_cli
from medv_jax.sampling.diffusion import SamplerConfig
from medv_jax.user_errors import CommandParser, UserError, command_name, run_command

COMMAND = "medv_jax.serve"
DEMO_WORKDIR = os.path.join("workdir", "demo")  # configs/demo.py's c.workdir
# configs/demo.py trains without a system prompt (c.data.system_prompt) and evaluates with
# gen_length = block_length = steps = 4 (c.eval); tests/serve checks these against the config.
DEMO_SYSTEM_PROMPT = "none"
DEMO_SAMPLER = SamplerConfig(gen_length=4, block_length=4, steps=4)
# Prompts are padded to a multiple of this many tokens: a chat recompiles only when its prompt
# crosses into a new bucket.
PROMPT_BUCKET = 128
SAMPLER_FIELDS = ("gen_length", "block_length", "steps", "temperature", "remasking", "cfg_scale")

HOW_TO_TRAIN = (
    "train the demo model first (under 10 minutes on a 2-core CPU): "
    "python -m medv_jax.train --config=configs/demo.py; "
    "or serve another checkpoint with --checkpoint DIR --tokenizer DIR"
)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=command_name(COMMAND),
        description=__doc__.split("\n\n")[0],
        epilog="The sampler flags (those of python -m medv_jax.generate, fast modes included) set the "
        "settings the page opens with and compiles at start-up (default: the demo's 4 / 4 / 4 for the "
        "demo model, else the paper's VQA 128 / 128 / 128).",
    )
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", default=None, help=f"converted checkpoint folder (default: {DEMO_WORKDIR}/model)")
    g.add_argument("--tokenizer", default=None, help=f"tokenizer folder (default: {DEMO_WORKDIR}/tokenizer)")
    sampling_cli.add_tokenizer_mismatch_arg(g)
    g.add_argument(
        "--system_prompt",
        default=None,
        help="medical|general|none|TEXT (default: none for the demo model, medical otherwise)",
    )
    g.add_argument("--question_suffix", default="", help="appended to every question")
    sampling_cli.add_weight_args(g)
    # The page opens with these settings and compiles them at start-up.
    sampling_cli.add_sampler_args(parser)
    parser.set_defaults(**{name: None for name in SAMPLER_FIELDS})
    s = parser.add_argument_group("server")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 exposes the demo to the network)"
    )
    s.add_argument("--port", type=int, default=7860, help="(default: 7860)")
    s.add_argument(
        "--examples_dir", default=None, help="where the example files go (default: ~/.cache/medv_jax/serve_examples)"
    )
    s.add_argument(
        "--replay_seconds", type=float, default=2.0, help="duration of the unmasking replay (default: 2; 0: off)"
    )
    s.add_argument(
        "--prompt_bucket",
        type=int,
        default=PROMPT_BUCKET,
        help=f"prompts are padded to a multiple of this (default: {PROMPT_BUCKET})",
    )
    s.add_argument("--max_queue", type=int, default=32, help="requests waiting beyond this are refused (default: 32)")
    s.add_argument("--no_warmup", action="store_true", help="skip the start-up compilation")
    return parser


def resolve_model_paths(args, parser) -> tuple[str, str, bool]:
    """(checkpoint, tokenizer, is_demo); exits with a how-to when the demo model is missing."""
    if args.checkpoint is None and args.tokenizer is None:
        ckpt, tok = os.path.join(DEMO_WORKDIR, "model"), os.path.join(DEMO_WORKDIR, "tokenizer")
        if not (os.path.isdir(ckpt) and os.path.isdir(tok)):
            raise UserError(f"no demo model at {os.path.abspath(ckpt)}: {HOW_TO_TRAIN}")
        return ckpt, tok, True
    if args.checkpoint is None or args.tokenizer is None:
        parser.error("give both --checkpoint and --tokenizer (or neither, to serve the demo model)")
    return args.checkpoint, args.tokenizer, False


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_serve, argv, COMMAND)


def _serve(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    checkpoint, tokenizer, is_demo = resolve_model_paths(args, parser)
    base = DEMO_SAMPLER if is_demo else SamplerConfig()
    for name in SAMPLER_FIELDS:
        if getattr(args, name) is None:
            setattr(args, name, getattr(base, name))
    defaults = sampling_cli.sampler_config_from(args, parser)
    if args.prompt_bucket <= 0:
        parser.error(f"--prompt_bucket={args.prompt_bucket} must be positive")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} must be in 0..65535")
    system_prompt = args.system_prompt or (DEMO_SYSTEM_PROMPT if is_demo else "medical")
    # Everything but the weights is checked before anything heavy loads.
    from medv_jax.sampling import api

    opened = api.open_checkpoint(
        checkpoint, tokenizer, param_dtype=args.param_dtype, dtype=args.dtype,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch, names=("--checkpoint", "--tokenizer"))

    try:
        from medv_jax.serve import app as app_lib  # imports gradio (telemetry off)
    except ImportError as e:
        raise UserError(f"the web demo needs gradio ({e}): pip install 'medv_jax[serve]'") from None
    from medv_jax.serve import engine as eng
    from medv_jax.serve import examples as examples_lib

    t0 = time.perf_counter()
    model = api.load(
        checkpoint,
        tokenizer,
        opened=opened,
        system_prompt=system_prompt,
        question_suffix=args.question_suffix,
        param_dtype=args.param_dtype,
        dtype=args.dtype,
        attention_impl=args.attention_impl,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
        weight_quant=args.weight_quant,
        merge_adapters=args.merge_adapters,
    )
    print(f"loaded {checkpoint} in {time.perf_counter() - t0:.1f} s")
    engine = eng.Engine(model, prompt_bucket=args.prompt_bucket)

    examples_dir = args.examples_dir or str(examples_lib.default_dir())
    size = model.config.vision.image_size if model.takes_images else 64
    rows = examples_lib.write_examples(examples_dir, image_size=size) if model.takes_images else []

    note = ""
    if not args.no_warmup:
        # Compile the start-up settings for an ordinary first question (an example, if any).
        t0 = time.perf_counter()
        try:
            image = eng.load_image(model, rows[0][0], rows[0][2])[1] if rows else None
            question = rows[0][1] if rows else "What is shown?"
            answer = engine.answer([], question, image, defaults, args.seed)
            print(
                f"compiled the start-up settings in {time.perf_counter() - t0:.1f} s "
                f"(one answer: {answer.sample_s:.3f} s, {answer.steps_used} steps)"
            )
        except eng.UserError as e:
            note = f"Start-up settings do not fit this model ({e}); change them below."
            print(f"warning: {note}", file=sys.stderr)

    demo = app_lib.build_app(
        engine,
        defaults=defaults,
        seed=args.seed,
        examples=rows,
        replay_seconds=args.replay_seconds,
        startup_note=note,
    )
    demo.queue(default_concurrency_limit=1, max_size=args.max_queue)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        allowed_paths=[examples_dir],
        show_error=True,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        css=app_lib.CSS,
    )
    return 0
