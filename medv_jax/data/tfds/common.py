"""Shared pieces of the VQA TFDS builders: release-file discovery, answer types, image lookup,
Hugging Face parquet rows, and one abstract builder that groups questions by image.

Every VQA builder stores ONE example per image (the image file's original bytes, never
re-encoded, plus all its questions), so a 30K-question set with 5K images stores each image once.
Examples are written as array_record files: building and reading need no TensorFlow
(`tfds.data_source` / `builder.as_data_source`).

Example features (VQA builders)::

    image        bytes    the image file exactly as released (JPEG/PNG/...)
    image_name   str      its name in the release (e.g. "synpic54610.jpg", "xmlab102/source.jpg")
    qa           Sequence of
        id           str      question id (release id; repeats get "#2", "#3" ...)
        index        int64    position of the question in the release split (read order)
        question     str
        answer       str
        answer_type  ClassLabel closed / open
"""
from __future__ import annotations

import abc
import collections
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

ANSWER_TYPES = ("closed", "open")
VERSION = tfds.core.Version("1.0.0")
# Release split folder/file names -> our TFDS split names.
SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "validate": "validation",
                 "valid": "validation", "dev": "validation", "test": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".dcm")


class ReleaseError(ValueError):
    """The manual folder does not hold the expected release files; the message says which."""


def vqa_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "image_name": tfds.features.Text(),
        "qa": tfds.features.Sequence({
            "id": tfds.features.Text(),
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "answer_type": tfds.features.ClassLabel(names=list(ANSWER_TYPES)),
        }),
    })


# ----------------------------------------------------------------------------------------------
# Answers and ids


def is_yes_no(answer: str) -> bool:
    return answer.strip().lower().rstrip(".") in ("yes", "no")


def answer_type_of(value: Any, where: str) -> str:
    """A release's CLOSED/OPEN label (any case, spaces) -> "closed"/"open"; else an error naming `where`."""
    kind = str(value).strip().lower()
    if kind not in ANSWER_TYPES:
        raise ReleaseError(f"{where}: answer_type {value!r} is neither CLOSED nor OPEN")
    return kind


