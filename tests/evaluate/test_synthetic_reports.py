"""The synthetic report benchmark's question file and scorer, on hand-worked answers."""
import pytest

from medv_jax.data import synthetic
from medv_jax.evaluate import synthetic_reports
from medv_jax.data.records import load_records


def test_question_file_rows_carry_their_scans(tmp_path):
    path = synthetic_reports.write_question_set(str(tmp_path), 5)
    rows = load_records(path)
    source = synthetic.SyntheticMedVQA("test", 5, task="report")
    assert [r["question_id"] for r in rows] == [f"synth-test-{i}" for i in range(5)]
    for i, row in enumerate(rows):
        assert (tmp_path / row["image"]).exists() and row["text"] in synthetic.REPORT_REQUESTS
        assert synthetic_reports.scene_of(row["meta"]) == source.describe(i)["scene"]
        assert synthetic.field_accuracy(row["answer"], synthetic_reports.scene_of(row["meta"])) == 1.0


def test_question_file_of_slot_scans(tmp_path):
    """--layout slots writes the miniature recipe's scans: the same records as its training source."""
    path = synthetic_reports.write_question_set(str(tmp_path), 5, layout="slots")
    source = synthetic.SyntheticMedVQA("test", 5, task="report", layout="slots")
    free = synthetic.SyntheticMedVQA("test", 5, task="report")
    rows = load_records(path)
    assert [synthetic_reports.scene_of(r["meta"]) for r in rows] == [source.describe(i)["scene"] for i in range(5)]
    assert [synthetic_reports.scene_of(r["meta"]) for r in rows] != [free.describe(i)["scene"] for i in range(5)]


def test_score_reports_hand_worked():
    lesion = {"x": 0.3, "y": 0.5, "radius": 0.1, "side": "left", "size": "small"}
    rows = [{"question_id": "a", "meta": {"modality": "ct", "region": "chest", "lesions": [lesion]}},
            {"question_id": "b", "meta": {"modality": "mri", "region": "brain", "lesions": []}}]
    answers = {
        # a: all five fields right
        "a": "CT scan of the chest. The left side shows one small lesion. Right side: no lesions.",
        # b: region right; modality wrong; a hallucinated lesion makes count and the right side wrong,
        # the left side is rightly empty: 2 of 5
        "b": "CT scan of the brain. The left side shows no lesions. The right side shows one large lesion.",
    }
    out = synthetic_reports.score_reports(rows, answers)
    assert out["per_field"] == {"modality": 50.0, "region": 100.0, "count": 50.0, "left": 100.0, "right": 50.0}
    assert out["field_accuracy"] == pytest.approx(70.0)
    missing = synthetic_reports.score_reports(rows, {"a": answers["a"]})  # b unanswered: 0 of 5
    assert missing["field_accuracy"] == pytest.approx(50.0)


def test_rows_without_scan_attributes_are_refused(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": "x", "image": "x.png", "text": "Describe."}\n')
    with pytest.raises(ValueError, match="synthetic-questions"):
        synthetic_reports._question_rows(str(path), None)
