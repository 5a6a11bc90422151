"""Lazy reading and sharded writing of Hugging Face safetensors folders (numpy only, no torch).

A folder holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Tensors are memory-mapped and read one at a time, so converting
an 8B checkpoint needs about one copy of the *output* in host memory, not two of the input.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ConversionError(ValueError):
    """A source or target checkpoint that cannot be converted; the message names every culprit."""


def read_config(path: Path) -> dict:
    """config.json of a folder (or the given JSON file itself)."""
    file = path / "config.json" if path.is_dir() or not path.suffix else path
    if not file.is_file():
        raise ConversionError(f"{file} not found: a Hugging Face checkpoint folder needs its config.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{file} is not valid JSON: {e}") from e


class SafetensorsFolder:
    """Name -> tensor access over one or several safetensors files, opened lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        single = self.folder / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index} is not a valid safetensors index: {e}") from e
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [SINGLE_FILE]
            weight_map = None
        else:
            raise ConversionError(f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise ConversionError(f"{path} is listed in {INDEX_FILE} but missing")
            try:
                handle = safe_open(str(path), framework="np")
                keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ConversionError(f"{path} is not a readable safetensors file: {e}") from e
            self._handles[name] = handle
            for key in keys:
                self._where[key] = name
        if weight_map is not None:
            listed_missing = sorted(k for k, f in weight_map.items() if self._where.get(k) != f)
            if listed_missing:
                raise ConversionError(
                    f"{index} lists tensors that their files do not hold: {listed_missing[:20]}"
                )

    def keys(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        file = self._where[name]
        try:
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{self.folder / file}: cannot read tensor {name}: {e}") from e

    def dtypes(self) -> set[str]:
        return {self._handles[f].get_slice(k).get_dtype() for k, f in self._where.items()}


def write_safetensors(
    folder: Path,
    tensors: Iterator[tuple[str, np.ndarray]],
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Write named tensors as ``model.safetensors`` or, past ``max_shard_bytes``, as
    ``model-0000i-of-0000n.safetensors`` shards plus an index (the Hugging Face layout)."""
    # Tensors are written shard by shard; only one shard's arrays are held at a time.
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    written: list[tuple[str, list[str]]] = []
    total = 0

    def flush() -> None:
        if not shards[-1]:
            return
        tmp_name = f"shard-{len(written):05d}.safetensors"
        save_file(shards[-1], str(folder / tmp_name), metadata={"format": "pt"})
        written.append((tmp_name, list(shards[-1])))
        shards[-1] = {}
        sizes[-1] = 0

    for name, array in tensors:
        array = np.ascontiguousarray(array)
        if sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = array
        sizes[-1] += array.nbytes
        total += array.nbytes
    flush()

    if len(written) == 1:
        os.replace(folder / written[0][0], folder / SINGLE_FILE)
        return
    weight_map = {}
    n = len(written)
    for i, (tmp_name, names) in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(folder / tmp_name, folder / final)
        weight_map.update({k: final for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
