"""Training throughput of the jitted train step (``medv_jax.train.step`` + ``loss``): step time,
tokens/s and MFU, optionally against a plain eager PyTorch train step of the same model, loss,
batch, masks and optimizer (CPU comparison).

    python benchmarks/train_throughput.py --config demo --torch              # CPU: JAX vs PyTorch
    python benchmarks/train_throughput.py --config cpu_wide --torch --steps 5
    python benchmarks/train_throughput.py --config llada_1b                  # GPU: MFU (bf16)
    python benchmarks/train_throughput.py --config mini_stage1 --unroll_layers both --steps 41

MFU = model FLOPs per step / step time / peak FLOPs. Model FLOPs (no rematerialisation counted):
``6 * N * tokens`` for every trained matmul weight (LM layers and head, projector; the input
embedding is a gather), ``2 *`` for a frozen module no gradient flows through (the vision tower
under the stage-2 recipe) and ``4 *`` for a frozen module gradients must cross, plus attention
``12 * layers * heads * head_dim * T^2`` per sequence (6 * for a forward-only tower), full
(bidirectional) attention. Peak FLOPs: ``--peak_flops``, else 989e12 for an H100/H200 in bf16,
else measured on CPU (best fp32 matmul throughput of this process; stated in the output).

Imports only medv_jax.models / medv_jax.train.{step,loss,optimizer} / medv_jax.sharding: no
ml_collections, grain or tensorflow-datasets (GPU machines lack them). ``--config demo`` mirrors
configs/demo.py (tests/benchmarks checks the mirror against the file).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402


@dataclasses.dataclass(frozen=True)
class TrainShape:
    lm: dict  # LLaDAConfig fields over the llada_8b preset
    vision: dict  # SiglipConfig fields over the so400m preset
    batch: int
    seq: int
    answer: int  # labelled positions at the end of each sequence
    dtype: str  # compute dtype (params are fp32)
    remat: str
    ce_chunk: int
    frozen: tuple[str, ...]  # regexes of frozen parameter groups
    lr: float


# configs/mini/: the demo's LM with the reports' 768-row vocabulary, a tower on 64 px scans in 32 px
# patches (4 image tokens).
MINI_LM = dict(vocab_size=768, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32,
               mlp_hidden_size=384, max_position_embeddings=256, rope_theta=10000.0, init_std=0.15)
MINI_VISION = dict(image_size=64, patch_size=32, hidden_size=64, num_layers=2, num_heads=4, mlp_hidden_size=128,
                   init_std=0.15)

CONFIGS: dict[str, TrainShape] = {
    # configs/demo.py: LM d128 x 4, tower 64 px / 16 px patches (16 image tokens), 40-token
    # sequences, global batch 64, everything trained, fp32.
    "demo": TrainShape(
        lm=dict(vocab_size=640, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32,
                mlp_hidden_size=384, max_position_embeddings=256, rope_theta=10000.0, init_std=0.15),
        vision=dict(image_size=64, patch_size=16, hidden_size=64, num_layers=2, num_heads=4, mlp_hidden_size=128,
                    init_std=0.15),
        batch=64, seq=40, answer=6, dtype="float32", remat="none", ce_chunk=96, frozen=(), lr=2e-3),
    # configs/mini/stage1_align.py: rows of 36 (a caption after the image's 4 tokens), everything trained.
    "mini_stage1": TrainShape(
        lm=MINI_LM, vision=MINI_VISION,
        batch=32, seq=36, answer=31, dtype="float32", remat="none", ce_chunk=128, frozen=(), lr=2e-3),
    # configs/mini/stage2_instruct.py's shapes: rows of 88 (a prompt padded to 32, then the answers)
    "mini_stage2": TrainShape(
        lm=MINI_LM, vision=MINI_VISION,
        batch=32, seq=88, answer=56, dtype="float32", remat="none", ce_chunk=128, frozen=(), lr=2e-3),
    # CPU-sized wide model (as the sampler benchmark): hidden 512 x 8, vocab 32k, a 384 px tower
    # (729 image tokens, frozen as in stage 2), 1024-token sequences.
    "cpu_wide": TrainShape(
        lm=dict(vocab_size=32768, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64,
                mlp_hidden_size=1408, max_position_embeddings=4096),
        vision=dict(hidden_size=384, num_layers=4, num_heads=6, mlp_hidden_size=1536),
        batch=1, seq=1024, answer=128, dtype="float32", remat="none", ce_chunk=512, frozen=("^vision/",),
        lr=1e-5),
    # ~1B LLaDA-shaped LM (hidden 2048 x 16 layers, MLP 5632, the 126k vocabulary: 1.34B params,
    # 1.08B in matmuls) + the so400m tower, stage-2 recipe (tower frozen), bf16 compute.
    "llada_1b": TrainShape(
        lm=dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16, head_dim=128,
                mlp_hidden_size=5632),
        vision=dict(), batch=8, seq=2048, answer=512, dtype="bfloat16", remat="none", ce_chunk=1024,
        frozen=("^vision/",), lr=1e-5),
}


def medv_config(shape: TrainShape, remat: str | None = None, dtype: str | None = None,
                attention_impl: str | None = None, unroll_layers: bool = False):
    from medv_jax.models import llada, medv, siglip

    numerics = dict(dtype=dtype or shape.dtype, param_dtype="float32", remat_policy=remat or shape.remat,
                    attention_impl=attention_impl, unroll_layers=unroll_layers)
    lm = llada.LLADA_PRESETS["llada_8b"].replace(**shape.lm, **numerics)
    vocab = lm.vocab_size
    if lm.mask_token_id >= vocab:  # small vocabularies: special ids at the top (as a tokenizer would)
        lm = lm.replace(tokenizer_vocab_size=vocab, bos_token_id=vocab - 6, eos_token_id=vocab - 5,
                        mask_token_id=vocab - 4, start_header_id=vocab - 3, end_header_id=vocab - 2,
                        eot_token_id=vocab - 1)
    vision = siglip.SIGLIP_PRESETS["siglip2_so400m_patch14_384"].replace(**shape.vision, **numerics)
    return medv.MedVConfig(lm=lm, vision=vision, image_aspect_ratio="square", mm_patch_merge_type="flat")


def make_batch(config, shape: TrainShape, seed: int = 0) -> dict[str, np.ndarray]:
    """One training batch of random ids: BOS, the image's slots, text; the last ``answer``
    positions labelled (the answer), everything else -100."""
    rng = np.random.RandomState(seed)
    lm = config.lm
    n_img = (config.vision.image_size // config.vision.patch_size) ** 2
    b, t = shape.batch, shape.seq
    if n_img + 1 + shape.answer > t:
        raise ValueError(f"seq={t} is too short for {n_img} image tokens + {shape.answer} answer tokens")
    tokens = rng.randint(0, lm.bos_token_id, size=(b, t)).astype(np.int32)
    tokens[:, 0] = lm.bos_token_id
    tokens[:, 1:1 + n_img] = lm.eos_token_id  # image slots (replaced by features)
    labels = np.full((b, t), -100, np.int32)
    labels[:, t - shape.answer:] = tokens[:, t - shape.answer:]
    index = np.zeros((b, t, 4), np.int32)
    weight = np.zeros((b, t, 4), np.float32)
    index[:, 1:1 + n_img, :] = np.arange(n_img)[None, :, None]
    weight[:, 1:1 + n_img, 0] = 1.0
    s = config.vision.image_size
    return {
        "tokens": tokens, "labels": labels, "key_mask": np.ones((b, t), bool),
        "pixels": rng.uniform(-1, 1, size=(b, 1, s, s, 3)).astype(np.float32),
        "image_index": index, "image_weight": weight, "image_newline_mask": np.zeros((b, t), bool),
    }


def model_flops(config, shape: TrainShape, params) -> dict[str, float]:
    """Model FLOPs of one train step (see the module docstring), by part."""
    import re

    from flax.traverse_util import flatten_dict

    def frozen(path: str) -> bool:
        return any(re.search(p, path) for p in shape.frozen)

    def matmul_params(tree, skip=()):
        return sum(int(np.prod(v.shape)) for k, v in flatten_dict(tree).items()
                   if k[-1] == "kernel" and not any(s in k for s in skip))

    lm, vis = config.lm, config.vision
    b, t = shape.batch, shape.seq
    n_img = (vis.image_size // vis.patch_size) ** 2
    lm_train, proj_train, vis_train = not frozen("lm/"), not frozen("projector/"), not frozen("vision/")
    n_lm = matmul_params(params["lm"])  # the embedding table is not a kernel: excluded
    n_proj = matmul_params(params["projector"])
    n_vis = matmul_params(params["vision"])
    lm_mult = 6 if lm_train else (4 if (proj_train or vis_train) else 2)
    proj_mult = 6 if proj_train else (4 if vis_train else 2)
    vis_mult = 6 if vis_train else 2
    return {
        "lm_matmul": lm_mult * n_lm * b * t,
        "lm_attention": lm_mult * 2 * lm.num_layers * lm.num_heads * lm.head_dim * t * t * b,
        "projector": proj_mult * n_proj * b * n_img,
        "vision_matmul": vis_mult * n_vis * b * n_img,
        "vision_attention": vis_mult * 2 * vis.num_layers * vis.hidden_size * n_img * n_img * b,
        "params_total": sum(int(np.prod(v.shape)) for v in flatten_dict(params).values()),
        "params_lm_matmul": n_lm,
    }


def measured_cpu_peak(seconds: float = 3.0) -> float:
    """Best fp32 matmul FLOP/s this process reaches (the CPU's attainable peak, measured)."""
    import jax
    import jax.numpy as jnp

    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: (x @ x) * (1.0 / n))
    jax.block_until_ready(f(a))
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def default_peak(device, dtype: str) -> tuple[float | None, str]:
    kind = device.device_kind.lower()
    if device.platform == "gpu" and ("h100" in kind or "h200" in kind) and dtype == "bfloat16":
        return 989e12, f"{device.device_kind} dense bf16 (989 TFLOP/s)"
    if device.platform == "gpu" and "a100" in kind and dtype == "bfloat16":
        return 312e12, f"{device.device_kind} dense bf16 (312 TFLOP/s)"
    if device.platform == "cpu":
        return None, "measured"
    return None, "unknown: pass --peak_flops"


