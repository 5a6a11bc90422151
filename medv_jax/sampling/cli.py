"""Pieces shared by the commands that answer questions: flags and their translation into the
Python API's arguments (``medv_jax.sampling.api``), rendering of replayed canvases."""
from __future__ import annotations

import argparse
from typing import Any

from medv_jax.data.dicom import WINDOW_CHOICES
from medv_jax.models.layers import ATTENTION_CHOICES, WEIGHT_QUANT
from medv_jax.sampling.diffusion import (
    CACHE_MODES,
    REMASKING,
    AdaptiveStop,
    CachePolicy,
    SamplerConfig,
    ThresholdSelection,
)
from medv_jax.sampling import answers, api
from medv_jax.sampling.multimodal import SYSTEM_PROMPTS

MASK_PLACEHOLDER = api.MASK_PLACEHOLDER


def add_weight_args(g) -> None:
    """How the weights are held and computed on load (dtypes, quantization, adapters, attention
    kernel): the flags every command that loads a checkpoint for answering shares."""
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


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="converted medv_jax checkpoint folder")
    g.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer folder (loaded with transformers.AutoTokenizer; a LLaDA-MedV download has one)",
    )
    add_tokenizer_mismatch_arg(g)
    add_weight_args(g)
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


question_text = answers.question_text


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
    """(checkpoint config, tokenizer) with every check that needs no weights
    (``api.open_checkpoint``); UserErrors name the flag."""
    return api.open_checkpoint(
        args.checkpoint,
        args.tokenizer,
        param_dtype=args.param_dtype,
        dtype=args.dtype,
        allow_tokenizer_mismatch=getattr(args, "allow_tokenizer_mismatch", False),
        names=("--checkpoint", "--tokenizer"),
    )


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """``api.load``'s keyword arguments from add_model_args' flags."""
    return dict(
        system_prompt=getattr(args, "system_prompt", "medical"),
        question_suffix=getattr(args, "question_suffix", ""),
        param_dtype=args.param_dtype,
        dtype=args.dtype,
        attention_impl=getattr(args, "attention_impl", None),
        allow_tokenizer_mismatch=getattr(args, "allow_tokenizer_mismatch", False),
        weight_quant=getattr(args, "weight_quant", None),
        merge_adapters=getattr(args, "merge_adapters", False),
    )


decode = api.decode


render_frame = api.render_frame
