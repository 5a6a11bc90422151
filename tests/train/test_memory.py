"""The AOT memory tool: the 8B stage-2 train step compiles for 8-way fsdp from abstract shapes only,
and the state it holds per device is 1/8 of the whole (params fp32 + Adam moments of the trainable)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    result = subprocess.run([sys.executable, "-m", "medv_jax.train.memory", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_8b_stage2_compiles_sharded_without_allocating():
    out = _run("--config=configs/stage2.py", "--mesh=1,8,1", "--seq_len=2048")
    params = re.search(r"params ([\d.]+) B \(([\d.]+) B trainable\)", out)
    total, trainable = float(params.group(1)), float(params.group(2))
    assert abs(total - 8.435) < 0.001 and abs(trainable - 8.037) < 0.001  # vision tower frozen
    args_gib = float(re.search(r"arguments \(state \+ batch\)\s+([\d.]+) GiB", out).group(1))
    state_gib = (4 * total + 8 * trainable) * 1e9 / 2**30  # fp32 params + Adam mu, nu
    assert abs(args_gib - state_gib / 8) < 0.1, out
    assert "peak estimate" in out