def prepare_jax(config, shape: TrainShape, batch: dict) -> dict[str, Any]:
    """The compiled train step on a 1-device mesh: {"step": () -> None (one timed update),
    "compile_s", "init_s", "params" (the initial params, numpy)}."""
    import flax.linen as nn
    import jax

    from medv_jax import sharding as shd
    from medv_jax.models import medv
    from medv_jax.train import optimizer as opt_lib
    from medv_jax.train import step as step_lib

    groups = [(p, None) for p in shape.frozen]
    abstract = medv.abstract_params(config)
    trainable_shape, _ = opt_lib.split_frozen(nn.unbox(abstract), groups)
    tx = opt_lib.make_optimizer(trainable_shape, groups, shape.lr, total_steps=1000, warmup_ratio=0.0)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    t0 = time.perf_counter()
    state, shardings = step_lib.init_sharded_state(
        lambda r: medv.init_params(config, r, boxed=True), tx, groups, mesh, seed=0)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    params0 = jax.tree_util.tree_map(np.asarray, opt_lib.merge_params(state.params, state.frozen))
    step = step_lib.jit_train_step(step_lib.make_train_step(medv.MedV(config), tx, step_lib.StepConfig(1, shape.ce_chunk)),
                                   shardings, mesh, batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def one_step() -> float:
        box["state"], metrics = compiled(box["state"], batch)  # the state is donated
        return float(jax.block_until_ready(metrics)["loss"])

    return {"step": one_step, "compile_s": compile_s, "init_s": init_s, "params": params0}


def jax_loss_on(config, params, batch, masked, p, ce_chunk) -> float:
    import jax

    from medv_jax.models import medv
    from medv_jax.train import loss as loss_lib

    fn = jax.jit(lambda pr, bt, m, pp: loss_lib.diffusion_loss(medv.MedV(config), pr, bt, m, pp, ce_chunk)[0])
    return float(fn(params, batch, masked, p))


def torch_model(config, params, threads: int | None):
    """The same model in the stock transformers modules (LLaDA-V names through the converter)."""
    import torch

    from benchmarks import torch_reference as tr
    from tools.convert_weights import hf_config_for, hf_tensors

    if threads:
        torch.set_num_threads(threads)
    tensors = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in hf_tensors(config, params)}
    ref = tr.build_reference(hf_config_for(config), tensors, tr.SpecialIds(mask=config.lm.mask_token_id))
    return ref


