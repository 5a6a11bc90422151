"""Answer one question about one image with LLaDA-MedV.

    python -m medv_jax.generate --checkpoint DIR --tokenizer DIR --image PATH \\
        --question TEXT [--gen_length 128 --block_length 128 --steps 128 --temperature 0 \\
        --remasking low_confidence --cfg_scale 0 --seed 0] [--json] [--show_steps] \\
        [--cache prefix|dual --cache_refresh 8] [--threshold 0.9] [--adaptive_stop]

Builds the docs/algorithm.md §3 prompt (system prompt selectable), runs the jitted sampler and prints the
answer. ``--json`` prints the answer, its token ids, the steps used, the cache refreshes and
timings (load, preprocess, compile, sample). ``--show_steps`` prints the answer canvas after
every step, masked positions shown as ``_`` (replayed from the step each token was committed at).
A LLaDA (text-only) checkpoint works without ``--image``. Mistakes in the flags, the files or
the question are reported in one line (exit status 2) before the weights load. The fast modes (``--cache``,
``--threshold``, ``--adaptive_stop``; see ``medv_jax.sampling.diffusion``) are opt-in.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import jax

from medv_jax.sampling import cli
from medv_jax.sampling.diffusion import replay
from medv_jax.user_errors import CommandParser, UserError, command_name, run_command

COMMAND = "medv_jax.generate"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=command_name(COMMAND), description=__doc__.split("\n\n")[0])
    cli.add_model_args(parser)
    parser.add_argument("--image", default=None, help="image file (PNG/JPEG/..., or DICOM .dcm)")
    parser.add_argument("--question", required=True, help="the question (any <image> in it is removed)")
    cli.add_image_args(parser)
    cli.add_sampler_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the answer")
    parser.add_argument("--show_steps", action="store_true", help="print the canvas after every step")
    parser.add_argument("--mask_placeholder", default=cli.MASK_PLACEHOLDER, help="shown for masked positions")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_generate, argv, COMMAND)


def _generate(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sampler_config = cli.sampler_config_from(args, parser)
    cli.question_text(args.question, "--question")
    image_options = cli.image_options(args)
    from medv_jax.models.medv import MedVConfig
    from medv_jax.sampling import api

    timings = {}
    t0 = time.perf_counter()
    opened = cli.open_model(args)
    if args.image is not None and not isinstance(opened[0], MedVConfig):
        raise UserError("--image needs a MedV checkpoint; this one is a text-only LLaDA model: leave --image out")
    t_check = time.perf_counter()
    # The image and the prompt are made before the weights load: a wrong path fails in a second.
    # A model without weights is enough for that (same tokenizer and image settings).
    unloaded = api.Model.unloaded(opened, **cli.load_options(args))
    image = None
    if args.image is not None:
        image = unloaded.image(args.image, name="--image", **image_options)
    row = unloaded.prompt(args.question, image)
    positions = unloaded.lm.max_position_embeddings
    if len(row.tokens) + sampler_config.gen_length > positions:
        raise UserError(
            f"the prompt ({len(row.tokens)} tokens) and --gen_length {sampler_config.gen_length} exceed the "
            f"model's {positions} positions: shorten the question or lower --gen_length"
        )
    timings["preprocess_s"] = time.perf_counter() - t_check
    model = api.load(args.checkpoint, args.tokenizer, opened=opened, **cli.load_options(args))
    timings["load_s"] = time.perf_counter() - t0 - timings["preprocess_s"]

    answer = model.run([row], [api.row_key(args.seed)], sampler_config)[0]
    timings["compile_s"] = answer.compile_seconds
    timings["sample_s"] = answer.seconds
    frames = []
    if args.show_steps:
        frames = [
            cli.render_frame(model.tokenizer, f, args.mask_placeholder)
            for f in replay(answer.tokens, answer.commit_step, answer.steps, model.lm.eot_token_id)
        ]
    if args.json:
        fields = answer.to_json()
        result = {
            "question": cli.question_text(args.question) + model.question_suffix,
            "answer": answer.text,
            "token_ids": answer.token_ids,
            "answer_length": fields["answer_length"],
            "stopped": answer.stopped,
            "steps_used": answer.steps,
            "prompt_tokens": answer.prompt_tokens,
            "cache_refreshes": answer.cache_refreshes,
            "sampler": cli.sampler_summary(sampler_config, args.seed),
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "device": str(jax.devices()[0].platform),
        }
        if args.show_steps:
            result["steps"] = frames
        print(json.dumps(result, ensure_ascii=False))
    else:
        for t, text in enumerate(frames):
            print(f"[step {t + 1}/{answer.steps}] {text}")
        print(answer.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
