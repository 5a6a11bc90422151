"""The exact JAX sampler against the eager PyTorch reference (``benchmarks/torch_reference.py``),
both in one process, on the same random LLaDA-V-style checkpoint folder and the same prompts
(random text around one square image whose 729 tokens both stacks encode with their own vision
tower + projector, inside the timed region).

    python benchmarks/sampler_vs_torch.py --shape cpu_wide --prompt_len 800 --gen_length 128 \\
        --block_length 128 --steps 32 --num_prompts 5
    python benchmarks/sampler_vs_torch.py --shape llada_8b --dtype bfloat16 --torch_device cuda \\
        --prompt_len 1000 --gen_length 256 --block_length 64 --steps 256      # on a GPU

Per prompt the two stacks run back to back (JAX, then torch), so load from other processes hits
both alike. Prints one side-by-side table (and ``--json``): tokens/s (generated tokens up to each
answer's stop), ms per step, JAX compile time, peak memory, and token identity of every answer.
Greedy (T = 0), low-confidence remasking, batch 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402


class PeakRSS:
    """Peak resident set size of this process while the ``with`` block runs (polled every 5 ms:
    covers both stacks' native allocations, which neither framework reports on CPU)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.005)

    def __enter__(self):
        self.start = self.current()
        self.peak = self.start
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def parse_args(argv=None):
    from benchmarks.models_setup import SHAPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="cpu_wide", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="float32", help="parameter and compute dtype of both stacks")
    p.add_argument("--prompt_len", type=int, default=800, help="prompt tokens, image tokens included")
    p.add_argument("--gen_length", type=int, default=128)
    p.add_argument("--block_length", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--num_prompts", type=int, default=5, help="timed runs per stack (one per prompt)")
    p.add_argument("--workdir", default=None, help="checkpoint folder (built once, then reused)")
    p.add_argument("--torch_device", default="cpu")
    p.add_argument("--torch_threads", type=int, default=None, help="default: torch's own choice")
    p.add_argument("--reference_logits", default="full", choices=["full", "block"],
                   help="full: LM head over the whole canvas each step, as the reference does; "
                        "block: over the current block only, as the JAX sampler does")
    p.add_argument("--init_std", type=float, default=0.05)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def run(args) -> dict:
    import jax
    import torch

    from benchmarks import torch_reference as tr
    from benchmarks.models_setup import SHAPES, build_checkpoint, jax_prompt_batch, load_jax, make_prompts
    from medv_jax.sampling.diffusion import SamplerConfig
    from medv_jax.sampling.multimodal import compile_medv

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    shape = SHAPES[args.shape]
    sampler = SamplerConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / f"medv_bench_{args.shape}_{args.dtype}")
    t0 = time.perf_counter()
    folder = build_checkpoint(workdir, shape, init_std=args.init_std, dtype=args.dtype)
    print(f"checkpoint: {folder} ({time.perf_counter() - t0:.1f} s)", flush=True)
    ref = tr.load_reference(folder, shape.ids, args.torch_device, getattr(torch, args.dtype))
    config, params = load_jax(folder, shape.ids, args.dtype)
    prompts = make_prompts(shape, args.num_prompts, args.prompt_len)

    t0 = time.perf_counter()
    first = jax_prompt_batch(config, prompts[0])
    run_jax = compile_medv(config, params, first, None, sampler)
    compile_s = time.perf_counter() - t0
    print(f"JAX compile: {compile_s:.1f} s", flush=True)
    # Warm-up: one full JAX answer; one torch step (its first forward sets up oneDNN kernels).
    jax.block_until_ready(run_jax(first, None))
    tr.generate(ref, prompts[0].tokens, args.gen_length, args.gen_length, 1, prompts[0].image_mask,
                prompts[0].pixels, args.reference_logits)

    res = {"jax": {"seconds": [], "tokens": [], "steps": []}, "torch": {"seconds": [], "tokens": [], "steps": [],
           "step_seconds": [], "encode_seconds": []}, "identical": []}
    mem = {}
    for i, prompt in enumerate(prompts):
        batch = jax_prompt_batch(config, prompt)
        with PeakRSS() as m_jax:
            t0 = time.perf_counter()
            out = jax.block_until_ready(run_jax(batch, None))
            dt = time.perf_counter() - t0
        jax_tokens = np.asarray(out.tokens[0]).tolist()
        n_jax = int(out.answer_length[0])
        res["jax"]["seconds"].append(dt)
        res["jax"]["tokens"].append(n_jax)
        res["jax"]["steps"].append(int(out.steps_run[0]))
        if args.torch_device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as m_torch:
            t0 = time.perf_counter()
            r = tr.generate(ref, prompt.tokens, args.gen_length, args.block_length, args.steps,
                            prompt.image_mask, prompt.pixels, args.reference_logits)
            dt_t = time.perf_counter() - t0
        res["torch"]["seconds"].append(dt_t)
        res["torch"]["tokens"].append(r.answer_length)
        res["torch"]["steps"].append(r.steps_run)
        res["torch"]["step_seconds"].extend(r.step_seconds)
        res["torch"]["encode_seconds"].append(r.encode_seconds)
        same = r.tokens == jax_tokens
        res["identical"].append(same)
        if not same:
            diff = [j for j, (a, b) in enumerate(zip(r.tokens, jax_tokens)) if a != b]
            print(f"  prompt {i}: outputs differ at {len(diff)} positions, first {diff[:8]}", flush=True)
        mem["jax_rss"] = max(mem.get("jax_rss", 0), m_jax.peak)
        mem["torch_rss"] = max(mem.get("torch_rss", 0), m_torch.peak)
        print(f"prompt {i}: jax {dt:.2f} s ({n_jax} tok, {int(out.steps_run[0])} steps) | torch {dt_t:.2f} s "
              f"({r.answer_length} tok, {r.steps_run} steps) | identical {same}", flush=True)

    dev_stats = jax.local_devices()[0].memory_stats() or {}
    jax_dev_peak = dev_stats.get("peak_bytes_in_use")
    torch_dev_peak = torch.cuda.max_memory_allocated() if args.torch_device.startswith("cuda") else None

    def summary(side):
        secs, toks, steps = res[side]["seconds"], res[side]["tokens"], res[side]["steps"]
        return {
            "median_s": statistics.median(secs),
            "tokens_per_s": statistics.median(t / s for t, s in zip(toks, secs)),
            "ms_per_step": statistics.median(1000 * s / max(n, 1) for s, n in zip(secs, steps)),
            "runs": len(secs),
        }

    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores; jax {jax.__version__} "
                   f"({jax.devices()[0].platform}, {jax.devices()[0].device_kind}); torch {torch.__version__} "
                   f"({args.torch_device}, {torch.get_num_threads()} threads)",
        "load_avg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "args": vars(args),
        "jax": {**summary("jax"), "compile_s": compile_s, "peak_rss_mib": mib(mem["jax_rss"]),
                "device_peak_mib": mib(jax_dev_peak) if jax_dev_peak else None},
        "torch": {**summary("torch"), "peak_rss_mib": mib(mem["torch_rss"]),
                  "device_peak_mib": mib(torch_dev_peak) if torch_dev_peak else None,
                  "median_loop_step_ms": 1000 * statistics.median(res["torch"]["step_seconds"]),
                  "median_encode_ms": 1000 * statistics.median(res["torch"]["encode_seconds"])},
        "token_identical": all(res["identical"]),
        "identical_per_prompt": res["identical"],
        "raw": res,
    }
    out["speedup_tokens_per_s"] = out["jax"]["tokens_per_s"] / out["torch"]["tokens_per_s"]
    return out


