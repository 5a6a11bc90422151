"""Key tables: Hugging Face tensor names <-> medv_jax parameter paths, plus the transforms between
PyTorch layouts (``Linear`` weights ``[out, in]``, ``Conv2d`` ``[out, in, kh, kw]``) and ours.

Every transform is a pure re-layout (transpose/reshape), so conversion is exact in both directions.
``{i}`` in a source name is the layer index; it selects a slice of the scanned (stacked) target.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_flax: Callable[[np.ndarray, Shape], np.ndarray]  # (hf array, target shape) -> flax array
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[Shape], Shape]  # target shape -> expected source shape


COPY = Transform("copy", lambda x, s: x, lambda x: x, lambda s: s)
# A bias over (heads, head_dim) stored flat.
SPLIT = Transform("split", lambda x, s: x.reshape(s), lambda x: x.reshape(-1), lambda s: (math.prod(s),))
# Linear weight [out, in] -> kernel [in, *out_dims].
LINEAR = Transform(
    "linear",
    lambda x, s: x.T.reshape(s),
    lambda k: k.reshape(k.shape[0], -1).T,
    lambda s: (math.prod(s[1:]), s[0]),
)
# Linear weight [out, in] -> kernel [*in_dims, out] (attention output projections).
LINEAR_OUT = Transform(
    "linear_out",
    lambda x, s: x.T.reshape(s),
    lambda k: k.reshape(-1, k.shape[-1]).T,
    lambda s: (s[-1], math.prod(s[:-1])),
)
# Conv2d weight [out, in, kh, kw] -> kernel [kh, kw, in, out].
CONV = Transform(
    "conv",
    lambda x, s: x.transpose(2, 3, 1, 0),
    lambda k: k.transpose(3, 2, 0, 1),
    lambda s: (s[3], s[2], s[0], s[1]),
)


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # may contain "{i}" for the layer index
    target: tuple[str, ...]
    transform: Transform = COPY

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.source

    def source_name(self, layer: int | None = None) -> str:
        return self.source.format(i=layer) if self.per_layer else self.source

    def pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.source).replace(re.escape("{i}"), r"(\d+)") + "$")


def prefixed(rules: list[Rule], source_prefix: str, target_prefix: tuple[str, ...]) -> list[Rule]:
    return [Rule(source_prefix + r.source, target_prefix + r.target, r.transform) for r in rules]


def _layer_rules(prefix: str, table: dict[str, tuple[tuple[str, ...], Transform]]) -> list[Rule]:
    return [Rule(prefix + "{i}." + src, ("layers",) + tgt, tf) for src, (tgt, tf) in table.items()]


# ----- LLaDA language model -----------------------------------------------------------------

_LLAMA_LAYER = {
    "input_layernorm.weight": (("attn_norm", "scale"), COPY),
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), LINEAR),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), LINEAR),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), LINEAR),
    "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), LINEAR_OUT),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), COPY),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), LINEAR),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), LINEAR),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), LINEAR),
}
# LLaDA-V / LLaDA-MedV (LLaMA names).
LLAMA_LM_RULES = [
    Rule("model.embed_tokens.weight", ("embed_tokens", "embedding")),
    *_layer_rules("model.layers.", _LLAMA_LAYER),
    Rule("model.norm.weight", ("final_norm", "scale")),
    Rule("lm_head.weight", ("lm_head", "kernel"), LINEAR),
]
LLAMA_LM_UNUSED = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]

# The original LLaDA-8B-Instruct release (OLMo names): the same tensors under other names.
_OLMO_LAYER = {
    "attn_norm.weight": (("attn_norm", "scale"), COPY),
    "q_proj.weight": (("attn", "q_proj", "kernel"), LINEAR),
    "k_proj.weight": (("attn", "k_proj", "kernel"), LINEAR),
    "v_proj.weight": (("attn", "v_proj", "kernel"), LINEAR),
    "attn_out.weight": (("attn", "o_proj", "kernel"), LINEAR_OUT),
    "ff_norm.weight": (("mlp_norm", "scale"), COPY),
    "ff_proj.weight": (("mlp", "gate_proj", "kernel"), LINEAR),  # ff_proj is the gate
    "up_proj.weight": (("mlp", "up_proj", "kernel"), LINEAR),
    "ff_out.weight": (("mlp", "down_proj", "kernel"), LINEAR),  # inside a block: down projection
}
OLMO_LM_RULES = [
    Rule("model.transformer.wte.weight", ("embed_tokens", "embedding")),
    *_layer_rules("model.transformer.blocks.", _OLMO_LAYER),
    Rule("model.transformer.ln_f.weight", ("final_norm", "scale")),
    Rule("model.transformer.ff_out.weight", ("lm_head", "kernel"), LINEAR),
]

# ----- SigLIP vision tower (names relative to "vision_model.") ---------------------------------

_SIGLIP_LAYER = {
    "layer_norm1.weight": (("ln1", "scale"), COPY),
    "layer_norm1.bias": (("ln1", "bias"), COPY),
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), LINEAR),
    "self_attn.q_proj.bias": (("attn", "q_proj", "bias"), SPLIT),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), LINEAR),
    "self_attn.k_proj.bias": (("attn", "k_proj", "bias"), SPLIT),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), LINEAR),
    "self_attn.v_proj.bias": (("attn", "v_proj", "bias"), SPLIT),
    "self_attn.out_proj.weight": (("attn", "o_proj", "kernel"), LINEAR_OUT),
    "self_attn.out_proj.bias": (("attn", "o_proj", "bias"), COPY),
    "layer_norm2.weight": (("ln2", "scale"), COPY),
    "layer_norm2.bias": (("ln2", "bias"), COPY),
    "mlp.fc1.weight": (("mlp", "fc1", "kernel"), LINEAR),
    "mlp.fc1.bias": (("mlp", "fc1", "bias"), COPY),
    "mlp.fc2.weight": (("mlp", "fc2", "kernel"), LINEAR),
    "mlp.fc2.bias": (("mlp", "fc2", "bias"), COPY),
}


def siglip_rules(use_post_layernorm: bool) -> list[Rule]:
    rules = [
        Rule("embeddings.patch_embedding.weight", ("patch_embed", "kernel"), CONV),
        Rule("embeddings.patch_embedding.bias", ("patch_embed", "bias")),
        Rule("embeddings.position_embedding.weight", ("pos_embed",)),
        *_layer_rules("encoder.layers.", _SIGLIP_LAYER),
    ]
    if use_post_layernorm:
        rules += [
            Rule("post_layernorm.weight", ("post_ln", "scale")),
            Rule("post_layernorm.bias", ("post_ln", "bias")),
        ]
    return rules


def siglip_unused(prefix: str, use_post_layernorm: bool) -> list[str]:
    """Tensors a SigLIP checkpoint may hold that LLaDA-MedV never reads. Encoder layers beyond the
    kept depth are handled by the converter (known-unused only past the configured layer count)."""
    p = re.escape(prefix)
    unused = [p + r"head\..*", p + r"embeddings\.position_ids"]
    if not use_post_layernorm:
        unused.append(p + r"post_layernorm\.(weight|bias)")
    return unused


# ----- the multimodal checkpoint --------------------------------------------------------------

MEDV_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_RULES = [
    Rule("model.mm_projector.0.weight", ("projector", "fc1", "kernel"), LINEAR),
    Rule("model.mm_projector.0.bias", ("projector", "fc1", "bias")),
    Rule("model.mm_projector.2.weight", ("projector", "fc2", "kernel"), LINEAR),
    Rule("model.mm_projector.2.bias", ("projector", "fc2", "bias")),
]


def medv_rules(use_post_layernorm: bool, use_image_newline: bool) -> list[Rule]:
    rules = prefixed(LLAMA_LM_RULES, "", ("lm",))
    rules += prefixed(siglip_rules(use_post_layernorm), MEDV_VISION_PREFIX, ("vision",))
    rules += PROJECTOR_RULES
    if use_image_newline:
        rules.append(Rule("model.image_newline", ("image_newline",)))
    return rules
