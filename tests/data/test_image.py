"""Pixel preprocessing (square / pad / anyres) and image file reading."""
import math

import numpy as np
import pytest
from PIL import Image

from medv_jax.data import anyres, image_io
from medv_jax.data import image as image_lib
from medv_jax.data.anyres import ImageConfig


def siglip_processor():
    """transformers' SigLIP processor with LLaDA-V's settings, on its Pillow backend (the reference
    preprocesses with Pillow; transformers 5 also has a torchvision backend that resizes
    differently)."""
    try:
        from transformers import SiglipImageProcessorPil as cls
    except ImportError:  # transformers 4.x: SiglipImageProcessor is the Pillow one
        from transformers import SiglipImageProcessor as cls
    return cls(
        size={"height": 384, "width": 384},
        resample=Image.Resampling.BICUBIC,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        rescale_factor=1 / 255,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
    )


def hf_pixels(proc, img):
    out = proc(img, return_tensors="np")["pixel_values"][0]  # [3, 384, 384]
    return np.moveaxis(out, 0, -1)


def sample_images(rng=np.random.default_rng(0)):
    """Noise (worst case for resampling) and a smooth photo-like image, non-square sizes."""
    noise = Image.fromarray(rng.integers(0, 256, (301, 517, 3), dtype=np.uint8))
    y, x = np.mgrid[0:700:1, 0:420:1]
    smooth = np.stack([x * 255 // 419, y * 255 // 699, (x + y) % 256], -1).astype(np.uint8)
    return [noise, Image.fromarray(smooth), Image.fromarray(rng.integers(0, 256, (7, 5, 3), dtype=np.uint8))]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_square_matches_transformers_siglip(which):
    img = sample_images()[which]
    got = image_lib.preprocess_image(img, "square")
    assert got.pixels.shape == (1, 384, 384, 3) and got.pixels.dtype == np.float32
    np.testing.assert_allclose(got.pixels[0], hf_pixels(siglip_processor(), img), atol=1e-5, rtol=0)
    assert got.layout.num_tokens == 729


def test_pad_mode():
    img = sample_images()[0]  # 517 wide x 301 tall
    got = image_lib.preprocess_image(img, "pad")
    # expand2square by hand: a 517 x 517 (127,127,127) canvas with the image at y = (517-301)//2
    canvas = np.full((517, 517, 3), 127, np.uint8)
    canvas[108 : 108 + 301] = np.asarray(img)
    np.testing.assert_allclose(got.pixels[0], hf_pixels(siglip_processor(), Image.fromarray(canvas)), atol=1e-5)
    # the letterbox band is the mean colour: (127/255 - 0.5) / 0.5
    np.testing.assert_allclose(got.pixels[0, :40], 127 / 255 * 2 - 1, atol=1e-6)
    tall = image_lib.expand_to_square(Image.new("RGB", (10, 30), (255, 0, 0)), (127, 127, 127))
    arr = np.asarray(tall)
    assert tall.size == (30, 30) and (arr[:, :10] == 127).all() and (arr[:, 10:20] == (255, 0, 0)).all()
    assert image_lib.preprocess_image(img, "pad").layout.num_tokens == 729


def ref_anyres_crops(img):
    """The reference anyres pixel path re-derived: squashed base view, then the image resized keeping
    its aspect (ceil on the free side, capped) onto a black canvas of the best grid, cut row-major."""
    pins = [(i * 384, j * 384) for i in range(1, 7) for j in range(1, 7)]
    tw, th = anyres.select_best_resolution(img.size, pins)
    ow, oh = img.size
    if tw / ow < th / oh:
        nw, nh = tw, min(math.ceil(oh * tw / ow), th)
    else:
        nw, nh = min(math.ceil(ow * th / oh), tw), th
    canvas = Image.new("RGB", (tw, th))
    canvas.paste(img.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))  # Pillow's default: bicubic
    crops = [canvas.crop((x, y, x + 384, y + 384)) for y in range(0, th, 384) for x in range(0, tw, 384)]
    return [img.resize((384, 384))] + crops


@pytest.mark.parametrize("size", [(1000, 300), (300, 1000), (40, 30), (900, 900), (1600, 380)])
def test_anyres_crops(size):
    rng = np.random.default_rng(size[0])
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    got = image_lib.preprocess_image(img, "anyres_max_4")
    ref = ref_anyres_crops(img)
    g = anyres.grid_shape(size, anyres.LLADA_V_SFT)
    assert got.pixels.shape == (1 + g.rows * g.cols, 384, 384, 3) == (len(ref), 384, 384, 3)
    proc = siglip_processor()
    for k, crop in enumerate(ref):
        np.testing.assert_allclose(got.pixels[k], hf_pixels(proc, crop), atol=1e-5, err_msg=f"crop {k}")
    # base view is the square-mode image; the layout is the one of image_layout
    np.testing.assert_array_equal(got.pixels[0], image_lib.preprocess_image(img, "square").pixels[0])
    assert got.layout.num_tokens > 729 and got.layout.newline.sum() > 0


def test_modes_from_config():
    img = sample_images()[2]
    cfg = ImageConfig.from_model_config({"image_aspect_ratio": "pad", "mm_patch_merge_type": "spatial_unpad"})
    got = image_lib.preprocess_image(img, cfg)
    assert got.pixels.shape == (1, 384, 384, 3) and got.layout.num_tokens == 730


# ---- reading files and converting modes ---------------------------------------------------------
def save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def rgb(img_or_path, **kw):
    return np.asarray(image_io.load_image(img_or_path, **kw))


def test_grayscale_palette_bilevel_cmyk(tmp_path):
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = rgb(save(Image.fromarray(gray), tmp_path / "g.png"))
    assert out.shape == (16, 16, 3) and (out == gray[..., None]).all()
    pal = Image.new("P", (2, 2))
    pal.putdata([0, 1, 2, 1])
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    out = rgb(save(pal, tmp_path / "p.png"))
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 255, 0] and out[1, 0].tolist() == [0, 0, 255]
    bilevel = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    assert rgb(save(bilevel, tmp_path / "b.png")).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert rgb(save(cmyk, tmp_path / "c.jpg", quality=100))[0, 0].tolist() == pytest.approx([255, 0, 0], abs=3)


