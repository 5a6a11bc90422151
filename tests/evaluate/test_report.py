"""The report command on small fake run folders (metrics.json as run-vqa / run-conversation
write them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medv_jax.evaluate.__main__ import main
from medv_jax.evaluate.report import vqa_dataset


def _run(root: Path, name: str, metrics: dict) -> str:
    folder = root / name
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return str(folder)


def _lengths(seconds, words, per_word, tps):
    return {"seconds_per_question": seconds, "words_per_question": words,
            "seconds_per_word": per_word, "tokens_per_second": tps}


@pytest.fixture
def runs(tmp_path):
    sampler = {"gen_length": 128, "block_length": 128, "steps": 128}
    rad = _run(tmp_path, "rad", {"kind": "vqa", "name": "ours-rad", "dataset": "vqa_rad", "sampler": sampler,
                                 "closed_accuracy": 81.25, "open_recall": 40.5, "n_closed": 272, "n_open": 179,
                                 "response_length": _lengths(0.5, 3.0, 0.1667, 12.0)})
    slake = _run(tmp_path, "slake", {"kind": "vqa", "dataset": "data/SLAKE-test", "sampler": sampler,
                                     "closed_accuracy": 90.0, "open_recall": 66.0,
                                     "response_length": _lengths(0.4, 2.0, 0.2, 10.0)})
    demo = _run(tmp_path, "demo", {"kind": "vqa", "dataset": "synthetic_test", "sampler": sampler,
                                   "closed_accuracy": 70.0, "open_recall": 30.0, "n_closed": 10, "n_open": 5})
    scores = {g: {"relative_score": v, "count": c} for g, v, c in [
        ("Conversation", 55.5, 143), ("Description", 47.25, 50), ("CXR", 60.0, 37), ("MRI", 45.0, 38),
        ("Histology", 50.0, 44), ("Gross", 52.0, 34), ("CT", 49.0, 40), ("Overall", 53.125, 193)]}
    conv = _run(tmp_path, "conv", {"kind": "conversation", "name": "ours-conv", "scores": scores,
                                   "overall": 53.125, "judge": {"model": "gpt-4.1-mini"},
                                   "n_judge_failures": 1, "n_missing_answers": 0,
                                   "sampler": {"gen_length": 256, "block_length": 64, "steps": 256},
                                   "response_length": _lengths(30.0, 160.0, 0.1875, 9.0)})
    return dict(rad=rad, slake=slake, demo=demo, conv=conv)


def test_vqa_dataset_names():
    assert [vqa_dataset(n) for n in ("vqa_rad", "VQA-RAD", "data/SLAKE-test", "pathvqa:test", "demo", None)] == \
        ["vqa_rad", "vqa_rad", "slake", "pathvqa", None, None]


def test_report_tables_with_paper_rows(runs, tmp_path, capsys):
    out = tmp_path / "report.md"
    assert main(["report", runs["rad"], runs["slake"], runs["demo"], runs["conv"], "--out", str(out), "--html"]) == 0
    md = out.read_text()
    lines = md.splitlines()

    def row(prefix):
        found = [line for line in lines if line.startswith(f"| {prefix}")]
        assert len(found) == 1, (prefix, found)
        return [c.strip() for c in found[0].strip("|").split("|")]

    # Table 1: our run beside the paper's rows, all eight columns.
    assert "| run | Conversation | Description | CXR | MRI | Histology | Gross | CT | Overall | judged |" in md
    assert row("ours-conv (") == ["ours-conv (L=256 B=64 N=256)", "55.500", "47.250", "60.000", "45.000",
                                "50.000", "52.000", "49.000", "53.125", "193"]
    assert row("LLaDA-MedV (paper, L=256 B=64 N=256)")[1:] == \
        ["54.141", "48.214", "64.352", "47.348", "51.073", "50.432", "50.268", "52.605", "193"]
    assert "ours-conv: judge gpt-4.1-mini, 1 judge failure(s)" in md
    # Table 2: each run in its dataset's columns, the paper row full.
    assert row("ours-rad (") == ["ours-rad (L=128 B=128 N=128)", "40.50", "81.25", "-", "-", "-", "-"]
    assert row("slake (L=128") == ["slake (L=128 B=128 N=128)", "-", "-", "66.00", "90.00", "-", "-"]
    assert row("LLaDA-MedV (paper, L=B=N=128)")[1:] == ["45.60", "84.93", "68.85", "92.31", "31.96", "95.15"]
    # Other question sets get their own table.
    assert row("demo | synthetic") == ["demo", "synthetic_test", "L=128 B=128 N=128", "10", "70.00", "5", "30.00"]
    # Table 3: lengths and speed, with the paper's timing rows.
    assert row("ours-conv | conversation") == ["ours-conv", "conversation", "30.000", "160.000", "0.188",
                                                "9.000", "256", "53.125"]
    assert row("LLaDA-MedV256 (paper, A100)")[2:5] == ["38.382", "166.585", "0.230"]
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<table>") == 4
    assert '<tr class="paper"><td>LLaDA-MedV (paper, L=B=N=128)</td><td>45.60</td>' in html
    assert "<h2>Open-ended biomedical conversation (paper Table 1)</h2>" in html


def test_report_rejects_a_folder_without_metrics(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.md")]) == 2
    assert "empty: no metrics.json" in capsys.readouterr().err
    bad = _run(tmp_path, "bad", {"kind": "other"})
    assert main(["report", bad, "--out", str(tmp_path / "r.md")]) == 2
    assert "'kind' must be 'vqa' or 'conversation'" in capsys.readouterr().err