def table(r: dict) -> str:
    j, t = r["jax"], r["torch"]
    a = r["args"]
    rows = [
        ("tokens / s (median)", f"{j['tokens_per_s']:.2f}", f"{t['tokens_per_s']:.2f}"),
        ("answer time, median (s)", f"{j['median_s']:.2f}", f"{t['median_s']:.2f}"),
        ("ms / step (answer time / steps)", f"{j['ms_per_step']:.1f}", f"{t['ms_per_step']:.1f}"),
        ("compile (s)", f"{j['compile_s']:.1f}", "-"),
        ("peak RSS of the process (MiB)", f"{j['peak_rss_mib']}", f"{t['peak_rss_mib']}"),
        ("device peak (MiB)", f"{j['device_peak_mib'] or '-'}", f"{t['device_peak_mib'] or '-'}"),
    ]
    lines = [
        f"shape {a['shape']} {a['dtype']}, prompt {a['prompt_len']}, L/B/N {a['gen_length']}/{a['block_length']}/"
        f"{a['steps']}, {t['runs']} prompts, reference logits: {a['reference_logits']}",
        f"{r['machine']}",
        "",
        "| | JAX (exact sampler) | PyTorch reference |",
        "|---|---|---|",
        *[f"| {name} | {x} | {y} |" for name, x, y in rows],
        "",
        f"speedup (tokens/s): {r['speedup_tokens_per_s']:.2f}x; token-identical: {r['token_identical']} "
        f"({sum(r['identical_per_prompt'])}/{len(r['identical_per_prompt'])} prompts); torch loop step median "
        f"{t['median_loop_step_ms']:.1f} ms, torch image+prompt encode median {t['median_encode_ms']:.1f} ms",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