def test_rgba_drops_alpha_like_llava(tmp_path):
    arr = np.array([[[200, 10, 20, 0], [30, 40, 50, 255]]], np.uint8)  # fully transparent, opaque
    out = rgb(save(Image.fromarray(arr), tmp_path / "a.png"))
    # LLaVA: Image.open(path).convert("RGB") keeps the colour under a transparent pixel
    assert out.tolist() == [[[200, 10, 20], [30, 40, 50]]]
    la = Image.fromarray(np.array([[[90, 0], [91, 255]]], np.uint8))
    assert la.mode == "LA"
    assert rgb(la).tolist() == [[[90] * 3, [91] * 3]]


def test_16_bit_grayscale(tmp_path):
    # 12-bit data in a 16-bit PNG, as radiology exports often are; Pillow alone would clip to white
    arr = np.array([[0, 1024, 2048, 4095]], np.uint16)
    path = save(Image.fromarray(arr), tmp_path / "x16.png")
    with Image.open(path) as im:
        assert im.mode == "I;16"
    assert rgb(path)[0, :, 0].tolist() == [0, 64, 128, 255]  # minmax (default): 0 -> 0, max -> 255
    assert rgb(path, high_bit_depth="full")[0, :, 0].tolist() == [0, 4, 8, 16]  # v / 65535 * 255
    full = np.array([[0, 257, 65535, 32896]], np.uint16)
    assert rgb(Image.fromarray(full), high_bit_depth="full")[0, :, 0].tolist() == [0, 1, 255, 128]
    # 32-bit integer and float images: no nominal range, always min-max; NaN -> minimum
    assert rgb(Image.fromarray(np.array([[-1000, 0, 1000]], np.int32)))[0, :, 0].tolist() == [0, 128, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, np.nan, 2.0]], np.float32))
    assert rgb(f)[0, :, 0].tolist() == [0, 64, 0, 255]
    assert rgb(Image.fromarray(np.full((2, 2), 7, np.uint16)))[..., 0].tolist() == [[0, 0], [0, 0]]
    got = image_lib.preprocess_image(path, "square")
    assert got.pixels.shape == (1, 384, 384, 3) and got.pixels.max() == pytest.approx(1.0)


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(image_io.ImageReadError, match="not_an_image.png"):
        image_lib.preprocess_image(str(bad), "square")
    with pytest.raises(image_io.ImageReadError, match="missing.jpg"):
        image_io.load_image(tmp_path / "missing.jpg")
    save(Image.fromarray(np.zeros((64, 64, 3), np.uint8)), tmp_path / "t.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "t.png").read_bytes()[:60])
    with pytest.raises(image_io.ImageReadError, match="truncated.png"):
        image_io.load_image(truncated)
    assert issubclass(image_io.ImageReadError, OSError)
