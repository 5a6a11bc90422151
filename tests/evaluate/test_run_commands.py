"""run-vqa, run-conversation and sweep end to end on a tiny random MedV checkpoint (built as in
tests/sampling/test_commands.py), a small test tokenizer and images written here. Every run uses
gen_length 4 or 8 so that the few compiled programs are shared between the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medv_jax.data.tokenizer import load_tokenizer
from medv_jax.evaluate.__main__ import main
from medv_jax.evaluate import generation
from medv_jax.evaluate.repetition import repeated_ngram_share, longest_run, words
from medv_jax.sampling import infer

from tests.evaluate.test_judge import FakeJudge, _qa50
from tests.tiny_medv import write_tiny_medv

FAST = ["--gen_length", "4", "--block_length", "4", "--steps", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_runs")
    _, tok_dir, ckpt = write_tiny_medv(root)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(images / name)
    return dict(root=root, tokenizer=str(tok_dir), checkpoint=str(ckpt), images=str(images))


def _model(files) -> list[str]:
    return ["--checkpoint", files["checkpoint"], "--tokenizer", files["tokenizer"],
            "--image_folder", files["images"], "--batch_size", "2", "--no_progress"]


def _vqa_questions(path: Path) -> Path:
    """LLaVA-Med test.json layout (one JSON list), plus one flat row."""

    def item(qid, image, question, answer, kind):
        return {"id": qid, "image": image, "answer_type": kind, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}

    records = [item(1, "a.png", "Is there a mass?", "yes", "CLOSED"),
               item(2, "b.png", "Where is the lesion?", "left lung", "OPEN"),
               item(3, "c.png", "Is it normal?", "no", "CLOSED"),
               {"question_id": "q4", "image": "a.png", "text": "What organ?", "answer": "lung",
                "answer_type": "OPEN"}]
    path.write_text(json.dumps(records))
    return path


def test_run_vqa_resumes_and_scores_infer_answers(files, tmp_path, capsys):
    questions = _vqa_questions(tmp_path / "test.json")
    out = tmp_path / "run"
    argv = ["run-vqa", "--questions", str(questions), "--out", str(out), "--dataset", "vqa_rad"] \
        + _model(files) + FAST
    assert main(argv + ["--limit", "3"]) == 0
    assert len((out / "answers.jsonl").read_text().splitlines()) == 3
    assert main(argv) == 0  # resumes: answers only the fourth question
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [1, 2, 3, "q4"]
    timing = [json.loads(line) for line in (out / "timing.jsonl").read_text().splitlines()]
    assert [t["answered"] for t in timing] == [3, 1] and timing[1]["question_ids"] == ["q4"]
    capsys.readouterr()

    # The answers are infer's own for the same question file (same rows, keys and batches).
    direct = tmp_path / "direct.jsonl"
    assert infer.main(["--checkpoint", files["checkpoint"], "--tokenizer", files["tokenizer"],
                       "--question_file", str(out / "questions.jsonl"), "--image_folder", files["images"],
                       "--answers_file", str(direct), "--batch_size", "2", "--no_progress"] + FAST) == 0
    assert [json.loads(line)["text"] for line in direct.read_text().splitlines()] == [a["text"] for a in answers]
    rows = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert rows[0] == {"question_id": 1, "text": "<image>\nIs there a mass?", "image": "a.png"}

    # The metrics are the vqa command's on the same files.
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["vqa", "--predictions", str(out / "answers.jsonl"), "--references", str(questions),
                 "--output", str(tmp_path / "vqa.json")]) == 0
    scored = json.loads((tmp_path / "vqa.json").read_text())
    for key in ("closed_accuracy", "open_recall", "n_closed", "n_open"):
        assert metrics[key] == scored[key], key
    assert (metrics["n_closed"], metrics["n_open"], metrics["n_missing"]) == (2, 2, 0)
    assert metrics["dataset"] == "vqa_rad" and metrics["sampler"]["steps"] == 2
    # Timing and token counts: the exact per-answer figures infer records in each row's metadata
    # (sampler seconds, generated ids up to the stop) win over the wall-time / re-encoding fallback.
    lengths = metrics["response_length"]
    seconds = [a["metadata"]["seconds"] for a in answers]
    counts = [a["metadata"]["num_tokens"] for a in answers]
    assert all(s > 0 for s in seconds) and sum(seconds) <= sum(t["wall_seconds"] for t in timing)
    assert lengths["seconds_per_question"] == pytest.approx(sum(seconds) / 4)
    assert lengths["tokens_per_question"] == pytest.approx(sum(counts) / 4)
    assert lengths["tokens_per_second"] == pytest.approx(sum(counts) / sum(seconds))
    # Rows without those fields (e.g. another tool's answers) fall back to their call's wall time
    # spread over its answers and to tokens re-encoded from the text.
    for a in answers:
        a.pop("metadata")
    (out / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    tokenizer = load_tokenizer(files["tokenizer"])
    fallback = generation.timed_answers(str(out), tokenizer)
    wall = {str(i): t["wall_seconds"] / t["answered"] for t in timing for i in t["question_ids"]}
    assert [r["seconds"] for r in fallback] == pytest.approx([wall[str(a["question_id"])] for a in answers])
    assert [r["num_tokens"] for r in fallback] == [generation.count_tokens(tokenizer, a["text"]) for a in answers]
    per_question = [json.loads(line) for line in (out / "per_question.jsonl").read_text().splitlines()]
    assert [p["question_id"] for p in per_question] == [1, 2, 3, "q4"]

    # A third run generates nothing (and loads no model).
    assert main(argv) == 0
    assert "already answered" in capsys.readouterr().err
    assert len((out / "timing.jsonl").read_text().splitlines()) == 2


def test_run_vqa_bad_input_is_one_error(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 7, "image": "a.png", "text": "Q?", "answer": "yes"}) + "\n")
    assert main(["run-vqa", "--questions", str(bad), "--out", str(tmp_path / "r")] + _model(files)) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m medv_jax.evaluate: error:") and "question 7 has no 'answer_type'" in err
    assert not (tmp_path / "r" / "answers.jsonl").exists()


def test_run_conversation_generates_then_judges(files, tmp_path, monkeypatch):
    records = [_qa50(0, "conversation", {"chest_xray": True}), _qa50(1, "detailed_description", {"mri": True})]
    for record, image in zip(records, ("a.png", "b.png")):
        record["image"] = image
    questions = tmp_path / "qa50.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "conv"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeJudge({}) as server:  # every reply "8 6"
        argv = ["run-conversation", "--questions", str(questions), "--out", str(out),
                "--judge_base_url", server.base_url] + _model(files) + FAST
        assert main(argv) == 0
        answers = {a["question_id"]: a["text"] for a in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
        sent = [r["body"]["messages"][1]["content"] for r in server.requests]
        assert sorted(s.split("[Assistant 2]\n")[1].split("\n\n[End")[0] for s in sent) == sorted(answers.values())
        assert all(r["auth"] is None and r["body"]["model"] == "gpt-4.1-mini" for r in server.requests)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["overall"] == pytest.approx(75.0) and metrics["n_judged"] == 2
        assert metrics["scores"]["CXR"]["count"] == 1 and metrics["scores"]["Description"]["count"] == 1
        assert metrics["sampler"]["gen_length"] == 4 and metrics["response_length"]["n_answers"] == 2
        assert main(argv) == 0  # rerun: nothing generated, nothing sent
        assert len(server.requests) == 2


def test_sweep_writes_table_and_plot(files, tmp_path, capsys):
    questions = _vqa_questions(tmp_path / "test.json")
    out = tmp_path / "sweep"
    argv = ["sweep", "--questions", str(questions), "--out", str(out), "--limit", "2",
            "--settings", "4:4:2", "4:4:4", "8:8:4", "6:4:2"] + _model(files)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "skipping L=6 B=4 N=2" in err
    lines = (out / "sweep.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:5] == ["gen_length", "block_length", "steps", "closed_accuracy", "open_recall"]
    assert "conversation_score" not in header  # a VQA sweep has no judge column
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [(r["gen_length"], r["block_length"], r["steps"]) for r in rows] == \
        [("4", "4", "2"), ("4", "4", "4"), ("8", "8", "4")]
    tokenizer = load_tokenizer(files["tokenizer"])
    for row in rows:
        run_dir = out / f"L{row['gen_length']}_B{row['block_length']}_N{row['steps']}"
        answers = [json.loads(line) for line in (run_dir / "answers.jsonl").read_text().splitlines()]
        texts = [a["text"] for a in answers]
        assert len(texts) == 2
        share = 100 * sum(repeated_ngram_share(words(t), 3) for t in texts) / 2
        assert float(row["repeated_ngram_share"]) == pytest.approx(share)
        # token runs are read on the generated ids infer records (they decode to the answer text)
        ids = [a["metadata"]["token_ids"] for a in answers]
        assert [tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids] == texts
        runs = [longest_run(i) for i in ids]
        assert float(row["longest_token_run"]) == pytest.approx(sum(runs) / 2)
        assert int(row["max_longest_token_run"]) == max(runs)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert float(row["closed_accuracy"]) == pytest.approx(metrics["closed_accuracy"])
    md = (out / "sweep.md").read_text()
    assert "| L | B | N | closed acc (%)" in md and md.count("\n| 4 | 4 |") == 2
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(out / "sweep.png").shape[1] > 1000  # four panels side by side
    # Rerun: every setting is resumed, nothing is generated again.
    before = {p: p.stat().st_mtime for p in out.glob("*/answers.jsonl")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime for p in out.glob("*/answers.jsonl")} == before
