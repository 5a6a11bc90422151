"""DICOM (.dcm) input: one frame, modality rescale, VOI window, 8-bit RGB.

None of the reference systems reads DICOM; radiology data lives in it, so a `.dcm` path is accepted
wherever an image is. Steps, following DICOM PS3.3 (C.7.6.3, C.11.1, C.11.2):

1. Decode one frame with pydicom (compressed transfer syntaxes need a matching decoder plugin;
   without one an ImageReadError names the file and the syntax).
2. Grayscale: modality LUT (Rescale Slope/Intercept, e.g. CT to Hounsfield units; functional
   groups of enhanced multi-frame files included).
3. Window to 8 bits: the file's Window Center/Width (first pair; VOI LUT Function LINEAR,
   LINEAR_EXACT or SIGMOID) by default, or a named window (`lung`, `soft_tissue`, `bone`, `brain`,
   in HU), an explicit (center, width), or `full` (the frame's own min..max). A file without any
   window falls back to `full`.
4. MONOCHROME1 (0 = white) is inverted so that bright always means high signal.
5. Colour (RGB / YBR, which pydicom returns as RGB) and PALETTE COLOR images are mapped to 8-bit RGB.

pydicom is an optional dependency (extra `dicom`); importing it lazily keeps the rest working
without it.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from medv_jax.data.pixels import ImageReadError, rescale_to_uint8
from medv_jax.user_errors import UserError

# Common radiology display windows as (center, width), in Hounsfield units.
NAMED_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
Window = str | tuple[float, float] | None
WINDOW_CHOICES = ("auto", "full", *NAMED_WINDOWS)


def parse_window(text: str | None, where: str = "DICOM window") -> Window:
    """A window as a user types it: 'auto' (or empty: the file's own), 'full', a name from
    NAMED_WINDOWS, or 'center,width' numbers. A UserError names ``where`` otherwise."""
    if text is None or text == "" or text == "auto":
        return None
    if text in WINDOW_CHOICES:
        return text
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise UserError(
            f"{where} {text!r}: choose one of {list(WINDOW_CHOICES)} or type 'center,width' (e.g. 40,400)"
        ) from None
    if not width > 0:
        raise UserError(f"{where} {text!r}: width must be positive")
    return (center, width)


def _import_pydicom():
    try:
        import pydicom
        import pydicom.errors
        import pydicom.pixels  # noqa: F401  (pydicom >= 3)
    except ImportError as e:
        raise ImportError(
            "reading DICOM files needs pydicom >= 3: pip install 'medv_jax[dicom]' (or pip install pydicom)"
        ) from e
    return pydicom


def _first(value: Any) -> float:
    """First entry of a possibly multi-valued DICOM number (Window Center may list several)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def frame_attribute(ds: Any, frame: int, sequence: str, name: str) -> Any:
    """`name` from the top level, else from the per-frame or shared functional group `sequence`
    (enhanced multi-frame objects keep rescale and window values there). None when absent."""
    if name in ds and ds[name].value not in (None, ""):
        return ds[name].value
    for groups, i in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > i:
            inner = seq[i].get(sequence)
            if inner is not None and len(inner) and name in inner[0] and inner[0][name].value not in (None, ""):
                return inner[0][name].value
    return None


def window_to_uint8(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing of `values` to 0..255 (PS3.3 C.11.2.1.2)."""
    x = values.astype(np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = np.clip((x - center) / width + 0.5, 0.0, 1.0)
    else:  # LINEAR: centre and width are offset by half a unit in the standard's definition
        if width < 1:
            raise ValueError(f"window width must be >= 1 for LINEAR windowing, got {width}")
        if width == 1:
            y = (x > center - 0.5).astype(np.float64)
        else:
            y = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return np.round(y * 255.0).astype(np.uint8)


def _modality_values(pydicom: Any, ds: Any, arr: np.ndarray, frame: int) -> np.ndarray:
    """Stored values -> modality values (slope * x + intercept, or the Modality LUT)."""
    if "ModalityLUTSequence" in ds:
        return pydicom.pixels.apply_modality_lut(arr, ds).astype(np.float64)
    slope = frame_attribute(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = frame_attribute(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    return arr.astype(np.float64) * slope + intercept


def _grayscale_to_uint8(pydicom: Any, ds: Any, values: np.ndarray, frame: int, window: Window) -> np.ndarray:
    if isinstance(window, tuple):
        return window_to_uint8(values, float(window[0]), float(window[1]))
    if isinstance(window, str) and window in NAMED_WINDOWS:
        return window_to_uint8(values, *NAMED_WINDOWS[window])
    if window == "full":
        return rescale_to_uint8(values, float(values.min()), float(values.max()))
    if window not in (None, "auto"):
        raise ValueError(
            f"unknown DICOM window {window!r}; use one of {sorted(NAMED_WINDOWS)}, 'full', 'auto' or (center, width)"
        )
    center = frame_attribute(ds, frame, "FrameVOILUTSequence", "WindowCenter")
    width = frame_attribute(ds, frame, "FrameVOILUTSequence", "WindowWidth")
    if center is not None and width is not None:
        function = frame_attribute(ds, frame, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR"
        return window_to_uint8(values, _first(center), _first(width), str(function))
    if "VOILUTSequence" in ds:  # a lookup table instead of a window: apply it, then stretch
        values = pydicom.pixels.apply_voi_lut(values, ds).astype(np.float64)
    return rescale_to_uint8(values, float(values.min()), float(values.max()))


def _colour_to_uint8(pydicom: Any, ds: Any, arr: np.ndarray) -> np.ndarray:
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        arr = pydicom.pixels.apply_color_lut(arr, ds)
        top = 255 if arr.dtype == np.uint8 else 65535
    else:
        top = 2 ** int(ds.get("BitsStored", 8)) - 1
    if arr.dtype == np.uint8 and top == 255:
        return arr
    return rescale_to_uint8(arr, 0, top)


def read_dicom(
    path: str | os.PathLike[str], *, window: Window = None, frame: int | None = None, force: bool = False
) -> Image.Image:
    """One frame of a DICOM file as an 8-bit RGB PIL image.

    Args:
      path: the .dcm file.
      window: None/"auto" (the file's window, else full range), "full", a name from NAMED_WINDOWS,
        or (center, width) in modality units.
      frame: frame of a multi-frame file (default: the middle one, the most representative slice of
        a volume); negative counts from the end.
      force: read a file without the DICOM file header (the 'DICM' preamble) as DICOM anyway.
    """
    pydicom = _import_pydicom()
    path = os.fspath(path)
    try:
        ds = pydicom.dcmread(path, force=force)
    except pydicom.errors.InvalidDicomError:
        raise ImageReadError(
            f"{path!r} has no DICOM file header (the 'DICM' preamble): if it is a headerless DICOM file, "
            "read it anyway with --dicom_force; otherwise give a PNG/JPEG or a complete DICOM file"
        ) from None
    except Exception as e:  # pydicom raises many types for malformed files
        raise ImageReadError(f"cannot read DICOM file {path!r}: {e}") from e
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(f"DICOM file {path!r} has no pixel data")
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as e:
        raise ImageReadError(f"DICOM file {path!r} has a bad NumberOfFrames: {e}") from e
    if frame is None:
        frame = n_frames // 2
    if not -n_frames <= frame < n_frames:
        raise ValueError(f"frame {frame} out of range for DICOM file {path!r} with {n_frames} frame(s)")
    frame %= n_frames
    try:
        arr = pydicom.pixels.pixel_array(ds, index=frame if n_frames > 1 else None)
    except Exception as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise ImageReadError(
            f"cannot decode the pixel data of DICOM file {path!r} (transfer syntax {name}): {e}. "
            "Compressed syntaxes need a decoder plugin, e.g. pip install pylibjpeg pylibjpeg-libjpeg "
            "pylibjpeg-openjpeg pyjpegls"
        ) from e

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3 or photometric == "PALETTE COLOR":
        rgb = _colour_to_uint8(pydicom, ds, arr)
        return Image.fromarray(np.ascontiguousarray(rgb))
    values = _modality_values(pydicom, ds, arr, frame)
    gray = _grayscale_to_uint8(pydicom, ds, values, frame, window)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray).convert("RGB")
