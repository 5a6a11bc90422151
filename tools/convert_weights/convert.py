"""Hugging Face checkpoints -> medv_jax checkpoints (``import_checkpoint``) and back
(``export_checkpoint``).

Source kinds, told apart by their tensor names:
  * ``medv``: a full LLaDA-V / LLaDA-MedV checkpoint (LM + ``model.vision_tower...`` +
    ``model.mm_projector`` [+ ``model.image_newline``]);
  * ``llada``: a language model with LLaMA names (LLaDA-V's LM) or the original LLaDA-8B-Instruct
    OLMo names (``model.transformer.blocks.N...``);
  * ``siglip``: a SigLIP/SigLIP2 vision checkpoint (``vision_model.*``).
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from tqdm import tqdm

from medv_jax import checkpoint
from medv_jax.data import anyres
from medv_jax.models import llada, medv, siglip
from tools.convert_weights import rules as R
from tools.convert_weights.hf_io import ConversionError, SafetensorsFolder, read_config, write_safetensors

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
VISION_VARIANTS = ("llada_v", "full")


# ----- configs from config.json ----------------------------------------------------------------


def lm_config_from_hf(cfg: dict, param_dtype: str) -> llada.LLaDAConfig:
    """Our LLaDA config from either the OLMo-style (``d_model``...) or LLaMA-style config.json."""
    if "d_model" in cfg:  # original LLaDA-8B-Instruct
        unsupported = {k: cfg.get(k) for k in ("include_bias", "weight_tying") if cfg.get(k)}
        heads = cfg["n_heads"]
        fields = dict(
            hidden_size=cfg["d_model"],
            num_layers=cfg["n_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("n_kv_heads") or heads,
            head_dim=cfg["d_model"] // heads,
            mlp_hidden_size=cfg["mlp_hidden_size"],
            vocab_size=cfg.get("embedding_size") or cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_sequence_length", 4096),
        )
    else:  # LLaDA-V / LLaDA-MedV (and LlamaConfig)
        unsupported = {
            k: cfg.get(k)
            for k in ("attention_bias", "mlp_bias", "tie_word_embeddings", "rope_scaling")
            if cfg.get(k)
        }
        heads = cfg["num_attention_heads"]
        fields = dict(
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            mlp_hidden_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        )
    if unsupported:
        raise ConversionError(f"config.json asks for features LLaDA does not have: {unsupported}")
    fields["rope_theta"] = _rope_theta(cfg)
    fields["rms_norm_eps"] = float(cfg.get("rms_norm_eps", 1e-5))
    # Special ids: the mask and padding ids may be recorded; BOS is not trusted (LLaDA-V's config
    # carries LLaMA-3's 128000, outside the vocabulary), the release's 126080 (docs/algorithm.md §1) stays.
    for hf_key, field in (("mask_token_id", "mask_token_id"), ("eos_token_id", "eos_token_id")):
        if isinstance(cfg.get(hf_key), int):
            fields[field] = cfg[hf_key]
    return llada.LLaDAConfig(param_dtype=param_dtype, **fields)


def _rope_theta(cfg: dict) -> float:
    """transformers < 5 writes ``rope_theta``; 5.x nests it in ``rope_parameters``."""
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"config.json rope_parameters={rope}: only plain RoPE is supported")
    return float(cfg.get("rope_theta") or rope.get("rope_theta") or 500000.0)


def vision_config_from_hf(cfg: dict, variant: str, param_dtype: str) -> siglip.SiglipConfig:
    """SigLIP config from a SiglipVisionModel / SiglipModel config.json.

    variant "llada_v": the last encoder layer is dropped and features are read before
    post_layernorm (LLaDA-V/MedV); "full": every layer plus post_layernorm.
    """
    if variant not in VISION_VARIANTS:
        raise ConversionError(f"vision variant {variant!r} is not one of {VISION_VARIANTS}")
    cfg = cfg.get("vision_config", cfg)
    depth = cfg.get("num_hidden_layers", 27)
    act = cfg.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ConversionError(f"vision hidden_act={act!r}: only the tanh GELU of SigLIP is supported")
    return siglip.SiglipConfig(
        image_size=cfg.get("image_size", 384),
        patch_size=cfg.get("patch_size", 14),
        num_channels=cfg.get("num_channels", 3),
        hidden_size=cfg.get("hidden_size", 1152),
        num_layers=depth - 1 if variant == "llada_v" else depth,
        num_heads=cfg.get("num_attention_heads", 16),
        mlp_hidden_size=cfg.get("intermediate_size", 4304),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
        use_post_layernorm=variant == "full",
        param_dtype=param_dtype,
    )


def grid_pinpoints_from_hf(value: Any, crop_size: int) -> tuple[tuple[int, int], ...]:
    """LLaVA's ``image_grid_pinpoints`` (every form LLaVA reads: ``anyres.parse_grid_pinpoints``);
    absent: LLaVA-OneVision's default grids."""
    if value is None:
        return medv.DEFAULT_GRID_PINPOINTS
    return anyres.parse_grid_pinpoints(value, crop_size)