def torch_loss(ref, batch_t: dict, masked_t, p_t, n_img: int, mask_id: int):
    """The docs/algorithm.md §4 loss, written plainly: splice image features, replace masked answer positions
    by the MASK embedding, bidirectional forward, full logits, CE / p over the answer count."""
    import torch

    lm = ref.lm
    tokens, labels = batch_t["tokens"], batch_t["labels"]
    b, t = tokens.shape
    px = batch_t["pixels"][:, 0].permute(0, 3, 1, 2)
    with torch.set_grad_enabled(any(p.requires_grad for p in ref.vision.parameters())):
        feats = ref.vision(pixel_values=px, output_hidden_states=True).hidden_states[-1]
    feats = ref.projector(feats)  # [B, n_img, D]
    embeds = lm.model.embed_tokens(tokens)
    embeds = torch.cat([embeds[:, :1], feats, embeds[:, 1 + n_img:]], dim=1)
    mask_embed = lm.model.embed_tokens(torch.tensor([mask_id]))[0]
    embeds = torch.where(masked_t[..., None], mask_embed, embeds)
    attn = torch.zeros(b, 1, t, t)
    logits = lm(inputs_embeds=embeds, attention_mask=attn, use_cache=False).logits.float()
    answer = labels != -100
    ce = torch.nn.functional.cross_entropy(logits.reshape(b * t, -1), torch.where(answer, labels, 0).reshape(-1),
                                           reduction="none").reshape(b, t)
    per_seq = (ce * masked_t).sum(1) / p_t / answer.sum(1).clamp(min=1)
    return per_seq.mean()


