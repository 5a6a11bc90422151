"""Batch inference on 2 local processes: each answers its share, process 0 merges one answers file
with every question exactly once (the same answers as one process), and a run whose process was
killed resumes from the answers already written; `--limit N` is the first N questions over all
processes."""
import json
import signal
import sys
import time

import pytest

from tests.multihost.procs import single_env, write_question_set

N_QUESTIONS = 14
TIMEOUT = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_question_set(tmp_path_factory.mktemp("infer"), N_QUESTIONS, lambda i: f"Question {i}: what is seen?")


def _cmd(setup, answers):
    return [sys.executable, "-m", "medv_jax.infer", "--checkpoint", setup["checkpoint"],
            "--tokenizer", setup["tokenizer"], "--question_file", setup["questions"],
            "--image_folder", setup["images"], "--answers_file", str(answers), "--batch_size", "1",
            "--gen_length", "8", "--block_length", "4", "--steps", "4", "--no_progress"]


def _answers(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    from tests.multihost.procs import Group

    group = Group(tmp_path_factory.mktemp("logs"))
    answers = setup["root"] / "single.jsonl"
    try:
        group.check([group.start(_cmd(setup, answers), single_env(1), "single")], TIMEOUT)
    finally:
        group.kill_all()
    return {a["question_id"]: a["metadata"]["token_ids"] for a in _answers(answers)}


def _check_merged(answers, reference):
    rows = _answers(answers)
    ids = [a["question_id"] for a in rows]
    assert ids == [f"q{i}" for i in range(N_QUESTIONS)]  # each once, in question order
    # A row's random numbers depend on its row only, so the shares give one process's answers.
    assert {a["question_id"]: a["metadata"]["token_ids"] for a in rows} == reference
    assert not list(answers.parent.glob(answers.name + ".process-*"))


def test_two_processes_answer_their_shares_into_one_file(setup, reference, group, tmp_path):
    answers = tmp_path / "answers.jsonl"
    procs = group.launch(_cmd(setup, answers), 2, 1, "infer")
    group.check(procs, TIMEOUT)
    for i, p in enumerate(procs):
        assert f"{N_QUESTIONS // 2} to answer (process {i} of 2)" in group.log_of(p)
    assert f"merged {N_QUESTIONS} answers of 2 processes" in group.log_of(procs[0])
    _check_merged(answers, reference)


def test_a_killed_process_then_a_relaunch_answers_every_question_once(setup, reference, group, tmp_path):
    answers = tmp_path / "answers.jsonl"
    # What a killed run leaves: process 1's answers so far, the last one cut off mid-write.
    part = tmp_path / "answers.jsonl.process-1"
    done = [json.dumps({"question_id": f"q{i}", "metadata": {"token_ids": reference[f"q{i}"]}}) for i in (1, 3)]
    part.write_text("\n".join(done) + "\n" + '{"question_id": "q5", "te')
    procs = group.launch(_cmd(setup, answers), 2, 1, "killed")
    deadline = time.time() + TIMEOUT
    while not answers.with_name("answers.jsonl.process-0").exists():  # process 0 has started answering
        assert time.time() < deadline and procs[0].poll() is None, group.log_of(procs[0])[-2000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    codes = group.wait(procs, 120)  # process 0 cannot merge without its peer: the heartbeat ends it
    assert codes[1] == -signal.SIGKILL and codes[0] != 0
    assert not answers.exists() or len(_answers(answers)) < N_QUESTIONS
    procs = group.launch(_cmd(setup, answers), 2, 1, "relaunch")
    group.check(procs, TIMEOUT)
    log1 = group.log_of(procs[1])
    assert "already answered" in log1 and f"{N_QUESTIONS // 2} to answer" not in log1
    _check_merged(answers, reference)


def test_limit_counts_questions_over_all_processes(setup, reference, group, tmp_path):
    answers = tmp_path / "answers.jsonl"
    procs = group.launch(_cmd(setup, answers) + ["--limit", "5"], 2, 1, "limit")
    group.check(procs, TIMEOUT)
    # The first 5 questions of the file, split as the whole file is: rows 0, 2, 4 and 1, 3.
    assert "3 to answer (process 0 of 2)" in group.log_of(procs[0])
    assert "2 to answer (process 1 of 2)" in group.log_of(procs[1])
    rows = _answers(answers)
    assert [a["question_id"] for a in rows] == [f"q{i}" for i in range(5)]
    assert all(a["metadata"]["token_ids"] == reference[a["question_id"]] for a in rows)
