"""LLaDA-8B: a LLaMA-shaped transformer with fully bidirectional attention (a mask predictor).

Architecture (docs/algorithm.md §1): pre-norm blocks ``x += attn(rms1(x)); x += mlp(rms2(x))``, RMSNorm
in fp32, half-split ("rotate_half") RoPE in fp32, gated SiLU MLP, no biases, untied LM head, no
causal mask. Layers are stacked under ``nn.scan``.

Parameter tree (kernels are ``[in, out]``; leading ``L`` is the scanned layer axis)::

    embed_tokens/embedding      [V, D]
    layers/attn_norm/scale      [L, D]
    layers/attn/q_proj/kernel   [L, D, H, Dh]      (k_proj, v_proj: [L, D, KV, Dh])
    layers/attn/o_proj/kernel   [L, H, Dh, D]
    layers/mlp_norm/scale       [L, D]
    layers/mlp/{gate,up}_proj/kernel [L, D, F];  layers/mlp/down_proj/kernel [L, F, D]
    final_norm/scale            [D]
    lm_head/kernel              [D, V]

With ``lora_rank`` > 0 a targeted kernel's module also holds ``lora_a`` ``[L, *in, r]`` and ``lora_b``
``[L, r, *out]``; with ``weight_quant`` the kernels are integers beside a float32 ``kernel_scale``
(``[L, 1.., *out]``) and the embedding beside ``embedding_scale`` ``[V, 1]`` (layers.FlatDense,
layers.QuantizedEmbed).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medv_jax.models import layers
from medv_jax.models.layers import Array

# The attention and MLP projections (not the LM head).
DEFAULT_LORA_TARGETS = r"/(attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$"


@dataclasses.dataclass(frozen=True)
class LLaDAConfig:
    vocab_size: int = 126464
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    mlp_hidden_size: int = 12288
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    # Ids the tokenizer can emit are < tokenizer_vocab_size; the rest of the rows are padding and
    # are banned at sampling time.
    tokenizer_vocab_size: int = 126349
    bos_token_id: int = 126080
    eos_token_id: int = 126081  # also the padding id
    mask_token_id: int = 126336
    start_header_id: int = 126346
    end_header_id: int = 126347
    eot_token_id: int = 126348  # end of turn: the sampler's stop token
    # Numerics and implementation choices (not part of the checkpoint).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_impl: str | None = None  # None | "xla" | "cudnn" | "per_head" (layers.attention)
    remat_policy: str = "none"
    unroll_layers: bool = False  # layers.scan_layers(unroll=...): for a few small layers on CPU
    # Std of the normal init of every weight matrix and embedding (only for training from scratch;
    # converted checkpoints replace it). 0.02 is the released models'; a small model trained from
    # scratch learns faster with a larger one (configs/demo.py).
    init_std: float = 0.02
    # Low-rank adapters (LoRA) on the dense kernels whose parameter path, written as in a MedV tree
    # ("lm/layers/attn/q_proj/kernel", "lm/lm_head/kernel"), matches ``lora_targets``
    # (re.search); rank 0 = none. Adapters are kept in float32 whatever param_dtype is.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = DEFAULT_LORA_TARGETS
    # Weight-only quantization of the LM's weight matrices: "none" | "int8" | "int4", per output
    # channel for the dense kernels (attention, MLP, LM head), per row for the token embedding.
    weight_quant: str = "none"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        layers.check_choice(self.attention_impl, layers.ATTENTION_IMPLEMENTATIONS, "attention_impl")
        layers.check_choice(self.remat_policy, list(layers.REMAT_POLICIES), "remat_policy")
        layers.to_dtype(self.dtype), layers.to_dtype(self.param_dtype)
        layers.check_choice(self.weight_quant, layers.WEIGHT_QUANT, "weight_quant")
        if self.lora_rank < 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 0 and lora_dropout={self.lora_dropout} in [0, 1)")
        re.compile(self.lora_targets)

    def dense_options(self, path: str) -> dict[str, Any]:
        """FlatDense's quantization and adapter fields for the kernel at ``path`` ("lm/...")."""
        options: dict[str, Any] = {"weight_quant": self.weight_quant}
        if self.lora_rank and re.search(self.lora_targets, path):
            options.update(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout)
        return options

    def replace(self, **changes: Any) -> "LLaDAConfig":
        return dataclasses.replace(self, **changes)


LLADA_PRESETS: dict[str, LLaDAConfig] = {
    "llada_8b": LLaDAConfig(),
    # Small shapes for tests and CPU demos; special ids keep their real values, so the vocabulary
    # must still cover them.
    "llada_tiny": LLaDAConfig(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, mlp_hidden_size=128
    ),
}


