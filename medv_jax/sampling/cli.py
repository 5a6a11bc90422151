"""Pieces shared by the ``generate`` and ``infer`` commands: flags, model loading, decoding."""
from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

from medv_jax.data.dicom import WINDOW_CHOICES
from medv_jax.models.layers import ATTENTION_CHOICES, WEIGHT_QUANT
from medv_jax.models.llada import LLaDAConfig
from medv_jax.models.medv import MedVConfig
from medv_jax.sampling.diffusion import (
    CACHE_MODES,
    REMASKING,
    AdaptiveStop,
    CachePolicy,
    SamplerConfig,
    ThresholdSelection,
)
from medv_jax.sampling.multimodal import SYSTEM_PROMPTS, tokenizer_id_mismatches, with_tokenizer_ids
from medv_jax.user_errors import UserError

MASK_PLACEHOLDER = "_"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="converted medv_jax checkpoint folder")
    g.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer folder (loaded with transformers.AutoTokenizer; a LLaDA-MedV download has one)",
    )
    add_tokenizer_mismatch_arg(g)
    g.add_argument("--param_dtype", default=None, help="cast the weights on load (e.g. bfloat16)")
    g.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    g.add_argument("--weight_quant", default=None, choices=WEIGHT_QUANT,
                   help="weight-only quantization of the LM's dense kernels on load, per output channel "
                        "(default: as the checkpoint is stored)")
    g.add_argument("--merge_adapters", action="store_true",
                   help="an adapters checkpoint (a LoRA run's workdir/adapters): merge the adapters into the "
                        "base's kernels on load instead of computing them beside the kernels")
    g.add_argument(
        "--attention_impl", default=None, choices=ATTENTION_CHOICES,
        help="attention kernel (default: per_head on CPU, JAX's choice elsewhere)",
    )
    g.add_argument(
        "--system_prompt",
        default="medical",
        help=f"one of {list(SYSTEM_PROMPTS)} or the text of a system prompt (default: medical, docs/algorithm.md §3)",
    )
    g.add_argument(
        "--question_suffix",
        default="",
        help='appended to every question (the reference VQA demo uses " Answer concisely in English.")',
    )


def add_tokenizer_mismatch_arg(group: Any) -> None:
    group.add_argument(
        "--allow_tokenizer_mismatch",
        action="store_true",
        help="use --tokenizer even where its special ids differ from those in the checkpoint's config.json",
    )


def add_image_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("DICOM images")
    g.add_argument(
        "--dicom_window",
        default="auto",
        metavar="|".join(WINDOW_CHOICES) + "|CENTER,WIDTH",
        help="display window of a DICOM image: auto (the file's own, default), full range, a named "
        "window, or center,width in modality units (e.g. 40,400)",
    )
    g.add_argument("--dicom_frame", type=int, default=None, help="frame of a multi-frame DICOM file (default: the middle one)")
    g.add_argument(
        "--dicom_force", action="store_true", help="read a file without the DICOM header preamble as DICOM anyway"
    )


def image_options(args: argparse.Namespace) -> dict[str, Any]:
    """preprocess_image's DICOM keyword arguments from add_image_args' flags (checked)."""
    from medv_jax.data.dicom import parse_window

    return dict(
        dicom_window=parse_window(args.dicom_window, "--dicom_window"),
        dicom_frame=args.dicom_frame,
        dicom_force=args.dicom_force,
    )


def question_text(text: str, where: str = "--question") -> str:
    """The question without ``<image>`` and outer whitespace; a UserError when nothing is left."""
    question = text.replace("<image>", "").strip()
    if not question:
        raise UserError(f"{where} is empty{' (only <image>)' if text.strip() else ''}: write the question")
    return question


def add_sampler_args(parser: argparse.ArgumentParser, defaults: SamplerConfig = SamplerConfig()) -> None:
    g = parser.add_argument_group("sampler (paper: VQA 128/128/128, conversation 256/64/256)")
    g.add_argument("--gen_length", type=int, default=defaults.gen_length, help="answer canvas length")
    g.add_argument("--block_length", type=int, default=defaults.block_length, help="semi-autoregressive block")
    g.add_argument("--steps", type=int, default=defaults.steps, help="total denoising steps")
    g.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    g.add_argument("--remasking", default=defaults.remasking, choices=list(REMASKING))
    g.add_argument("--cfg_scale", type=float, default=defaults.cfg_scale, help="classifier-free guidance")
    g.add_argument("--seed", type=int, default=0)
    f = parser.add_argument_group("fast sampling (opt-in, approximate unless stated)")
    f.add_argument(
        "--cache",
        default="none",
        choices=["none", *CACHE_MODES],
        help="KV cache: prefix (prompt and finished blocks cached; each step runs the current block "
        "onward) or dual (the masked tail cached too; each step runs the current block only)",
    )
    f.add_argument(
        "--cache_refresh",
        type=int,
        default=CachePolicy().refresh_every,
        help="refresh the cache at each block start and every this many steps (1 = exact)",
    )
    f.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="parallel decoding: also commit every masked position of the block whose confidence "
        "exceeds this (in [0, 1]; 1.0 = exact); default off",
    )
    f.add_argument(
        "--adaptive_stop",
        action="store_true",
        help="end a row's block once its draft is stable and confident (see --stop_patience, --stop_entropy)",
    )
    f.add_argument(
        "--stop_patience",
        type=int,
        default=AdaptiveStop().patience,
        help="adaptive stop: steps the draft must stay unchanged",
    )
    f.add_argument(
        "--stop_entropy",
        type=float,
        default=AdaptiveStop().max_entropy,
        help="adaptive stop: mean entropy (nats) of the draft's masked positions must be below this",
    )


