"""LLaDA-V generation written plainly in eager PyTorch: the reference the JAX sampler is timed and
checked against.

This is what a user of the reference implementation runs: the checkpoint folder's weights in the
stock ``transformers`` modules (``LlamaForCausalLM`` with an all-zeros 4-D attention mask, which
makes its attention bidirectional as in LLaDA; ``SiglipVisionModel`` minus its last layer, read
before the post-LayerNorm; the ``mlp2x_gelu`` projector as ``nn.Sequential``), batch 1, one Python
loop iteration per diffusion step, each step a full forward over prompt + canvas under
``torch.no_grad()``, greedy low-confidence remasking (docs/algorithm.md §5).

Choices, stated:

* Image tokens: the reference runs the vision tower and projector itself (once per answer, before
  the loop) and splices the features at the image slots, so an end-to-end timing includes the
  image encoding in both stacks. Pixels arrive already preprocessed (resize/normalise is host
  work outside both stacks). Square/pad single-crop layouts only (729 features in patch order,
  plus the trailing ``image_newline`` when the merge type contains "unpad").
* Logits: by default the LM head runs over the whole canvas each step, as the reference's
  ``model(inputs_embeds=x).logits`` does; ``logits="block"`` runs it on the current block only
  (what the JAX sampler does) to separate that saving from the rest.
* The selection rule is docs/algorithm.md §5 exactly as ``medv_jax.sampling.diffusion`` documents it (ids
  ``>= tokenizer_vocab_size`` and BOS/EOS/header ids banned at masked positions, committed
  positions tracked explicitly, confidence ties to the lower position, argmax ties to the lower
  id, the stop rule after each step), so that at fp32 the two stacks give the same tokens.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
NEWLINE_KEY = "model.image_newline"


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids the sampler needs (docs/algorithm.md §1 defaults: LLaDA-8B's tokenizer)."""

    bos: int = 126080
    eos: int = 126081
    mask: int = 126336
    start_header: int = 126346
    end_header: int = 126347
    eot: int = 126348
    tokenizer_vocab_size: int = 126349  # ids >= this are padding rows, banned at sampling


@dataclasses.dataclass
class ReferenceModel:
    lm: LlamaForCausalLM
    vision: SiglipVisionModel | None
    projector: torch.nn.Sequential | None
    image_newline: torch.Tensor | None  # [D] or None
    merge_type: str
    ids: SpecialIds

    @property
    def device(self) -> torch.device:
        return self.lm.lm_head.weight.device


@dataclasses.dataclass
class GenerateResult:
    tokens: list[int]  # the generated region, length gen_length; never-committed positions = MASK
    answer_length: int  # tokens before the first end-of-turn (gen_length if none)
    steps_run: int
    step_seconds: list[float]  # wall time of each step (forward + selection)
    encode_seconds: float  # image encoding + prompt embedding, before the loop


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors folder."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing safetensors file")
        tensors.update(load_file(str(path)))
    return tensors


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or rope.get("rope_theta") or 500000.0)


def llama_config_from(cfg: dict) -> LlamaConfig:
    """LlamaConfig of a LLaDA-V/MedV config.json (LLaMA field names)."""
    try:
        return LlamaConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=_rope_theta(cfg),
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks the field {e}") from e


