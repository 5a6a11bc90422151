"""The staged recipe end to end (configs/mini/, a few steps per stage on a shrunken model): every
stage starts from the model the stage before it exported, trains exactly the parts its config
names, and a second run of the same command redoes nothing."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from medv_jax import checkpoint
from medv_jax.models import medv
from medv_jax.train import chain
from medv_jax.train import optimizer as opt_lib

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "configs" / "mini"
STEPS, LR = 3, 1e-4
TINY = [
    "model.lm_overrides.hidden_size=32", "model.lm_overrides.num_layers=2", "model.lm_overrides.head_dim=8",
    "model.lm_overrides.mlp_hidden_size=64", "model.vision_overrides.image_size=32",
    "model.vision_overrides.hidden_size=32", "model.vision_overrides.num_layers=1",
    "model.vision_overrides.mlp_hidden_size=64", "train.global_batch=8", f"train.num_steps={STEPS}",
    "train.log_every=1", f"optim.lr={LR}", "eval.batch_size=8", "data.test_size=8",
]


# What each stage trains (top-level parameter groups); everything else stays as it came in.
TRAINS = {
    "stage0_text": {"lm"},  # text only: the language model's pretraining
    "stage1_align": {"lm", "projector", "vision"},  # captions; the from-scratch tower learns here
    "stage2_instruct": {"lm", "projector", "vision"},  # the tower at a tenth of the rate (configs/mini/stage2_instruct.py)
    "stage3_vqa": {"lm", "projector"},  # vision frozen, as in the paper
}


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    out = chain.run_chain(MINI, root, seed=3, overrides=TINY)
    return root, out


def _params(path):
    cfg, params = checkpoint.load_pretrained(path)
    return cfg, {opt_lib.param_path(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def test_stage_configs_chain_into_each_other():
    stages = chain.discover_stages(MINI)
    assert [s.name for s in stages] == ["stage0_text", "stage1_align", "stage2_instruct", "stage3_vqa"]
    placed = chain.place_stages(stages, "/r", seed=7, overrides=["train.num_steps=5"])
    assert placed[0].config.init_from == ""
    for prev, s in zip(placed, placed[1:]):
        assert s.config.init_from == f"/r/{prev.name}/model"
    assert all(s.config.workdir == f"/r/{s.name}" and s.config.seed == 7 and s.config.train.num_steps == 5
               for s in placed)


def test_every_stage_starts_from_the_previous_and_trains_only_its_parts(chain_run):
    root, out = chain_run
    stages = chain.place_stages(chain.discover_stages(MINI), root, seed=3, overrides=TINY)
    assert set(out["stages"]) == {s.name for s in stages}
    assert json.loads((root / "chain_summary.json").read_text())["stages"].keys() == out["stages"].keys()
    # Stage 0 starts from random weights: its frozen parts are those of the initialisation.
    cfg0, first = _params(root / stages[0].name / "model")
    init = medv.init_params(cfg0, jax.random.split(jax.random.PRNGKey(3))[0])
    init = {opt_lib.param_path(k): np.asarray(v) for k, v in flatten_dict(init).items()}
    previous_params = init
    for s in stages:
        cfg, params = _params(root / s.name / "model")
        # The config's numerics reach the model the stage trained and exported.
        assert cfg.lm.unroll_layers == cfg.vision.unroll_layers == s.config.model.unroll_layers, s.name
        groups = opt_lib.resolve_group_rates([tuple(g) for g in s.config.optim.param_groups], s.config.optim.lr)
        frozen = {k for k in params if opt_lib.group_of(k, groups) == opt_lib.FROZEN}
        trained = set(params) - frozen
        assert {k.split("/")[0] for k in trained} == TRAINS[s.name], s.name
        for k in frozen:  # bit-identical to where the stage started (the rebuilt random init: to rounding)
            if previous_params is init:
                np.testing.assert_allclose(params[k], init[k], rtol=1e-6, atol=1e-7, err_msg=f"{s.name}: {k}")
            else:
                np.testing.assert_array_equal(params[k], previous_params[k], err_msg=f"{s.name}: {k}")
        moved = [k for k in trained if not np.array_equal(params[k], previous_params[k])]
        assert len(moved) > len(trained) // 2, f"{s.name}: only {len(moved)} of {len(trained)} tensors trained"
        # A few small AdamW steps from the previous model move each weight by about its group's lr
        # per step; a fresh random start would differ by the weights' own scale (std 0.15).
        for k in trained:
            label = opt_lib.group_of(k, groups)
            lr = groups[int(label[len("group"):])][1] if label.startswith("group") else LR
            step = np.max(np.abs(params[k] - previous_params[k]))
            assert step <= 2 * STEPS * lr, f"{s.name}: {k} moved {step:.2e}, not a start from the previous stage"
        previous_params = params
    summaries = out["stages"]
    assert "reports" in summaries["stage2_instruct"] and "vqa" in summaries["stage3_vqa"]


def test_a_second_run_skips_finished_stages(chain_run, capsys):
    root, out = chain_run
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("*/summary.json")}
    again = chain.run_chain(MINI, root, seed=3, overrides=TINY)
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/summary.json")} == stamps
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    assert again["stages"].keys() == out["stages"].keys()


def test_bad_override_is_one_line_before_anything_runs(tmp_path, capsys):
    assert chain.main([str(MINI), f"--workdir={tmp_path / 'w'}", "--set", "train.nonexistent=1"]) == 2
    assert "train.nonexistent" in capsys.readouterr().out
    assert not (tmp_path / "w").exists()


def test_fast_sampling_benchmark_scores_reports_by_field_accuracy(chain_run, tmp_path, monkeypatch, capsys):
    """benchmarks/fast_sampling.py on the chain's report model: every mode's answers are scored
    against their scans, and the exact sampler agrees with itself."""
    import runpy

    from medv_jax.data import synthetic

    root, _ = chain_run
    out = tmp_path / "fast.json"
    monkeypatch.setattr("sys.argv", [
        "fast_sampling.py", "--checkpoint", str(root / "stage2_instruct" / "model"),
        "--config", str(MINI / "stage2_instruct.py"), "--gen_length", "16", "--block_length", "8",
        "--steps", "16", "--num_examples", "8", "--batch_size", "8", "--timing_examples", "1",
        "--repeats", "1", "--modes", "dual+threshold", "--out", str(out)])
    runpy.run_path(str(ROOT / "benchmarks" / "fast_sampling.py"), run_name="__main__")
    result = json.loads(out.read_text())["modes"]
    assert set(result) == {"exact", "dual+threshold"}
    assert result["exact"]["agreement"] == 100.0
    test = synthetic.SyntheticMedVQA("test", 8, task="report")
    for mode in result.values():
        assert len(mode["answers"]) == 8
        want = 100.0 * np.mean([synthetic.field_accuracy(text, test.describe(int(q.rsplit("-", 1)[1]))["scene"])
                                for q, text in mode["answers"].items()])
        assert mode["field_accuracy"] == pytest.approx(want)
        same = 100.0 * np.mean([synthetic.parse_report(text) == synthetic.parse_report(result["exact"]["answers"][q])
                                for q, text in mode["answers"].items()])
        assert mode["findings_agreement"] == pytest.approx(same)
    assert result["exact"]["findings_agreement"] == 100.0
    assert "same findings as exact" in capsys.readouterr().out


def test_report_sweep_on_the_chains_report_model(chain_run, tmp_path, capsys):
    """synthetic-questions then ``evaluate sweep --task report`` on the chain's stage-2 model: one
    run folder per setting, field accuracy recomputed from the answers, table and plot written."""
    import csv

    from medv_jax.evaluate import synthetic_reports
    from medv_jax.evaluate.__main__ import main as evaluate_main
    from medv_jax.data.records import load_records

    root, _ = chain_run
    qdir = tmp_path / "reports"
    assert evaluate_main(["synthetic-questions", "--out", str(qdir), "--num", "4"]) == 0
    stage = root / "stage2_instruct"
    out = tmp_path / "sweep"
    assert evaluate_main([
        "sweep", "--task", "report", "--questions", str(qdir / "questions.jsonl"), "--image_folder", str(qdir),
        "--checkpoint", str(stage / "model"), "--tokenizer", str(stage / "tokenizer"), "--system_prompt", "none",
        "--out", str(out), "--settings", "16:8:16", "16:8:4", "--no_progress"]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["gen_length"], r["block_length"], r["steps"]) for r in rows] == [("16", "8", "16"), ("16", "8", "4")]
    questions = load_records(qdir / "questions.jsonl")
    for row, name in zip(rows, ("L16_B8_N16", "L16_B8_N4")):
        answers = {a["question_id"]: a["text"] for a in load_records(out / name / "answers.jsonl")}
        assert len(answers) == 4
        want = synthetic_reports.score_reports(questions, answers)["field_accuracy"]
        assert float(row["field_accuracy"]) == pytest.approx(want, abs=0.01)
        assert float(row["words_per_answer"]) >= 0 and float(row["seconds_per_word"]) >= 0
    assert (out / "sweep.png").stat().st_size > 10_000
    assert "field acc (%)" in (out / "sweep.md").read_text()


def test_overrides_take_each_fields_type():
    config = chain.load_config_file(MINI / "stage2_instruct.py")
    for assignment in ("train.num_steps=7", "optim.lr=1", "data.closed_families=('modality',)",
                       "tokenizer=demo", "optim.param_groups=[('^vision/', None)]"):
        chain.apply_override(config, assignment)
    assert config.train.num_steps == 7 and config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert tuple(config.data.closed_families) == ("modality",) and config.tokenizer == "demo"
    assert [tuple(g) for g in config.optim.param_groups] == [("^vision/", None)]
    for bad, message in (("train.num_step=7", "no field 'train.num_step'"), ("trian.num_steps=7", "no field 'trian.num_steps'"),
                         ("optim.lr=fast", "cannot read"), ("train.num_steps", "FIELD=VALUE")):
        with pytest.raises(ValueError, match=message):
            chain.apply_override(config, bad)
