"""The parts of ``benchmarks/gpu_check.sh`` (see there): ``sampler``, ``train`` and ``summary``.

    python benchmarks/gpu_check.py sampler --out DIR/sampler.jsonl
    python benchmarks/gpu_check.py train --out DIR/train.jsonl
    python benchmarks/gpu_check.py summary DIR/*.jsonl

Each part appends one JSON line per finished measurement, so a part cut off by its time limit
still leaves what it measured. ``GPU_CHECK_TINY=1`` swaps every shape for a tiny one (a CPU dry run).

The modules that GPU machines lack (ml_collections, grain, tensorflow_datasets) are refused at
import: if anything on the benchmarks' import path needed them, this script fails loudly, on any
machine.
"""
from __future__ import annotations

import dataclasses
import importlib.abc
import json
import os
import sys
import time
import traceback
from pathlib import Path

ABSENT_ON_GPU = ("ml_collections", "grain", "tensorflow_datasets", "tensorflow")


class _RefuseAbsent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ABSENT_ON_GPU:
            raise ImportError(f"gpu_check: {name} is not installed on the GPU machines and must not be imported")
        return None


sys.meta_path.insert(0, _RefuseAbsent())
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

TINY = os.environ.get("GPU_CHECK_TINY", "") not in ("", "0")
# Random weights are never confident, so the threshold commits nothing extra there: the cache
# modes are timed at one token per step, plus one run at the reference's common N = L/2 schedule.
DEFAULT_FAST = "prefix:8:0.9,dual:8:0.9,prefix:8:0.9:128" if not TINY else "prefix:8:0.9,dual:4:0.9:8"


def emit(out: Path, record: dict) -> None:
    record = {"time": time.strftime("%H:%M:%S"), **record}
    print(json.dumps(record), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclasses.dataclass(frozen=True)
class BanToken:
    """Logits processor (hashable: a static argument of the sampler program) banning one id.
    Random weights may draw the end-of-turn token anywhere and end an answer after a few steps;
    banning it makes every answer run its full schedule, which is what is being timed."""

    token_id: int

    def __call__(self, logits, gen_index):  # [B, n, V] -> [B, n, V]
        import jax.numpy as jnp

        return logits.at[..., self.token_id].set(-jnp.inf)


def fast_configs(base) -> list[tuple[str, object]]:
    """The accelerated sampler settings named by ``GPU_CHECK_FAST`` (comma-separated
    ``cache_mode:refresh_every:threshold[:steps]``, e.g. ``prefix:8:0.9`` or ``dual:4:0.9:128``).
    Returns [] with a message when this checkout's sampler lacks the fast modes; a malformed entry
    is an error naming it."""
    try:
        from medv_jax.sampling.diffusion import CachePolicy, ThresholdSelection
    except ImportError as e:
        print(f"accelerated sampler: not available in this checkout ({e}); only the exact sampler is "
              "measured", flush=True)
        return []
    out = []
    for m in os.environ.get("GPU_CHECK_FAST", DEFAULT_FAST).split(","):
        try:
            mode, k, th, *steps = m.split(":")
            if len(steps) > 1:
                raise ValueError("too many fields")
            cfg = base.replace(cache=CachePolicy(mode=mode, refresh_every=int(k)),
                               selection=ThresholdSelection(threshold=float(th)))
            if steps:  # a shorter schedule: at least gen_length / steps tokens committed per step
                cfg = cfg.replace(steps=int(steps[0]))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"GPU_CHECK_FAST entry {m!r}: {e} (expected cache_mode:refresh_every:"
                             "threshold[:steps], e.g. prefix:8:0.9 or dual:4:0.9:128)") from None
        name = f"{mode} cache K={k} + threshold {th}" + (f", N={steps[0]}" if steps else "")
        out.append((name, cfg))
    return out


