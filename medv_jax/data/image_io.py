"""Reading image files (and DICOM) into 8-bit RGB PIL images.

LLaVA/LLaDA-V open every training image with `Image.open(path).convert("RGB")`; that is kept for all
8-bit modes (RGBA and LA drop alpha rather than compositing, palette images map through their
palette, CMYK/YCbCr convert). Pillow's own conversion of high-bit-depth grayscale (I;16, I, F)
*clips* at 255, which turns a 16-bit radiograph white, so those modes are rescaled to 8 bits here:
"minmax" stretches the image's own range (default: radiology exports rarely use the full 16-bit
range, e.g. 12-bit data in a 16-bit PNG), "full" maps the nominal 0..65535 range of I;16 linearly
(what image viewers show); I and F have no nominal range and always use min-max. EXIF orientation is
not applied, as in the reference.
"""
from __future__ import annotations

import io
import os
from typing import Literal

import numpy as np
from PIL import Image

from medv_jax.data.pixels import ImageReadError, rescale_to_uint8  # noqa: F401  (ImageReadError: part of this module's API)

HighBitDepth = Literal["minmax", "full"]
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _is_dicom_path(path: str) -> bool:
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    try:  # extension-less DICOM: "DICM" magic after the 128-byte preamble
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:] == b"DICM"
    except OSError:
        return False


def high_bit_depth_to_l(img: Image.Image, how: HighBitDepth = "minmax") -> Image.Image:
    """A grayscale I;16 / I / F image as 8-bit "L" (see module docstring)."""
    arr = np.asarray(img)
    if how == "full" and img.mode in _16BIT_MODES:
        return Image.fromarray(rescale_to_uint8(arr, 0, 65535))
    if how not in ("full", "minmax"):
        raise ValueError(f"high_bit_depth must be 'minmax' or 'full', got {how!r}")
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    if finite.size == 0:
        return Image.fromarray(np.zeros(arr.shape, np.uint8))
    out = rescale_to_uint8(np.nan_to_num(arr, nan=float(finite.min())), float(finite.min()), float(finite.max()))
    return Image.fromarray(out)


def to_rgb(img: Image.Image, high_bit_depth: HighBitDepth = "minmax") -> Image.Image:
    """8-bit RGB version of any PIL image (LLaVA's convert("RGB"), plus correct 16-bit handling)."""
    if img.mode == "RGB":
        return img
    if img.mode in _16BIT_MODES or img.mode in ("I", "F"):
        img = high_bit_depth_to_l(img, high_bit_depth)
    return img.convert("RGB")


def load_image(
    source: str | os.PathLike[str] | Image.Image | np.ndarray | bytes,
    *,
    high_bit_depth: HighBitDepth = "minmax",
    dicom_window: str | tuple[float, float] | None = None,
    dicom_frame: int | None = None,
    dicom_force: bool = False,
) -> Image.Image:
    """Opens `source` (a path, a PIL image, an HxW / HxWxC uint8 array, or the bytes of an encoded
    picture; DICOM only from a path) as 8-bit RGB.

    `.dcm` files (or files with the DICOM magic) go through `medv_jax.data.dicom.read_dicom` with
    `dicom_window` / `dicom_frame` / `dicom_force`. Unreadable or undecodable files raise ImageReadError naming
    the file.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source, high_bit_depth)
    if isinstance(source, np.ndarray):
        return to_rgb(Image.fromarray(source), high_bit_depth)
    if isinstance(source, (bytes, bytearray)):  # an encoded picture (PNG, JPEG, ...) held in memory
        opened, shown = io.BytesIO(source), "image bytes"
    else:
        path = os.fspath(source)
        if _is_dicom_path(path):
            from medv_jax.data import dicom  # pydicom is optional

            return dicom.read_dicom(path, window=dicom_window, frame=dicom_frame, force=dicom_force)
        opened, shown = path, f"image file {path!r}"
    try:
        with Image.open(opened) as img:
            img.load()  # decode now, so truncated files fail here, with the name
            return to_rgb(img, high_bit_depth)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read {shown}: {e}") from e
