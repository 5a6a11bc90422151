"""TFDS builders for the paper's VQA sets (VQA-RAD, SLAKE English, PathVQA) and LLaVA-Med-style
JSON, built from a manual folder holding the official release (nothing is downloaded), written
as array_record files with no TensorFlow needed. Read them with
`medv_jax.data.tfds_vqa.read_split("vqa_rad:test")`; build them with

    python -m medv_jax.data.tfds build vqa_rad --manual_dir ~/releases/vqa_rad [--data_dir DIR]
"""
from __future__ import annotations

from medv_jax.data.tfds.common import ReleaseError
from medv_jax.data.tfds.llava_med import LlavaMed
from medv_jax.data.tfds.path_vqa import PathVqa
from medv_jax.data.tfds.slake import Slake
from medv_jax.data.tfds.vqa_rad import VqaRad

#: Our dataset names -> builder classes (TFDS also knows them under these names once imported).
BUILDERS = {"vqa_rad": VqaRad, "slake": Slake, "path_vqa": PathVqa, "llava_med": LlavaMed}
_ALIASES = {"vqarad": "vqa_rad", "pathvqa": "path_vqa", "llavamed": "llava_med", "slake": "slake"}


def canonical_name(name: str) -> str:
    """"vqa_rad", "VQA-RAD", "pathvqa", ... -> the builder name, or a ValueError listing them."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in _ALIASES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    return _ALIASES[key]


def builder(name: str, data_dir: str | None = None):
    """The builder of dataset `name` over `data_dir` (default: TFDS's, ~/tensorflow_datasets or
    $TFDS_DATA_DIR)."""
    return BUILDERS[canonical_name(name)](data_dir=data_dir)


def is_built(b) -> bool:
    """Whether builder ``b``'s data set is built, without TFDS's warning about an unbuilt folder
    (callers say what to do instead)."""
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        return b.is_prepared()
    finally:
        logging.set_verbosity(level)


def build(name: str, manual_dir: str, data_dir: str | None = None):
    """Builds dataset `name` from the release in `manual_dir` (once; a built one is kept)."""
    import os

    import tensorflow_datasets as tfds

    manual_dir = os.path.expanduser(manual_dir)
    canonical = canonical_name(name)
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
        raise FileNotFoundError(f"{canonical}: the manual folder {manual_dir} does not exist or is empty; put "
                                f"the release there:{BUILDERS[canonical].MANUAL_DOWNLOAD_INSTRUCTIONS}")
    b = builder(canonical, data_dir)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return b


__all__ = ["BUILDERS", "LlavaMed", "PathVqa", "ReleaseError", "Slake", "VqaRad", "build", "builder",
           "canonical_name"]
