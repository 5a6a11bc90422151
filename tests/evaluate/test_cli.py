"""End-to-end tests of ``python -m medv_jax.evaluate`` on files written here.

Scenario (worked by hand):
  q1 CLOSED truth "Yes", prediction "Yes, there is."  -> hit
  q2 CLOSED truth "no",  prediction "Yes"             -> miss          closed accuracy 50 %
  q3 OPEN   truth "left lung", prediction "The left lung."   -> r 1, p 1,   f1 1,   em 1
  q4 OPEN   truth "2", prediction "two lesions" ("2 lesions") -> r 1, p 1/2, f1 2/3, em 1/2
  open recall 100, precision 75, F1 (1 + 2/3) / 2 = 83.33, exact match 75,
  BLEU-1 (1 + 1/2) / 2 = 75 (q4: c = 2 > r = 1, no penalty), BLEU-2 (1 + 0) / 2 = 50.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medv_jax.evaluate.__main__ import SUBCOMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[2]


def _llava_med_test_json() -> list[dict]:
    """LLaVA-Med's VQA test.json layout: id, image, conversations, answer_type."""

    def item(qid, question, answer, kind):
        return {
            "id": qid,
            "image": f"synpic{qid}.jpg",
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": answer},
            ],
            "answer_type": kind,
        }

    return [
        item(1, "Is there a mass?", "Yes", "CLOSED"),
        item(2, "Is it enlarged?", "no", "CLOSED"),
        item(3, "Where is the lesion?", "left lung", "OPEN"),
        item(4, "How many lesions?", "2", "OPEN"),
    ]


ANSWERS = {1: "Yes, there is.", 2: "Yes", 3: "The left lung.", 4: "two lesions"}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _answer_file(path: Path, ids=(1, 2, 3, 4), extra=None) -> Path:
    records = [
        {"question_id": i, "prompt": "...", "text": ANSWERS[i], "answer_id": f"a{i}",
         "model_id": "medv", "metadata": {}}
        for i in ids
    ]
    for record in records:
        record.update((extra or {}).get(record["question_id"], {}))
    return _write_jsonl(path, records)


