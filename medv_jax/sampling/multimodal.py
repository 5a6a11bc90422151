"""LLaDA-MedV prompts (question + image) -> fixed-shape batches -> one compiled program that
encodes the images, splices them into the prompt embeddings and runs the sampler.

Host side (numpy): ``prompt_row`` / ``question_prompt`` format a conversation or one question in
the LLaDA chat template (docs/algorithm.md §3, ``medv_jax.data.conversation``) with the image's
token layout (``medv_jax.data.image_layout``);
``collate_prompts`` left-pads rows into a ``PromptBatch`` (filler rows where asked, for fixed-shape
batches). Device side: ``sample_medv`` (jitted; the MedV parameter tree, LM under ``params['lm']``).

Special ids always come from the tokenizer: ``with_tokenizer_ids`` writes them into the model
config the sampler reads.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medv_jax.data import conversation as conv
from medv_jax.data import image_layout
from medv_jax.data import tokenizer as tok_lib
from medv_jax.data.anyres import ImageConfig
from medv_jax.data.image import PreprocessedImage
from medv_jax.models.llada import LLaDAConfig
from medv_jax.models.medv import MedV, MedVConfig
from medv_jax.sampling import diffusion
from medv_jax.sampling.diffusion import LogitsProcessor, SampleOutput, SamplerConfig
from medv_jax.sampling.program import run_sampler
from medv_jax.user_errors import UserError

SYSTEM_PROMPTS = {
    "medical": conv.MEDICAL_SYSTEM_PROMPT,
    "general": conv.GENERAL_SYSTEM_PROMPT,
    "none": None,
}


def system_prompt_for(choice: str | None) -> str | None:
    """'medical' (default, docs/algorithm.md §3), 'general' (LLaDA-V), 'none', or any other text used as is."""
    if choice is None:
        return conv.MEDICAL_SYSTEM_PROMPT
    return SYSTEM_PROMPTS.get(choice, choice)


def image_config_for(config: MedVConfig) -> ImageConfig:
    """The image preprocessing a MedV config implies (mode, merge, grid, crop and patch grid)."""
    vision = config.vision
    return ImageConfig(
        aspect_ratio=config.image_aspect_ratio,
        merge_type=config.mm_patch_merge_type,
        grid_pinpoints=tuple(tuple(p) for p in config.image_grid_pinpoints),
        crop_size=vision.image_size,
        patches_per_side=vision.image_size // vision.patch_size,
    )


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """One past the largest id the tokenizer can produce (vocabularies may have gaps)."""
    return max(int(i) for i in tokenizer.get_vocab().values()) + 1


# The LM config's field holding each special id of tok_lib.SpecialTokenIds.
CONFIG_ID_FIELDS = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "mask": "mask_token_id",
    "start_header": "start_header_id",
    "end_header": "end_header_id",
    "eot": "eot_token_id",
}


def tokenizer_id_mismatches(config: LLaDAConfig | MedVConfig, tokenizer: Any) -> list[tuple[str, int, int]]:
    """(name, the tokenizer's id, the config's id) of every special id on which a tokenizer and a
    checkpoint's config disagree: a tokenizer that does not belong to the checkpoint."""
    lm = config.lm if isinstance(config, MedVConfig) else config
    ids = dataclasses.asdict(tok_lib.special_token_ids(tokenizer))
    return [
        (name, ids[name], getattr(lm, field))
        for name, field in CONFIG_ID_FIELDS.items()
        if ids[name] != getattr(lm, field)
    ]


def with_tokenizer_ids(config: LLaDAConfig | MedVConfig, tokenizer: Any) -> Any:
    """``config`` with every special id (and the usable vocabulary size) read from ``tokenizer``."""
    lm = config.lm if isinstance(config, MedVConfig) else config
    ids = tok_lib.special_token_ids(tokenizer)
    usable = tokenizer_vocab_size(tokenizer)
    too_big = {k: v for k, v in dataclasses.asdict(ids).items() if v >= lm.vocab_size}
    if too_big:
        raise UserError(
            f"tokenizer special ids {too_big} do not fit the model's vocab_size={lm.vocab_size}"
        )
    lm = lm.replace(
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        mask_token_id=ids.mask,
        start_header_id=ids.start_header,
        end_header_id=ids.end_header,
        eot_token_id=ids.eot,
        tokenizer_vocab_size=min(usable, lm.vocab_size),
    )
    return config.replace(lm=lm) if isinstance(config, MedVConfig) else lm


