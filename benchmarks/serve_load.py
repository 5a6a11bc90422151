"""The OpenAI-compatible server under load: throughput and latency against the number of concurrent
clients, batched serving against one request at a time, on the demo model
(``python -m medv_jax.train --config=configs/demo.py``) with the demo's settings.

    python benchmarks/serve_load.py --checkpoint workdir/demo/model --tokenizer workdir/demo/tokenizer \
        --clients 1,4,16,32 --requests 128 --out serve_load.json

For each mode the server (medv_jax/serve/openai_compat.py) runs in this process on 127.0.0.1,
compiled for the default settings at start-up, and ``--requests`` questions of the synthetic test
split (their scans sent as PNG data: URLs) are asked through the official ``openai`` client
(``AsyncOpenAI``) by ``c`` concurrent clients for each ``c`` of ``--clients`` (each client sends
its next question when it has its answer), from a separate load-generator process on the same
cores. Modes: ``batched`` (requests gathered for ``--window_ms`` into batches of up to
the largest of ``--batch_sizes``) and ``one_at_a_time`` (batch size 1, no window). Reported per
(mode, clients): requests per second (requests / wall time), p50 / p99 latency per request, mean
batch size, and how many answers differ from ``model.answer`` asked alone (must be 0). The
speedup is batched over one-at-a-time requests per second at the same client count.
Also reported: the sampler alone (``model.run`` on prompts built in advance, no HTTP) in
milliseconds per row at each batch size, the ceiling of what batching can give on the machine.
Results go to ``--out`` as JSON and a markdown table to stdout.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe_cpu, matmul_gflops  # noqa: E402
from medv_jax.sampling import api  # noqa: E402
from medv_jax.sampling.diffusion import SamplerConfig  # noqa: E402
from medv_jax.serve import openai_compat as oc  # noqa: E402

DEMO_SAMPLER = SamplerConfig(gen_length=4, block_length=4, steps=4)  # configs/demo.py's c.eval


def questions(n: int, seed: int) -> list[tuple[bytes, str]]:
    """(PNG bytes, question) of the first ``n`` synthetic test examples (the demo's families)."""
    from medv_jax.data.synthetic import SyntheticMedVQA

    data = SyntheticMedVQA("test", n, seed=seed, image_size=128)
    out = []
    for i in range(n):
        example = data[i]
        question = next(t["value"] for t in example["conversations"] if t["from"] == "human")
        buffer = io.BytesIO()
        example["image"].save(buffer, format="PNG")
        out.append((buffer.getvalue(), question.replace("<image>", "").strip()))
    return out


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by this process's threads, summed by kind: "xla" (XLA's compute
    threads) and "python" (the interpreter's threads: HTTP, request handling, batching, the
    sampler's host side). Read from /proc (Linux); empty elsewhere."""
    import glob

    tick = os.sysconf("SC_CLK_TCK")
    out = {"xla": 0.0, "python": 0.0}
    for task in glob.glob(f"/proc/{os.getpid()}/task/*"):
        try:
            name = Path(task, "comm").read_text().strip()
            fields = Path(task, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out["xla" if name.startswith("tf_") else "python"] += (int(fields[11]) + int(fields[12])) / tick
    return out if Path(f"/proc/{os.getpid()}/task").is_dir() else {}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def load_level(url: str, name: str, asks: list[tuple[bytes, str]], clients: int) -> dict:
    """Ask every question of ``asks`` with ``clients`` concurrent clients, driven from a separate
    process (as a load generator on another machine would be; in this process its client threads
    would hold the interpreter lock the server's request path needs); latencies and answers."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        given, taken = Path(folder) / "asks.json", Path(folder) / "results.json"
        given.write_text(json.dumps({"url": url, "model": name, "clients": clients,
                                     "asks": [[base64.b64encode(png).decode(), q] for png, q in asks]}))
        subprocess.run([sys.executable, __file__, "--drive", str(given), "--out", str(taken)], check=True)
        return json.loads(taken.read_text())


async def _drive(job: dict) -> dict:
    """The load generator: ``job["clients"]`` concurrent clients of the official ``openai`` package,
    each sending its next question when it has its answer."""
    import asyncio

    import openai

    client = openai.AsyncOpenAI(base_url=job["url"] + "/v1", api_key="none", max_retries=0, timeout=600)
    work = list(enumerate(job["asks"]))
    results: dict[int, tuple[float, list[int]]] = {}

    async def one_client(share):
        for index, (png, question) in share:
            t0 = time.perf_counter()
            reply = await client.chat.completions.create(model=job["model"], messages=[{"role": "user", "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}},
            ]}])
            results[index] = (time.perf_counter() - t0, reply.model_extra["medv"]["token_ids"])

    clients = job["clients"]
    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one_client(work[c::clients]) for c in range(clients)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await client.close()
    n = len(work)
    return {"wall_s": wall, "cpu_s": cpu, "latencies": [results[i][0] for i in range(n)],
            "token_ids": [results[i][1] for i in range(n)]}


def first_width(model, asks: list[tuple[bytes, str]], sampler: SamplerConfig) -> int:
    """The padded prompt width of the first question: the width the sampler-alone runs use."""
    import PIL.Image

    png, question = asks[0]
    row = model.prompt(question, model.image(PIL.Image.open(io.BytesIO(png)).convert("RGB")))
    return model.prompt_width(len(row.tokens), sampler.gen_length)


def sampler_alone(model, asks: list[tuple[bytes, str]], sampler: SamplerConfig, sizes: tuple[int, ...],
                  repeats: int = 10) -> list[dict]:
    """The batching ceiling: milliseconds per row of ``model.run`` alone (no HTTP, no request
    handling) at each batch size, over the same questions (the first as many as the largest batch
    size, in batches of each size), the median of ``repeats`` passes; and the speedup per row over
    batch size 1. Batching cannot make serving faster than this."""
    import PIL.Image

    rows = [model.prompt(q, model.image(PIL.Image.open(io.BytesIO(png)).convert("RGB"))) for png, q in asks]
    width = first_width(model, asks, sampler)
    rows = [r for r in rows if model.prompt_width(len(r.tokens), sampler.gen_length) == width]
    sizes = [size for size in sorted(set(sizes)) if size <= len(rows)]
    rows = rows[:sizes[-1]]
    keys = [api.row_key(0)] * len(rows)

    def one_pass(size):
        """The steps each batch ran (a batch runs until its last row is done)."""
        return [max(a.steps for a in model.run(rows[start:start + size], keys[start:start + size], sampler,
                                               batch_size=size, prompt_width=width))
                for start in range(0, len(rows), size)]

    out = []
    for size in sizes:
        steps = one_pass(size)  # compile
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            one_pass(size)
            times.append(time.perf_counter() - t0)
        out.append({"batch": size, "ms_per_row": statistics.median(times) * 1e3 / len(rows),
                    "steps_per_batch": statistics.mean(steps)})
    for r in out:
        r["speedup_per_row"] = out[0]["ms_per_row"] / r["ms_per_row"]
    return out


def lm_forward_flops(lm, tokens: int, logits_positions: int) -> int:
    """Floating-point operations of one LM forward pass over ``tokens`` positions with logits at
    ``logits_positions`` of them, counting the matrix products (2 per multiply-add): the
    projections, the gated MLP, attention's scores and weighted sum, the LM head. Elementwise
    work (norms, rotary, softmax, gating) is left out: a few percent here."""
    q, kv = lm.num_heads * lm.head_dim, lm.num_kv_heads * lm.head_dim
    weights = lm.hidden_size * (q + 2 * kv) + q * lm.hidden_size + 3 * lm.hidden_size * lm.mlp_hidden_size
    attention = 2 * tokens * q  # scores (q . k) and the weighted sum of values, per position
    return 2 * lm.num_layers * tokens * (weights + attention) + 2 * logits_positions * lm.hidden_size * lm.vocab_size


def compute_floor(model, sampler: SamplerConfig, width: int, steps_per_answer: float, gflops: float) -> dict:
    """The least time an answer takes on this machine, on average: the exact sampler runs one LM
    forward over the prompt width and the answer, logits on the answer's block, per step (an
    answer stops once its end of turn and everything before it are written: ``steps_per_answer``
    is the mean), each at the machine's matmul rate ``gflops`` (the tower, once per answer, is
    left out). No batching makes a row cheaper than this."""
    flops = steps_per_answer * lm_forward_flops(model.lm, width + sampler.gen_length, sampler.block_length)
    return {"matmul_gflops": gflops, "steps_per_answer": steps_per_answer, "gflop_per_answer": flops / 1e9,
            "floor_ms_per_answer": flops / gflops / 1e6}


def floor_line(floor: dict, alone: list[dict]) -> str:
    return (f"the compute floor: {floor['steps_per_answer']:.2f} steps, {floor['gflop_per_answer']:.3f} GFLOP "
            f"per answer at the machine's "
            f"{floor['matmul_gflops']:.0f} GFLOP/s matmul rate = {floor['floor_ms_per_answer']:.2f} ms per answer, "
            f"so batching can gain at most {alone[0]['ms_per_row'] / floor['floor_ms_per_answer']:.2f}x over batch 1")


def ceiling_line(alone: list[dict]) -> str:
    return "the sampler alone, ms per row (speedup over batch 1, mean steps a batch ran): " + ", ".join(
        f"batch {r['batch']} {r['ms_per_row']:.2f} ({r['speedup_per_row']:.2f}x, {r['steps_per_batch']:.2f} steps)"
        for r in alone)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="workdir/demo/model")
    parser.add_argument("--tokenizer", default="workdir/demo/tokenizer")
    parser.add_argument("--system_prompt", default="none", help="the demo trains without one (default: none)")
    parser.add_argument("--gen_length", type=int, default=DEMO_SAMPLER.gen_length)
    parser.add_argument("--block_length", type=int, default=DEMO_SAMPLER.block_length)
    parser.add_argument("--steps", type=int, default=DEMO_SAMPLER.steps)
    parser.add_argument("--clients", default="1,4,16,32", help="concurrent client counts")
    parser.add_argument("--requests", type=int, default=128, help="questions asked at each client count")
    parser.add_argument("--batch_sizes", default="1,2,4,8,16,32", help="the batched mode's batch sizes")
    parser.add_argument("--window_ms", type=float, default=20.0, help="the batched mode's gathering window")
    parser.add_argument("--modes", default="batched,one_at_a_time")
    parser.add_argument("--seed", type=int, default=0, help="which synthetic test examples")
    parser.add_argument("--out", default="serve_load.json")
    parser.add_argument("--drive", default=None, help=argparse.SUPPRESS)  # the load-generator process
    args = parser.parse_args(argv)
    if args.drive:
        import asyncio

        Path(args.out).write_text(json.dumps(asyncio.run(_drive(json.loads(Path(args.drive).read_text())))))
        return 0
    clients = [int(c) for c in args.clients.split(",")]
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    modes = {"batched": (sizes, args.window_ms / 1000), "one_at_a_time": ((1,), 0.0)}
    chosen = args.modes.split(",")
    unknown = [m for m in chosen if m not in modes]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; use {list(modes)}")
    for path in (args.checkpoint, args.tokenizer):
        if not os.path.isdir(path):
            parser.error(f"{path}: no such folder (train the demo first: python -m medv_jax.train --config=configs/demo.py)")

    defaults = SamplerConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)
    model = api.load(args.checkpoint, args.tokenizer, system_prompt=args.system_prompt)
    asks = questions(args.requests, args.seed)
    # The reference: every question asked alone through the Python API.
    import PIL.Image

    alone = [model.answer(PIL.Image.open(io.BytesIO(png)).convert("RGB"), q, sampler=defaults) for png, q in asks]
    expected = [a.token_ids for a in alone]
    report = {"machine": describe_cpu(), "checkpoint": args.checkpoint, "requests": args.requests,
              "sampler": {"gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps},
              "sampler_alone": sampler_alone(model, asks, defaults, sizes), "results": []}
    report["floor"] = compute_floor(model, defaults, first_width(model, asks, defaults),
                                    statistics.mean(a.steps for a in alone), matmul_gflops())
    print(ceiling_line(report["sampler_alone"]), file=sys.stderr)
    print(floor_line(report["floor"], report["sampler_alone"]), file=sys.stderr)
    for mode in chosen:
        batch_sizes, window = modes[mode]
        batcher = oc.Batcher(model, batch_sizes=batch_sizes, window_s=window, max_queue=max(clients) * 2)
        compile_s = batcher.warm_up(oc.default_warm_up_rows(model) + [model.prompt(asks[0][1], model.image(
            PIL.Image.open(io.BytesIO(asks[0][0])).convert("RGB")))], defaults)
        app = oc.build_app(model, batcher, defaults, served_name="demo")
        with oc.serving(app) as url:
            for c in clients:
                before, cpu_before = len(batcher.batches_run), thread_cpu_seconds()
                level = load_level(url, "demo", asks, c)
                batches, cpu_after = batcher.batches_run[before:], thread_cpu_seconds()
                row = {
                    "mode": mode,
                    "clients": c,
                    "requests": len(asks),
                    "requests_per_s": len(asks) / level["wall_s"],
                    "p50_s": statistics.median(level["latencies"]),
                    "p99_s": percentile(level["latencies"], 99),
                    "mean_batch": sum(batches) / max(len(batches), 1),
                    "answers_differing": sum(a != b for a, b in zip(level["token_ids"], expected)),
                    "compile_s": compile_s,
                    # CPU milliseconds per request: the server's threads by kind (counted over the
                    # level, so including the moments between the load generator's clock reads)
                    # and the load generator's process within its timed window.
                    "cpu_ms_per_request": {
                        **{k: (cpu_after[k] - cpu_before[k]) * 1e3 / len(asks) for k in cpu_after},
                        "load_generator": level["cpu_s"] * 1e3 / len(asks),
                    },
                }
                report["results"].append(row)
                print(json.dumps(row), file=sys.stderr)
                Path(args.out).write_text(json.dumps(report, indent=1))
    by = {(r["mode"], r["clients"]): r for r in report["results"]}
    print(f"machine: {report['machine']}; {args.requests} requests per level; "
          f"sampler {args.gen_length}/{args.block_length}/{args.steps}\n")
    print(ceiling_line(report["sampler_alone"]))
    print(floor_line(report["floor"], report["sampler_alone"]) + "\n")
    print("| clients | mode | requests/s | p50 s | p99 s | mean batch | answers differing | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        single = by.get(("one_at_a_time", r["clients"]))
        speedup = f"{r['requests_per_s'] / single['requests_per_s']:.2f}x" if single and r["mode"] == "batched" else ""
        print(f"| {r['clients']} | {r['mode']} | {r['requests_per_s']:.2f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | "
              f"{r['mean_batch']:.1f} | {r['answers_differing']} | {speedup} |")
    print("\nCPU milliseconds per request (server: XLA's compute threads and the Python threads; the load "
          "generator's process), and the CPU-seconds used per second of the level:\n")
    print("| clients | mode | server XLA | server Python | load generator | total | cores busy |")
    print("|---|---|---|---|---|---|---|")
    for r in report["results"]:
        cpu = r["cpu_ms_per_request"]
        total = sum(cpu.values())
        print(f"| {r['clients']} | {r['mode']} | {cpu.get('xla', float('nan')):.2f} | {cpu.get('python', float('nan')):.2f} | "
              f"{cpu['load_generator']:.2f} | {total:.2f} | {total * r['requests_per_s'] / 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