def medv_config_from_hf(cfg: dict, vision_cfg: dict | None, param_dtype: str) -> medv.MedVConfig:
    if vision_cfg is not None:
        vision = vision_config_from_hf(vision_cfg, "llada_v", param_dtype)
    else:  # the multimodal config only names its tower (e.g. google/siglip2-so400m-patch14-384)
        vision = siglip.SIGLIP_PRESETS["siglip2_so400m_patch14_384"].replace(param_dtype=param_dtype)
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision.hidden_size:
        raise ConversionError(
            f"config.json mm_hidden_size={mm_hidden} but the vision tower has hidden_size={vision.hidden_size}"
        )
    projector = cfg.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ConversionError(f"mm_projector_type={projector!r}: only mlp2x_gelu is supported")
    try:
        return medv.MedVConfig(
            lm=lm_config_from_hf(cfg, param_dtype),
            vision=vision,
            image_aspect_ratio=cfg.get("image_aspect_ratio", "square"),
            mm_patch_merge_type=cfg.get("mm_patch_merge_type", "flat"),
            image_grid_pinpoints=grid_pinpoints_from_hf(cfg.get("image_grid_pinpoints"), vision.image_size),
        )
    except ValueError as e:
        raise ConversionError(f"config.json: {e}") from e


# ----- source detection and the rule set for a config ------------------------------------------


def detect_kind(names: list[str]) -> tuple[str, str]:
    """(kind, naming) of a checkpoint from its tensor names."""
    if any(n.startswith(("model.vision_tower.", "model.mm_projector.")) for n in names):
        return "medv", "llama"
    if any(n.startswith("model.transformer.") for n in names):
        return "llada", "olmo"
    if any(n.startswith("model.layers.") or n == "model.embed_tokens.weight" for n in names):
        return "llada", "llama"
    # SigLIP: "vision_model.*" in released checkpoints; transformers 5 saves a SiglipVisionModel
    # without the prefix. The naming returned is the prefix.
    if any(n.startswith("vision_model.") for n in names):
        return "siglip", "vision_model."
    if "embeddings.patch_embedding.weight" in names:
        return "siglip", ""
    raise ConversionError(
        "cannot tell what this checkpoint is: expected LLaDA/LLaMA (model.layers.* or "
        "model.transformer.*), SigLIP (vision_model.*) or LLaDA-V (model.vision_tower.*) tensor names; "
        f"first names: {names[:5]}"
    )


def rules_for(config: checkpoint.Config, naming: str = "llama") -> tuple[list[R.Rule], list[str]]:
    """(rules, regexes of known-unused source names) for a config."""
    if isinstance(config, medv.MedVConfig):
        rules = R.medv_rules(config.vision.use_post_layernorm, config.use_image_newline)
        unused = R.LLAMA_LM_UNUSED + R.siglip_unused(R.MEDV_VISION_PREFIX, config.vision.use_post_layernorm)
        return rules, unused
    if isinstance(config, llada.LLaDAConfig):
        return (R.OLMO_LM_RULES if naming == "olmo" else R.LLAMA_LM_RULES), R.LLAMA_LM_UNUSED
    prefix = "vision_model." if naming == "llama" else naming
    rules = R.prefixed(R.siglip_rules(config.use_post_layernorm), prefix, ())
    # A full SiglipModel checkpoint also holds the text tower.
    unused = [r"text_model\..*", r"logit_(scale|bias)"]
    return rules, unused + R.siglip_unused(prefix, config.use_post_layernorm)


