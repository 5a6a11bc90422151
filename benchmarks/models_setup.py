"""Shared set-up of the sampler benchmarks: named model shapes, a random LLaDA-V-style Hugging Face
checkpoint folder built with the real ``transformers`` modules, its weights loaded into medv_jax,
and a deterministic set of multimodal prompts (random text around one square image).

Nothing is downloaded: every folder is written by ``build_checkpoint``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.torch_reference import SpecialIds


@dataclasses.dataclass(frozen=True)
class Shape:
    """A LLaDA-shaped LM + SigLIP-shaped tower (layers counted as stored: one is dropped at load)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    mlp_hidden_size: int
    vision_image_size: int
    vision_patch_size: int
    vision_hidden_size: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    ids: SpecialIds
    rope_theta: float = 500000.0

    @property
    def image_tokens(self) -> int:
        return (self.vision_image_size // self.vision_patch_size) ** 2


def _ids_below(vocab: int, usable: int) -> SpecialIds:
    """Special ids just below ``usable`` (the tokenizer's size) in a vocabulary of ``vocab`` rows."""
    return SpecialIds(bos=usable - 6, eos=usable - 5, mask=usable - 4, start_header=usable - 3,
                      end_header=usable - 2, eot=usable - 1, tokenizer_vocab_size=usable)


SHAPES: dict[str, Shape] = {
    # Test-sized: runs in well under a second per answer.
    "tiny": Shape(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, mlp_hidden_size=96,
                  vision_image_size=56, vision_patch_size=14, vision_hidden_size=32, vision_layers=3,
                  vision_heads=4, vision_mlp=48, ids=_ids_below(96, 90)),
    # CPU-sized wide model: hidden 512, 8 layers, vocab 32k; a 384 px / 14 px tower gives
    # 729 image tokens (4 layers kept of 5).
    "cpu_wide": Shape(vocab_size=32768, hidden_size=512, num_layers=8, num_heads=8, head_dim=64,
                      mlp_hidden_size=1408, vision_image_size=384, vision_patch_size=14,
                      vision_hidden_size=384, vision_layers=5, vision_heads=6, vision_mlp=1536,
                      ids=_ids_below(32768, 32006)),
    # LLaDA-8B + SigLIP2 so400m (docs/algorithm.md §1 and §2); for GPU runs (bf16).
    "llada_8b": Shape(vocab_size=126464, hidden_size=4096, num_layers=32, num_heads=32, head_dim=128,
                      mlp_hidden_size=12288, vision_image_size=384, vision_patch_size=14,
                      vision_hidden_size=1152, vision_layers=27, vision_heads=16, vision_mlp=4304,
                      ids=SpecialIds()),
}


def build_checkpoint(folder: str | Path, shape: Shape, seed: int = 0, init_std: float = 0.05,
                     dtype: str = "float32", eot_scale: float = 1.0) -> Path:
    """Write a random LLaDA-V-style checkpoint (LLaMA LM names + vision tower + projector) to
    ``folder`` with the real transformers modules. Reuses ``folder`` when it already holds the
    same shape, seed and dtype (``bench_meta.json``).

    ``eot_scale`` multiplies the LM head's end-of-turn row: > 1 makes random weights stop some
    answers early (random weights otherwise practically never emit the stop token)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    folder = Path(folder)
    meta = {"shape": dataclasses.asdict(shape), "seed": seed, "init_std": init_std, "dtype": dtype,
            "eot_scale": eot_scale}
    meta_path = folder / "bench_meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) == json.loads(json.dumps(meta)):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    lm_cfg = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                         intermediate_size=shape.mlp_hidden_size, num_hidden_layers=shape.num_layers,
                         num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_heads,
                         head_dim=shape.head_dim, rope_theta=shape.rope_theta, rms_norm_eps=1e-5,
                         attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
                         max_position_embeddings=8192)
    vis_cfg = SiglipVisionConfig(hidden_size=shape.vision_hidden_size, intermediate_size=shape.vision_mlp,
                                 num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                                 image_size=shape.vision_image_size, patch_size=shape.vision_patch_size,
                                 num_channels=3, layer_norm_eps=1e-6)
    with torch.device("meta"):  # names and shapes only; the values are drawn below
        lm = LlamaForCausalLM(lm_cfg)
        vision = SiglipVisionModel(vis_cfg)
        d_v, d = shape.vision_hidden_size, shape.hidden_size
        projector = torch.nn.Sequential(torch.nn.Linear(d_v, d), torch.nn.GELU(), torch.nn.Linear(d, d))
    target = getattr(torch, dtype)
    tensors: dict[str, Any] = {}

    def rand(name: str, shape_: tuple[int, ...]) -> Any:
        # Norm weights near 1 (not exactly: a mis-mapped norm must change the result), the rest
        # normal(0, init_std): logits spread enough that greedy choices are not near-ties.
        if "norm" in name and name.endswith("weight"):
            return (1.0 + 0.1 * torch.randn(shape_, generator=gen)).to(target)
        return (init_std * torch.randn(shape_, generator=gen)).to(target)

    with torch.no_grad():
        for name, p in lm.state_dict().items():
            tensors[name] = rand(name, tuple(p.shape))
        tensors["lm_head.weight"][shape.ids.eot] *= eot_scale
        dropped = f"encoder.layers.{shape.vision_layers - 1}."
        for name, p in vision.state_dict().items():
            name = name.removeprefix("vision_model.")
            if name.startswith((dropped, "head.")):  # LLaDA-V deletes the last layer and the head
                continue
            tensors["model.vision_tower.vision_tower.vision_model." + name] = rand(name, tuple(p.shape))
        for i in (0, 2):
            for part in ("weight", "bias"):
                p = getattr(projector[i], part)
                tensors[f"model.mm_projector.{i}.{part}"] = rand(part, tuple(p.shape))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    cfg = json.loads(lm_cfg.to_json_string())
    ids = shape.ids
    cfg.update(model_type="llava_llada", mm_hidden_size=d_v, mm_projector_type="mlp2x_gelu",
               mm_vision_tower="google/siglip2-so400m-patch14-384", image_aspect_ratio="square",
               mm_patch_merge_type="flat", mask_token_id=ids.mask, eos_token_id=ids.eos,
               vision_config=json.loads(vis_cfg.to_json_string()), torch_dtype=dtype)
    (folder / "config.json").write_text(json.dumps(cfg))
    meta_path.write_text(json.dumps(meta))
    return folder


def load_jax(folder: str | Path, ids: SpecialIds, dtype: str = "float32"):
    """(MedVConfig, params on the default device) from the checkpoint folder, through the project's
    converter, with the special ids of the benchmark's vocabulary."""
    import jax

    from tools.convert_weights import convert_params

    config, params = convert_params(folder, dtype)
    lm = config.lm.replace(bos_token_id=ids.bos, eos_token_id=ids.eos, mask_token_id=ids.mask,
                           start_header_id=ids.start_header, end_header_id=ids.end_header,
                           eot_token_id=ids.eot, tokenizer_vocab_size=ids.tokenizer_vocab_size,
                           dtype=dtype, max_position_embeddings=max(config.lm.max_position_embeddings, 8192))
    config = config.replace(lm=lm, vision=config.vision.replace(dtype=dtype))
    return config, jax.device_put(params)


@dataclasses.dataclass
class Prompt:
    tokens: np.ndarray  # [P] int32 (image slots hold EOS, the padding id)
    image_mask: np.ndarray  # [P] bool
    pixels: np.ndarray  # [1, S, S, 3] float32, already normalised


def make_prompts(shape: Shape, n: int, prompt_len: int, seed: int = 0) -> list[Prompt]:
    """``n`` prompts of exactly ``prompt_len`` tokens in the docs/algorithm.md §3 layout (random text):
    BOS, user header, the image's slots, question text, eot, assistant header."""
    ids = shape.ids
    n_img = shape.image_tokens
    head = [ids.bos, ids.start_header, 0, ids.end_header]
    tail = [ids.eot, ids.start_header, 1, ids.end_header]
    n_text = prompt_len - len(head) - n_img - len(tail)
    if n_text < 1:
        raise ValueError(f"prompt_len={prompt_len} leaves no room for text around {n_img} image tokens")
    prompts = []
    for i in range(n):
        rng = np.random.RandomState(seed + i)
        text = rng.randint(2, ids.bos, size=n_text).tolist()
        tokens = np.asarray(head + [ids.eos] * n_img + text + tail, np.int32)
        image_mask = np.zeros(prompt_len, bool)
        image_mask[len(head): len(head) + n_img] = True
        s = shape.vision_image_size
        pixels = rng.uniform(-1, 1, size=(1, s, s, 3)).astype(np.float32)
        prompts.append(Prompt(tokens, image_mask, pixels))
    return prompts


def jax_prompt_batch(config, prompt: Prompt):
    """The PromptBatch (batch 1) medv_jax's multimodal sampler takes for ``prompt``."""
    from medv_jax.data import image_layout
    from medv_jax.sampling.multimodal import PromptBatch, image_config_for

    s = config.vision.image_size
    layout = image_layout.image_token_layout((s, s), image_config_for(config))
    index, weight, newline = image_layout.place_in_sequence(prompt.image_mask, layout)
    p = len(prompt.tokens)
    return PromptBatch(tokens=prompt.tokens[None], key_mask=np.ones((1, p), bool), pixels=prompt.pixels[None],
                       image_index=index[None], image_weight=weight[None], image_newline_mask=newline[None],
                       valid=np.ones((1,), bool))