def rms_norm_scale_init(names):
    return layers.param_init(nn.initializers.ones, names)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 then cast back to the input dtype before the weight (as LLaMA)."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", rms_norm_scale_init(("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
    """Half-split rotary embedding, computed in fp32.

    x: [batch, len, heads, head_dim]; positions: [batch, len] int.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, len, head_dim/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nn.Module):
    """Self-attention; with ``kv`` (this layer's cached keys/values ``([B, T, KV, Dh], [B, T, KV,
    Dh])``) the input is a span of ``S`` positions starting at ``kv_start``: its fresh keys/values
    overwrite the span in the cache and the span attends over all ``T`` positions. Returns
    ``(out [B, S, D], updated kv or None)``."""

    config: LLaDAConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        key_mask: Array | None,
        kv: tuple[Array, Array] | None = None,
        kv_start: Array | int | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)

        def proj(heads, name, axis_name):
            return layers.FlatDense(
                features=(heads, cfg.head_dim),
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=layers.normal_init(cfg.init_std, ("embed", axis_name, "head_dim")),
                name=name,
                **cfg.dense_options(f"lm/layers/attn/{name}/kernel"),
            )(x)

        q = proj(cfg.num_heads, "q_proj", "heads")  # [B, T, H, Dh]
        k = proj(cfg.num_kv_heads, "k_proj", "kv_heads")  # [B, T, KV, Dh]
        v = proj(cfg.num_kv_heads, "v_proj", "kv_heads")
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
        q = layers.constrain(q, ("batch", "length", "heads", "head_dim"))
        if kv is not None:
            cache_k, cache_v = kv
            k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), kv_start, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), kv_start, axis=1)
        out = layers.attention(q, k, v, key_mask, cfg.attention_impl)  # [B, S, H, Dh]
        out = layers.FlatDense(
            features=cfg.hidden_size,
            in_axes=2,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=layers.normal_init(cfg.init_std, ("heads", "head_dim", "embed")),
            name="o_proj",
            **cfg.dense_options("lm/layers/attn/o_proj/kernel"),
        )(out)
        return out, (None if kv is None else (k, v))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    config: LLaDAConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)

        def dense(features, names, name):
            return layers.FlatDense(
                features,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=layers.normal_init(cfg.init_std, names),
                name=name,
                **cfg.dense_options(f"lm/layers/mlp/{name}/kernel"),
            )

        gate = dense(cfg.mlp_hidden_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg.mlp_hidden_size, ("embed", "mlp"), "up_proj")(x)
        h = layers.constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(h)


class Block(nn.Module):
    config: LLaDAConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, key_mask: Array | None, kv=None, kv_start=None):
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        x = layers.constrain(x, ("batch", "length", "embed"))
        h = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="attn_norm")(x)
        attn, kv = Attention(cfg, name="attn")(h, positions, key_mask, kv, kv_start)
        x = x + attn
        h = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="mlp_norm")(x)
        x = x + GatedMLP(cfg, name="mlp")(h)
        return x, kv  # kv: this layer's updated cache (stacked over layers by the scan), or None


def default_positions(key_mask: Array | None, batch: int, length: int) -> Array:
    """Positions 0..n-1 over the valid tokens of each row.

    With left padding this makes a row's RoPE phases (and so its result) independent of how much
    padding precedes it; without a mask it is simply 0..length-1.
    """
    if key_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return jnp.maximum(jnp.cumsum(key_mask.astype(jnp.int32), axis=1) - 1, 0)


class LLaDA(nn.Module):
    """The LLaDA mask predictor.

    Entry points (``model.apply(params, ..., method=...)``):
      * ``__call__(tokens, key_mask=None, positions=None)`` -> fp32 logits ``[B, T, V]``;
      * ``embed(tokens)`` -> ``[B, T, D]`` input embeddings (to splice image features into);
      * ``forward_embeds(embeds, key_mask, positions, logits_start, logits_length)`` -> fp32 logits
        for positions ``[logits_start, logits_start + logits_length)`` only (``logits_start`` may
        be traced), so the full ``[B, T, V]`` tensor is never built when it is not needed;
      * ``hidden_states(embeds, key_mask, positions)`` -> final-normed ``[B, T, D]``;
      * ``logits(hidden)`` -> fp32 logits of given hidden states (e.g. chunked losses);
      * ``forward_cached(span_embeds, key_mask, span_positions, cache, cache_start, logits_start,
        logits_length)`` -> (fp32 logits, updated cache): a KV-cache forward for the samplers' fast
        modes. ``cache`` is ``(keys, values)``, each ``[num_layers, B, T, KV, Dh]`` (``init_cache``);
        the span ``[cache_start, cache_start + S)`` is recomputed and every other position is
        read from the cache. With ``S = T`` and ``cache_start = 0`` it is the plain forward that
        also returns every layer's keys/values (a cache refresh).
    """

    config: LLaDAConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        if cfg.weight_quant == "none":
            self.embed_tokens = nn.Embed(
                cfg.vocab_size,
                cfg.hidden_size,
                dtype=dtype,
                param_dtype=param_dtype,
                embedding_init=layers.normal_init(cfg.init_std, ("embed_vocab", "embed")),
            )
        else:
            self.embed_tokens = layers.QuantizedEmbed(cfg.vocab_size, cfg.hidden_size, cfg.weight_quant, dtype)
        # kv (the per-layer cache) is sliced on its leading layer axis; the rest is broadcast.
        self.layers = layers.scan_layers(
            Block,
            cfg.num_layers,
            cfg.remat_policy,
            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
            unroll=cfg.unroll_layers,
            config=cfg,
        )
        self.final_norm = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype)
        self.lm_head = layers.FlatDense(
            cfg.vocab_size,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=layers.normal_init(cfg.init_std, ("embed", "vocab")),
            **cfg.dense_options("lm/lm_head/kernel"),
        )

    def embed(self, tokens: Array) -> Array:
        return self.embed_tokens(tokens)

    def hidden_states(
        self, embeds: Array, key_mask: Array | None = None, positions: Array | None = None
    ) -> Array:
        batch, length, _ = embeds.shape
        if positions is None:
            positions = default_positions(key_mask, batch, length)
        x = embeds.astype(layers.to_dtype(self.config.dtype))
        x, _ = self.layers(x, positions, key_mask, None, None)
        return self.final_norm(x)

    def logits(self, hidden: Array) -> Array:
        return self.lm_head(hidden).astype(jnp.float32)

    def forward_embeds(
        self,
        embeds: Array,  # [B, T, D]
        key_mask: Array | None = None,  # [B, T] bool
        positions: Array | None = None,  # [B, T] int
        logits_start: Array | int = 0,
        logits_length: int | None = None,
    ) -> Array:  # [B, logits_length, V] fp32
        hidden = self.hidden_states(embeds, key_mask, positions)
        if logits_length is not None:
            hidden = jax.lax.dynamic_slice_in_dim(hidden, logits_start, logits_length, axis=1)
        return self.logits(hidden)

    def forward_cached(
        self,
        embeds: Array,  # [B, S, D], the span
        key_mask: Array | None,  # [B, T] bool, over the whole cached sequence
        positions: Array,  # [B, S] int, the span's positions
        cache: tuple[Array, Array],  # keys, values: [num_layers, B, T, KV, Dh] each
        cache_start: Array | int = 0,
        logits_start: Array | int = 0,  # within the span
        logits_length: int | None = None,
    ) -> tuple[Array, tuple[Array, Array]]:  # ([B, logits_length or S, V] fp32, updated cache)
        x = embeds.astype(layers.to_dtype(self.config.dtype))
        x, cache = self.layers(x, positions, key_mask, cache, cache_start)
        hidden = self.final_norm(x)
        if logits_length is not None:
            hidden = jax.lax.dynamic_slice_in_dim(hidden, logits_start, logits_length, axis=1)
        return self.logits(hidden), cache

    def __call__(
        self, tokens: Array, key_mask: Array | None = None, positions: Array | None = None
    ) -> Array:
        return self.forward_embeds(self.embed(tokens), key_mask, positions)


def init_cache(config: LLaDAConfig, batch: int, length: int) -> tuple[Array, Array]:
    """An empty KV cache for ``LLaDA.forward_cached``: (keys, values), each
    ``[num_layers, batch, length, num_kv_heads, head_dim]`` in the compute dtype."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, layers.to_dtype(config.dtype))
    return zeros, zeros


def init_params(config: LLaDAConfig, rng: Array, boxed: bool = False) -> Any:
    """Random parameters (``{"params": ...}`` stripped). ``boxed`` keeps the logical-axis boxes."""
    variables = LLaDA(config).init(rng, jnp.zeros((1, 4), jnp.int32))
    params = variables["params"]
    return params if boxed else nn.unbox(params)


def abstract_params(config: LLaDAConfig) -> Any:
    """Shapes/dtypes of the parameters (boxed with logical axis names), allocating nothing."""
    return jax.eval_shape(lambda rng: init_params(config, rng, boxed=True), jax.random.key(0))
