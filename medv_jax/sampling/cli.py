"""Pieces shared by the ``generate`` and ``infer`` commands: flags, model loading, decoding."""
from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

from medv_jax.models.llada import LLaDAConfig
from medv_jax.models.medv import MedVConfig
from medv_jax.sampling.diffusion import REMASKING, SamplerConfig
from medv_jax.sampling.multimodal import SYSTEM_PROMPTS, with_tokenizer_ids

MASK_PLACEHOLDER = "_"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="converted medv_jax checkpoint folder")
    g.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer folder (loaded with transformers.AutoTokenizer; a LLaDA-MedV download has one)",
    )
    g.add_argument("--param_dtype", default=None, help="cast the weights on load (e.g. bfloat16)")
    g.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    g.add_argument(
        "--attention_impl", default=None, choices=["xla", "cudnn"], help="attention kernel (default: JAX's choice)"
    )
    g.add_argument(
        "--system_prompt",
        default="medical",
        help=f"one of {list(SYSTEM_PROMPTS)} or the text of a system prompt (default: medical, SPEC 3)",
    )
    g.add_argument(
        "--question_suffix",
        default="",
        help='appended to every question (the reference VQA demo uses " Answer concisely in English.")',
    )


def add_sampler_args(parser: argparse.ArgumentParser, defaults: SamplerConfig = SamplerConfig()) -> None:
    g = parser.add_argument_group("sampler (paper: VQA 128/128/128, conversation 256/64/256)")
    g.add_argument("--gen_length", type=int, default=defaults.gen_length, help="answer canvas length")
    g.add_argument("--block_length", type=int, default=defaults.block_length, help="semi-autoregressive block")
    g.add_argument("--steps", type=int, default=defaults.steps, help="total denoising steps")
    g.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    g.add_argument("--remasking", default=defaults.remasking, choices=list(REMASKING))
    g.add_argument("--cfg_scale", type=float, default=defaults.cfg_scale, help="classifier-free guidance")
    g.add_argument("--seed", type=int, default=0)


def sampler_config_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SamplerConfig:
    try:
        return SamplerConfig(
            gen_length=args.gen_length,
            block_length=args.block_length,
            steps=args.steps,
            temperature=args.temperature,
            remasking=args.remasking,
            cfg_scale=args.cfg_scale,
        )
    except ValueError as e:
        parser.error(str(e))  # exits with status 2 and the message naming the flag
        raise


def load_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(config with the tokenizer's special ids, params, tokenizer)."""
    from medv_jax import checkpoint
    from medv_jax.data import tokenizer as tok_lib

    tokenizer = tok_lib.load_tokenizer(os.path.expanduser(args.tokenizer))
    config, params = checkpoint.load_pretrained(os.path.expanduser(args.checkpoint), dtype=args.param_dtype)
    if not isinstance(config, (MedVConfig, LLaDAConfig)):
        raise ValueError(f"--checkpoint holds a {type(config).__name__}, not a MedV or LLaDA model")
    changes = {}
    if args.dtype is not None:
        changes["dtype"] = args.dtype
    if args.attention_impl is not None:
        changes["attention_impl"] = args.attention_impl
    if changes:
        if isinstance(config, MedVConfig):
            config = config.replace(lm=config.lm.replace(**changes), vision=config.vision.replace(**changes))
        else:
            config = config.replace(**changes)
    return with_tokenizer_ids(config, tokenizer), params, tokenizer


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Answer text as LLaVA-Med writes it: special tokens skipped, outer whitespace stripped."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()


def render_frame(tokenizer: Any, frame: Sequence[int | None], placeholder: str = MASK_PLACEHOLDER) -> str:
    """One replayed canvas (token ids, None = masked) as text: runs of committed tokens decoded,
    each masked position shown as ``placeholder``."""
    parts, run = [], []
    for tok in frame:
        if tok is None:
            if run:
                parts.append(tokenizer.decode(run, skip_special_tokens=False))
                run = []
            parts.append(placeholder)
        else:
            run.append(tok)
    if run:
        parts.append(tokenizer.decode(run, skip_special_tokens=False))
    return "".join(parts)
