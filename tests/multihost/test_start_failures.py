"""A run that cannot form its collective stops within a bounded time with one line naming the
problem (exit status 2), instead of hanging or aborting with a stack trace."""
import re
import socket
import sys
import time

import pytest

from tests.multihost.procs import free_port, process_env

JOIN_TIMEOUT = 8


def _cmd(tmp_path):
    # Valid questions, so that the run gets past its input checks to the collective; the
    # checkpoint is only opened after the processes have joined.
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "text": "What is shown?"}\n')
    return [sys.executable, "-m", "medv_jax.infer", "--checkpoint", str(tmp_path / "none"),
            "--tokenizer", str(tmp_path / "none"), "--question_file", str(tmp_path / "q.jsonl"),
            "--answers_file", str(tmp_path / "a.jsonl"), "--no_progress"]


def _one_error_line(group, proc, timeout):
    started = time.time()
    assert group.wait([proc], timeout) == [2]
    out = group.log_of(proc)
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    # The command's own line, or the join watchdog's (it ends the process before JAX aborts it).
    assert len(errors) == 1 and re.match(r"(python -m medv_jax\.infer: )?error: ", errors[0]), out[-3000:]
    assert "Traceback" not in out and "Check failure" not in out, out[-3000:]
    return errors[0], time.time() - started


def test_missing_peer_or_wrong_count(group, tmp_path):
    """Two processes told there are three: neither sees every process join."""
    port = free_port()
    procs = [group.start(_cmd(tmp_path), process_env(i, 3, port, 1, MEDV_DISTRIBUTED_TIMEOUT=str(JOIN_TIMEOUT)),
                         f"p{i}") for i in range(2)]
    for p in procs:
        line, _ = _one_error_line(group, p, 120)
        assert "not every process joined" in line and "of 3" in line and f"127.0.0.1:{port}" in line


def test_taken_port(group, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = group.start(_cmd(tmp_path), process_env(0, 2, port, 1), "p0")
        line, _ = _one_error_line(group, proc, 60)
    assert f"port {port} is taken" in line


@pytest.mark.parametrize("env, named", [
    (dict(JAX_PROCESS_ID="2"), "JAX_PROCESS_ID=2 is out of range for JAX_NUM_PROCESSES=2"),
    (dict(JAX_COORDINATOR_ADDRESS="localhost"), "JAX_COORDINATOR_ADDRESS='localhost': give host:port"),
])
def test_bad_settings(group, tmp_path, env, named):
    proc = group.start(_cmd(tmp_path), {**process_env(0, 2, free_port(), 1), **env}, "p")
    line, _ = _one_error_line(group, proc, 60)
    assert named in line
