"""The machine a benchmark ran on, in words, for its results file."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), e.g. "AMD EPYC 7B13"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_cpu() -> str:
    """"<cpu name>, <n> CPUs"."""
    return f"{cpu_name()}, {os.cpu_count()} CPUs"


def matmul_gflops(size: int = 1024, repeats: int = 7) -> float:
    """The machine's float32 matrix-multiply rate through XLA, GFLOP/s: the median over
    ``repeats`` timed batches of ``size`` x ``size`` products, after a compiling run. A forward
    pass whose matmuls run at this rate is as fast as this machine can run it."""
    import statistics
    import time

    import jax
    import jax.numpy as jnp

    a = jnp.full((size, size), 0.5, jnp.float32)
    product = jax.jit(lambda x, y: x @ y)
    product(a, a).block_until_ready()
    flops = 2 * size ** 3
    per_batch = max(1, int(2e9 // flops))  # about 2 GFLOP a batch
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            out = product(a, a)
        out.block_until_ready()
        times.append((time.perf_counter() - t0) / per_batch)
    return flops / statistics.median(times) / 1e9
