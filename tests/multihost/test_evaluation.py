"""`python -m medv_jax.evaluate run-vqa` on 2 local processes: each answers its share, process 0
merges them and scores, giving the answers and scores of one process; a run whose process was
killed resumes from the answers already written, each question answered once."""
import json
import signal
import sys
import time

import pytest

from tests.multihost.procs import Group, single_env, write_question_set

N_QUESTIONS = 24
TIMEOUT = 300
# Seconds and throughput depend on the machine's load, not on the answers.
TIMED = ("last_call",)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_question_set(
        tmp_path_factory.mktemp("run_vqa"), N_QUESTIONS, lambda i: f"Question {i}: is it normal?",
        lambda i: {"answer": ("yes", "no", "left lung")[i % 3], "answer_type": "OPEN" if i % 3 == 2 else "CLOSED"},
        name="test.jsonl")


def _cmd(setup, out):
    return [sys.executable, "-m", "medv_jax.evaluate", "run-vqa", "--checkpoint", setup["checkpoint"],
            "--tokenizer", setup["tokenizer"], "--questions", setup["questions"], "--image_folder",
            setup["images"], "--out", str(out), "--name", "tiny", "--batch_size", "1",
            "--gen_length", "8", "--block_length", "4", "--steps", "4", "--no_progress"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _results(out):
    """What a run decides: each answer (in file order), the scores and the per-question scores."""
    answers = [(a["question_id"], a["text"], a["metadata"]["token_ids"]) for a in _rows(out / "answers.jsonl")]
    metrics = json.loads((out / "metrics.json").read_text())
    scores = {k: v for k, v in metrics.items() if k not in TIMED}
    scores["response_length"] = {k: v for k, v in scores["response_length"].items() if "second" not in k}
    return dict(answers=answers, scores=scores, per_question=(out / "per_question.jsonl").read_text(),
                questions=(out / "questions.jsonl").read_text())


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    group = Group(tmp_path_factory.mktemp("logs"))
    out = setup["root"] / "single" / "run"
    try:
        group.check([group.start(_cmd(setup, out), single_env(1), "single")], TIMEOUT)
    finally:
        group.kill_all()
    return _results(out)


def _check_like_one_process(out, reference):
    got = _results(out)
    assert [a[0] for a in got["answers"]] == [f"q{i}" for i in range(N_QUESTIONS)]  # each once, in order
    assert got == reference
    assert not list(out.glob("answers.jsonl.process-*"))


def test_two_processes_answer_their_shares_and_process_0_scores(setup, reference, group, tmp_path):
    out = tmp_path / "run"
    procs = group.launch(_cmd(setup, out), 2, 1, "run-vqa")
    group.check(procs, TIMEOUT)
    for i, p in enumerate(procs):
        assert f"{N_QUESTIONS // 2} to answer (process {i} of 2)" in group.log_of(p)
    # Process 0 alone prints the score table.
    assert "metrics.json" in group.log_of(procs[0]) and "metrics.json" not in group.log_of(procs[1])
    _check_like_one_process(out, reference)
    timing = _rows(out / "timing.jsonl")
    assert len(timing) == 1 and timing[0]["answered"] == N_QUESTIONS


def _complete_lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_one_process_then_relaunch_answers_each_question_once(setup, reference, group, tmp_path):
    out = tmp_path / "run"
    part = out / "answers.jsonl.process-1"
    procs = group.launch(_cmd(setup, out), 2, 1, "killed")
    deadline = time.time() + TIMEOUT
    while _complete_lines(part) < 1:  # process 1 is answering
        assert time.time() < deadline and procs[1].poll() is None, group.log_of(procs[1])[-2000:]
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    codes = group.wait(procs, 120)  # process 0 cannot merge without its peer: the heartbeat ends it
    assert codes[1] == -signal.SIGKILL and codes[0] != 0
    assert not (out / "metrics.json").exists()
    kept = _complete_lines(part)
    assert 1 <= kept < N_QUESTIONS // 2, "process 1 finished its share before it was killed"

    procs = group.launch(_cmd(setup, out), 2, 1, "relaunch")
    group.check(procs, TIMEOUT)
    # Process 1 answers only what it had not written before it was killed.
    assert f"{N_QUESTIONS // 2 - kept} to answer (process 1 of 2)" in group.log_of(procs[1])
    _check_like_one_process(out, reference)