def _num_layers_of(config: checkpoint.Config, target: tuple[str, ...]) -> int:
    if isinstance(config, medv.MedVConfig):
        return config.vision.num_layers if target[0] == "vision" else config.lm.num_layers
    return config.num_layers


def _is_dropped_vision_layer(config: checkpoint.Config, rule: R.Rule, layer: int) -> bool:
    """LLaDA-V drops the last SigLIP layer: source layers past the kept depth are known-unused."""
    vision_target = isinstance(config, siglip.SiglipConfig) or (
        isinstance(config, medv.MedVConfig) and rule.target[0] == "vision"
    )
    return vision_target and layer >= _num_layers_of(config, rule.target)


# ----- import ------------------------------------------------------------------------------------


def _plan(source: SafetensorsFolder, config, naming: str):
    """Match every source tensor to a target slice and check every shape, reading headers only.

    Returns [(source name, target path, layer or None, transform)]; raises ConversionError listing
    unknown tensors, shape mismatches and unfilled targets together.
    """
    rules, unused = rules_for(config, naming)
    patterns = [(r, r.pattern()) for r in rules]
    unused_res = [re.compile(u + "$") for u in unused]
    targets = flatten_dict(nn.unbox(checkpoint.abstract_params(config)))
    filled: dict[tuple, set] = {path: set() for path in targets}
    plan, unknown, bad_shapes = [], [], []
    for name in source.keys():
        match = next(((r, m) for r, p in patterns if (m := p.match(name))), None)
        if match is None:
            if not any(u.match(name) for u in unused_res):
                unknown.append(name)
            continue
        rule, m = match
        layer = int(m.group(1)) if rule.per_layer else None
        target = targets[rule.target]
        shape = tuple(target.shape)
        if layer is not None:
            if layer >= shape[0]:
                if not _is_dropped_vision_layer(config, rule, layer):
                    unknown.append(f"{name} (layer {layer} beyond the {shape[0]} configured)")
                continue
            shape = shape[1:]
        expected = rule.transform.hf_shape(shape)
        got = source.shape(name)
        if got != expected:
            bad_shapes.append(f"{name}: shape {list(got)}, expected {list(expected)}")
            continue
        plan.append((name, rule.target, layer, rule.transform))
        filled[rule.target].add(layer)
    missing = []
    for rule in rules:
        n = _num_layers_of(config, rule.target) if rule.per_layer else None
        want = set(range(n)) if rule.per_layer else {None}
        for layer in sorted(want - filled[rule.target], key=lambda x: -1 if x is None else x):
            missing.append(rule.source_name(layer))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): " + ", ".join(missing))
    if unknown:
        problems.append(f"unknown tensors ({len(unknown)}): " + ", ".join(unknown))
    if bad_shapes:
        problems.append(f"wrong shapes ({len(bad_shapes)}): " + "; ".join(bad_shapes))
    if problems:
        raise ConversionError(f"cannot convert {source.folder}:\n  " + "\n  ".join(problems))
    return plan, targets


def _target_dtype(source: SafetensorsFolder, dtype: str) -> str:
    if dtype != "auto":
        np.dtype(jax.numpy.dtype(dtype))
        return dtype
    names = {_SAFETENSORS_DTYPES.get(d, d) for d in source.dtypes()}
    return names.pop() if len(names) == 1 else "float32"


def build_config(src: Path, kind: str, dtype: str, vision_config: Path | None, vision_variant: str):
    hf = read_config(src)
    try:
        if kind == "medv":
            vis = read_config(vision_config) if vision_config else hf.get("vision_config")
            return medv_config_from_hf(hf, vis, dtype)
        if kind == "llada":
            return lm_config_from_hf(hf, dtype)
        return vision_config_from_hf(hf, vision_variant, dtype)
    except KeyError as e:
        raise ConversionError(f"{src / 'config.json'} lacks the field {e}") from e


def convert_params(src: str | Path, dtype: str = "auto", vision_config: str | Path | None = None,
                   vision_variant: str = "llada_v", progress: bool = False):
    """Read a Hugging Face folder and return ``(config, params)`` as numpy arrays."""
    src = Path(src)
    source = SafetensorsFolder(src)
    kind, naming = detect_kind(source.keys())
    dtype = _target_dtype(source, dtype)
    config = build_config(src, kind, dtype, Path(vision_config) if vision_config else None, vision_variant)
    plan, targets = _plan(source, config, naming)
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    out = {path: np.empty(t.shape, np_dtype) for path, t in targets.items()}
    for name, path, layer, transform in tqdm(plan, desc="converting", unit="tensor", disable=not progress):
        dest = out[path] if layer is None else out[path][layer]
        dest[...] = transform.to_flax(source.get(name), dest.shape).astype(np_dtype, copy=False)
    return config, unflatten_dict(out)