def read_json_list(path: Path, dataset: str) -> list[Any]:
    """A release file holding one JSON list, or a ReleaseError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{dataset}: cannot read {path}: {e}") from e
    if not isinstance(data, list):
        raise ReleaseError(f"{dataset}: {path} does not hold a JSON list")
    return data


def checked_rows(rows: Sequence[Any], path: Path, required: Sequence[str]) -> Iterator[tuple[int, str, dict]]:
    """(index, where, row) of release rows that are objects holding every `required` field;
    otherwise a ReleaseError naming the file, the row and its qid."""
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ReleaseError(f"{path} row {n}: not an object")
        where = f"{path} row {n} (qid {row.get('qid')!r})"
        missing = [k for k in required if k not in row]
        if missing:
            raise ReleaseError(f"{where}: missing field(s) {missing}")
        yield n, where, row


def text_of(value: Any, what: str, where: str) -> str:
    """A question/answer field as stripped text (numbers in JSON releases become text)."""
    if value is None or isinstance(value, (list, dict)):
        raise ReleaseError(f"{where}: {what} is {value!r}, not text")
    return str(value).strip()


# ----------------------------------------------------------------------------------------------
# Finding files in a manual folder


def manual_folder(dl_manager: Any, name: str) -> Path:
    """The manual folder, or a FileNotFoundError naming it and the dataset."""
    path = getattr(dl_manager, "_manual_dir", None)
    try:
        return Path(dl_manager.manual_dir)
    except AssertionError as e:  # tfds: missing or empty folder
        raise FileNotFoundError(f"{name}: the manual folder {path} does not exist or is empty; put the "
                                f"official release there (see the builder's MANUAL_DOWNLOAD_INSTRUCTIONS)") from e


def find_files(root: Path, pattern: str) -> list[Path]:
    """Files under root matching a glob pattern (recursively), sorted, hidden folders skipped."""
    return sorted(p for p in root.rglob(pattern) if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts))


class ImageIndex:
    """Looks image names up under a folder tree: by the name relative to any of `bases`, then by
    the name's last one or two path components anywhere under the root ("xmlab1/source.jpg"
    is unique where "source.jpg" is not). Ambiguous or missing names raise ReleaseError."""

    def __init__(self, root: Path, bases: Iterable[Path] = ()):
        self.root = root
        self.bases = [b for b in bases if b.is_dir()]
        self._keys: dict[str, list[Path]] | None = None

    def _index(self) -> dict[str, list[Path]]:
        if self._keys is None:
            keys: dict[str, list[Path]] = collections.defaultdict(list)
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                parent = os.path.basename(dirpath)
                for f in filenames:
                    if f.lower().endswith(IMAGE_SUFFIXES):
                        p = Path(dirpath, f)
                        keys[f].append(p)
                        keys[f"{parent}/{f}"].append(p)
            self._keys = keys
        return self._keys

    def find(self, name: str, where: str, suffixes: Sequence[str] = ("",)) -> Path:
        name = name.replace("\\", "/").strip("/")
        for base in self.bases:
            for s in suffixes:
                p = base / (name + s)
                if p.is_file():
                    return p
        parts = name.split("/")
        for key in ("/".join(parts[-2:]), parts[-1]):
            for s in suffixes:
                hits = self._index().get(key + s, [])
                if len(hits) == 1:
                    return hits[0]
                if len(hits) > 1:
                    raise ReleaseError(f"{where}: image {name!r} matches several files under {self.root}: "
                                       f"{[str(h) for h in hits[:4]]}")
        raise ReleaseError(f"{where}: image {name!r} not found under {self.root}")


def split_of_path(path: Path, root: Path) -> str | None:
    """Our split name from a release file's name or folder ("test-00000-of-00001.parquet",
    "validate.json", "qas/val/val_qa.pkl"), or None."""
    for part in [path.name] + list(reversed(path.relative_to(root).parts[:-1])):
        stem = re.split(r"[-_.]", part.lower())[0]
        if stem in SPLIT_ALIASES:
            return SPLIT_ALIASES[stem]
    return None


# ----------------------------------------------------------------------------------------------
# Hugging Face parquet releases (columns image{bytes,path}, question, answer [, answer_type, q_lang, id])


def parquet_files(root: Path) -> dict[str, list[Path]]:
    """{split: parquet files} found under root (split from file or folder names)."""
    out: dict[str, list[Path]] = collections.defaultdict(list)
    for p in find_files(root, "*.parquet"):
        split = split_of_path(p, root)
        if split is not None:
            out[split].append(p)
    return dict(out)


def image_bytes_of(cell: Any, where: str) -> tuple[bytes, str]:
    """(bytes, name) from a parquet image cell: {"bytes", "path"} (datasets' Image) or raw bytes."""
    if isinstance(cell, Mapping):
        data, name = cell.get("bytes"), cell.get("path") or ""
    else:
        data, name = cell, ""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ReleaseError(f"{where}: no image bytes in the parquet image column")
    data = bytes(data)
    if not name:  # unnamed (HF stores bytes only): a content name, so equal images share one entry
        name = "img-" + hashlib.sha1(data).hexdigest()[:16] + image_suffix(data)
    return data, os.path.basename(str(name))


def image_suffix(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
    except Exception:  # noqa: BLE001 - unknown format: keep the bytes, neutral suffix
        return ".bin"
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}" if fmt else ".bin")


def parquet_rows(files: Sequence[Path], dataset: str, split: str) -> Iterator[dict[str, Any]]:
    """Rows of HF parquet files as release rows (image bytes inline). Closed/open comes from an
    `answer_type` column when present, else from the answer being yes/no."""
    import pyarrow.parquet as pq

    n = 0
    for path in files:
        table = pq.read_table(path)
        cols = set(table.column_names)
        missing = {"image", "question", "answer"} - cols
        if missing:
            raise ReleaseError(f"{path}: parquet lacks column(s) {sorted(missing)} (has {sorted(cols)})")
        for row in table.to_pylist():
            where = f"{path} row {n}"
            if "q_lang" in cols and str(row.get("q_lang", "en")).strip().lower() != "en":
                n += 1
                continue
            data, name = image_bytes_of(row["image"], where)
            answer = text_of(row["answer"], "answer", where)
            kind = (answer_type_of(row["answer_type"], where) if row.get("answer_type") is not None
                    else ("closed" if is_yes_no(answer) else "open"))
            rid = row.get("qid", row.get("id"))
            yield {
                "id": str(rid) if rid is not None else f"{split}-{n}",
                "question": text_of(row["question"], "question", where),
                "answer": answer,
                "answer_type": kind,
                "image_name": name,
                "image_bytes": data,
            }
            n += 1


# ----------------------------------------------------------------------------------------------
# The builder


def group_by_image(rows: Iterable[Mapping[str, Any]], dataset: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Release rows (in release order; each with id, question, answer, answer_type, image_name and
    image_path or image_bytes) -> (key, example) per image. Question ids are made unique. Rows are
    streamed: only one copy of each image's bytes is kept."""
    seen: collections.Counter = collections.Counter()
    by_image: dict[str, dict[str, Any]] = {}
    for index, r in enumerate(rows):
        rid = str(r["id"])
        seen[rid] += 1
        qid = rid if seen[rid] == 1 else f"{rid}#{seen[rid]}"
        name = r["image_name"]
        src = r.get("image_bytes")
        src = src if src is not None else r["image_path"]
        ex = by_image.get(name)
        if ex is None:
            ex = by_image[name] = {"image_name": name, "source": src, "qa": []}
        elif isinstance(src, bytes) and isinstance(ex["source"], bytes) and src != ex["source"]:
            raise ReleaseError(f"{dataset}: two different images are both named {name!r}")
        ex["qa"].append({"id": qid, "index": index, "question": r["question"],
                         "answer": r["answer"], "answer_type": r["answer_type"]})
    for name, ex in by_image.items():
        src = ex["source"]
        if not isinstance(src, bytes):
            try:
                src = Path(src).read_bytes()
            except OSError as e:
                raise ReleaseError(f"{dataset}: cannot read image file {src}: {e}") from e
        qa = ex["qa"]
        yield name, {"image": src, "image_name": name,
                     "qa": {k: [q[k] for q in qa] for k in ("id", "index", "question", "answer", "answer_type")}}


class VqaBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
    """A VQA set from a manual folder: subclasses say which splits exist and read release rows."""

    VERSION = VERSION
    RELEASE_NOTES = {"1.0.0": "One example per image (original bytes) with its questions; array_record."}

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=vqa_features())

    @abc.abstractmethod
    def release_rows(self, root: Path) -> dict[str, Iterable[Mapping[str, Any]]]:
        """{split: rows in release order} read from the manual folder `root`."""

    def _split_generators(self, dl_manager):
        root = manual_folder(dl_manager, self.name)
        splits = self.release_rows(root)
        if not splits:
            raise ReleaseError(f"{self.name}: no release files found in {root}\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return {split: self._generate_examples(rows) for split, rows in splits.items()}

    def _generate_examples(self, rows):
        yield from group_by_image(rows, self.name)
