"""End to end on the host side: image -> layout -> conversation slots -> per-position gather arrays,
checked against the model's splice (medv_jax/models/medv.py) when it is importable."""
import numpy as np
import pytest
from PIL import Image

from medv_jax.data import conversation as conv
from medv_jax.data import image as image_lib
from medv_jax.data import image_layout as L

RECORD = {
    "id": "c1",
    "image": "x.png",
    "conversations": [{"from": "human", "value": "Which organ? <image>"}, {"from": "gpt", "value": "Liver."}],
}


@pytest.mark.parametrize("mode", ["square", "anyres_max_4"])
def test_layout_placed_in_sequence(tokenizer, mode):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 700, 3), dtype=np.uint8))
    pre = image_lib.preprocess_image(img, mode)
    sample = conv.format_conversation(RECORD, tokenizer, num_image_tokens=pre.layout.num_tokens)
    index, weight, newline = L.place_in_sequence(sample.image_mask, pre.layout)
    assert index.shape == weight.shape == (len(sample), 4) and newline.shape == (len(sample),)
    is_image = (weight != 0).any(-1) | newline
    np.testing.assert_array_equal(is_image, sample.image_mask)  # the model's rule finds the same slots
    assert index.max() < pre.pixels.shape[0] * 729

    feats = np.random.default_rng(2).standard_normal((pre.pixels.shape[0] * 729, 6)).astype(np.float32)
    nl_vec = np.random.default_rng(3).standard_normal(6).astype(np.float32)
    text = np.random.default_rng(4).standard_normal((len(sample), 6)).astype(np.float32)
    want = text.copy()
    want[sample.image_mask] = L.gather_features(feats, pre.layout, nl_vec)

    try:
        from medv_jax.models.medv import splice_image_features
    except ImportError:
        pytest.skip("model splice not available")
    got = splice_image_features(text[None], feats[None], index[None], weight[None], newline[None], nl_vec)
    np.testing.assert_allclose(np.asarray(got[0]), want, atol=1e-5)


def test_place_in_sequence_checks_counts():
    layout = L.image_token_layout((10, 10), image_lib.ImageConfig())
    with pytest.raises(ValueError, match="728 image slots"):
        L.place_in_sequence(np.arange(800) < 728, layout)
