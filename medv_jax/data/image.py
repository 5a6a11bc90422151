"""Image preprocessing for the SigLIP tower with Pillow + numpy (no torch): square, pad, anyres.

Pixel facts matched (docs/algorithm.md §2; LLaDA-V mm_utils.process_anyres_image / train.py process_image and its
SigLipImageProcessor): RGB, Pillow bicubic resize to 384 x 384 (aspect not kept), scale by 1/255
(in float64, then float32, as transformers' rescale), normalise (x - 0.5) / 0.5.

* square: the image resized to 384 x 384.
* pad: pasted centred on a square canvas of the mean colour (127, 127, 127) first (LLaVA's
  expand2square: offset (side - w) // 2 or (side - h) // 2).
* anyres[_max_N]: a base view (the whole image squashed to 384 x 384) followed by the crops of the
  best grid: the image resized keeping its aspect into the grid resolution, pasted centred on a
  black canvas, cut into 384-pixel crops in row-major order.

Output pixels are HWC float32 `[n_crops, 384, 384, 3]`, with the token layout of
`image_layout.image_token_layout` for the model's feature merge.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from medv_jax.data import anyres, image_io, image_layout
from medv_jax.data.anyres import ImageConfig
from medv_jax.data.image_layout import ImageTokenLayout

BICUBIC = Image.Resampling.BICUBIC


class PreprocessedImage(NamedTuple):
    """pixels: float32 [n_crops, crop, crop, 3]; layout: the image tokens' gather layout."""

    pixels: np.ndarray
    layout: ImageTokenLayout


def normalize(img: Image.Image, config: ImageConfig) -> np.ndarray:
    """8-bit RGB image -> float32 [H, W, 3]: x / 255 (computed in float64), then (x - mean) / std."""
    x = (np.asarray(img, dtype=np.uint8).astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    mean = np.asarray(config.image_mean, np.float32)
    std = np.asarray(config.image_std, np.float32)
    return (x - mean) / std


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to size x size, aspect ratio not kept."""
    return img.resize((size, size), BICUBIC)


def expand_to_square(img: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Centre `img` on a square canvas of `color` whose side is the longer image side."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_and_pad(img: Image.Image, target: anyres.Size) -> Image.Image:
    """Aspect-keeping bicubic resize into `target` (w, h), centred on a black canvas."""
    (nw, nh), offset = anyres.resize_and_pad_geometry(img.size, target)
    canvas = Image.new("RGB", target, (0, 0, 0))
    canvas.paste(img.resize((nw, nh), BICUBIC), offset)
    return canvas


def split_crops(img: Image.Image, crop: int) -> list[Image.Image]:
    """crop x crop tiles of `img`, row by row, left to right."""
    w, h = img.size
    return [img.crop((x, y, x + crop, y + crop)) for y in range(0, h, crop) for x in range(0, w, crop)]


def anyres_crops(img: Image.Image, config: ImageConfig) -> list[Image.Image]:
    """Base view (whole image squashed to one crop) followed by the best grid's crops."""
    target = anyres.select_best_resolution(img.size, config.grid_pinpoints)
    grid = split_crops(resize_and_pad(img, target), config.crop_size)
    return [resize_square(img, config.crop_size)] + grid


def crops_for(img: Image.Image, config: ImageConfig) -> list[Image.Image]:
    """The 8-bit RGB crops the vision tower sees for `img` under `config`."""
    if config.is_anyres:
        return anyres_crops(img, config)
    if config.aspect_ratio == "pad":
        img = expand_to_square(img, config.pad_color)
    return [resize_square(img, config.crop_size)]


def preprocess_pil(img: Image.Image, config: ImageConfig) -> PreprocessedImage:
    """An 8-bit RGB PIL image -> (pixels [n_crops, 384, 384, 3], token layout)."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r}; use image_io.load_image")
    pixels = np.stack([normalize(c, config) for c in crops_for(img, config)])
    layout = image_layout.image_token_layout(img.size, config)
    return PreprocessedImage(pixels, layout)


def preprocess_image(
    source: str | os.PathLike[str] | Image.Image | np.ndarray | bytes,
    mode: str | ImageConfig = "square",
    *,
    high_bit_depth: image_io.HighBitDepth = "minmax",
    dicom_window: str | tuple[float, float] | None = None,
    dicom_frame: int | None = None,
    dicom_force: bool = False,
) -> PreprocessedImage:
    """Loads `source` (path incl. .dcm, PIL image, uint8 array or encoded bytes) and preprocesses it.

    `mode` is an ImageConfig (normally `ImageConfig.from_model_config(checkpoint_config)`) or a
    preset name: "square", "pad" (729 tokens each) or "anyres_max_N" (spatial_unpad; LLaDA-V uses N = 4).
    Returns pixels float32 [n_crops, 384, 384, 3] and the layout (index int32 [T, 4],
    weight float32 [T, 4], newline bool [T]); T is the `<image>` placeholder's token count.
    """
    config = mode if isinstance(mode, ImageConfig) else ImageConfig.for_mode(mode)
    img = image_io.load_image(
        source,
        high_bit_depth=high_bit_depth,
        dicom_window=dicom_window,
        dicom_frame=dicom_frame,
        dicom_force=dicom_force,
    )
    return preprocess_pil(img, config)
