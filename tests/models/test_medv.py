"""The multimodal model and projector against a composition of the same torch modules, and the
parameter counts of the released model shapes (abstract, nothing allocated)."""
import jax
import numpy as np
import pytest
import torch

from medv_jax.models import layers, llada, medv, siglip
from medv_jax.models.projector import Projector
from tests import hf_checkpoints as hf
from tools.convert_weights import convert_params

T = 24  # sequence length
N = 16  # patches per crop of the tiny tower (56 px / 14)


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    folder = tmp_path_factory.mktemp("medv_square")
    ref = hf.TorchMedV(seed=3)
    ref.save(folder)
    return ref, convert_params(folder)


def _pixels(batch, crops, seed=0):
    size = hf.VISION_DIMS["image_size"]
    return np.random.RandomState(seed).uniform(-1, 1, (batch, crops, size, size, 3)).astype(np.float32)


def test_projector_matches_torch(square):
    ref, (config, params) = square
    x = np.random.RandomState(1).normal(size=(3, 5, hf.VISION_DIMS["hidden_size"])).astype(np.float32)
    out = Projector(config.lm.hidden_size).apply({"params": params["projector"]}, x)
    with torch.no_grad():
        expected = ref.projector(torch.as_tensor(x)).numpy()
    hf.assert_rel_close(out, expected, what="projector")


def test_square_image_forward_matches_llava_splice(square):
    """LLaVA's splice: text before <image>, the crop's N features, text after."""
    ref, (config, params) = square
    assert config.image_aspect_ratio == "square" and not config.use_image_newline
    rng = np.random.RandomState(2)
    tokens = rng.randint(0, hf.LM_DIMS["vocab_size"], size=(2, T))
    starts = [3, 5]  # where each row's image begins
    index = np.zeros((2, T, 4), np.int32)
    weight = np.zeros((2, T, 4), np.float32)
    for b, s in enumerate(starts):
        index[b, s:s + N, 0] = np.arange(N)
        weight[b, s:s + N, 0] = 1.0
    pixels = _pixels(2, 1)
    out = medv.MedV(config).apply({"params": params}, tokens, pixels, index, weight, np.zeros((2, T), bool))

    feats = hf.siglip_features(ref.vision, pixels[:, 0], ref.kept_layers)
    with torch.no_grad():
        proj = ref.projector(torch.as_tensor(feats))
        text = ref.lm.model.embed_tokens(torch.as_tensor(tokens))
        rows = [torch.cat([text[b, :s], proj[b], text[b, s + N:]]) for b, s in enumerate(starts)]
    expected = hf.llama_logits(ref.lm, embeds=torch.stack(rows).numpy())
    hf.assert_rel_close(out, expected, what="square multimodal logits")


def test_unrolled_layers_equal_the_layer_loop(square):
    """``unroll_layers`` writes the same layers without the loop: the same parameter tree (an init
    draws the same weights), and logits and gradients equal to rounding (<= 1e-5 relative)."""
    ref, (config, params) = square
    unrolled = config.replace(lm=config.lm.replace(unroll_layers=True),
                              vision=config.vision.replace(unroll_layers=True))
    init = lambda cfg: jax.jit(medv.init_params, static_argnums=0)(cfg, jax.random.key(4))
    jax.tree_util.tree_map(np.testing.assert_array_equal, init(unrolled), init(config))
    rng = np.random.RandomState(5)
    tokens = rng.randint(0, hf.LM_DIMS["vocab_size"], size=(2, T))
    index = np.zeros((2, T, 4), np.int32)
    weight = np.zeros((2, T, 4), np.float32)
    index[:, 2:2 + N, 0], weight[:, 2:2 + N, 0] = np.arange(N), 1.0
    key_mask = np.ones((2, T), bool)
    key_mask[1, -5:] = False
    batch = (tokens, _pixels(2, 1, seed=6), index, weight, np.zeros((2, T), bool), key_mask)
    # The option reaches both towers: the loop lowers to one while loop each, unrolled to none.
    lowered = lambda cfg: jax.jit(lambda p: medv.MedV(cfg).apply({"params": p}, *batch)).lower(params).as_text()
    assert lowered(config).count("stablehlo.while") == 2 and "stablehlo.while" not in lowered(unrolled)

    def loss(p, cfg):
        logits = medv.MedV(cfg).apply({"params": p}, *batch)
        return (logits[:, :, :7] ** 2).mean(), logits

    (_, loop_logits), loop_grads = jax.value_and_grad(loss, has_aux=True)(params, config)
    (_, flat_logits), flat_grads = jax.value_and_grad(loss, has_aux=True)(params, unrolled)
    hf.assert_rel_close(flat_logits, loop_logits, what="unrolled logits")
    # Per tensor, relative to its own largest entry; the key biases' gradients are zero up to
    # rounding (softmax ignores a shift shared by a query's logits), so the floor is a thousandth
    # of the largest gradient anywhere.
    floor = 1e-3 * max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(loop_grads))
    flat, loop = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (flat_grads, loop_grads))
    assert flat.keys() == loop.keys()
    for path, want in loop.items():
        err = float(np.abs(np.asarray(flat[path]) - want).max()) / max(float(np.abs(want).max()), floor)
        assert err <= 1e-5, f"unrolled gradient {jax.tree_util.keystr(path)}: relative error {err:.3g}"