def sampler_config_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SamplerConfig:
    """The SamplerConfig the flags describe; a bad value exits (status 2) naming its flag."""

    def build(flag: str, make):
        try:
            return make()
        except ValueError as e:
            parser.error(f"{flag}: {e}")
            raise

    cache = None
    if args.cache != "none":
        cache = build("--cache_refresh", lambda: CachePolicy(args.cache, args.cache_refresh))
    elif args.cache_refresh != CachePolicy().refresh_every:
        parser.error("--cache_refresh needs --cache prefix or --cache dual")
    selection = None
    if args.threshold is not None:
        selection = build("--threshold", lambda: ThresholdSelection(args.threshold))
    adaptive = None
    if args.adaptive_stop:
        adaptive = build(
            "--stop_patience/--stop_entropy", lambda: AdaptiveStop(args.stop_patience, args.stop_entropy)
        )
    elif (args.stop_patience, args.stop_entropy) != (AdaptiveStop().patience, AdaptiveStop().max_entropy):
        parser.error("--stop_patience/--stop_entropy need --adaptive_stop")
    try:
        return SamplerConfig(
            gen_length=args.gen_length,
            block_length=args.block_length,
            steps=args.steps,
            temperature=args.temperature,
            remasking=args.remasking,
            cfg_scale=args.cfg_scale,
            cache=cache,
            selection=selection,
            adaptive_stop=adaptive,
        )
    except ValueError as e:
        message = str(e)
        if message.startswith("selection"):
            message = "--threshold: " + message
        parser.error(message)  # exits with status 2 and the message naming the flag
        raise


def sampler_summary(config: SamplerConfig, seed: int) -> dict:
    """The sampler settings as a JSON-able dict (for --json output and logs)."""
    return {
        "gen_length": config.gen_length,
        "block_length": config.block_length,
        "steps": config.steps,
        "temperature": config.temperature,
        "remasking": config.remasking,
        "cfg_scale": config.cfg_scale,
        "cache": None if config.cache is None else config.cache.mode,
        "cache_refresh": None if config.cache is None else config.cache.refresh_every,
        "threshold": None if config.selection is None else config.selection.threshold,
        "adaptive_stop": None
        if config.adaptive_stop is None
        else {"patience": config.adaptive_stop.patience, "max_entropy": config.adaptive_stop.max_entropy},
        "seed": seed,
    }


def open_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(checkpoint config, tokenizer) with every check that needs no weights: the checkpoint is a
    converted one, the tokenizer loads, its special ids are the checkpoint's (unless
    --allow_tokenizer_mismatch) and the dtypes exist. UserErrors name the flag."""
    import jax.numpy as jnp

    from medv_jax import checkpoint
    from medv_jax.data import tokenizer as tok_lib

    config = checkpoint.check_converted(args.checkpoint, "--checkpoint")
    if not isinstance(config, (MedVConfig, LLaDAConfig)):
        raise UserError(
            f"--checkpoint {args.checkpoint!r} holds a {type(config).__name__}, not a MedV or LLaDA model"
        )
    for flag, name in (("--param_dtype", args.param_dtype), ("--dtype", args.dtype)):
        if name is not None:
            try:
                jnp.dtype(name)
            except TypeError:
                raise UserError(f"{flag} {name!r} is not a dtype: use e.g. float32 or bfloat16") from None
    tokenizer = tok_lib.open_tokenizer(args.tokenizer, "--tokenizer")
    mismatches = tokenizer_id_mismatches(config, tokenizer)
    if mismatches and not getattr(args, "allow_tokenizer_mismatch", False):
        listed = ", ".join(f"{name} {tok} vs {ckpt}" for name, tok, ckpt in mismatches)
        raise UserError(
            f"--tokenizer {args.tokenizer!r} does not belong to --checkpoint {args.checkpoint!r}: special ids "
            f"(tokenizer vs checkpoint config.json) {listed}; give the checkpoint's tokenizer, or pass "
            "--allow_tokenizer_mismatch to use this one anyway"
        )
    return config, tokenizer


def load_model(args: argparse.Namespace, opened: tuple[Any, Any] | None = None) -> tuple[Any, Any, Any]:
    """(config with the tokenizer's special ids, params, tokenizer); ``opened`` is open_model's
    result when the caller has it already."""
    from medv_jax import checkpoint

    _, tokenizer = opened or open_model(args)
    config, params = checkpoint.load_pretrained(
        os.path.expanduser(args.checkpoint), dtype=args.param_dtype,
        merge_adapters=getattr(args, "merge_adapters", False), weight_quant=getattr(args, "weight_quant", None))
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
