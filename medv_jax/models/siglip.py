"""SigLIP / SigLIP2 fixed-resolution vision tower (so400m-patch14-384 and small test shapes).

Patch conv -> learned position embedding -> pre-LN encoder blocks (tanh-GELU MLP, biases
everywhere) -> optional post-LayerNorm. LLaDA-V/MedV keep 26 of the 27 encoder layers and read
features before ``post_layernorm``; ``num_layers`` is the number of layers *kept* and
``use_post_layernorm`` turns the final norm on for the full-depth variant. The pooling head is
never built (unused by LLaDA-MedV).

Parameter tree (``L`` the scanned layer axis; pixel input is NHWC)::

    patch_embed/{kernel [P, P, C, D], bias [D]}
    pos_embed                         [N, D]
    layers/{ln1,ln2}/{scale,bias}     [L, D]
    layers/attn/{q,k,v}_proj/kernel   [L, D, H, Dh]   bias [L, H, Dh]
    layers/attn/o_proj/kernel         [L, H, Dh, D]   bias [L, D]
    layers/mlp/fc1/{kernel [L, D, F], bias [L, F]};  layers/mlp/fc2/{kernel [L, F, D], bias [L, D]}
    post_ln/{scale,bias}              [D]   (only with use_post_layernorm)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medv_jax.models import layers
from medv_jax.models.layers import Array

_ZEROS = nn.initializers.zeros


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1152
    num_layers: int = 26  # layers kept (the so400m checkpoint has 27)
    num_heads: int = 16
    mlp_hidden_size: int = 4304
    layer_norm_eps: float = 1e-6
    use_post_layernorm: bool = False
    # Numerics and implementation choices (not part of the checkpoint).
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str | None = None
    remat_policy: str = "none"
    unroll_layers: bool = False  # layers.scan_layers(unroll=...): for a few small layers on CPU
    # Std of the normal init of every weight matrix and embedding (only for training from scratch;
    # converted checkpoints replace it). 0.02 is the released models'; a small model trained from
    # scratch learns faster with a larger one (configs/demo.py).
    init_std: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        layers.check_choice(self.attention_impl, layers.ATTENTION_IMPLEMENTATIONS, "attention_impl")
        layers.check_choice(self.remat_policy, list(layers.REMAT_POLICIES), "remat_policy")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        # 384 // 14 = 27: the VALID patch conv drops the last 6 pixel rows/columns, as in torch.
        return (self.image_size // self.patch_size) ** 2

    def replace(self, **changes: Any) -> "SiglipConfig":
        return dataclasses.replace(self, **changes)


SIGLIP_PRESETS: dict[str, SiglipConfig] = {
    # As LLaDA-V / LLaDA-MedV use it: 26 of 27 layers, features before post-LN.
    "siglip2_so400m_patch14_384": SiglipConfig(),
    # The released vision tower at full depth with its post-LayerNorm (pooling head excluded).
    "siglip2_so400m_patch14_384_full": SiglipConfig(num_layers=27, use_post_layernorm=True),
    "siglip_tiny": SiglipConfig(
        image_size=56, patch_size=14, hidden_size=32, num_layers=2, num_heads=4, mlp_hidden_size=64
    ),
}


def _layer_norm(cfg: SiglipConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=layers.to_dtype(cfg.dtype),
        param_dtype=layers.to_dtype(cfg.param_dtype),
        scale_init=layers.param_init(nn.initializers.ones, ("norm",)),
        bias_init=layers.param_init(_ZEROS, ("norm",)),
        name=name,
    )


class Attention(nn.Module):
    config: SiglipConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)

        def proj(name):
            return layers.FlatDense(
                features=(cfg.num_heads, cfg.head_dim),
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=layers.normal_init(cfg.init_std, ("vit_embed", "vit_heads", "head_dim")),
                bias_init=layers.param_init(_ZEROS, ("vit_heads", "head_dim")),
                name=name,
            )(x)

        out = layers.attention(proj("q_proj"), proj("k_proj"), proj("v_proj"), None, cfg.attention_impl)
        return layers.FlatDense(
            features=cfg.hidden_size,
            in_axes=2,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=layers.normal_init(cfg.init_std, ("vit_heads", "head_dim", "vit_embed")),
            bias_init=layers.param_init(_ZEROS, ("vit_embed",)),
            name="o_proj",
        )(out)


class MLP(nn.Module):
    config: SiglipConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)

        def dense(features, names, name):
            return layers.FlatDense(
                features,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=layers.normal_init(cfg.init_std, names),
                bias_init=layers.param_init(_ZEROS, names[1:]),
                name=name,
            )

        h = nn.gelu(dense(cfg.mlp_hidden_size, ("vit_embed", "vit_mlp"), "fc1")(x), approximate=True)
        return dense(cfg.hidden_size, ("vit_mlp", "vit_embed"), "fc2")(h)


class EncoderBlock(nn.Module):
    config: SiglipConfig

    @nn.compact
    def __call__(self, x: Array):
        x = layers.constrain(x, ("batch", "length", "vit_embed"))
        x = x + Attention(self.config, name="attn")(_layer_norm(self.config, "ln1")(x))
        x = x + MLP(self.config, name="mlp")(_layer_norm(self.config, "ln2")(x))
        return x, None


class SiglipVisionTower(nn.Module):
    """pixels ``[B, H, W, C]`` (normalised, NHWC) -> features ``[B, N, D]``, N = (H/P)*(W/P)."""

    config: SiglipConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        x = nn.Conv(
            cfg.hidden_size,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=layers.normal_init(cfg.init_std, (None, None, None, "vit_embed")),
            bias_init=layers.param_init(_ZEROS, ("vit_embed",)),
            name="patch_embed",
        )(pixels.astype(dtype))
        batch = x.shape[0]
        x = x.reshape(batch, -1, cfg.hidden_size)  # row-major over the patch grid, like torch
        pos = self.param(
            "pos_embed",
            layers.normal_init(cfg.init_std, ("vit_patches", "vit_embed")),
            (cfg.num_patches, cfg.hidden_size),
            param_dtype,
        )
        x = x + pos.astype(dtype)[None]
        blocks = layers.scan_layers(EncoderBlock, cfg.num_layers, cfg.remat_policy, unroll=cfg.unroll_layers,
                                    config=cfg, name="layers")
        x, _ = blocks(x)
        if cfg.use_post_layernorm:
            x = _layer_norm(cfg, "post_ln")(x)
        return x


def init_params(config: SiglipConfig, rng: Array, boxed: bool = False) -> Any:
    pixels = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    params = SiglipVisionTower(config).init(rng, pixels)["params"]
    return params if boxed else nn.unbox(params)


def abstract_params(config: SiglipConfig) -> Any:
    return jax.eval_shape(lambda rng: init_params(config, rng, boxed=True), jax.random.key(0))