def test_multi_crop_layout_with_newlines_and_bilinear_taps(tmp_path):
    """Several crops, 4-tap weighted gathers (as the anyres shrink needs) and image_newline."""
    ref = hf.TorchMedV(seed=4, image_aspect_ratio="anyres_max_4", mm_patch_merge_type="spatial_unpad")
    ref.save(tmp_path)
    config, params = convert_params(tmp_path)
    assert config.use_image_newline and "image_newline" in params
    s = hf.VISION_DIMS["image_size"]  # "(1x1),...,(6x6)" counts crops of the tower's size
    assert config.image_grid_pinpoints[:2] == ((s, s), (s, 2 * s)) and len(config.image_grid_pinpoints) == 36
    rng = np.random.RandomState(5)
    crops = 3
    tokens = rng.randint(0, hf.LM_DIMS["vocab_size"], size=(2, T))
    index = rng.randint(0, crops * N, size=(2, T, 4)).astype(np.int32)
    weight = rng.uniform(0, 1, size=(2, T, 4)).astype(np.float32)
    weight[:, :4] = 0  # text prefix
    weight[:, -3:] = 0  # text suffix
    newline = np.zeros((2, T), bool)
    newline[:, [9, 15]] = True
    key_mask = np.ones((2, T), bool)
    key_mask[1, :2] = False
    pixels = _pixels(2, crops, seed=6)
    out = medv.MedV(config).apply({"params": params}, tokens, pixels, index, weight, newline, key_mask)
    expected = ref.logits(tokens, pixels, index, weight, newline, key_mask)
    hf.assert_rel_close(np.asarray(out)[:, 2:], expected[:, 2:], what="multi-crop logits")


def test_released_parameter_counts():
    """eval_shape only: counts worked out from the shapes in docs/algorithm.md §1-2."""
    d, f, v, n_layers = 4096, 12288, 126464, 32
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    llada_8b = 2 * v * d + n_layers * per_layer + d
    assert llada_8b == 8_015_581_184
    assert layers.count_params(llada.abstract_params(llada.LLADA_PRESETS["llada_8b"])) == llada_8b

    dv, fv, patches = 1152, 4304, 729
    vit_layer = 4 * (dv * dv + dv) + 2 * (dv * fv) + fv + dv + 4 * dv
    embed = 14 * 14 * 3 * dv + dv + patches * dv
    kept = embed + 26 * vit_layer
    full = embed + 27 * vit_layer + 2 * dv
    head = dv + 3 * dv * dv + 3 * dv + dv * dv + dv + 2 * dv + dv * fv + fv + fv * dv + dv
    assert full + head == 428_225_600  # the released so400m vision model with its pooling head
    assert layers.count_params(siglip.abstract_params(siglip.SIGLIP_PRESETS["siglip2_so400m_patch14_384"])) == kept
    assert layers.count_params(siglip.abstract_params(siglip.SIGLIP_PRESETS["siglip2_so400m_patch14_384_full"])) == full

    projector = dv * d + d + d * d + d
    total = layers.count_params(medv.abstract_params(medv.MEDV_PRESETS["llada_medv_8b"]))
    assert total == llada_8b + kept + projector + d  # + image_newline


def test_8b_logical_axes_cover_every_param():
    import flax.linen as nn

    specs = nn.get_partition_spec(medv.abstract_params(medv.MEDV_PRESETS["llada_medv_8b"]))
    leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert leaves and all(isinstance(s, jax.sharding.PartitionSpec) for s in leaves)
    assert specs["lm"]["layers"]["attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "heads", "head_dim")
