"""benchmarks/train_throughput.py: the demo mirror matches configs/demo.py, the model-FLOP count
matches a hand count, the eager PyTorch loss equals the JAX loss on the same batch and masks,
and the GPU check's import path needs none of the modules GPU machines lack."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import train_throughput as tt
from medv_jax.models import medv
from medv_jax.train import loss as loss_lib

ROOT = Path(__file__).resolve().parents[2]


def test_demo_mirror_matches_configs_demo():
    ml_collections = pytest.importorskip("ml_collections")  # noqa: F841
    sys.path.insert(0, str(ROOT / "configs"))
    try:
        import demo
    finally:
        sys.path.remove(str(ROOT / "configs"))
    c = demo.get_config()
    shape = tt.CONFIGS["demo"]
    assert c.model.lm_preset == "llada_tiny" and c.model.vision_preset == "siglip_tiny"
    assert dict(c.model.lm_overrides) == shape.lm
    assert dict(c.model.vision_overrides) == shape.vision
    assert (c.train.global_batch, c.data.max_length, c.train.ce_chunk) == (shape.batch, shape.seq, shape.ce_chunk)
    assert (c.model.dtype, c.model.remat_policy, c.optim.lr) == (shape.dtype, shape.remat, shape.lr)
    assert list(c.optim.param_groups) == list(shape.frozen)
    # The mirror builds the same shapes as the trainer's presets + overrides.
    cfg = tt.medv_config(shape)
    assert (cfg.lm.hidden_size, cfg.lm.num_layers, cfg.vision.image_size, cfg.vision.patch_size) == (128, 4, 64, 16)


@pytest.mark.parametrize("name, config_file", [("mini_stage1", "stage1_align.py"), ("mini_stage2", "stage2_instruct.py")])
def test_mini_mirrors_match_configs_mini(name, config_file):
    pytest.importorskip("ml_collections")
    from medv_jax.train.chain import load_config_file

    c = load_config_file(ROOT / "configs" / "mini" / config_file)
    shape = tt.CONFIGS[name]
    assert dict(c.model.lm_overrides) == shape.lm
    assert dict(c.model.vision_overrides) == shape.vision
    assert (c.train.global_batch, c.data.max_length, c.train.ce_chunk) == (shape.batch, shape.seq, shape.ce_chunk)
    assert (c.model.dtype, c.model.remat_policy, c.optim.lr) == (shape.dtype, shape.remat, shape.lr)
    assert not [g for g in c.optim.param_groups if g[1] is None] and shape.frozen == ()  # everything trains
    assert c.model.unroll_layers  # what --unroll_layers yes measures


def test_model_flops_hand_count():
    shape = tt.CONFIGS["demo"]
    cfg = tt.medv_config(shape)
    params = jax.eval_shape(lambda r: medv.init_params(cfg, r), jax.random.key(0))
    f = tt.model_flops(cfg, shape, params)
    d, ff, v, layers = 128, 384, 640, 4
    n_lm = layers * (4 * d * d + 3 * d * ff) + d * v  # q, k, v, o (4 heads x 32), gated MLP, head
    assert f["params_lm_matmul"] == n_lm
    tokens = shape.batch * shape.seq
    assert f["lm_matmul"] == 6 * n_lm * tokens
    assert f["lm_attention"] == 12 * layers * d * shape.seq**2 * shape.batch
    n_img = 16  # 64 px / 16 px patches
    assert f["vision_attention"] == 12 * 2 * 64 * n_img**2 * shape.batch  # trained: fwd + bwd


def test_torch_loss_equals_jax_loss():
    torch = pytest.importorskip("torch")
    import dataclasses

    shape = dataclasses.replace(tt.CONFIGS["demo"], batch=3)
    cfg = tt.medv_config(shape)
    # Random values drawn on the host (no init program to compile).
    rng = np.random.RandomState(3)
    shapes = jax.eval_shape(lambda r: medv.init_params(cfg, r), jax.random.key(0))
    params = jax.tree_util.tree_map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    batch = tt.make_batch(cfg, shape, seed=1)
    masked, p = loss_lib.draw_masks(jax.random.key(2), batch["labels"] != loss_lib.IGNORE_INDEX)
    assert bool(np.asarray(masked).any())
    jax_loss = tt.jax_loss_on(cfg, params, batch, masked, p, shape.ce_chunk)
    ref = tt.torch_model(cfg, params, threads=None)
    bt = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
    bt["tokens"], bt["labels"] = bt["tokens"].long(), bt["labels"].long()
    with torch.no_grad():
        t_loss = float(tt.torch_loss(ref, bt, torch.from_numpy(np.array(masked)), torch.from_numpy(np.array(p)),
                                     16, cfg.lm.mask_token_id))
    assert abs(t_loss - jax_loss) <= 1e-5 * abs(jax_loss), (t_loss, jax_loss)


def test_gpu_check_import_path_is_free_of_absent_modules():
    # gpu_check refuses ml_collections / grain / tensorflow_datasets at import; everything the
    # GPU check runs must import under that guard.
    code = ("import benchmarks.gpu_check, benchmarks.train_throughput, medv_jax.sampling.multimodal, "
            "medv_jax.sampling.diffusion, medv_jax.train.step, medv_jax.train.loss, medv_jax.models.medv\n"
            "import importlib\n"
            "try:\n    importlib.import_module('ml_collections')\nexcept ImportError as e:\n    print('refused', e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused" in out.stdout  # the guard is live, so the imports above really ran without them
