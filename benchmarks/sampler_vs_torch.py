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
    p.add_argument("--torch_threads", default=None,
                   help="torch CPU threads; a comma list (e.g. 2,1) times the reference at each count, "
                        "back to back per prompt (default: torch's own choice)")
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

    thread_counts = [int(x) for x in str(args.torch_threads).split(",")] if args.torch_threads else [torch.get_num_threads()]
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

    sides = ["jax"] + [f"torch_{n}t" for n in thread_counts]
    res = {side: {"seconds": [], "tokens": [], "steps": [], "step_seconds": [], "encode_seconds": [],
                  "identical": [], "rss": 0} for side in sides}
    for i, prompt in enumerate(prompts):
        batch = jax_prompt_batch(config, prompt)
        with PeakRSS() as m_jax:
            t0 = time.perf_counter()
            out = jax.block_until_ready(run_jax(batch, None))
            dt = time.perf_counter() - t0
        jax_tokens = np.asarray(out.tokens[0]).tolist()
        r_j = res["jax"]
        r_j["seconds"].append(dt)
        r_j["tokens"].append(int(out.answer_length[0]))
        r_j["steps"].append(int(out.steps_run[0]))
        r_j["rss"] = max(r_j["rss"], m_jax.peak)
        line = [f"prompt {i}: jax {dt:.2f} s ({r_j['tokens'][-1]} tok, {r_j['steps'][-1]} steps)"]
        for n in thread_counts:
            torch.set_num_threads(n)
            if args.torch_device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as m_torch:
                t0 = time.perf_counter()
                r = tr.generate(ref, prompt.tokens, args.gen_length, args.block_length, args.steps,
                                prompt.image_mask, prompt.pixels, args.reference_logits)
                dt_t = time.perf_counter() - t0
            r_t = res[f"torch_{n}t"]
            r_t["seconds"].append(dt_t)
            r_t["tokens"].append(r.answer_length)
            r_t["steps"].append(r.steps_run)
            r_t["step_seconds"].extend(r.step_seconds)
            r_t["encode_seconds"].append(r.encode_seconds)
            r_t["rss"] = max(r_t["rss"], m_torch.peak)
            same = r.tokens == jax_tokens
            r_t["identical"].append(same)
            if not same:
                diff = [j for j, (a, b) in enumerate(zip(r.tokens, jax_tokens)) if a != b]
                print(f"  prompt {i}: torch ({n} threads) and JAX differ at {len(diff)} positions, first {diff[:8]}",
                      flush=True)
            line.append(f"torch/{n}t {dt_t:.2f} s ({r.answer_length} tok, {r.steps_run} steps, identical {same})")
        print(" | ".join(line), flush=True)

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
            "peak_rss_mib": mib(res[side]["rss"]),
        }

    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores; jax {jax.__version__} "
                   f"({jax.devices()[0].platform}, {jax.devices()[0].device_kind}); torch {torch.__version__} "
                   f"({args.torch_device})",
        "load_avg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "args": vars(args),
        "jax": {**summary("jax"), "compile_s": compile_s,
                "device_peak_mib": mib(jax_dev_peak) if jax_dev_peak else None},
        "torch": {},
        "raw": res,
    }
    for n in thread_counts:
        side = f"torch_{n}t"
        out["torch"][side] = {
            **summary(side), "threads": n,
            "device_peak_mib": mib(torch_dev_peak) if torch_dev_peak else None,
            "median_loop_step_ms": 1000 * statistics.median(res[side]["step_seconds"]),
            "median_encode_ms": 1000 * statistics.median(res[side]["encode_seconds"]),
            "token_identical": all(res[side]["identical"]),
            "identical_prompts": f"{sum(res[side]['identical'])}/{len(res[side]['identical'])}",
            "speedup_tokens_per_s": out["jax"]["tokens_per_s"] / summary(side)["tokens_per_s"],
        }
    best = max(out["torch"].values(), key=lambda t: t["tokens_per_s"])
    out["speedup_vs_fastest_torch"] = out["jax"]["tokens_per_s"] / best["tokens_per_s"]
    out["token_identical"] = all(t["token_identical"] for t in out["torch"].values())
    return out


def table(r: dict) -> str:
    j, ts = r["jax"], list(r["torch"].values())
    a = r["args"]

    def cells(fmt, key):
        return [fmt(j.get(key))] + [fmt(t.get(key)) for t in ts]

    f1 = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    f2 = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [
        ("tokens / s (median)", cells(f2, "tokens_per_s")),
        ("answer time, median (s)", cells(f2, "median_s")),
        ("ms / step (answer time / steps)", cells(f1, "ms_per_step")),
        ("loop step, median (ms)", ["-"] + [f1(t["median_loop_step_ms"]) for t in ts]),
        ("image + prompt encode, median (ms)", ["in the program"] + [f1(t["median_encode_ms"]) for t in ts]),
        ("compile (s)", [f1(j["compile_s"])] + ["-"] * len(ts)),
        ("peak RSS of the process (MiB)", cells(lambda v: str(v), "peak_rss_mib")),
        ("device peak (MiB)", cells(lambda v: "-" if not v else str(v), "device_peak_mib")),
        ("token-identical to JAX", ["-"] + [t["identical_prompts"] for t in ts]),
        ("JAX speedup (tokens/s)", ["-"] + [f"{t['speedup_tokens_per_s']:.2f}x" for t in ts]),
    ]
    head = "| | JAX (exact sampler) | " + " | ".join(f"PyTorch reference, {t['threads']} threads" for t in ts) + " |"
    lines = [
        f"shape {a['shape']} {a['dtype']}, prompt {a['prompt_len']}, L/B/N {a['gen_length']}/{a['block_length']}/"
        f"{a['steps']}, {j['runs']} prompts, reference logits: {a['reference_logits']}",
        f"{r['machine']}; load average after: {r['load_avg_after']}",
        "",
        head,
        "|---|" + "---|" * (1 + len(ts)),
        *[f"| {name} | " + " | ".join(c) + " |" for name, c in rows],
        "",
        f"JAX vs the fastest reference setting: {r['speedup_vs_fastest_torch']:.2f}x tokens/s; "
        f"token-identical: {r['token_identical']}",
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
