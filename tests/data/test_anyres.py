"""anyres geometry and the feature-merge layout, against a plain re-derivation of the reference
(LLaDA-V mm_utils.select_best_resolution / get_anyres_image_grid_shape and the merge in
llava_arch.prepare_inputs_labels_for_multimodal) written here with torch."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medv_jax.data import anyres
from medv_jax.data import image_layout as L
from medv_jax.data.anyres import ImageConfig

P = 27  # patches per side
N = P * P

# Odd aspect ratios: very wide, very tall, tiny, huge, plus ordinary ones.
SIZES = [
    (384, 384), (768, 768), (1920, 1080), (1080, 1920), (500, 300), (385, 1000), (1000, 385),
    (4000, 100), (20000, 100), (3000, 7), (100, 4000), (100, 20000), (7, 3000),
    (1, 1), (5, 3), (3, 5), (10, 10), (383, 2),
    (10000, 8000), (8000, 10000), (50000, 50000), (2304, 2304), (2305, 1153),
]
RANDOM_SIZES = [tuple(int(v) for v in s) for s in np.random.default_rng(0).integers(1, 6000, size=(40, 2))]


# ---- the reference algorithm, re-derived --------------------------------------------------------
def ref_pinpoints():
    return [[i * 384, j * 384] for i in range(1, 7) for j in range(1, 7)]


def ref_best_resolution(size, candidates):
    ow, oh = size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in candidates:
        s = min(w / ow, h / oh)
        eff = min(int(ow * s) * int(oh * s), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def ref_grid(size):
    w, h = ref_best_resolution(size, ref_pinpoints())
    return w // 384, h // 384  # (cols, rows)


def ref_merge(feats, size, newline, merge="spatial_unpad", max_patches=4):
    """feats: [n_crops, 729, D] (crop 0 = base view) -> [T, D], the reference's feature merge."""
    if merge == "flat":
        return feats.flatten(0, 1)
    base, rest = feats[0], feats[1:]
    cols, rows = ref_grid(size)
    x = rest.view(rows, cols, P, P, -1)
    if merge == "spatial":
        return torch.cat([base, x.permute(0, 2, 1, 3, 4).flatten(0, 3)])
    x = x.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [D, rows*27, cols*27]
    ow, oh = size
    ch, cw = x.shape[1:]
    if ow / oh > cw / ch:
        pad = (ch - int(oh * (cw / ow))) // 2
        x = x[:, pad : ch - pad, :]
    else:
        pad = (cw - int(ow * (ch / oh))) // 2
        x = x[:, :, pad : cw - pad]
    d, h, w = x.shape
    if max_patches is not None:
        times = math.sqrt(h * w / (max_patches * P * P))
        if times > 1.1:
            x = F.interpolate(x[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    x = torch.cat([x, newline[:, None, None].expand(d, x.shape[1], 1)], dim=-1)
    return torch.cat([base, x.flatten(1, 2).transpose(0, 1)])


# ---- tests ---------------------------------------------------------------------------------------
def test_pinpoints_parsing():
    pins = anyres.parse_grid_pinpoints("(1x1),...,(6x6)")
    assert [list(p) for p in pins] == ref_pinpoints()
    assert pins[:2] == ((384, 384), (384, 768)) and len(pins) == 36
    assert anyres.parse_grid_pinpoints("[[384, 768], [768, 384]]") == ((384, 768), (768, 384))
    assert anyres.parse_grid_pinpoints([[384, 384]]) == ((384, 384),)
    cfg = ImageConfig.from_model_config(
        {"image_aspect_ratio": "anyres_max_4", "mm_patch_merge_type": "spatial_unpad",
         "image_grid_pinpoints": "(1x1),...,(2x2)"}
    )
    assert cfg.max_num_patches == 4 and cfg.is_anyres and len(cfg.grid_pinpoints) == 4
    assert ImageConfig.from_model_config({}) == ImageConfig()  # LLaVA defaults: square, flat
    with pytest.raises(ValueError):
        ImageConfig(aspect_ratio="highres")
    with pytest.raises(ValueError):
        ImageConfig(merge_type="maxpool2x2")



# One parser for every form LLaVA reads (ast.literal_eval strings, the "(AxB),...,(CxD)" range, lists).
@pytest.mark.parametrize("value, crop, expected", [
    # range: first pair (1, 1) to last pair (2, 3); i outer, j inner; each times the crop size
    ("(1x1),...,(2x3)", 384, ((384, 384), (384, 768), (384, 1152), (768, 384), (768, 768), (768, 1152))),
    ("(2x1),...,(3x2)", 10, ((20, 10), (20, 20), (30, 10), (30, 20))),
    ("(1x1), ..., (2x2)", 5, ((5, 5), (5, 10), (10, 5), (10, 10))),  # spaces as LLaVA's findall allows
    ("(2x2)", 100, ((200, 200),)),  # a one-grid range
    ("(1x1),(2x2),(1x2)", 1, ((1, 1), (1, 2))),  # only the first and last pair count, as in LLaVA
    # Python-literal strings, pixels as written (the crop size does not apply)
    ("[(384, 768), (768, 384)]", 384, ((384, 768), (768, 384))),
    ("[[384, 768], [768, 384]]", 10, ((384, 768), (768, 384))),
    ("((384, 384),)", 384, ((384, 384),)),
    (" [[1, 2]] ", 384, ((1, 2),)),
    # lists of pairs, as a saved config.json or Python code holds them
    ([[384, 768], [768, 384]], 384, ((384, 768), (768, 384))),
    ([(384, 384)], 384, ((384, 384),)),
    (((3, 4), (5, 6)), 384, ((3, 4), (5, 6))),
    (np.array([[3, 4], [5, 6]]), 384, ((3, 4), (5, 6))),
])
def test_grid_pinpoints_every_form(value, crop, expected):
    got = anyres.parse_grid_pinpoints(value, crop)
    assert got == expected and all(type(n) is int for pair in got for n in pair)


@pytest.mark.parametrize("value", [
    "", "[]", [], "not pinpoints", "[(384, 768)", "[(384, 768, 1)]", "[(384, 0)]", "[(-384, 384)]",
    "[(384.0, 768)]", [[True, 384]], [384, 768], "{'a': 1}", {"a": 1}, None, 384,
    "(0x1),...,(2x2)", "(3x3),...,(1x1)", "(2x1),...,(3x0)", "(1x1)...(3x3)", "1x1,...,3x3",
    "(1x1),...,(axb)", "(1x1),foo,(2x2)",
])
def test_grid_pinpoints_bad_input(value):
    with pytest.raises(ValueError) as err:
        anyres.parse_grid_pinpoints(value)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"image_grid_pinpoints={value!r}")
    assert '"(1x1),...,(6x6)"' in message and '"[(384, 768), (768, 384)]"' in message


def test_anyres_max_any_positive_n():
    assert anyres.parse_anyres_max("anyres_max_9") == 9 and anyres.parse_anyres_max("anyres_max_1") == 1
    assert anyres.parse_anyres_max("square") is None and anyres.parse_anyres_max("anyres") is None
    cfg = ImageConfig.from_model_config(
        {"image_aspect_ratio": "anyres_max_9", "mm_patch_merge_type": "spatial_unpad",
         "image_grid_pinpoints": "[(768, 768), (2304, 2304)]"}
    )
    assert cfg.max_num_patches == 9 and cfg.grid_pinpoints == ((768, 768), (2304, 2304))
    # A 2304 x 2304 image picks the 6 x 6 grid: a 162 x 162 map, no letterbox. The shrink factor is
    # sqrt(162^2 / (N * 27^2)): 2 for N = 9 (-> 81 x 81), 3 for N = 4 (-> 54 x 54); each map row
    # ends with an image_newline, after the base view's 729 tokens.
    assert L.num_image_tokens((2304, 2304), cfg) == 729 + 81 * 82
    assert L.num_image_tokens((2304, 2304), ImageConfig.for_mode("anyres_max_4")) == 729 + 54 * 55
    for bad in ("anyres_max_0", "anyres_max_", "anyres_max", "anyres_max_-1", "anyres_max_4x", "anyres_max_ 4"):
        with pytest.raises(ValueError, match=f"image_aspect_ratio={bad!r}: expected anyres_max_N"):
            ImageConfig(aspect_ratio=bad, merge_type="spatial_unpad")


def test_model_config_takes_anyres_max_any_positive_n():
    from medv_jax.models.medv import MedVConfig

    assert MedVConfig(image_aspect_ratio="anyres_max_9").image_aspect_ratio == "anyres_max_9"
    assert MedVConfig(image_aspect_ratio="pad").image_aspect_ratio == "pad"
    for bad in ("anyres_max_0", "highres"):
        with pytest.raises(ValueError, match=f"image_aspect_ratio={bad!r}"):
            MedVConfig(image_aspect_ratio=bad)

@pytest.mark.parametrize("size", SIZES + RANDOM_SIZES)
def test_grid_choice_matches_reference(size):
    cols, rows = ref_grid(size)
    assert anyres.grid_shape(size, anyres.LLADA_V_SFT) == (rows, cols)
    assert L.num_crops(size, anyres.LLADA_V_SFT) == 1 + rows * cols


@pytest.mark.parametrize("size", SIZES + RANDOM_SIZES[:10])
@pytest.mark.parametrize("merge", ["spatial_unpad", "spatial", "flat"])
def test_merge_layout_equals_torch_merge(size, merge):
    cfg = ImageConfig(aspect_ratio="anyres_max_4", merge_type=merge)
    g = anyres.grid_shape(size, cfg)
    n_crops = 1 + g.rows * g.cols
    gen = torch.Generator().manual_seed(hash(size) % 2**31)
    feats = torch.randn(n_crops, N, 5, generator=gen)
    newline = torch.randn(5, generator=gen)
    want = ref_merge(feats, size, newline, merge).numpy()
    layout = L.image_token_layout(size, cfg)
    assert layout.index.shape == (want.shape[0], 4) and layout.index.dtype == np.int32
    assert layout.weight.dtype == np.float32 and layout.newline.dtype == bool
    assert layout.index.min() >= 0 and layout.index.max() < n_crops * N
    assert (layout.weight[layout.newline] == 0).all()
    np.testing.assert_allclose(layout.weight[~layout.newline].sum(-1), 1.0, atol=1e-6)
    got = L.gather_features(feats.flatten(0, 1).numpy(), layout, newline.numpy())
    # bit-exact taps; what is left is float32 summation order (torch nests the two 1-D blends)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    assert L.num_image_tokens(size, cfg) == want.shape[0]


def test_plain_anyres_unpads_without_shrinking():
    cfg = ImageConfig(aspect_ratio="anyres", merge_type="spatial_unpad")
    size = (5000, 5000)  # 6x6 grid, would be shrunk under anyres_max_4
    feats = torch.randn(37, N, 3)
    nl = torch.randn(3)
    want = ref_merge(feats, size, nl, max_patches=None).numpy()
    got = L.gather_features(feats.flatten(0, 1).numpy(), L.image_token_layout(size, cfg), nl.numpy())
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.shape[0] == N + 162 * 163


@pytest.mark.parametrize(
    "shape_in,shape_out",
    [((54, 81), (37, 56)), ((162, 162), (53, 53)), ((27, 162), (12, 75)), ((100, 7), (61, 4)),
     ((5, 9), (5, 9)), ((3, 4), (8, 11)), ((1, 30), (1, 17)), ((81, 48), (2, 1))],
)
def test_bilinear_taps_match_torch_interpolate(shape_in, shape_out):
    h, w = shape_in
    x = torch.randn(1, 6, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))
    want = F.interpolate(x, list(shape_out), mode="bilinear", align_corners=False)[0]  # [6, oh, ow]
    rows = np.arange(h * w, dtype=np.int32).reshape(h, w)
    index, weight = L.bilinear_resize_taps(rows, *shape_out)
    flat = x[0].permute(1, 2, 0).reshape(h * w, 6).numpy()
    got = np.einsum("ijk,ijkd->ijd", weight, flat[index])
    np.testing.assert_allclose(got, want.permute(1, 2, 0).numpy(), atol=1e-5, rtol=0)


