"""Image-mode configuration and the pure geometry of LLaVA-OneVision "anyres" tiling.

Facts matched (LLaDA-V train/llava/mm_utils.py and model/llava_arch.py, docs/algorithm.md §2):

* Grid pinpoints "(1x1),...,(6x6)" expand to every (i, j) for i, j in 1..6, i outer, j inner, each
  scaled by the crop size and read as (width, height) in pixels. Order matters: ties keep the first.
* The best resolution maximises the effective resolution min(downscaled area, original area) and,
  among equals, minimises the wasted area; the downscaled size truncates with int().
* The grid is (width // crop) columns by (height // crop) rows of 384-pixel crops, row-major.
* unpad: on the (rows*27, cols*27) feature map, the letterbox rows (or columns) are cut using the
  original image size: `padding = (current - int(original * scale)) // 2` on both sides.
* anyres_max_N shrink: times = sqrt(h * w / (N * 27**2)); when times > 1.1 the map is resized to
  (int(h // times), int(w // times)) by bilinear interpolation (torch, align_corners=False).
"""
from __future__ import annotations

import ast
import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

Size = tuple[int, int]  # (width, height) in pixels, as PIL's Image.size


_PINPOINTS_ACCEPTED = (
    '(width, height) pixel pairs as a list or a Python-literal string such as "[(384, 768), (768, 384)]", '
    'or a range of crop grids such as "(1x1),...,(6x6)"'
)
# "(AxB)" items separated by commas, "..." allowed between them: LLaVA reads only the first and
# the last pair, the rest is decoration.
_RANGE_FORM = re.compile(r"\s*\(\s*\d+\s*x\s*\d+\s*\)(\s*,\s*(\.\.\.|\(\s*\d+\s*x\s*\d+\s*\)))*\s*")
_RANGE_PAIR = re.compile(r"\(\s*(\d+)\s*x\s*(\d+)\s*\)")


def parse_grid_pinpoints(value: str | Sequence[Sequence[int]], crop_size: int = 384) -> tuple[Size, ...]:
    """Candidate grid resolutions as (width, height) pixel pairs, from LLaVA's
    ``image_grid_pinpoints`` in any of the forms LLaVA reads (llava/mm_utils.py):

    * a list of pixel pairs, as a saved config.json holds them: ``[[384, 768], [768, 384]]``;
    * the same as a Python-literal string (LLaVA uses ``ast.literal_eval``):
      ``"[(384, 768), (768, 384)]"`` or ``"[[384, 768], [768, 384]]"``;
    * a range of grids counted in crops: ``"(1x1),...,(3x3)"`` is every (i, j) for i in 1..3
      (outer), j in 1..3 (inner), each times ``crop_size``: (384, 384), (384, 768), ...

    Anything else raises ValueError naming the value and the accepted forms.
    """
    def bad(why: str = "") -> ValueError:
        return ValueError(f"image_grid_pinpoints={value!r}{': ' + why if why else ''}; expected {_PINPOINTS_ACCEPTED}")

    pairs: Any = value
    if isinstance(value, str):
        if "x" in value:  # LLaVA's test for the range form
            if not _RANGE_FORM.fullmatch(value):
                raise bad()
            matches = _RANGE_PAIR.findall(value)
            (a0, b0), (a1, b1) = map(int, matches[0]), map(int, matches[-1])
            if min(a0, b0) < 1 or a1 < a0 or b1 < b0:
                raise bad("the range must run from a grid of at least 1x1 up to a grid at least as large")
            return tuple((i * crop_size, j * crop_size) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1))
        try:
            pairs = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise bad() from None
    items = _items(pairs)
    if not items:
        raise bad()
    out = []
    for pair in items:
        numbers_ = _items(pair)
        if numbers_ is None or len(numbers_) != 2 or not all(_is_positive_int(n) for n in numbers_):
            raise bad(f"{pair!r} is not a pair of positive integers")
        out.append((int(numbers_[0]), int(numbers_[1])))
    return tuple(out)


def _items(value: Any) -> list | None:
    """The elements of a list, tuple or array; None for a scalar, a string or a mapping."""
    if isinstance(value, (str, bytes, Mapping)):
        return None
    try:
        return list(value)
    except TypeError:
        return None


def _is_positive_int(n: Any) -> bool:
    # numpy integers count (a config built in Python may hold them); bools and floats do not.
    return not isinstance(n, bool) and isinstance(n, numbers.Integral) and n > 0


def parse_anyres_max(aspect_ratio: Any) -> int | None:
    """N of an ``image_aspect_ratio`` "anyres_max_N" (any positive integer N: the shrink budget
    in crops' worth of tokens); None for any mode not starting with "anyres_max"."""
    if not isinstance(aspect_ratio, str) or not aspect_ratio.startswith("anyres_max"):
        return None
    m = re.fullmatch(r"anyres_max_(\d+)", aspect_ratio)
    if m is None or int(m.group(1)) < 1:
        raise ValueError(
            f"image_aspect_ratio={aspect_ratio!r}: expected anyres_max_N with N a positive integer"
        )
    return int(m.group(1))


DEFAULT_GRID_PINPOINTS: tuple[Size, ...] = parse_grid_pinpoints("(1x1),...,(6x6)")