def _table_values(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if "  " in line.strip():
            label, value = line.rsplit(maxsplit=1)
            values[label.strip()] = value
    return values


def _check_scenario(metrics: dict) -> None:
    assert metrics["n_closed"] == 2 and metrics["n_open"] == 2 and metrics["n_missing"] == 0
    assert metrics["closed_accuracy"] == pytest.approx(50.0)
    assert metrics["open_recall"] == pytest.approx(100.0)
    assert metrics["open"]["precision"] == pytest.approx(75.0)
    assert metrics["open"]["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert metrics["open"]["exact_match"] == pytest.approx(75.0)
    assert metrics["open"]["bleu_1"] == pytest.approx(75.0)
    assert metrics["open"]["bleu_2"] == pytest.approx(50.0)
    per_question = {q["question_id"]: q for q in metrics["per_question"]}
    assert per_question[1]["closed_hit"] == 1 and per_question[2]["closed_hit"] == 0
    assert per_question[4]["precision"] == pytest.approx(0.5)


def test_vqa_on_llava_med_test_json(tmp_path, capsys) -> None:
    references = tmp_path / "test.json"
    references.write_text(json.dumps(_llava_med_test_json()), encoding="utf-8")
    answers = _answer_file(tmp_path / "answers.jsonl")
    output = tmp_path / "out" / "metrics.json"

    code = main(["vqa", "--predictions", str(answers), "--references", str(references),
                 "--output", str(output)])

    assert code == 0
    table = _table_values(capsys.readouterr().out)
    assert table["closed accuracy (%)"] == "50.00"
    assert table["open recall (%)"] == "100.00"
    assert table["closed questions"] == "2" and table["open questions"] == "2"
    assert table["open F1 (%)"] == "83.33"
    metrics = json.loads(output.read_text(encoding="utf-8"))
    _check_scenario(metrics)
    assert "response_length" not in metrics  # the answer file carries no timings


def test_vqa_on_question_jsonl_with_answer_fields(tmp_path, capsys) -> None:
    # LLaVA-style question file: question_id, text (the question), image, answer_type, answer.
    # Ids are strings here and ints in the answers; the predictions use the "answer" key.
    references = _write_jsonl(
        tmp_path / "questions.jsonl",
        [
            {"question_id": str(r["id"]), "text": r["conversations"][0]["value"],
             "image": r["image"], "answer_type": r["answer_type"].lower(),
             "answer": r["conversations"][1]["value"]}
            for r in _llava_med_test_json()
        ],
    )
    answers = _write_jsonl(
        tmp_path / "answers.jsonl",
        [{"question_id": i, "answer": ANSWERS[i], "num_tokens": 4, "seconds": 2.0}
         for i in (1, 2, 3, 4)],
    )
    output = tmp_path / "metrics.json"
    assert main(["vqa", "--predictions", str(answers), "--references", str(references),
                 "--output", str(output)]) == 0
    metrics = json.loads(output.read_text(encoding="utf-8"))
    assert metrics["closed_accuracy"] == pytest.approx(50.0)
    assert metrics["open"]["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    # timings present: words 3 + 1 + 3 + 2 = 9 over 8 seconds
    assert metrics["response_length"]["seconds_per_question"] == pytest.approx(2.0)
    assert metrics["response_length"]["seconds_per_word"] == pytest.approx(8 / 9)
    assert "seconds / word" in capsys.readouterr().out


def test_vqa_missing_and_unknown_ids_are_one_clear_error(tmp_path, capsys) -> None:
    references = tmp_path / "test.json"
    references.write_text(json.dumps(_llava_med_test_json()), encoding="utf-8")
    answers = _write_jsonl(
        tmp_path / "answers.jsonl",
        [{"question_id": i, "text": ANSWERS[i]} for i in (1, 2, 3)]
        + [{"question_id": 99, "text": "yes"}],
    )
    output = tmp_path / "metrics.json"
    code = main(["vqa", "--predictions", str(answers), "--references", str(references),
                 "--output", str(output)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1
    assert "1 reference question id(s) have no prediction: [4]" in err
    assert "1 prediction question id(s) are not in the references: [99]" in err
    assert "--allow_missing" in err
    assert not output.exists()


def test_vqa_allow_missing_scores_missing_as_empty(tmp_path, capsys) -> None:
    references = tmp_path / "test.json"
    references.write_text(json.dumps(_llava_med_test_json()), encoding="utf-8")
    answers = _answer_file(tmp_path / "answers.jsonl", ids=(1, 2, 3))
    output = tmp_path / "metrics.json"
    code = main(["vqa", "--predictions", str(answers), "--references", str(references),
                 "--output", str(output), "--allow_missing"])
    assert code == 0
    captured = capsys.readouterr()
    assert _table_values(captured.out)["missing predictions (scored empty)"] == "1"
    assert "1 reference question(s) had no prediction" in captured.err
    metrics = json.loads(output.read_text(encoding="utf-8"))
    assert metrics["n_missing"] == 1 and metrics["missing_ids"] == [4]
    assert metrics["open_recall"] == pytest.approx(50.0)  # q3 recall 1, q4 empty -> 0
    assert metrics["closed_accuracy"] == pytest.approx(50.0)


def test_vqa_allow_missing_still_rejects_unknown_ids(tmp_path, capsys) -> None:
    references = tmp_path / "test.json"
    references.write_text(json.dumps(_llava_med_test_json()), encoding="utf-8")
    answers = _write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 7, "text": "yes"}])
    code = main(["vqa", "--predictions", str(answers), "--references", str(references),
                 "--allow_missing"])
    assert code == 2
    err = capsys.readouterr().err
    assert "[7]" in err and "--allow_missing" not in err


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"id": 1, "answer": "yes", "answer_type": "YESNO"}], "answer_type 'YESNO'"),
        ([{"id": 1, "answer": "yes"}], "no 'answer_type'"),
        ([{"id": 1, "answer_type": "OPEN"}], "no ground truth"),
        ([{"answer": "yes", "answer_type": "OPEN"}], "neither 'question_id' nor 'id'"),
        ([{"id": 1, "answer": "a", "answer_type": "OPEN"},
          {"id": 1, "answer": "b", "answer_type": "OPEN"}], "duplicate question ids [1]"),
    ],
)
def test_vqa_bad_references(tmp_path, capsys, records, message) -> None:
    references = _write_jsonl(tmp_path / "refs.jsonl", records)
    answers = _write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "yes"}])
    assert main(["vqa", "--predictions", str(answers), "--references", str(references)]) == 2
    assert message in capsys.readouterr().err


