"""benchmarks/serve_load.py end to end with tiny settings on the tests' tiny random checkpoint:
every (mode, clients) level is measured, nothing is dropped and every answer equals the one
``model.answer`` gives alone. The timings themselves are never asserted."""
import contextlib
import io
import json

from benchmarks import serve_load
from tests.serve.conftest import build_tiny_checkpoint


def test_serve_load_runs_and_answers_as_the_model_alone(tmp_path):
    tiny = build_tiny_checkpoint(tmp_path)
    out = tmp_path / "serve_load.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert serve_load.main(["--checkpoint", tiny["checkpoint"], "--tokenizer", tiny["tokenizer"],
                                "--clients", "1,3", "--requests", "6", "--batch_sizes", "1,4",
                                "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    levels = [(r["mode"], r["clients"]) for r in report["results"]]
    assert levels == [("batched", 1), ("batched", 3), ("one_at_a_time", 1), ("one_at_a_time", 3)]
    for row in report["results"]:
        assert row["requests"] == 6 and row["answers_differing"] == 0
        assert row["requests_per_s"] > 0 and 0 < row["p50_s"] <= row["p99_s"]
    assert all(r["mean_batch"] == 1 for r in report["results"] if r["mode"] == "one_at_a_time")
    alone = report["sampler_alone"]  # the ceiling: model.run alone at each batch size
    assert [r["batch"] for r in alone] == [1, 4] and alone[0]["speedup_per_row"] == 1.0
    assert all(r["ms_per_row"] > 0 for r in alone)
    table = printed.getvalue()
    assert "| 3 | batched |" in table and "x |" in table  # the speedup column is filled
