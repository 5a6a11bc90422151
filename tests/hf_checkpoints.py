"""Tiny *random* checkpoints in the real Hugging Face formats, built with the real `transformers`
modules, plus the PyTorch reference forwards the parity tests compare against.

Nothing here downloads anything; every test writes its own folders under tmp_path.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

LM_DIMS = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, head_dim=16)
VISION_DIMS = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   image_size=56, patch_size=14, num_channels=3, layer_norm_eps=1e-6)


def assert_rel_close(actual, expected, tol: float = 1e-5, what: str = "") -> float:
    """max |a - b| / max |b| <= tol (the parity criterion), returning the error."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"
    return err


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms included (default init leaves norms at exactly 1 and
    biases at 0, which would hide a mis-mapped norm or bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def llama_config(**overrides) -> LlamaConfig:
    dims = {"rope_theta": 500000.0, **LM_DIMS, **overrides}
    return LlamaConfig(rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
                       tie_word_embeddings=False, **dims)


def make_llama(folder: Path | None = None, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random LLaDA-shaped LlamaForCausalLM (LLaDA-V's LM names), saved to ``folder``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**overrides)).eval()
    _randomize(model, seed)
    if folder is not None:
        model.save_pretrained(folder, safe_serialization=True)
    return model


def llama_logits(model: LlamaForCausalLM, tokens=None, embeds=None, key_mask=None) -> np.ndarray:
    """The reference: LLaMA with an all-zeros (or key-padding) 4-D float mask is bidirectional."""
    x = torch.as_tensor(np.asarray(tokens)) if tokens is not None else None
    e = torch.as_tensor(np.asarray(embeds)) if embeds is not None else None
    batch, length = (x if x is not None else e).shape[:2]
    mask = torch.zeros(batch, 1, length, length)
    if key_mask is not None:
        mask = mask.masked_fill(~torch.as_tensor(np.asarray(key_mask))[:, None, None, :], float("-inf"))
    positions = torch.arange(length)[None].expand(batch, length)
    if key_mask is not None:  # positions count valid tokens only, as medv_jax does
        positions = (torch.as_tensor(np.asarray(key_mask)).long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=x, inputs_embeds=e, attention_mask=mask, position_ids=positions)
    return out.logits.numpy()


def write_olmo_copy(folder: Path, model: LlamaForCausalLM) -> None:
    """The same weights under the original LLaDA-8B-Instruct (OLMo) names and config."""
    rename = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
              "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
              "mlp.down_proj": "ff_out", "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}
    tensors = {}
    for name, value in model.state_dict().items():
        if name == "model.embed_tokens.weight":
            new = "model.transformer.wte.weight"
        elif name == "model.norm.weight":
            new = "model.transformer.ln_f.weight"
        elif name == "lm_head.weight":
            new = "model.transformer.ff_out.weight"
        else:
            _, _, idx, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            new = f"model.transformer.blocks.{idx}.{rename[module]}.weight"
        tensors[new] = value.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = model.config
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llada", "d_model": cfg.hidden_size, "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads, "n_layers": cfg.num_hidden_layers,
        "mlp_hidden_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "embedding_size": cfg.vocab_size, "rope_theta": cfg.rope_parameters["rope_theta"], "rms_norm_eps": cfg.rms_norm_eps,
        "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081,
        "include_bias": False, "weight_tying": False,
    }))


def make_siglip(folder: Path | None = None, seed: int = 1, **overrides) -> SiglipVisionModel:
    """A random SiglipVisionModel (with its pooling head), saved with ``vision_model.*`` names."""
    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(**{**VISION_DIMS, **overrides})).eval()
    _randomize(model, seed)
    if folder is not None:
        model.save_pretrained(folder, safe_serialization=True)
    return model


