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
        _, params = _params(root / s.name / "model")
        groups = [tuple(g) for g in s.config.optim.param_groups]
        frozen = {k for k in params if opt_lib.group_of(k, groups) == opt_lib.FROZEN}
        trained = set(params) - frozen
        assert frozen and trained, s.name
        for k in frozen:  # bit-identical to where the stage started (the rebuilt random init: to rounding)
            if previous_params is init:
                np.testing.assert_allclose(params[k], init[k], rtol=1e-6, atol=1e-7, err_msg=f"{s.name}: {k}")
            else:
                np.testing.assert_array_equal(params[k], previous_params[k], err_msg=f"{s.name}: {k}")
        moved = [k for k in trained if not np.array_equal(params[k], previous_params[k])]
        assert len(moved) > len(trained) // 2, f"{s.name}: only {len(moved)} of {len(trained)} tensors trained"
        # A few small AdamW steps from the previous model move each weight by about lr per step;
        # a fresh random start would differ by the weights' own scale (std 0.15).
        for k in trained:
            step = np.max(np.abs(params[k] - previous_params[k]))
            assert step <= 2 * STEPS * LR, f"{s.name}: {k} moved {step:.2e}, not a start from the previous stage"
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
    assert "field acc." in capsys.readouterr().out
