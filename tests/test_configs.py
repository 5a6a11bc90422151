"""Every shipped config builds, and the stage configs say what the paper's stages train."""
import runpy
from pathlib import Path

import pytest

from medv_jax.train.optimizer import FROZEN, group_of

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py") if p.name != "common.py")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path):
    config = runpy.run_path(str(path))["get_config"]()
    assert config.train.global_batch > 0 and config.optim.lr > 0


def _frozen(name, param):
    config = runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"))["get_config"]()
    return group_of(param, [tuple(g) for g in config.optim.param_groups]) == FROZEN


def test_stage_freezing_follows_the_paper():
    assert _frozen("stage1", "lm/layers/attn/q_proj/kernel") and _frozen("stage1", "vision/pos_embed")
    assert not _frozen("stage1", "projector/fc1/kernel")
    for stage in ("stage2", "stage3_vqa_rad", "stage3_slake", "stage3_pathvqa"):
        assert _frozen(stage, "vision/layers/mlp/fc1/kernel")
        assert not _frozen(stage, "lm/embed_tokens/embedding") and not _frozen(stage, "projector/fc2/bias")
