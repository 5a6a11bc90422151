"""SigLIP parity against transformers' SiglipVisionModel on random weights."""
import numpy as np
import pytest

from medv_jax.models import siglip
from tests import hf_checkpoints as hf
from tools.convert_weights import convert_params


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip")
    return folder, hf.make_siglip(folder)


def _pixels(batch=2, seed=0):
    size = hf.VISION_DIMS["image_size"]
    return np.random.RandomState(seed).uniform(-1, 1, size=(batch, size, size, 3)).astype(np.float32)


def test_kept_layers_before_post_layernorm(tower):
    folder, torch_model = tower
    config, params = convert_params(folder)  # the LLaDA-V variant: last layer dropped, no post-LN
    depth = hf.VISION_DIMS["num_hidden_layers"]
    assert config.num_layers == depth - 1 and not config.use_post_layernorm
    assert "post_ln" not in params
    pixels = _pixels()
    out = siglip.SiglipVisionTower(config).apply({"params": params}, pixels)
    assert out.shape == (2, config.num_patches, hf.VISION_DIMS["hidden_size"])
    hf.assert_rel_close(out, hf.siglip_features(torch_model, pixels, layer=depth - 1), what="layer features")


def test_full_depth_with_post_layernorm(tower):
    folder, torch_model = tower
    config, params = convert_params(folder, vision_variant="full")
    assert config.num_layers == hf.VISION_DIMS["num_hidden_layers"] and config.use_post_layernorm
    pixels = _pixels(seed=1)
    out = siglip.SiglipVisionTower(config).apply({"params": params}, pixels)
    hf.assert_rel_close(out, hf.siglip_features(torch_model, pixels), what="post-LN features")


def test_image_size_not_multiple_of_patch(tmp_path):
    # so400m is 384 px with 14 px patches: the conv drops the remainder, like torch.
    torch_model = hf.make_siglip(tmp_path, image_size=60)
    config, params = convert_params(tmp_path)
    assert config.num_patches == 16
    pixels = np.random.RandomState(2).uniform(-1, 1, size=(1, 60, 60, 3)).astype(np.float32)
    out = siglip.SiglipVisionTower(config).apply({"params": params}, pixels)
    hf.assert_rel_close(out, hf.siglip_features(torch_model, pixels, layer=config.num_layers))
