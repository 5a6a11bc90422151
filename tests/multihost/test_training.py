"""Training on 2 local processes x 4 fake CPU devices (one 8-device (data, fsdp, tensor) mesh over
JAX's distributed runtime, gloo collectives on loopback) matches the one-process 8-device run;
a run killed mid-way resumes with the same losses; checkpoints move between process counts."""
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.multihost.procs import Group, single_env
from tests.train.test_trainer import TINY
from tests.train.test_trainer import _losses

STEPS, EVERY = 12, 4
# Cross-process reductions (gloo) add in another order than the in-process ones: the runs agree
# to float32 rounding, not bit for bit.
RTOL, PARAM_ATOL = 2e-6, 2e-5
# A key bias adds the same q.b to every key's logit of a query, which softmax cancels: its gradient
# is rounding noise, which Adam scales into steps whose sign differs between the two reduction orders.
# Those leaves are only checked to stay at noise level.
NOISE_ONLY = "k_proj']['bias']"
NOISE_LEVEL = 1e-3
RUN_TIMEOUT = 420


def _cmd(workdir):
    return [sys.executable, "-m", "medv_jax.train", "--config=configs/demo.py", f"--workdir={workdir}", *TINY,
            "--config.mesh=(2,2,2)", f"--config.train.num_steps={STEPS}",
            f"--config.train.checkpoint_every={EVERY}", "--config.train.keep_checkpoints=10"]


def _assert_same_losses(got, want):
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=RTOL)


def _train(group, workdir, processes):
    if processes == 1:
        group.check([group.start(_cmd(workdir), single_env(8), "single")], RUN_TIMEOUT)
    else:
        group.check(group.launch(_cmd(workdir), processes, 8 // processes, "multi"), RUN_TIMEOUT)


def _params(workdir):
    from medv_jax import checkpoint

    return checkpoint.load_pretrained(Path(workdir) / "model")[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted runs: one process x 8 devices and 2 processes x 4 devices."""
    group = Group(tmp_path_factory.mktemp("logs"))
    try:
        out = {}
        for processes in (1, 2):
            workdir = tmp_path_factory.mktemp(f"straight{processes}")
            _train(group, workdir, processes)
            out[processes] = workdir
        return out
    finally:
        group.kill_all()


def test_two_processes_match_one_process(runs):
    import jax

    _assert_same_losses(_losses(runs[2]), _losses(runs[1]))
    assert sorted(_losses(runs[1])) == list(range(1, STEPS + 1))
    one, two = _params(runs[1]), _params(runs[2])
    assert jax.tree_util.tree_structure(one) == jax.tree_util.tree_structure(two)
    compared = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree_util.tree_leaves(two)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if jax.tree_util.keystr(path).endswith(NOISE_ONLY):
            assert np.abs(a).max() < NOISE_LEVEL and np.abs(b).max() < NOISE_LEVEL, jax.tree_util.keystr(path)
            continue
        np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL, err_msg=jax.tree_util.keystr(path))
        compared += 1
    assert compared > 10
    # The runs moved the params: equal params are not two untouched initialisations.
    losses = _losses(runs[1])
    assert losses[STEPS] < losses[1] - 0.5


def test_sigkill_one_process_then_relaunch_resumes_with_the_same_losses(runs, group, tmp_path):
    workdir = tmp_path / "work"
    procs = group.launch(_cmd(workdir), 2, 4, "killed")
    log = workdir / "metrics.jsonl"
    deadline = time.time() + RUN_TIMEOUT
    while not (log.exists() and max(_losses(workdir), default=0) >= EVERY + 1):
        assert time.time() < deadline, "step 5 not reached"
        assert all(p.poll() is None for p in procs), group.log_of(procs[0])[-2000:]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    # The survivor cannot finish its collectives: the heartbeat timeout (10 s here) ends it.
    codes = group.wait(procs, 120)
    assert codes[0] != 0 and codes[1] == -signal.SIGKILL
    assert max(_losses(workdir)) < STEPS, "the run finished before the kill; the test proves nothing"
    _train(group, workdir, 2)
    assert "resumed from" in group.log_of(group.procs[-2])
    _assert_same_losses(_losses(workdir), _losses(runs[2]))


@pytest.mark.parametrize("written_by, resumed_by", [(2, 1), (1, 2)])
def test_checkpoints_restore_across_process_counts(runs, group, tmp_path, written_by, resumed_by):
    """A checkpoint of step 4 written by one process count resumes on the other with the
    uninterrupted losses of steps 5..12 (params, optimiser state, step and data position)."""
    workdir = tmp_path / "work"
    shutil.copytree(runs[written_by], workdir)
    for ckpt in (workdir / "checkpoints").iterdir():
        if ckpt.name.isdigit() and int(ckpt.name) > EVERY:
            shutil.rmtree(ckpt)
    shutil.rmtree(workdir / "model")
    (workdir / "metrics.jsonl").unlink()
    _train(group, workdir, resumed_by)
    assert f"at step {EVERY}" in group.log_of(group.procs[0])
    want = {s: v for s, v in _losses(runs[1]).items() if s > EVERY}
    _assert_same_losses(_losses(workdir), want)
