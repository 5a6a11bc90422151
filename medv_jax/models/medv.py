"""LLaDA-MedV: SigLIP2 vision tower -> GELU projector -> LLaDA, with image features spliced into
the token embeddings at static positions.

Image features are placed by a *layout* computed on the host by the data pipeline, so every shape
is static (a fixed image-token budget per sequence) and any image mode is one gather:

* ``pixels [B, C, S, S, 3]``: up to C crops per sequence (crop 0 is the base view); the tower and
  projector turn them into ``C * N`` features per row (crop c, patch p -> index ``c * N + p``).
* ``image_index [B, T, 4] int32`` / ``image_weight [B, T, 4] float32``: position t of the sequence
  takes ``sum_k weight[t, k] * features[index[t, k]]``. Square/pad images use one tap of weight 1;
  anyres unpadding is a choice of indices and its bilinear shrink is four taps.
* ``image_newline_mask [B, T] bool``: positions that take the learned ``image_newline`` vector.

A position is an image position when it has a non-zero tap or is a newline; every other position
embeds its token id.

Parameter tree: ``{"vision": siglip tree, "projector": projector tree, "lm": llada tree,
"image_newline": [D]}`` (the last only when ``mm_patch_merge_type`` contains "unpad").
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medv_jax.data import anyres
from medv_jax.models import layers, llada, siglip
from medv_jax.models.layers import Array
from medv_jax.models.projector import Projector

# Besides these, "anyres_max_N" for any positive N (anyres.parse_anyres_max).
IMAGE_FIT_MODES = ("square", "pad")

# LLaVA-OneVision's grid pinpoints for anyres_max_*: every (rows, cols) grid of 384-pixel crops
# from 1x1 to 6x6, written as (width, height) pixels.
DEFAULT_GRID_PINPOINTS: tuple[tuple[int, int], ...] = anyres.DEFAULT_GRID_PINPOINTS


@dataclasses.dataclass(frozen=True)
class MedVConfig:
    lm: llada.LLaDAConfig = llada.LLaDAConfig()
    vision: siglip.SiglipConfig = siglip.SiglipConfig()
    # Read from the checkpoint's config.json (docs/algorithm.md §2); these defaults are LLaDA-V's SFT ones.
    image_aspect_ratio: str = "anyres_max_4"
    mm_patch_merge_type: str = "spatial_unpad"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_GRID_PINPOINTS
    # Storage dtype of the projector and image_newline; None = the LM's param_dtype. LoRA runs keep
    # the frozen LM in bfloat16 and train these fully, so they stay in float32 there.
    projector_param_dtype: str | None = None

    def __post_init__(self):
        mode = self.image_aspect_ratio
        if mode not in IMAGE_FIT_MODES and anyres.parse_anyres_max(mode) is None:
            raise ValueError(
                f"image_aspect_ratio={mode!r} is not one of "
                f"{list(IMAGE_FIT_MODES)} nor anyres_max_N (N a positive integer)"
            )

    @property
    def use_image_newline(self) -> bool:
        return "unpad" in self.mm_patch_merge_type

    def replace(self, **changes: Any) -> "MedVConfig":
        return dataclasses.replace(self, **changes)


MEDV_PRESETS: dict[str, MedVConfig] = {
    "llada_medv_8b": MedVConfig(),
    "medv_tiny": MedVConfig(
        lm=llada.LLADA_PRESETS["llada_tiny"],
        vision=siglip.SIGLIP_PRESETS["siglip_tiny"],
        image_aspect_ratio="square",
        mm_patch_merge_type="flat",
    ),
}


def splice_image_features(
    text_embeds: Array,  # [B, T, D]
    features: Array,  # [B, C * N, D]
    image_index: Array,  # [B, T, 4] int
    image_weight: Array,  # [B, T, 4] float
    image_newline_mask: Array,  # [B, T] bool
    image_newline: Array | None,  # [D]
) -> Array:  # [B, T, D]
    """Put image features (and newline vectors) at the image positions of ``text_embeds``."""
    weight = image_weight.astype(features.dtype)
    gathered = jnp.zeros_like(text_embeds)
    for tap in range(image_index.shape[-1]):  # 4 fused gathers; never builds [B, T, 4, D]
        taken = jnp.take_along_axis(features, image_index[..., tap, None], axis=1)
        gathered = gathered + weight[..., tap, None] * taken.astype(text_embeds.dtype)
    is_image = jnp.any(image_weight != 0, axis=-1)
    if image_newline is not None:
        gathered = jnp.where(image_newline_mask[..., None], image_newline.astype(gathered.dtype), gathered)
        is_image = is_image | image_newline_mask
    return jnp.where(is_image[..., None], gathered, text_embeds)


class MedV(nn.Module):
    """The multimodal model.

    Entry points: ``__call__`` -> fp32 logits; ``encode_images``; ``embed_inputs`` (the spliced
    input embeddings, for the sampler and the loss); ``forward_embeds`` (the LM from embeddings,
    with an optional logits slice, see ``LLaDA.forward_embeds``).
    """

    config: MedVConfig

    def setup(self):
        cfg = self.config
        self.vision = siglip.SiglipVisionTower(cfg.vision)
        projector_dtype = cfg.projector_param_dtype or cfg.lm.param_dtype
        self.projector = Projector(cfg.lm.hidden_size, cfg.lm.dtype, projector_dtype, cfg.lm.init_std)
        self.lm = llada.LLaDA(cfg.lm)
        if cfg.use_image_newline:
            self.image_newline = self.param(
                "image_newline",
                layers.param_init(nn.initializers.normal(0.02), ("embed",)),
                (cfg.lm.hidden_size,),
                layers.to_dtype(projector_dtype),
            )

    def encode_images(self, pixels: Array) -> Array:
        """``[B, C, S, S, 3]`` -> projected features ``[B, C * N, D]``."""
        batch, crops = pixels.shape[:2]
        feats = self.vision(pixels.reshape((batch * crops,) + pixels.shape[2:]))
        feats = self.projector(feats)
        return feats.reshape(batch, crops * feats.shape[1], feats.shape[-1])

    def embed_inputs(
        self,
        tokens: Array,  # [B, T]
        pixels: Array,  # [B, C, S, S, 3]
        image_index: Array,  # [B, T, 4]
        image_weight: Array,  # [B, T, 4]
        image_newline_mask: Array,  # [B, T]
    ) -> Array:  # [B, T, D]
        newline = self.image_newline if self.config.use_image_newline else None
        return splice_image_features(
            self.lm.embed(tokens),
            self.encode_images(pixels),
            image_index,
            image_weight,
            image_newline_mask,
            newline,
        )

    def forward_embeds(self, embeds, key_mask=None, positions=None, logits_start=0, logits_length=None):
        return self.lm.forward_embeds(embeds, key_mask, positions, logits_start, logits_length)

    def forward_cached(self, embeds, key_mask, positions, cache, cache_start=0, logits_start=0, logits_length=None):
        """The LM's KV-cache forward (``LLaDA.forward_cached``)."""
        return self.lm.forward_cached(
            embeds, key_mask, positions, cache, cache_start, logits_start, logits_length
        )

    def __call__(
        self,
        tokens: Array,
        pixels: Array,
        image_index: Array,
        image_weight: Array,
        image_newline_mask: Array,
        key_mask: Array | None = None,
        positions: Array | None = None,
    ) -> Array:  # [B, T, V] fp32
        embeds = self.embed_inputs(tokens, pixels, image_index, image_weight, image_newline_mask)
        return self.lm.forward_embeds(embeds, key_mask, positions)


def dummy_inputs(config: MedVConfig, length: int = 8, crops: int = 1) -> tuple[Array, ...]:
    """Smallest inputs that touch every parameter (for init and shape checks)."""
    s = config.vision.image_size
    return (
        jnp.zeros((1, length), jnp.int32),
        jnp.zeros((1, crops, s, s, config.vision.num_channels), jnp.float32),
        jnp.zeros((1, length, 4), jnp.int32),
        jnp.zeros((1, length, 4), jnp.float32),
        jnp.zeros((1, length), jnp.bool_),
    )


def init_params(config: MedVConfig, rng: Array, boxed: bool = False) -> Any:
    params = MedV(config).init(rng, *dummy_inputs(config))["params"]
    return params if boxed else nn.unbox(params)


def abstract_params(config: MedVConfig) -> Any:
    return jax.eval_shape(lambda rng: init_params(config, rng, boxed=True), jax.random.key(0))
