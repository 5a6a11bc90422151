"""The feature-merge contract between image preprocessing and the model (medv_jax/models/medv.py).

The vision tower + projector give 729 (27 x 27, row-major) features per 384-pixel crop. For one
image the crops' features are flattened to `feats: [n_crops * 729, D]` (crop c, patch p -> row
c * 729 + p; crop 0 is the base view in anyres modes). Every image token of the sequence is then

    token[k] = newline[k] ? image_newline : sum_j weight[k, j] * feats[index[k, j]]

with `index: int32 [T, 4]`, `weight: float32 [T, 4]`, `newline: bool [T]`. A fixed 4-tap gather
expresses every merge LLaVA-OneVision/LLaDA-V does (identity, crop reassembly, letterbox removal,
bilinear shrink) with one static-shaped op, and keeps all data-dependent geometry on the host.
Unused taps have weight 0 and a valid index; newline tokens have all weights 0.

Layouts (facts from LLaDA-V llava_arch.prepare_inputs_labels_for_multimodal):
* one crop (square / pad): token k <- patch k (729 tokens). With an "unpad" merge type the
  reference's single-crop branch appends one image_newline at the end: 730 tokens. (An anyres image
  always has >= 2 crops, base view + grid, so the 730 case never arises there; a 1x1 anyres grid on
  a square image gives 729 + 27 * 28 = 1485.)
* anyres + "flat": every crop's 729 patches in crop order.
* anyres + "spatial": base view's 729, then the (rows*27, cols*27) map row-major.
* anyres + "spatial_unpad": base view's 729, then the map with the letterbox cut away, shrunk for
  anyres_max_N, and an image_newline after each row.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from medv_jax.data import anyres
from medv_jax.data.anyres import ImageConfig, Size

TAPS = 4


class ImageTokenLayout(NamedTuple):
    """index: int32 [T, 4] rows of the flattened crop features; weight: float32 [T, 4];
    newline: bool [T] (True -> the learned image_newline vector, weights 0)."""

    index: np.ndarray
    weight: np.ndarray
    newline: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.newline.shape[0])


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-D taps of torch's bilinear resize with align_corners=False, bit-exact with its kernels.

    Returns (i0, i1, w0, w1), each [out_size]: output o = w0[o] * x[i0[o]] + w1[o] * x[i1[o]].
    Source coordinate = (o + 0.5) * in/out - 0.5, clamped at 0; i1 = i0 + 1 except at the last
    input sample (then i1 = i0). Equal sizes copy.

    Precision: torch computes the ratio in float32 and the source coordinate as a fused
    multiply-add (one rounding to float32; compilers contract `scale * (o + 0.5) - 0.5`). Plain
    float32 arithmetic rounds twice and moves weights by up to one float32 ulp of the coordinate
    (~1e-5 on a 100-wide map). float64 evaluates the product and difference exactly (24-bit ratio
    times a small half-integer), so one cast to float32 reproduces the fused result.
    """
    o = np.arange(out_size)
    if in_size == out_size:
        return o, o, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.float64(scale) * (o + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def _identity(n: int, offset: int = 0) -> ImageTokenLayout:
    index = np.zeros((n, TAPS), np.int32)
    index[:] = (offset + np.arange(n, dtype=np.int32))[:, None]
    weight = np.zeros((n, TAPS), np.float32)
    weight[:, 0] = 1.0
    return ImageTokenLayout(index, weight, np.zeros(n, bool))


def _newline_tokens(n: int) -> ImageTokenLayout:
    return ImageTokenLayout(np.zeros((n, TAPS), np.int32), np.zeros((n, TAPS), np.float32), np.ones(n, bool))


def concat_layouts(*parts: ImageTokenLayout) -> ImageTokenLayout:
    return ImageTokenLayout(*(np.concatenate(x, axis=0) for x in zip(*parts)))


def grid_map_rows(grid: anyres.Grid, config: ImageConfig) -> np.ndarray:
    """int32 [rows*27, cols*27]: flattened-feature row of each position of the assembled grid map.

    Grid crop (r, c) is crop 1 + r * cols + c (crop 0 is the base view); its patch (py, px) lands
    at map position (r * 27 + py, c * 27 + px).
    """
    p = config.patches_per_side
    y = np.arange(grid.rows * p)[:, None]
    x = np.arange(grid.cols * p)[None, :]
    crop = 1 + (y // p) * grid.cols + (x // p)
    return (crop * p * p + (y % p) * p + (x % p)).astype(np.int32)


def bilinear_resize_taps(rows: np.ndarray, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """4-tap gather that bilinearly resizes a map whose positions hold the feature rows `rows`
    ([h, w]) to (out_h, out_w). Returns index int32 [out_h, out_w, 4], weight float32 [same]."""
    h, w = rows.shape
    y0, y1, wy0, wy1 = bilinear_taps(h, out_h)
    x0, x1, wx0, wx1 = bilinear_taps(w, out_w)
    index = np.stack(
        [rows[y0][:, x0], rows[y0][:, x1], rows[y1][:, x0], rows[y1][:, x1]], axis=-1
    ).astype(np.int32)
    weight = np.stack(
        [np.outer(wy0, wx0), np.outer(wy0, wx1), np.outer(wy1, wx0), np.outer(wy1, wx1)], axis=-1
    ).astype(np.float32)
    return index, weight


def _map_with_newlines(index: np.ndarray, weight: np.ndarray, newline_per_row: bool) -> ImageTokenLayout:
    """Row-major tokens of a [h, w, 4] map, optionally with a newline token closing each row."""
    h, w = index.shape[:2]
    nl = np.zeros((h, w), bool)
    if newline_per_row:
        index = np.concatenate([index, np.zeros((h, 1, TAPS), np.int32)], axis=1)
        weight = np.concatenate([weight, np.zeros((h, 1, TAPS), np.float32)], axis=1)
        nl = np.concatenate([nl, np.ones((h, 1), bool)], axis=1)
    return ImageTokenLayout(index.reshape(-1, TAPS), weight.reshape(-1, TAPS), nl.reshape(-1))


def anyres_grid_layout(image_size: Size, config: ImageConfig) -> ImageTokenLayout:
    """Tokens of the grid part (after the base view) for "spatial" / "spatial_unpad"."""
    grid = anyres.grid_shape(image_size, config)
    rows = grid_map_rows(grid, config)
    if "unpad" not in config.merge_type:
        return _identity_map(rows)
    r0, r1, c0, c1 = anyres.unpad_window(image_size, *rows.shape)
    rows = rows[r0:r1, c0:c1]
    target = None
    if config.max_num_patches is not None:
        target = anyres.shrink_size(*rows.shape, config.max_num_patches, config.patches_per_side)
    if target is None:
        index = np.zeros(rows.shape + (TAPS,), np.int32)
        index[:] = rows[..., None]
        weight = np.zeros(rows.shape + (TAPS,), np.float32)
        weight[..., 0] = 1.0
    else:
        index, weight = bilinear_resize_taps(rows, *target)
    return _map_with_newlines(index, weight, newline_per_row=True)


def _identity_map(rows: np.ndarray) -> ImageTokenLayout:
    index = np.repeat(rows.reshape(-1, 1), TAPS, axis=1).astype(np.int32)
    weight = np.zeros(index.shape, np.float32)
    weight[:, 0] = 1.0
    return ImageTokenLayout(index, weight, np.zeros(index.shape[0], bool))


def num_crops(image_size: Size, config: ImageConfig) -> int:
    """Crops the preprocessing produces: 1 for square/pad, 1 + rows * cols for anyres."""
    if not config.is_anyres:
        return 1
    g = anyres.grid_shape(image_size, config)
    return 1 + g.rows * g.cols


def image_token_layout(image_size: Size, config: ImageConfig) -> ImageTokenLayout:
    """Gather layout of the image tokens for an image of `image_size` = (width, height) pixels
    (the original size, before any resize or padding)."""
    n = config.tokens_per_crop
    if not config.is_anyres:
        base = _identity(n)
        if "unpad" in config.merge_type:  # reference single-crop branch: one trailing newline
            return concat_layouts(base, _newline_tokens(1))
        return base
    if config.merge_type == "flat":
        return _identity(num_crops(image_size, config) * n)
    return concat_layouts(_identity(n), anyres_grid_layout(image_size, config))


def num_image_tokens(image_size: Size, config: ImageConfig) -> int:
    """Length of `image_token_layout(image_size, config)`: the `<image>` placeholder's expansion."""
    return image_token_layout(image_size, config).num_tokens


def gather_features(feats: np.ndarray, layout: ImageTokenLayout, newline: np.ndarray) -> np.ndarray:
    """Reference (numpy) application of the contract: feats [n_crops*729, D], newline [D] -> [T, D].

    The model does the same in JAX; this version documents the semantics and serves tests.
    """
    out = np.einsum("tk,tkd->td", layout.weight, feats[layout.index])
    return np.where(layout.newline[:, None], newline[None, :], out)


def place_in_sequence(
    image_mask: np.ndarray, layout: ImageTokenLayout
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spreads an image's layout over the positions of a sequence (the model's per-position form).

    image_mask: bool [L] (TokenizedSample.image_mask, one image). Returns index int32 [L, 4],
    weight float32 [L, 4], newline bool [L]; text positions get index 0, weight 0, newline False.
    """
    pos = np.flatnonzero(image_mask)
    if pos.size != layout.num_tokens:
        raise ValueError(f"{pos.size} image slots in the sequence but the layout has {layout.num_tokens} tokens")
    n = image_mask.shape[0]
    index = np.zeros((n, TAPS), np.int32)
    weight = np.zeros((n, TAPS), np.float32)
    newline = np.zeros(n, bool)
    index[pos], weight[pos], newline[pos] = layout.index, layout.weight, layout.newline
    return index, weight, newline