class PromptRow(NamedTuple):
    """One encoded prompt: tokens int32 [n] (image slots hold PAD), image_mask bool [n], and the
    preprocessed image (None for a text-only prompt)."""

    tokens: np.ndarray
    image_mask: np.ndarray
    image: PreprocessedImage | None

    @property
    def num_crops(self) -> int:
        return 0 if self.image is None else int(self.image.pixels.shape[0])


def prompt_row(
    tokenizer: Any,
    record: dict[str, Any],
    image: PreprocessedImage | None,
    system_prompt: str | None = conv.MEDICAL_SYSTEM_PROMPT,
) -> PromptRow:
    """The inference prompt of a conversation record (e.g. ``conv.chat_record``) with its
    preprocessed image: ``conv.format_prompt``, the one prompt builder training shares, so the prompt
    is a prefix of the training row of the same conversation."""
    sample = conv.format_prompt(
        record,
        tokenizer,
        num_image_tokens=None if image is None else image.layout.num_tokens,
        system_prompt=system_prompt,
    )
    return PromptRow(sample.input_ids, sample.image_mask, image)


def question_prompt(
    tokenizer: Any,
    question: str,
    image: PreprocessedImage | None,
    system_prompt: str | None = conv.MEDICAL_SYSTEM_PROMPT,
    sample_id: str = "prompt",
) -> PromptRow:
    """``prompt_row`` of a one-question chat: system turn, user turn ``<image>\\n{question}``, then
    the assistant header the answer follows."""
    record = conv.chat_record([question], has_image=image is not None, sample_id=sample_id)
    return prompt_row(tokenizer, record, image, system_prompt)


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts, the inputs of ``MedV.embed_inputs`` plus the key mask.

    tokens [B, P] int32, key_mask [B, P] bool, pixels [B, C, S, S, 3] float32 (unused crops zero),
    image_index [B, P, 4] int32, image_weight [B, P, 4] float32, image_newline_mask [B, P] bool,
    valid [B] bool (False on filler rows).
    """

    tokens: np.ndarray
    key_mask: np.ndarray
    pixels: np.ndarray
    image_index: np.ndarray
    image_weight: np.ndarray
    image_newline_mask: np.ndarray
    valid: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate_prompts(
    rows: Sequence[PromptRow],
    *,
    pad_id: int,
    crop_size: int,
    batch_size: int | None = None,
    prompt_length: int | None = None,
    max_crops: int | None = None,
) -> PromptBatch:
    """Stack rows, left padded to ``prompt_length`` (default: the longest), with ``max_crops``
    crop slots (default: the most any row needs, at least 1) and filler rows up to ``batch_size``
    (key mask all False, no image)."""
    if not rows:
        raise ValueError("rows: no prompts to collate")
    b = len(rows) if batch_size is None else batch_size
    if b < len(rows):
        raise ValueError(f"batch_size={b} is smaller than the {len(rows)} rows")
    longest = max(len(r.tokens) for r in rows)
    p = longest if prompt_length is None else prompt_length
    if longest > p:
        raise ValueError(f"prompt_length={p} is shorter than the longest prompt ({longest} tokens)")
    c = max([1] + [r.num_crops for r in rows]) if max_crops is None else max_crops
    if max(r.num_crops for r in rows) > c:
        raise ValueError(f"max_crops={c} is fewer than an image needs ({max(r.num_crops for r in rows)})")
    tokens = np.full((b, p), pad_id, np.int32)
    key_mask = np.zeros((b, p), np.bool_)
    pixels = np.zeros((b, c, crop_size, crop_size, 3), np.float32)
    index = np.zeros((b, p, image_layout.TAPS), np.int32)
    weight = np.zeros((b, p, image_layout.TAPS), np.float32)
    newline = np.zeros((b, p), np.bool_)
    valid = np.zeros((b,), np.bool_)
    for i, row in enumerate(rows):
        off = p - len(row.tokens)
        tokens[i, off:] = row.tokens
        key_mask[i, off:] = True
        valid[i] = True
        if row.image is not None:
            pixels[i, : row.num_crops] = row.image.pixels
            idx, w, nl = image_layout.place_in_sequence(row.image_mask, row.image.layout)
            index[i, off:], weight[i, off:], newline[i, off:] = idx, w, nl
    return PromptBatch(tokens, key_mask, pixels, index, weight, newline, valid)


@functools.partial(jax.jit, static_argnames=("config", "plan", "logits_processor", "on_block"))
def _medv_program(
    params,
    tokens,
    key_mask,
    pixels,
    image_index,
    image_weight,
    image_newline_mask,
    row_keys,
    knobs,
    *,
    config: MedVConfig,
    plan,
    logits_processor,
    on_block=None,
):
    # Image encoding and prompt embedding happen once, before the sampling loop.
    embeds = MedV(config).apply(
        {"params": params},
        tokens,
        pixels,
        image_index,
        image_weight,
        image_newline_mask,
        method=MedV.embed_inputs,
    )
    return run_sampler(
        config.lm,
        plan,
        params["lm"],
        embeds,
        key_mask,
        row_keys,
        knobs,
        logits_processor,
        on_block,
    )


def _program_inputs(config, batch, rng, sampler_config, logits_processor):
    if not isinstance(config, MedVConfig):
        raise ValueError(f"config: expected a MedVConfig, got {type(config).__name__}")
    b, p = batch.shape
    diffusion.validate_prompt(config.lm, sampler_config, b, p, batch.key_mask)
    args = (
        jnp.asarray(batch.tokens),
        jnp.asarray(batch.key_mask),
        jnp.asarray(batch.pixels),
        jnp.asarray(batch.image_index),
        jnp.asarray(batch.image_weight),
        jnp.asarray(batch.image_newline_mask),
        diffusion.row_keys_for(rng, b),
        sampler_config._knobs(),
    )
    static = dict(config=config, plan=sampler_config._plan(), logits_processor=logits_processor)
    return args, static


def sample_medv(
    config: MedVConfig,
    params: Any,
    batch: PromptBatch,
    rng: Any,
    sampler_config: SamplerConfig,
    logits_processor: LogitsProcessor | None = None,
    on_block: diffusion.BlockCallback | None = None,
) -> SampleOutput:
    """Run the sampler on a prompt batch (one compiled program per config and shapes).
    ``on_block``: called on the host as each block is finished (``diffusion.BlockCallback``)."""
    args, static = _program_inputs(config, batch, rng, sampler_config, logits_processor)
    return _medv_program(params, *args, **static, on_block=on_block)


def compile_medv(
    config: MedVConfig,
    params: Any,
    batch: PromptBatch,
    rng: Any,
    sampler_config: SamplerConfig,
    logits_processor: LogitsProcessor | None = None,
    on_block: diffusion.BlockCallback | None = None,
):
    """Ahead-of-time compile for ``batch``'s shapes (to time compilation apart from sampling).
    Returns ``run(batch, rng[, settings]) -> SampleOutput`` for batches of the same shapes."""
    args, static = _program_inputs(config, batch, rng, sampler_config, logits_processor)
    compiled = _medv_program.lower(params, *args, **static, on_block=on_block).compile()

    def run(batch: PromptBatch, rng: Any, settings: SamplerConfig | None = None) -> SampleOutput:
        """``settings``: other values of the traced settings (temperature, CFG scale, ...) of
        the same plan; default the compiled ones."""
        settings = sampler_config if settings is None else settings
        if settings._plan() != sampler_config._plan():
            raise ValueError("settings: a different sampler plan needs its own compiled program")
        args, _ = _program_inputs(config, batch, rng, settings, logits_processor)
        return compiled(params, *args)

    return run