def siglip_features(model: SiglipVisionModel, pixels_nhwc, layer: int | None = None) -> np.ndarray:
    """Hidden state after encoder layer ``layer`` (before post-LN), or the post-LN output."""
    x = torch.as_tensor(np.asarray(pixels_nhwc)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    return (out.last_hidden_state if layer is None else out.hidden_states[layer]).numpy()


class TorchMedV:
    """LLaDA-V's composition of the three torch modules (SigLIP minus its last layer -> Linear,
    GELU, Linear -> LLaMA with a bidirectional mask), and its checkpoint writer."""

    def __init__(self, seed: int = 2, image_aspect_ratio="square", mm_patch_merge_type="flat", **lm):
        self.lm = make_llama(seed=seed, **lm)
        self.vision = make_siglip(seed=seed + 1)
        d_v, d = VISION_DIMS["hidden_size"], self.lm.config.hidden_size
        torch.manual_seed(seed + 2)
        self.projector = torch.nn.Sequential(torch.nn.Linear(d_v, d), torch.nn.GELU(), torch.nn.Linear(d, d))
        _randomize(self.projector, seed + 2)
        self.image_newline = 0.1 * torch.randn(d, generator=torch.Generator().manual_seed(seed + 3))
        self.image_aspect_ratio = image_aspect_ratio
        self.mm_patch_merge_type = mm_patch_merge_type
        self.kept_layers = VISION_DIMS["num_hidden_layers"] - 1

    def save(self, folder: Path, vision_config_in_file: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.lm.state_dict().items()}
        dropped = f"encoder.layers.{self.kept_layers}."
        for k, v in self.vision.state_dict().items():  # transformers 5: no "vision_model." prefix
            k = k.removeprefix("vision_model.")
            if k.startswith((dropped, "head.")):  # LLaDA-V deletes the last layer and the head
                continue
            tensors["model.vision_tower.vision_tower.vision_model." + k] = v.contiguous()
        for i in (0, 2):
            tensors[f"model.mm_projector.{i}.weight"] = self.projector[i].weight.detach().contiguous()
            tensors[f"model.mm_projector.{i}.bias"] = self.projector[i].bias.detach().contiguous()
        if "unpad" in self.mm_patch_merge_type:
            tensors["model.image_newline"] = self.image_newline.contiguous()
        save_file(tensors, str(folder / "model.safetensors"))
        cfg = json.loads(self.lm.config.to_json_string())
        cfg.update(model_type="llava_llada", mm_hidden_size=VISION_DIMS["hidden_size"],
                   mm_projector_type="mlp2x_gelu", mm_vision_tower="google/siglip2-so400m-patch14-384",
                   image_aspect_ratio=self.image_aspect_ratio, mm_patch_merge_type=self.mm_patch_merge_type,
                   image_grid_pinpoints="(1x1),...,(6x6)")
        if vision_config_in_file:
            cfg["vision_config"] = json.loads(self.vision.config.to_json_string())
        (folder / "config.json").write_text(json.dumps(cfg))

    def logits(self, tokens, pixels, image_index, image_weight, newline_mask, key_mask=None) -> np.ndarray:
        """Reference forward with the same static image layout medv_jax uses."""
        b, c = pixels.shape[:2]
        feats = siglip_features(self.vision, pixels.reshape((b * c,) + pixels.shape[2:]), self.kept_layers)
        with torch.no_grad():
            proj = self.projector(torch.as_tensor(feats)).reshape(b, -1, self.lm.config.hidden_size)
            text = self.lm.model.embed_tokens(torch.as_tensor(np.asarray(tokens)))
            index = torch.as_tensor(np.asarray(image_index)).long()
            weight = torch.as_tensor(np.asarray(image_weight))
            gathered = torch.stack([proj[i][index[i]] for i in range(b)])  # [B, T, 4, D]
            spliced = (gathered * weight[..., None]).sum(2)
            nl = torch.as_tensor(np.asarray(newline_mask))
            spliced = torch.where(nl[..., None], self.image_newline.expand_as(spliced), spliced)
            is_image = (weight != 0).any(-1) | nl
            embeds = torch.where(is_image[..., None], spliced, text)
        return llama_logits(self.lm, embeds=embeds.numpy(), key_mask=key_mask)