def prepare_torch(config, shape: TrainShape, params, batch: dict, masked, p, threads: int | None):
    """The eager PyTorch train step: {"step": () -> loss, "first_loss" (no update), "threads"}."""
    import torch

    ref = torch_model(config, params, threads)
    modules = {"lm/": ref.lm, "projector/": ref.projector, "vision/": ref.vision}
    trainable = []
    for prefix, module in modules.items():
        train = not any(pat.lstrip("^") == prefix for pat in shape.frozen)
        module.train(False)  # no dropout anywhere; eval mode keeps the forward identical
        for prm in module.parameters():
            prm.requires_grad_(train)
            if train:
                trainable.append(prm)
    opt = torch.optim.AdamW(trainable, lr=shape.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    bt = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
    bt["tokens"], bt["labels"] = bt["tokens"].long(), bt["labels"].long()
    m_t, p_t = torch.from_numpy(np.array(masked)), torch.from_numpy(np.array(p))
    n_img = (config.vision.image_size // config.vision.patch_size) ** 2

    def one_step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = torch_loss(ref, bt, m_t, p_t, n_img, config.lm.mask_token_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return float(loss.detach())

    with torch.no_grad():
        first_loss = float(torch_loss(ref, bt, m_t, p_t, n_img, config.lm.mask_token_id))
    return {"step": one_step, "first_loss": first_loss, "threads": torch.get_num_threads()}


def time_interleaved(steps: dict, n: int) -> dict[str, list[float]]:
    """One warm-up step each, then ``n`` rounds of one timed step of each stack back to back, so
    load from other processes hits both alike."""
    for fn in steps.values():
        fn()
    times = {name: [] for name in steps}
    for _ in range(n):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    from medv_jax.models import layers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="demo", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    ap.add_argument("--remat", default=None, help="override the config's remat policy")
    ap.add_argument("--ce_chunk", type=int, default=None, help="override the cross-entropy chunk")
    ap.add_argument("--dtype", default=None, help="override the config's compute dtype")
    ap.add_argument("--attention_impl", default=None, choices=layers.ATTENTION_CHOICES,
                    help="attention kernel (default: per_head on CPU, JAX's choice elsewhere)")
    ap.add_argument("--unroll_layers", default="no", choices=["no", "yes", "both"],
                    help="layers as straight-line code (model unroll_layers); both: the two steps timed "
                         "interleaved, the loop as 'jax'")
    ap.add_argument("--peak_flops", type=float, default=None)
    ap.add_argument("--torch", action="store_true", help="also time the eager PyTorch train step (fp32)")
    ap.add_argument("--torch_threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.ce_chunk is not None and args.ce_chunk <= 0:
        ap.error(f"--ce_chunk must be positive, got {args.ce_chunk}")

    import jax

    shape = CONFIGS[args.config]
    shape = dataclasses.replace(shape, batch=args.batch or shape.batch, seq=args.seq or shape.seq,
                                ce_chunk=args.ce_chunk or shape.ce_chunk)
    config = medv_config(shape, args.remat, args.dtype, args.attention_impl, args.unroll_layers == "yes")
    if args.torch and config.lm.dtype != "float32":
        ap.error("--torch compares fp32 steps: pass --dtype float32")
    batch = make_batch(config, shape)
    dev = jax.devices()[0]
    peak, peak_note = (args.peak_flops, "given") if args.peak_flops else default_peak(dev, config.lm.dtype)
    if peak is None and dev.platform == "cpu":
        peak = measured_cpu_peak()
        peak_note = f"measured best fp32 1024^3 matmul of this process ({peak / 1e9:.1f} GFLOP/s)"

    j = prepare_jax(config, shape, batch)
    steps = {"jax": j["step"]}
    if args.unroll_layers == "both":
        unrolled = medv_config(shape, args.remat, args.dtype, args.attention_impl, unroll_layers=True)
        steps["jax_unrolled"] = prepare_jax(unrolled, shape, batch)["step"]
    if args.torch:
        from medv_jax.train import loss as loss_lib

        masked, p = loss_lib.draw_masks(jax.random.key(1), batch["labels"] != loss_lib.IGNORE_INDEX)
        t = prepare_torch(config, shape, j["params"], batch, masked, p, args.torch_threads)
        steps["torch"] = t["step"]
    times = time_interleaved(steps, args.steps)
    stats = jax.local_devices()[0].memory_stats() or {}
    flops = model_flops(config, shape, j["params"])
    step_flops = sum(v for k, v in flops.items() if not k.startswith("params"))
    tokens = shape.batch * shape.seq
    jt = statistics.median(times["jax"])
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores; jax {jax.__version__} on {dev.platform} "
                   f"({dev.device_kind})",
        "load_avg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "config": args.config, "batch": shape.batch, "seq": shape.seq, "dtype": config.lm.dtype,
        "unroll_layers": args.unroll_layers,
        "remat": config.lm.remat_policy, "params_total": flops["params_total"],
        "params_lm_matmul": flops["params_lm_matmul"], "model_tflop_per_step": step_flops / 1e12,
        "jax": {"compile_s": j["compile_s"], "step_s": jt, "tokens_per_s": tokens / jt,
                "mfu": step_flops / jt / peak if peak else None, "steps": len(times["jax"]),
                "step_times": times["jax"],
                "device_peak_mib": round(stats["peak_bytes_in_use"] / 2**20) if "peak_bytes_in_use" in stats else None},
        "peak_flops": peak, "peak_note": peak_note,
    }
    if "jax_unrolled" in times:
        ut = statistics.median(times["jax_unrolled"])
        result["jax_unrolled"] = {"step_s": ut, "tokens_per_s": tokens / ut, "steps": len(times["jax_unrolled"]),
                                  "step_times": times["jax_unrolled"]}
        result["loop_over_unrolled_step_time"] = jt / ut
    if args.torch:
        jl = jax_loss_on(config, j["params"], batch, masked, p, shape.ce_chunk)
        tt = statistics.median(times["torch"])
        result["torch"] = {"step_s": tt, "tokens_per_s": tokens / tt, "mfu": step_flops / tt / peak if peak else None,
                           "threads": t["threads"], "steps": len(times["torch"]), "step_times": times["torch"]}
        result["loss_check"] = {"jax": jl, "torch": t["first_loss"], "rel_diff": abs(jl - t["first_loss"]) / abs(jl)}
        result["torch_over_jax_step_time"] = tt / jt
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def print_table(r: dict) -> None:
    j, t = r["jax"], r.get("torch")
    print(f"{r['config']}: batch {r['batch']} x seq {r['seq']}, {r['dtype']}, remat {r['remat']}, "
          f"{r['params_total'] / 1e6:.1f}M params ({r['params_lm_matmul'] / 1e6:.1f}M LM matmul), "
          f"{r['model_tflop_per_step']:.3f} model TFLOP/step; peak {r['peak_note']}")
    print(f"{r['machine']}; load average after: {r['load_avg_after']}")
    print("| | JAX (jit) |" + (" PyTorch eager |" if t else ""))
    print("|---|---|" + ("---|" if t else ""))

    def row(name, fmt, key):
        cells = [fmt(j[key]) if j.get(key) is not None else "-"]
        if t:
            cells.append(fmt(t[key]) if t.get(key) is not None else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")

    row("step time (s, median)", lambda v: f"{v:.4f}", "step_s")
    row("tokens / s", lambda v: f"{v:,.0f}", "tokens_per_s")
    row("MFU", lambda v: f"{100 * v:.1f} %", "mfu")
    print(f"JAX compile {j['compile_s']:.1f} s" + (f"; device peak {j['device_peak_mib']} MiB" if j["device_peak_mib"] else ""))
    if "jax_unrolled" in r:
        u = r["jax_unrolled"]
        print(f"layers unrolled: step {u['step_s']:.4f} s (median of {u['steps']}), {u['tokens_per_s']:,.0f} tokens/s; "
              f"layer loop / unrolled step time: {r['loop_over_unrolled_step_time']:.2f}x")
    if t:
        lc = r["loss_check"]
        print(f"PyTorch / JAX step time: {r['torch_over_jax_step_time']:.2f}x; same loss on the same batch and masks: "
              f"jax {lc['jax']:.6f} torch {lc['torch']:.6f} (rel diff {lc['rel_diff']:.1e}); torch threads {t['threads']}")


if __name__ == "__main__":
    main()