def import_checkpoint(src, dst, dtype: str = "auto", vision_config=None, vision_variant: str = "llada_v",
                      overwrite: bool = False, progress: bool = False):
    """Convert a Hugging Face folder ``src`` into a medv_jax checkpoint at ``dst``.

    Nothing is left at ``dst`` when anything fails."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists (use --overwrite)")
    config, params = convert_params(src, dtype, vision_config, vision_variant, progress)
    checkpoint.save_pretrained(dst, config, params, overwrite=overwrite)
    return config


# ----- export ------------------------------------------------------------------------------------


def hf_config_for(config: checkpoint.Config) -> dict:
    """A config.json that ``import_checkpoint`` (and LLaDA-V's code) reads back to ``config``."""
    if isinstance(config, siglip.SiglipConfig):
        return _siglip_hf_config(config)
    lm = config.lm if isinstance(config, medv.MedVConfig) else config
    out = {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "hidden_size": lm.hidden_size,
        "num_hidden_layers": lm.num_layers,
        "num_attention_heads": lm.num_heads,
        "num_key_value_heads": lm.num_kv_heads,
        "head_dim": lm.head_dim,
        "intermediate_size": lm.mlp_hidden_size,
        "vocab_size": lm.vocab_size,
        "max_position_embeddings": lm.max_position_embeddings,
        "rope_theta": lm.rope_theta,
        "rms_norm_eps": lm.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "rope_scaling": None,
        "mask_token_id": lm.mask_token_id,
        "eos_token_id": lm.eos_token_id,
        "torch_dtype": str(lm.param_dtype),
    }
    if isinstance(config, medv.MedVConfig):
        out.update(
            architectures=["LlavaLLaDAModelLM"],
            mm_hidden_size=config.vision.hidden_size,
            mm_projector_type="mlp2x_gelu",
            mm_vision_select_layer=-2,
            image_aspect_ratio=config.image_aspect_ratio,
            mm_patch_merge_type=config.mm_patch_merge_type,
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
            vision_config=_siglip_hf_config(config.vision),
        )
    return out


def _siglip_hf_config(v: siglip.SiglipConfig) -> dict:
    if v.use_post_layernorm:
        depth = v.num_layers
    else:  # LLaDA-V layout: the config keeps the released depth, the weights lack the last layer
        depth = v.num_layers + 1
    return {
        "model_type": "siglip_vision_model",
        "architectures": ["SiglipVisionModel"],
        "hidden_size": v.hidden_size,
        "intermediate_size": v.mlp_hidden_size,
        "num_hidden_layers": depth,
        "num_attention_heads": v.num_heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": "gelu_pytorch_tanh",
        "torch_dtype": str(v.param_dtype),
    }


def hf_tensors(config: checkpoint.Config, params: Any) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face name, numpy array) for every parameter, LLaDA-V (LLaMA) names."""
    rules, _ = rules_for(config, "llama")
    flat = flatten_dict(nn.unbox(params))
    for rule in rules:
        value = np.asarray(flat[rule.target])
        if rule.per_layer:
            for layer in range(value.shape[0]):
                yield rule.source_name(layer), rule.transform.to_hf(value[layer])
        else:
            yield rule.source, rule.transform.to_hf(value)


def export_checkpoint(src, dst, overwrite: bool = False, max_shard_bytes: int = 5 * 1024**3):
    """Write the medv_jax checkpoint ``src`` as a Hugging Face folder (safetensors + config.json); an
    adapters checkpoint is written with its adapters merged into its base's weights."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists (use --overwrite)")
    config, params = checkpoint.load_pretrained(src, merge_adapters=True, weight_quant="none")
    params = jax.tree_util.tree_map(np.asarray, params)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config_for(config), indent=2) + "\n")
        write_safetensors(tmp, hf_tensors(config, params), max_shard_bytes)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


__all__ = [
    "ConversionError",
    "convert_params",
    "import_checkpoint",
    "export_checkpoint",
    "hf_tensors",
    "hf_config_for",
]