def sampler(out: Path) -> None:
    import jax

    from medv_jax.data import image_layout
    from medv_jax.models import llada, medv, siglip
    from medv_jax.sampling.diffusion import SamplerConfig
    from medv_jax.sampling.multimodal import PromptBatch, compile_medv, image_config_for

    dev = jax.devices()[0]
    import flax
    import optax

    emit(out, {"part": "env", "device": f"{dev.platform} {dev.device_kind}", "jax": jax.__version__,
               "flax": flax.__version__, "optax": optax.__version__, "devices": jax.device_count()})
    dtype = "float32" if TINY else "bfloat16"
    attn = os.environ.get("GPU_CHECK_ATTENTION") or None  # e.g. "cudnn"
    numerics = dict(dtype=dtype, param_dtype=dtype, attention_impl=attn)
    if TINY:
        lm = llada.LLADA_PRESETS["llada_tiny"].replace(vocab_size=512, tokenizer_vocab_size=500, bos_token_id=490,
                                                       eos_token_id=491, mask_token_id=495, start_header_id=496,
                                                       end_header_id=497, eot_token_id=498, **numerics)
        vision = siglip.SIGLIP_PRESETS["siglip_tiny"].replace(**numerics)
        prompt_len, schedule = 48, dict(gen_length=16, block_length=8, steps=16)
    else:  # LLaDA-8B + SigLIP2 so400m (docs/algorithm.md §1, §2): 729 image tokens in a ~1k-token prompt
        lm = llada.LLADA_PRESETS["llada_8b"].replace(**numerics)
        vision = siglip.SIGLIP_PRESETS["siglip2_so400m_patch14_384"].replace(**numerics)
        prompt_len, schedule = 1000, dict(gen_length=256, block_length=64, steps=256)
    config = medv.MedVConfig(lm=lm, vision=vision, image_aspect_ratio="square", mm_patch_merge_type="flat")

    t0 = time.perf_counter()
    # Random weights straight on the device (no host copy, no HF checkpoint at 8B).
    params = jax.jit(lambda r: medv.init_params(config, r))(jax.random.key(0))
    jax.block_until_ready(params)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    emit(out, {"part": "init", "params": n_params, "dtype": dtype, "seconds": time.perf_counter() - t0})

    # docs/algorithm.md §3 layout with random text: BOS, user header, image slots, question, eot, assistant header.
    s = vision.image_size
    layout = image_layout.image_token_layout((s, s), image_config_for(config))
    n_img = layout.num_tokens
    user, assistant = (6, 7) if TINY else (882, 78191)  # role-name ids (LLaMA-3 ids at 8B)
    head = [lm.bos_token_id, lm.start_header_id, user, lm.end_header_id]
    tail = [lm.eot_token_id, lm.start_header_id, assistant, lm.end_header_id]
    rng = np.random.RandomState(0)
    text = rng.randint(0, lm.bos_token_id, size=prompt_len - len(head) - n_img - len(tail)).tolist()
    tokens = np.asarray(head + [lm.eos_token_id] * n_img + text + tail, np.int32)
    if tokens.max() >= lm.vocab_size:  # an out-of-range id embeds as NaN and silently ruins the run
        raise ValueError(f"prompt id {tokens.max()} >= vocab_size {lm.vocab_size}")
    image_mask = np.zeros(len(tokens), bool)
    image_mask[len(head): len(head) + n_img] = True
    index, weight, newline = image_layout.place_in_sequence(image_mask, layout)
    batch = PromptBatch(tokens[None], np.ones((1, len(tokens)), bool),
                        rng.uniform(-1, 1, (1, 1, s, s, 3)).astype(np.float32), index[None], weight[None],
                        newline[None], np.ones((1,), bool))

    exact = SamplerConfig(**schedule)
    runs = [("exact", exact)] + fast_configs(exact)
    reference_tokens = None
    for name, cfg in runs:
        try:
            t0 = time.perf_counter()
            run = compile_medv(config, params, batch, jax.random.key(0), cfg, BanToken(lm.eot_token_id))
            compile_s = time.perf_counter() - t0
            jax.block_until_ready(run(batch, jax.random.key(0)))  # warm-up
            times, res = [], None
            for i in range(2 if not TINY else 3):
                t0 = time.perf_counter()
                res = jax.block_until_ready(run(batch, jax.random.key(0)))
                times.append(time.perf_counter() - t0)
            t = float(np.median(times))
            n_tok = int(res.answer_length[0])  # tokens before the stop (the whole canvas: eot banned)
            toks = np.asarray(res.tokens[0])
            rec = {"part": "sampler", "mode": name, "prompt_len": len(tokens), "gen_length": cfg.gen_length,
                   "block_length": cfg.block_length, "steps": cfg.steps,
                   "compile_s": compile_s, "answer_s": t, "tokens": n_tok, "tokens_per_s": n_tok / t,
                   "steps_run": int(res.steps_run[0]), "ms_per_step": 1000 * t / max(int(res.steps_run[0]), 1),
                   "runs": len(times)}
            if reference_tokens is None:
                reference_tokens = toks
            else:
                rec["token_agreement_vs_exact"] = float(np.mean(toks == reference_tokens))
            stats = jax.local_devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                rec["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
            emit(out, rec)
        except Exception as e:  # keep measuring the other modes; report this one's failure
            traceback.print_exc()
            emit(out, {"part": "sampler", "mode": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})


def train(out: Path) -> None:
    from benchmarks import train_throughput as tt

    cfg = "demo" if TINY else "llada_1b"
    base = ["--config", cfg, "--steps", "2" if TINY else "5"]
    if TINY:
        base += ["--peak_flops", "1e11"]
    for remat in (["none", "full"] if not TINY else ["none"]):
        try:
            r = tt.main(base + ["--remat", remat])
            emit(out, {"part": "train", "config": cfg, "remat": remat, "batch": r["batch"], "seq": r["seq"],
                       "dtype": r["dtype"], "params": r["params_total"], "step_s": r["jax"]["step_s"],
                       "tokens_per_s": r["jax"]["tokens_per_s"], "mfu": r["jax"]["mfu"],
                       "compile_s": r["jax"]["compile_s"], "peak_note": r["peak_note"],
                       "device_peak_mib": r["jax"]["device_peak_mib"]})
            return
        except Exception as e:  # out of memory without remat: retry with full remat
            traceback.print_exc()
            emit(out, {"part": "train", "config": cfg, "remat": remat, "error": f"{type(e).__name__}: {str(e)[:300]}"})


def summary(files: list[str]) -> None:
    recs = []
    for f in files:
        if Path(f).exists():
            recs += [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
    env = next((r for r in recs if r["part"] == "env"), {})
    print(f"\n== gpu_check summary ({env.get('device', '?')}, jax {env.get('jax', '?')}"
          f"{', TINY dry run' if TINY else ''}) ==")
    print("| what | setting | result | target |")
    print("|---|---|---|---|")
    for r in recs:
        if r["part"] == "init":
            print(f"| random params on device | {r['params'] / 1e9:.2f}B {r['dtype']} | {r['seconds']:.1f} s | - |")
        elif r["part"] == "sampler" and "error" in r:
            print(f"| sampler {r['mode']} | - | FAILED: {r['error']} | - |")
        elif r["part"] == "sampler":
            target = "<= 8 s / answer" if r["mode"] == "exact" else ">= 150 tok/s"
            agree = f", agreement {100 * r['token_agreement_vs_exact']:.0f} %" if "token_agreement_vs_exact" in r else ""
            print(f"| sampler {r['mode']} | prompt {r['prompt_len']}, L/B/N {r['gen_length']}/{r['block_length']}/"
                  f"{r['steps']}, batch 1 | {r['answer_s']:.2f} s / answer, {r['tokens_per_s']:.1f} tok/s, "
                  f"{r['steps_run']} steps, {r['ms_per_step']:.1f} ms/step, compile {r['compile_s']:.0f} s{agree} "
                  f"| {target} |")
        elif r["part"] == "train" and "error" in r:
            print(f"| train {r['config']} remat {r['remat']} | - | FAILED: {r['error']} | - |")
        elif r["part"] == "train":
            mfu = f"MFU {100 * r['mfu']:.1f} %" if r["mfu"] is not None else "MFU - (no peak)"
            print(f"| train {r['config']} | batch {r['batch']} x {r['seq']}, {r['dtype']}, remat {r['remat']} | "
                  f"{r['step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tok/s, {mfu}, compile {r['compile_s']:.0f} s "
                  f"| MFU >= 45 % |")
    missing = {"sampler", "train"} - {r["part"] for r in recs}
    if missing:
        print(f"(no result from: {', '.join(sorted(missing))}: cut off by its time limit or crashed; see the log above)")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("sampler", "train", "summary"):
        raise SystemExit(__doc__)
    part = sys.argv[1]
    if part == "summary":
        summary(sys.argv[2:])
        return
    if len(sys.argv) != 4 or sys.argv[2] != "--out":
        raise SystemExit(f"usage: gpu_check.py {part} --out FILE.jsonl")
    {"sampler": sampler, "train": train}[part](Path(sys.argv[3]))


if __name__ == "__main__":
    main()
