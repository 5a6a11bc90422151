"""Every shipped config builds, and the stage configs say what the paper's stages train."""
import runpy
from pathlib import Path

import pytest

from medv_jax.train.optimizer import FROZEN, group_of

ROOT = Path(__file__).resolve().parents[1]
STAGE3_DATASETS = ("vqa_rad", "slake", "pathvqa")
# (config file, argument of its get_config or None)
TAKES_DATASET = ("stage3.py", "stage3_lora.py")
CONFIGS = [(p, None) for p in sorted((ROOT / "configs").rglob("*.py")) if p.name not in TAKES_DATASET]
CONFIGS += [(ROOT / "configs" / name, d) for name in TAKES_DATASET for d in STAGE3_DATASETS]


def _load(path, arg=None):
    get_config = runpy.run_path(str(path))["get_config"]
    return get_config() if arg is None else get_config(arg)


@pytest.mark.parametrize("path,arg", CONFIGS, ids=lambda x: x.stem if isinstance(x, Path) else str(x))
def test_config_builds(path, arg):
    config = _load(path, arg)
    assert config.train.global_batch > 0 and config.optim.lr > 0


def test_configs_load_from_any_folder(tmp_path, monkeypatch):
    """Configs import their building blocks from the package, not from a neighbouring file."""
    for path, _ in CONFIGS:
        assert "sys.path" not in path.read_text(), path
    monkeypatch.chdir(tmp_path)
    assert _load(ROOT / "configs" / "mini" / "stage2_instruct.py").data.task == "report"
    assert _load(ROOT / "configs" / "stage3.py", "slake").train.num_epochs == 10


def test_stage3_takes_the_dataset_as_its_argument():
    epochs = {d: _load(ROOT / "configs" / "stage3.py", d).train.num_epochs for d in STAGE3_DATASETS}
    assert epochs == {"vqa_rad": 2, "slake": 10, "pathvqa": 7}
    with pytest.raises(ValueError, match="configs/stage3.py:vqa_rad"):
        _load(ROOT / "configs" / "stage3.py", "vqarad")


def _frozen(name, param):
    stem, _, arg = name.partition(":")
    config = _load(ROOT / "configs" / f"{stem}.py", arg or None)
    return group_of(param, [tuple(g) for g in config.optim.param_groups]) == FROZEN


def test_stage_freezing_follows_the_paper():
    assert _frozen("stage1", "lm/layers/attn/q_proj/kernel") and _frozen("stage1", "vision/pos_embed")
    assert not _frozen("stage1", "projector/fc1/kernel")
    for stage in ("stage2", "stage3:vqa_rad", "stage3:slake", "stage3:pathvqa"):
        assert _frozen(stage, "vision/layers/mlp/fc1/kernel")
        assert not _frozen(stage, "lm/embed_tokens/embedding") and not _frozen(stage, "projector/fc2/bias")


def test_lora_stage3_trains_adapters_and_projector_only():
    for d in STAGE3_DATASETS:
        full, lora = _load(ROOT / "configs" / "stage3.py", d), _load(ROOT / "configs" / "stage3_lora.py", d)
        assert lora.train.num_epochs == full.train.num_epochs and lora.model.lora.rank == 64
    with pytest.raises(ValueError, match="configs/stage3_lora.py:vqa_rad"):
        _load(ROOT / "configs" / "stage3_lora.py", "vqarad")
    for param in ("lm/layers/attn/q_proj/kernel", "lm/embed_tokens/embedding", "lm/lm_head/kernel",
                  "vision/layers/mlp/fc1/kernel"):
        assert _frozen("stage3_lora:slake", param), param
    for param in ("lm/layers/attn/q_proj/lora_a", "lm/layers/mlp/down_proj/lora_b", "projector/fc1/kernel"):
        assert not _frozen("stage3_lora:slake", param), param


MINI_STAGES = sorted((ROOT / "configs" / "mini").glob("stage*.py"))


@pytest.mark.parametrize("path", MINI_STAGES, ids=lambda p: p.stem)
def test_mini_rows_hold_the_longest_record_their_data_can_draw(path, tmp_path):
    """Each stage's rows (data.max_length) fit the longest record its synthetic set can draw
    (records of a longer one would stop the run: too_long = "raise"), with little to spare."""
    from medv_jax.data import pipeline
    from medv_jax.train import trainer

    config = _load(path)
    assert config.data.too_long == "raise"
    config.init_from = None  # the model's shape comes from the config; no earlier stage is needed
    tokenizer = trainer.load_tokenizer(config, tmp_path)
    bcfg = trainer.batch_config(config, trainer.model_config(config, tokenizer), 1)
    train_source, _ = trainer.data_sources(config)
    length = lambda record: pipeline.record_length(record, tokenizer, bcfg)
    longest = length(train_source.longest_record(length))
    assert max(length(train_source[i]) for i in range(200)) <= longest <= config.data.max_length <= longest + 8
