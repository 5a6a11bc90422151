"""LoRA training end to end on the demo's tiny model over a base checkpoint: the loss falls well below
its start, a SIGKILLed run resumes to exactly the uninterrupted losses, checkpoints and the final
adapters hold only the trained tensors (plus the base's path), and the adapters load merged and
unmerged to the same logits."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from medv_jax import checkpoint
from medv_jax.models import medv
from tests.train.test_trainer import TINY, _env, _losses, _wait_for_step

ROOT = Path(__file__).resolve().parents[2]
STEPS = 120


def _train(workdir, config, *extra):
    return [sys.executable, "-m", "medv_jax.train", f"--config={config}", f"--workdir={workdir}", *TINY, *extra]


def _run(cmd):
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base checkpoint: the demo's tiny model after two steps of full training."""
    workdir = tmp_path_factory.mktemp("base")
    _run(_train(workdir, "configs/demo.py", "--config.train.num_steps=2"))
    return workdir / "model"


def _lora(workdir, base):
    return _train(workdir, "tests/train/lora_demo.py", f"--config.init_from={base}",
                  f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=10",
                  "--config.data.train_size=2000", "--config.model.lora.dropout=0.1")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base):
    workdir = tmp_path_factory.mktemp("lora")
    _run(_lora(workdir, base))
    return workdir


def _masked_ce(workdir):
    records = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r["masked_ce"] for r in records if r["split"] == "train"]


def test_a_lora_run_learns(lora_run):
    ce = _masked_ce(lora_run)
    assert len(ce) == STEPS
    start, end = np.mean(ce[:5]), np.mean(ce[-20:])
    assert end < 0.75 * start, (start, end)


def test_sigkill_then_resume_gives_the_same_losses(lora_run, base, tmp_path):
    proc = subprocess.Popen(_lora(tmp_path, base), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path, 15, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _run(_lora(tmp_path, base))
    assert _losses(tmp_path) == _losses(lora_run)


def _trained_paths(tree):
    return sorted("/".join(k) for k in flatten_dict(tree))


def test_checkpoints_and_adapters_hold_only_the_trained_tensors(lora_run, base):
    import orbax.checkpoint as ocp

    step_dir = max((lora_run / "checkpoints").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    state = ocp.StandardCheckpointer().restore(step_dir / "state")
    trained = _trained_paths(state["params"])
    assert trained and all(p.startswith("projector/") or p.endswith(("/lora_a", "/lora_b")) for p in trained)
    assert any(p.endswith("/lora_a") for p in trained) and any(p.startswith("projector/") for p in trained)
    assert not flatten_dict(state.get("frozen") or {})  # the frozen base is not stored
    # Adam's moments exist for the trained tensors only.
    moment_leaves = [x for x in jax.tree_util.tree_leaves(state["opt_state"]) if np.ndim(x) > 0]
    assert sum(np.size(x) for x in moment_leaves) == 2 * sum(np.size(x) for x in jax.tree_util.tree_leaves(state["params"]))
    assert json.loads((step_dir / "data" / "metadata").read_text())["base"] == str(base.absolute())

    adapters_dir = lora_run / "adapters"
    assert checkpoint.adapters_base(adapters_dir) == str(base.absolute())
    saved = ocp.StandardCheckpointer().restore(adapters_dir / "params")
    assert _trained_paths(saved) == trained


def test_adapters_load_merged_and_unmerged_to_the_same_logits(lora_run):
    unmerged_cfg, unmerged = checkpoint.load_pretrained(lora_run / "adapters")
    merged_cfg, merged = checkpoint.load_pretrained(lora_run / "adapters", merge_adapters=True)
    assert unmerged_cfg.lm.lora_rank == 4 and merged_cfg.lm.lora_rank == 0
    assert not any(k[-1].startswith("lora") for k in flatten_dict(merged))
    inputs = list(medv.dummy_inputs(unmerged_cfg, length=12))
    inputs[0] = jax.random.randint(jax.random.key(0), (1, 12), 0, unmerged_cfg.lm.tokenizer_vocab_size)
    a = np.asarray(medv.MedV(unmerged_cfg).apply({"params": unmerged}, *inputs))
    b = np.asarray(medv.MedV(merged_cfg).apply({"params": merged}, *inputs))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    _, plain = checkpoint.load_pretrained(checkpoint.adapters_base(lora_run / "adapters"))
    c = np.asarray(medv.MedV(merged_cfg).apply({"params": plain}, *inputs))
    assert np.abs(a - c).max() > 1e-3 * np.abs(a).max()  # training changed the model
