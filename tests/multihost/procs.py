"""Launching one command as N local JAX processes on loopback (the local launcher of
docs/multihost.md), each in its own process group so that a failing test leaves nothing behind."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices: int, **extra: str) -> dict[str, str]:
    """What the local launcher sets: the coordinator, this process's id and its fake CPU devices."""
    env = dict(os.environ)
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(process_id),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        # Subprocesses import this checkout, whatever is installed.
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        MEDV_DISTRIBUTED_TIMEOUT=extra.pop("MEDV_DISTRIBUTED_TIMEOUT", "120"),
        MEDV_HEARTBEAT_TIMEOUT=extra.pop("MEDV_HEARTBEAT_TIMEOUT", "10"),
    )
    env.update(extra)
    return env


def single_env(devices: int) -> dict[str, str]:
    """One process with ``devices`` fake CPU devices and no coordinator."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p))
    return env


class Group:
    """Processes started by a test; ``kill_all`` ends every process group still running."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, cmd: list[str], env: dict[str, str], name: str) -> subprocess.Popen:
        log = self.log_dir / f"{name}-{len(self.procs)}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def launch(self, cmd: list[str], num_processes: int, devices: int, name: str, **extra: str):
        port = free_port()
        return [self.start(cmd, process_env(i, num_processes, port, devices, **extra), f"{name}-p{i}")
                for i in range(num_processes)]

    def log_of(self, proc: subprocess.Popen) -> str:
        return self.logs[self.procs.index(proc)].read_text(errors="replace")

    def wait(self, procs, timeout: float) -> list[int]:
        """Exit codes; on timeout every process of the group is killed and the test fails."""
        deadline = time.time() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                tails = "\n".join(self.log_of(q)[-1500:] for q in procs)
                self.kill_all()
                raise AssertionError(f"processes still running after {timeout} s:\n{tails}") from None
        return [p.returncode for p in procs]

    def check(self, procs, timeout: float) -> None:
        codes = self.wait(procs, timeout)
        if any(codes):
            tails = "\n".join(f"--- exit {c}\n" + self.log_of(p)[-2500:] for p, c in zip(procs, codes))
            raise AssertionError(f"exit codes {codes}:\n{tails}")

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def write_question_set(root, n_questions: int, text, extra=lambda i: {}, name: str = "questions.jsonl") -> dict:
    """A tiny random MedV checkpoint, three images of different sizes and `n_questions` questions
    (`text(i)`, plus the fields `extra(i)`) under `root`: what the multi-process inference and
    evaluation tests answer."""
    import json

    import numpy as np
    from PIL import Image

    from tests.tiny_medv import write_tiny_medv

    _, tok_dir, ckpt = write_tiny_medv(root, eot_scale=3.0)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 50, 3), dtype=np.uint8)).save(images / f"{i}.png")
    questions = root / name
    questions.write_text("".join(
        json.dumps({"question_id": f"q{i}", "image": f"{i % 3}.png", "text": text(i), **extra(i)}) + "\n"
        for i in range(n_questions)))
    return dict(root=root, tokenizer=str(tok_dir), checkpoint=str(ckpt), images=str(images),
                questions=str(questions))
