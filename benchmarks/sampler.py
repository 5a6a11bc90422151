"""Sampler benchmark: tokens/s, per-step latency, compile time and peak memory of the jitted
reverse-diffusion sampler for a chosen model shape (random weights) on the current backend.

    python benchmarks/sampler.py --preset cpu_wide --prompt_len 800 --gen_length 128 --steps 128
    python benchmarks/sampler.py --preset llada_8b --dtype bfloat16 --batch 8      # on a GPU

Reports the median of --repeats timed runs after one warm-up run. Tokens/s counts the generated
tokens up to each row's stop (end of turn) or the whole canvas when a row never stops.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import jax  # noqa: E402
import numpy as np  # noqa: E402

from medv_jax.models import llada  # noqa: E402
from medv_jax.models.layers import ATTENTION_CHOICES  # noqa: E402
from medv_jax.sampling.diffusion import SamplerConfig, compile_generate_text  # noqa: E402

PRESETS = {
    # A CPU-sized wide model (hidden 768, 8 layers, vocab 32k).
    "cpu_wide": dict(vocab_size=32768, hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=12,
                     head_dim=64, mlp_hidden_size=2048, tokenizer_vocab_size=32000, bos_token_id=32000,
                     eos_token_id=32001, mask_token_id=32002, start_header_id=32003, end_header_id=32004,
                     eot_token_id=32005),
    "llada_tiny": dict(vocab_size=512, tokenizer_vocab_size=500, bos_token_id=490, eos_token_id=491,
                       mask_token_id=495, start_header_id=496, end_header_id=497, eot_token_id=498),
    "llada_8b": {},
}


def peak_memory_mib() -> float:
    """Device peak where the backend reports it (GPU/TPU), else the process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu_wide", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=800)
    p.add_argument("--gen_length", type=int, default=128)
    p.add_argument("--block_length", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--attention_impl", default=None, choices=ATTENTION_CHOICES)
    args = p.parse_args()

    base = llada.LLADA_PRESETS["llada_tiny" if args.preset == "llada_tiny" else "llada_8b"]
    cfg = base.replace(**PRESETS[args.preset], dtype=args.dtype, param_dtype=args.dtype,
                       attention_impl=args.attention_impl, max_position_embeddings=args.prompt_len + args.gen_length)
    params = jax.jit(lambda r: llada.init_params(cfg, r))(jax.random.key(0))
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(0, cfg.tokenizer_vocab_size - 10, size=args.prompt_len)) for _ in range(args.batch)]
    sampler = SamplerConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)

    t0 = time.perf_counter()
    run = compile_generate_text(cfg, params, prompts, jax.random.key(0), sampler)
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(run(prompts, jax.random.key(1)))  # warm-up
    times, tokens, steps = [], [], []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(run(prompts, jax.random.key(2 + i)))
        times.append(time.perf_counter() - t0)
        lengths = np.where(np.asarray(out.answer_length) > 0, np.asarray(out.answer_length), args.gen_length)
        tokens.append(int(lengths.sum()))
        steps.append(int(np.max(out.steps_run)))
    median = statistics.median(times)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
                   f"{jax.device_count()} device(s)",
        "preset": args.preset, "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
        "gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps,
        "compile_s": round(compile_s, 2),
        "median_s": round(median, 3),
        "tokens_per_s": round(statistics.median(t / s for t, s in zip(tokens, times)), 1),
        "ms_per_step": round(1000 * median / max(statistics.median(steps), 1), 2),
        "peak_memory_mib": round(peak_memory_mib(), 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
