"""What the image readers (medv_jax/data/image_io.py, medv_jax/data/dicom.py) share: the error for a
file that cannot be read, and the linear rescaling of pixel values to 8 bits. A module of its own so
that the DICOM reader and the generic reader, which dispatches to it, need not import each other."""
from __future__ import annotations

import numpy as np


class ImageReadError(OSError):
    """An image (or DICOM) file that cannot be read or decoded; the message names the file."""


def rescale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] to [0, 255], clipped and rounded; a flat range gives zeros."""
    values = values.astype(np.float64)
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
