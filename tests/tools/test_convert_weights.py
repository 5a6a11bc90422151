"""The conversion tool: failures are clear and leave nothing behind; export round-trips exactly."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from medv_jax import checkpoint
from tests import hf_checkpoints as hf
from tools.convert_weights import ConversionError, convert_params, export_checkpoint, import_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf.make_llama(folder)
    return folder


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def _assert_fails(src, dst, *needles):
    with pytest.raises(ConversionError) as err:
        import_checkpoint(src, dst)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp")]


def test_missing_tensor(llama_dir, tmp_path):
    src = _edited_copy(llama_dir, tmp_path / "src", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _assert_fails(src, tmp_path / "out", "missing tensors (1)", "model.layers.1.mlp.up_proj.weight")


def test_unknown_tensor(llama_dir, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
        t["model.layers.7.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"]
    src = _edited_copy(llama_dir, tmp_path / "src", edit)
    _assert_fails(src, tmp_path / "out", "unknown tensors (2)", "q_norm", "layer 7 beyond the 2 configured")


def test_wrong_shape(llama_dir, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 60), np.float32)
    src = _edited_copy(llama_dir, tmp_path / "src", edit)
    _assert_fails(src, tmp_path / "out", "wrong shapes (1)", "k_proj.weight: shape [64, 60], expected [64, 64]")


def test_corrupt_safetensors(llama_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((llama_dir / "config.json").read_text())
    data = (llama_dir / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:40] + b"garbage" + data[47:1000])
    _assert_fails(src, tmp_path / "out", "model.safetensors is not a readable safetensors file")


def test_unknown_checkpoint_and_existing_destination(llama_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    save_file({"foo.weight": np.zeros(3, np.float32)}, str(src / "model.safetensors"))
    _assert_fails(src, tmp_path / "out", "cannot tell what this checkpoint is")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        import_checkpoint(llama_dir, tmp_path / "taken")


def test_multimodal_round_trip_is_bit_exact(tmp_path):
    ref = hf.TorchMedV(seed=7, image_aspect_ratio="anyres_max_4", mm_patch_merge_type="spatial_unpad")
    ref.save(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "jax")
    # Tiny shards force the sharded layout (index + several files) on export and re-import.
    export_checkpoint(tmp_path / "jax", tmp_path / "hf2", max_shard_bytes=20_000)
    assert (tmp_path / "hf2" / "model.safetensors.index.json").is_file()
    config, params = checkpoint.load_pretrained(tmp_path / "jax")
    config2, params2 = convert_params(tmp_path / "hf2")
    assert config2 == config
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, params2)
    # Every tensor LLaDA-MedV uses comes back under its original name, bit for bit (the dropped
    # layer, post-LN and head are not exported: they were never converted).
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    index = json.loads((tmp_path / "hf2" / "model.safetensors.index.json").read_text())["weight_map"]
    exported = {}
    for file in set(index.values()):
        exported.update(load_file(str(tmp_path / "hf2" / file)))
    unused = {k for k in original if "post_layernorm" in k}
    assert set(exported) == set(original) - unused
    for name, value in exported.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)



def test_grid_pinpoints_string_forms_convert(tmp_path):
    """config.json may hold image_grid_pinpoints as a Python-literal string (LLaVA reads it with
    ast.literal_eval) and any anyres_max_N; a bad value fails naming it."""
    ref = hf.TorchMedV(seed=7, image_aspect_ratio="anyres_max_4", mm_patch_merge_type="spatial_unpad")
    ref.save(tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(image_grid_pinpoints="[(384, 768), (768, 384)]", image_aspect_ratio="anyres_max_9")
    cfg_path.write_text(json.dumps(cfg))
    import_checkpoint(tmp_path / "hf", tmp_path / "jax")
    config, _ = checkpoint.load_pretrained(tmp_path / "jax")
    assert config.image_grid_pinpoints == ((384, 768), (768, 384))
    assert config.image_aspect_ratio == "anyres_max_9"

    crop = config.vision.image_size
    cfg.update(image_grid_pinpoints="(1x1),...,(1x2)")
    cfg_path.write_text(json.dumps(cfg))
    config, _ = convert_params(tmp_path / "hf")
    assert config.image_grid_pinpoints == ((crop, crop), (crop, 2 * crop))

    cfg.update(image_grid_pinpoints="[(384, 768)")
    cfg_path.write_text(json.dumps(cfg))
    _assert_fails(tmp_path / "hf", tmp_path / "jax_bad", "image_grid_pinpoints='[(384, 768)'", "(1x1),...,(6x6)")

def test_bfloat16_conversion_and_cli(llama_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tools.convert_weights", "--src", str(llama_dir), "--dst",
         str(tmp_path / "bf16"), "--dtype", "bfloat16"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    config, params = checkpoint.load_pretrained(tmp_path / "bf16")
    assert config.param_dtype == "bfloat16"
    assert params["lm_head"]["kernel"].dtype == jax.numpy.bfloat16
    _, fp32 = convert_params(llama_dir)
    np.testing.assert_array_equal(
        np.asarray(params["lm_head"]["kernel"]),
        fp32["lm_head"]["kernel"].astype(jax.numpy.bfloat16),
    )
    # A failing run prints one error line and exits 2.
    again = subprocess.run(
        [sys.executable, "-m", "tools.convert_weights", "--src", str(llama_dir), "--dst", str(tmp_path / "bf16")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert again.returncode == 2 and "already exists" in again.stderr