_MERGE_TYPES = ("flat", "spatial", "spatial_unpad")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """How images become crops and image tokens (the checkpoint config decides; docs/algorithm.md §2).

    aspect_ratio: `image_aspect_ratio`: "square", "pad", "anyres" or "anyres_max_N".
    merge_type: `mm_patch_merge_type`: "flat", "spatial" or "spatial_unpad".
    grid_pinpoints: candidate grids for anyres, (width, height) in pixels.
    crop_size: vision tower input size; patches_per_side: its patch grid (384 / 14 -> 27).
    image_mean / image_std: per-channel normalisation (SigLIP: 0.5 / 0.5).
    """

    aspect_ratio: str = "square"
    merge_type: str = "flat"
    grid_pinpoints: tuple[Size, ...] = DEFAULT_GRID_PINPOINTS
    crop_size: int = 384
    patches_per_side: int = 27
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.aspect_ratio not in ("square", "pad", "anyres") and self.max_num_patches is None:
            raise ValueError(f"unsupported image_aspect_ratio {self.aspect_ratio!r}")
        if self.merge_type not in _MERGE_TYPES:
            raise ValueError(f"unsupported mm_patch_merge_type {self.merge_type!r}; supported: {_MERGE_TYPES}")

    @property
    def is_anyres(self) -> bool:
        return self.aspect_ratio == "anyres" or self.aspect_ratio.startswith("anyres_max")

    @property
    def max_num_patches(self) -> int | None:
        """N of "anyres_max_N" (the shrink budget in crops' worth of tokens), else None."""
        return parse_anyres_max(self.aspect_ratio)

    @property
    def tokens_per_crop(self) -> int:
        return self.patches_per_side**2

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """Background of "pad" mode: the mean colour in 0..255, truncated ((127,127,127) for 0.5)."""
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]

    @classmethod
    def for_mode(cls, mode: str, **kwargs: Any) -> "ImageConfig":
        """Named presets: "square" and "pad" (flat, 729 tokens) and "anyres_max_4" / any anyres
        mode with "spatial_unpad" (LLaDA-V's SFT setting)."""
        merge = "spatial_unpad" if mode.startswith("anyres") else "flat"
        return cls(aspect_ratio=mode, merge_type=kwargs.pop("merge_type", merge), **kwargs)

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any], **kwargs: Any) -> "ImageConfig":
        """Reads `image_aspect_ratio`, `mm_patch_merge_type` and `image_grid_pinpoints` from a
        checkpoint's config.json dict (LLaVA defaults: square, flat)."""
        crop = kwargs.get("crop_size", 384)
        pins = config.get("image_grid_pinpoints")
        return cls(
            aspect_ratio=config.get("image_aspect_ratio") or "square",
            merge_type=config.get("mm_patch_merge_type") or "flat",
            grid_pinpoints=DEFAULT_GRID_PINPOINTS if pins is None else parse_grid_pinpoints(pins, crop),
            **kwargs,
        )


LLADA_V_SFT = ImageConfig(aspect_ratio="anyres_max_4", merge_type="spatial_unpad")


class Grid(NamedTuple):
    rows: int
    cols: int


def select_best_resolution(original_size: Size, possible: Sequence[Size]) -> Size:
    """The candidate (width, height) keeping the most image detail, then wasting the least."""
    ow, oh = original_size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in possible:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    if best is None:
        raise ValueError(f"no grid resolution fits image size {original_size}")
    return best


def grid_shape(image_size: Size, config: ImageConfig) -> Grid:
    """Rows and columns of crops the anyres grid uses for an image of `image_size` (w, h)."""
    w, h = select_best_resolution(image_size, config.grid_pinpoints)
    return Grid(rows=h // config.crop_size, cols=w // config.crop_size)


def resize_and_pad_geometry(image_size: Size, target: Size) -> tuple[Size, tuple[int, int]]:
    """Aspect-keeping resize of `image_size` into `target` (both (w, h)): the resized size and the
    (x, y) paste offset that centres it on the letterboxed canvas. The filled side takes the target
    exactly, the other side is ceil-ed and capped."""
    ow, oh = image_size
    tw, th = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(math.ceil(oh * sw), th)
    else:
        nw, nh = min(math.ceil(ow * sh), tw), th
    return (nw, nh), ((tw - nw) // 2, (th - nh) // 2)


def unpad_window(image_size: Size, map_height: int, map_width: int) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and columns [c0, c1) of a (map_height, map_width) grid feature map that hold
    image content; the letterbox bands added by the resize-and-pad are cut away.

    Note the cut is symmetric, `padding` on both sides, so an odd leftover keeps one extra row.
    """
    ow, oh = image_size
    if ow / oh > map_width / map_height:  # padding was added top and bottom
        new_h = int(oh * (map_width / ow))
        pad = (map_height - new_h) // 2
        return pad, map_height - pad, 0, map_width
    new_w = int(ow * (map_height / oh))
    pad = (map_width - new_w) // 2
    return 0, map_height, pad, map_width - pad


def shrink_size(height: int, width: int, max_num_patches: int, unit: int) -> tuple[int, int] | None:
    """Target (h, w) of the anyres_max shrink, or None when the map is small enough.

    The map is shrunk only when it exceeds max_num_patches crops' worth of tokens by more than 10%
    (in the sqrt sense); the floor division by a float matches the reference's `int(h // times)`.
    """
    times = math.sqrt(height * width / (max_num_patches * unit**2))
    if times > 1.1:
        return int(height // times), int(width // times)
    return None