def test_vqa_bad_prediction_line(tmp_path, capsys) -> None:
    references = tmp_path / "test.json"
    references.write_text(json.dumps(_llava_med_test_json()), encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": 1, "text": "yes"}\n{not json\n', encoding="utf-8")
    assert main(["vqa", "--predictions", str(answers), "--references", str(references)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_lengths_subcommand(tmp_path, capsys) -> None:
    run_a = _write_jsonl(
        tmp_path / "a.jsonl",
        [{"question_id": 1, "text": "a b c", "num_tokens": 6, "seconds": 1.5},
         {"question_id": 2, "text": "d e f g h i j", "num_tokens": 10, "seconds": 3.5}],
    )
    run_b = _write_jsonl(tmp_path / "b.jsonl", [{"question_id": 1, "text": "x y"}])
    output = tmp_path / "lengths.json"
    assert main(["lengths", "--answers", str(run_a), str(run_b), "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["statistic", "a.jsonl", "b.jsonl"]
    stats = json.loads(output.read_text(encoding="utf-8"))["runs"]
    assert stats[0]["answers"] == str(run_a)
    # 10 words, 16 tokens, 5 seconds over 2 answers
    assert stats[0]["words_per_question"] == pytest.approx(5.0)
    assert stats[0]["tokens_per_question"] == pytest.approx(8.0)
    assert stats[0]["seconds_per_question"] == pytest.approx(2.5)
    assert stats[0]["seconds_per_word"] == pytest.approx(0.5)
    assert stats[1]["seconds_per_word"] is None and stats[1]["words_per_question"] == 2.0


def test_missing_file_is_a_clean_error(tmp_path, capsys) -> None:
    assert main(["lengths", "--answers", str(tmp_path / "nope.jsonl")]) == 2
    assert "error:" in capsys.readouterr().err


def test_subcommands_are_registered() -> None:
    assert [c.name for c in SUBCOMMANDS][:2] == ["vqa", "lengths"]
    with pytest.raises(SystemExit):
        build_parser().parse_args([])  # a subcommand is required


def test_python_dash_m_entry_point(tmp_path) -> None:
    references = tmp_path / "test.json"
    references.write_text(json.dumps(_llava_med_test_json()), encoding="utf-8")
    answers = _answer_file(tmp_path / "answers.jsonl")
    output = tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, "-m", "medv_jax.evaluate", "vqa", "--predictions", str(answers),
         "--references", str(references), "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert _table_values(result.stdout)["closed accuracy (%)"] == "50.00"
    _check_scenario(json.loads(output.read_text(encoding="utf-8")))

    bad = _answer_file(tmp_path / "bad.jsonl", ids=(1, 2))
    result = subprocess.run(
        [sys.executable, "-m", "medv_jax.evaluate", "vqa", "--predictions", str(bad),
         "--references", str(references)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "2 reference question id(s) have no prediction: [3, 4]" in result.stderr