def load_reference(
    folder: str | Path,
    ids: SpecialIds = SpecialIds(),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ReferenceModel:
    """The torch modules of a LLaDA-V-style checkpoint folder (LM, and the vision tower and
    projector when the folder holds them), in eval mode on ``device``."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: no config.json in the checkpoint folder")
    cfg = json.loads(config_path.read_text())
    return build_reference(cfg, _read_tensors(folder), ids, device, dtype, where=str(folder))


def build_reference(
    cfg: dict,
    tensors: dict[str, torch.Tensor],
    ids: SpecialIds = SpecialIds(),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    where: str = "checkpoint",
) -> ReferenceModel:
    """``load_reference`` from a parsed config.json and its tensors (LLaDA-V names)."""
    lm_tensors = {
        k: v for k, v in tensors.items()
        if not k.startswith((VISION_PREFIX, PROJECTOR_PREFIX, NEWLINE_KEY))
    }
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build (and randomly initialise) straight in the target dtype
    try:
        with torch.device(device):
            lm = LlamaForCausalLM(llama_config_from(cfg))
            vision = projector = None
            vision_tensors = {
                k[len(VISION_PREFIX):]: v for k, v in tensors.items() if k.startswith(VISION_PREFIX)
            }
            if vision_tensors:
                if "vision_config" not in cfg:
                    raise ValueError(f"{where}: a vision tower is stored but config.json has no vision_config")
                vcfg = dict(cfg["vision_config"])
                # LLaDA-V deletes the tower's last layer (and reads features before post-LN).
                vcfg["num_hidden_layers"] = vcfg["num_hidden_layers"] - 1
                vcfg["vision_use_head"] = False
                vcfg = {k: v for k, v in vcfg.items() if k in SiglipVisionConfig().to_dict()}
                vision = SiglipVisionModel(SiglipVisionConfig(**vcfg))
                w1 = tensors[PROJECTOR_PREFIX + "0.weight"]
                w2 = tensors[PROJECTOR_PREFIX + "2.weight"]
                projector = torch.nn.Sequential(
                    torch.nn.Linear(w1.shape[1], w1.shape[0]),
                    torch.nn.GELU(),
                    torch.nn.Linear(w2.shape[1], w2.shape[0]),
                )
    finally:
        torch.set_default_dtype(previous)
    lm.load_state_dict(lm_tensors, strict=True)
    if vision is not None:
        missing, unexpected = vision.load_state_dict(vision_tensors, strict=False)
        # post_layernorm is never applied (features are read before it): a checkpoint may omit it.
        missing = [k for k in missing if not k.startswith("post_layernorm.")]
        if missing or unexpected:
            raise ValueError(f"{where}: vision tower tensors do not match: missing {missing}, unexpected {unexpected}")
        projector.load_state_dict(
            {k[len(PROJECTOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}
        )
        vision.eval()
        projector.eval()
    newline = tensors.get(NEWLINE_KEY)
    return ReferenceModel(
        lm=lm.to(device=device, dtype=dtype).eval(),
        vision=None if vision is None else vision.to(device=device, dtype=dtype),
        projector=None if projector is None else projector.to(device=device, dtype=dtype),
        image_newline=None if newline is None else newline.to(device=device, dtype=dtype),
        merge_type=cfg.get("mm_patch_merge_type", "flat"),
        ids=ids,
    )


def transfer_counts(masked: int, steps: int) -> list[int]:
    """Tokens committed at each step of a block holding ``masked`` masked positions (docs/algorithm.md §5 step 2)."""
    return [masked // steps + (1 if i < masked % steps else 0) for i in range(steps)]


def banned_ids(vocab_size: int, ids: SpecialIds) -> torch.Tensor:
    banned = torch.arange(vocab_size) >= ids.tokenizer_vocab_size
    for i in (ids.bos, ids.eos, ids.start_header, ids.end_header):
        if 0 <= i < vocab_size:
            banned[i] = True
    return banned


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def encode_prompt(
    ref: ReferenceModel,
    tokens: np.ndarray,  # [P] int
    image_mask: np.ndarray | None = None,  # [P] bool, the image slots
    pixels: np.ndarray | None = None,  # [C, S, S, 3] preprocessed (NHWC, as medv_jax)
) -> torch.Tensor:  # [P, D]
    """Prompt embeddings with the image features spliced in at the image slots, in order."""
    dev = ref.device
    embeds = ref.lm.model.embed_tokens(torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=dev))
    if image_mask is None or not np.any(image_mask):
        return embeds
    if ref.vision is None or pixels is None:
        raise ValueError("prompt has image slots but no vision tower / pixels were given")
    x = torch.as_tensor(np.asarray(pixels), device=dev, dtype=embeds.dtype).permute(0, 3, 1, 2)
    feats = ref.vision(pixel_values=x, output_hidden_states=True).hidden_states[-1]  # before post-LN
    feats = ref.projector(feats).reshape(-1, embeds.shape[-1])  # [C * N, D]
    if "unpad" in ref.merge_type:  # single-crop branch: one trailing image_newline
        feats = torch.cat([feats, ref.image_newline[None]], dim=0)
    slots = torch.as_tensor(np.flatnonzero(image_mask), device=dev)
    if slots.numel() != feats.shape[0]:
        raise ValueError(f"image_mask has {slots.numel()} slots but the image gives {feats.shape[0]} features")
    embeds = embeds.clone()
    embeds[slots] = feats.to(embeds.dtype)
    return embeds


@torch.no_grad()
def generate(
    ref: ReferenceModel,
    tokens: np.ndarray,  # [P] int
    gen_length: int = 128,
    block_length: int = 128,
    steps: int = 128,
    image_mask: np.ndarray | None = None,
    pixels: np.ndarray | None = None,
    logits: str = "full",
    on_step: Callable[[int, list[int]], Any] | None = None,
) -> GenerateResult:
    """Greedy low-confidence reverse diffusion for one prompt (batch 1), one step per iteration."""
    if gen_length % block_length or steps % (gen_length // block_length) or steps > gen_length:
        raise ValueError(f"bad schedule gen_length={gen_length} block_length={block_length} steps={steps}")
    if logits not in ("full", "block"):
        raise ValueError(f"logits={logits!r} is not one of ['full', 'block']")
    ids, lm, dev = ref.ids, ref.lm, ref.device
    t0 = time.perf_counter()
    prompt = encode_prompt(ref, tokens, image_mask, pixels)  # [P, D]
    _sync(dev)
    encode_seconds = time.perf_counter() - t0
    p_len, hidden = prompt.shape
    total = p_len + gen_length
    mask_embed = lm.model.embed_tokens(torch.tensor([ids.mask], device=dev))[0]
    x = torch.cat([prompt, mask_embed.expand(gen_length, hidden)])[None].clone()  # [1, P + L, D]
    attn = torch.zeros(1, 1, total, total, dtype=x.dtype, device=dev)  # all zeros: bidirectional
    positions = torch.arange(total, device=dev)[None]
    banned = banned_ids(lm.config.vocab_size, ids).to(dev)
    gen_tokens = torch.full((gen_length,), ids.mask, dtype=torch.long, device=dev)
    committed = torch.zeros(gen_length, dtype=torch.bool, device=dev)
    gen_index = torch.arange(gen_length, device=dev)
    stop = gen_length
    num_blocks = gen_length // block_length
    spb = steps // num_blocks
    step_seconds: list[float] = []
    for b in range(num_blocks):
        lo, hi = b * block_length, (b + 1) * block_length
        counts = transfer_counts(int((~committed[lo:hi]).sum()), spb)
        for i in range(spb):
            if not bool((~committed[:stop]).any()):  # every position before the stop committed
                break
            s0 = time.perf_counter()
            if logits == "full":
                out = lm(inputs_embeds=x, attention_mask=attn, position_ids=positions, use_cache=False)
                blk_logits = out.logits[0, p_len + lo: p_len + hi].float()  # [B, V]
            else:
                h = lm.model(inputs_embeds=x, attention_mask=attn, position_ids=positions,
                             use_cache=False).last_hidden_state
                blk_logits = lm.lm_head(h[0, p_len + lo: p_len + hi]).float()
            blk_logits = blk_logits.masked_fill(banned, float("-inf"))
            x0 = blk_logits.argmax(-1)  # [B]
            conf = torch.softmax(blk_logits, -1).gather(-1, x0[:, None])[:, 0]
            eligible = ~committed[lo:hi] & (gen_index[lo:hi] < stop)
            conf = torch.where(eligible, conf, torch.full_like(conf, float("-inf")))
            k = min(counts[i], int(eligible.sum()))
            pick = torch.sort(conf, descending=True, stable=True).indices[:k]  # ties: lower position
            gen_tokens[lo + pick] = x0[pick]
            committed[lo + pick] = True
            x[0, p_len + lo + pick] = lm.model.embed_tokens(x0[pick]).to(x.dtype)
            eot = torch.nonzero(committed & (gen_tokens == ids.eot))
            if eot.numel():
                stop = min(stop, int(eot[0, 0]))
            _sync(dev)
            step_seconds.append(time.perf_counter() - s0)
            if on_step is not None:
                on_step(len(step_seconds), gen_tokens.tolist())
        else:
            continue
        break
    return GenerateResult(gen_tokens.tolist(), stop, len(step_seconds), step_seconds, encode_seconds)