def test_single_crop_token_counts_and_the_730_claim():
    """docs/algorithm.md §2: "a single crop with spatial_unpad gives 730 tokens". In the reference that is the
    single-crop branch (one crop per image, i.e. square/pad preprocessing with an "unpad" merge
    type): 729 features + one image_newline. An anyres image always has base view + grid crops, so
    a 1x1 grid on a square image gives 729 + 27 rows x (27 + newline) = 1485 instead."""
    for mode in ("square", "pad"):
        flat = L.image_token_layout((500, 300), ImageConfig(aspect_ratio=mode))
        assert flat.num_tokens == 729 and not flat.newline.any()
        np.testing.assert_array_equal(flat.index[:, 0], np.arange(729))
        np.testing.assert_array_equal(flat.weight, np.eye(4, dtype=np.float32)[[0] * 729])
        unpad = L.image_token_layout((500, 300), ImageConfig(aspect_ratio=mode, merge_type="spatial_unpad"))
        assert unpad.num_tokens == 730 and unpad.newline.tolist() == [False] * 729 + [True]
    assert L.num_image_tokens((384, 384), anyres.LLADA_V_SFT) == 729 + 27 * 28


def test_unpad_and_shrink_details():
    # 1000x300 -> 3 columns x 1 row; map 27 x 81; content height int(300 * 81/1000) = 24 -> pad 1
    assert anyres.unpad_window((1000, 300), 27, 81) == (1, 26, 0, 81)
    # odd leftover keeps one extra row: height int(100 * 162/20000) = 0 -> pad 13 -> 1 row
    assert anyres.unpad_window((20000, 100), 27, 162) == (13, 14, 0, 162)
    assert anyres.shrink_size(27, 81, 4, 27) is None
    # 6x6 grid: times = sqrt(162*162 / (4*729)) = 3.0 -> (54, 54)
    assert anyres.shrink_size(162, 162, 4, 27) == (54, 54)
    # just above the 10% margin: 2x3 grid unpadded to 54 x 81 -> times = 1.22 -> (44, 66)
    assert anyres.shrink_size(54, 81, 4, 27) == (44, 66)


def test_bilinear_weights_bit_exact_with_torch():
    """Per-output weights equal torch's exactly (its source coordinate is a fused multiply-add)."""
    for n_in in range(2, 170, 7):
        for n_out in range(1, n_in + 3, 5):
            eye = torch.eye(n_in)[:, None, None, :]  # impulse i -> weight of input i in every output
            want = F.interpolate(eye, [1, n_out], mode="bilinear", align_corners=False)[:, 0, 0, :].numpy()
            i0, i1, w0, w1 = L.bilinear_taps(n_in, n_out)
            got = np.zeros((n_in, n_out), np.float32)
            np.add.at(got, (i0, np.arange(n_out)), w0)
            np.add.at(got, (i1, np.arange(n_out)), w1)
            np.testing.assert_array_equal(got, want, err_msg=f"{n_in} -> {n_out}")
