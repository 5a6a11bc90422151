"""One reader for the TFDS VQA datasets: `read_split("vqa_rad:test")` -> LLaVA-style records.

Records have exactly the shape of medv_jax's JSON data (the trainer's `data.source = "json"`,
`medv_jax.sampling.infer`, `medv_jax.evaluate vqa --references`)::

    {"id": "0", "image": "/data/tfds/vqa_rad/1.0.0/images/synpic54610.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nIs there a fracture?"},
                       {"from": "gpt", "value": "no"}],
     "answer_type": "closed"}

Image bytes are written once into an `images/` folder inside the built dataset's version folder,
under names derived from the release names (deterministic; files already there are reused).
Records come in release order.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

IMAGE_PLACEHOLDER = "<image>"


def parse_spec(spec: str) -> tuple[str, str]:
    """"NAME:SPLIT" -> (builder name, split name), or a ValueError saying what is wrong."""
    from medv_jax.data import tfds as builders
    from medv_jax.data.tfds import common

    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"dataset spec {spec!r} must be NAME:SPLIT, e.g. vqa_rad:test "
                         f"(names: {sorted(builders.BUILDERS)})")
    name, split = (s.strip() for s in spec.split(":"))
    name = builders.canonical_name(name)
    split = common.SPLIT_ALIASES.get(split.lower(), split)
    return name, split


def cache_name(image_name: str) -> str:
    """A flat, deterministic file name for a release image name; names that had to be changed
    ("xmlab1/source.jpg") get a digest of the original so two never meet."""
    base = image_name.replace("\\", "/")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", base.replace("/", "__")).lstrip(".") or "image"
    if safe != base:
        stem, ext = os.path.splitext(safe)
        safe = f"{stem}-{hashlib.sha1(base.encode()).hexdigest()[:8]}{ext}"
    return safe


def materialize_image(cache_dir: Path, image_name: str, data: bytes) -> str:
    """Writes `data` to cache_dir/cache_name(image_name) unless a file of that size is there."""
    path = cache_dir / cache_name(image_name)
    if path.is_file() and path.stat().st_size == len(data):
        return str(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: concurrent readers see the whole file or none
    return str(path)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def read_split(spec: str, data_dir: str | None = None) -> list[dict[str, Any]]:
    """The records of split SPLIT of dataset NAME ("vqa_rad:test", "slake:train",
    "path_vqa:validation", "llava_med:train"), built beforehand in `data_dir` (default: TFDS's
    data folder) with `python -m medv_jax.data.tfds build NAME --manual_dir DIR`."""
    from medv_jax.data import tfds as builders

    name, split = parse_spec(spec)
    b = builders.builder(name, data_dir)
    if not builders.is_built(b):
        raise FileNotFoundError(
            f"dataset {name} is not built in {b.data_dir}; build it from the release with "
            f"`python -m medv_jax.data.tfds build {name} --manual_dir DIR"
            + (f" --data_dir {data_dir}`" if data_dir else "`"))
    splits = sorted(b.info.splits)
    if split not in splits:
        raise ValueError(f"dataset {name} has no split {split!r} (spec {spec!r}); it has {splits}")
    source = b.as_data_source(split=split)
    cache_dir = Path(b.data_dir) / "images"
    records: list[tuple[int, dict[str, Any]]] = []
    from tqdm import tqdm

    for i in tqdm(range(len(source)), desc=f"read {name}:{split}", unit="ex", disable=len(source) < 2000):
        ex = source[i]
        image_name = _text(ex["image_name"])
        image = materialize_image(cache_dir, image_name, bytes(ex["image"])) if image_name else None
        if name == "llava_med":
            rec = {"id": _text(ex["id"]), "image": image, "conversations": json.loads(_text(ex["conversations"]))}
            if image is None:
                del rec["image"]
            kind = _text(ex["answer_type"])
            if kind:
                rec["answer_type"] = kind
            records.append((int(ex["index"]), rec))
            continue
        qa = ex["qa"]
        for qid, index, question, answer, kind in zip(qa["id"], qa["index"], qa["question"], qa["answer"],
                                                      qa["answer_type"]):
            records.append((int(index), {
                "id": _text(qid),
                "image": image,
                "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{_text(question)}"},
                                  {"from": "gpt", "value": _text(answer)}],
                "answer_type": ("closed", "open")[int(kind)],
            }))
    records.sort(key=lambda r: r[0])
    return [r for _, r in records]
