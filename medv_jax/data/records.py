"""Reading answer and question files: JSON lists or JSON Lines, with clear errors."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

__all__ = ["load_records", "first_field", "record_id", "IdKey", "id_key", "write_json"]

#: Question ids are matched on their text so that 12 and "12" meet (files differ in this).
IdKey = str


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a JSON file holding a list of objects, or of a JSON Lines file.

    LLaVA-Med uses both: answer files are JSON Lines, its VQA test files are one JSON list.
    Blank lines in JSON Lines are skipped; a bad line is reported with its number.
    """
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    stripped = text.strip()
    if not stripped:
        return []
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from None
        records = data
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON: {err}") from None
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {index} is a {type(record).__name__}, not an object")
    return records


def first_field(record: Mapping[str, Any], names: Sequence[str]) -> tuple[str, Any] | None:
    """The first of ``names`` present (and not null) in ``record``, as (name, value)."""
    for name in names:
        if record.get(name) is not None:
            return name, record[name]
    return None


def record_id(record: Mapping[str, Any], where: str, index: int) -> Any:
    """A record's ``question_id`` (or ``id``), or a ValueError naming the record."""
    found = first_field(record, ("question_id", "id"))
    if found is None:
        raise ValueError(f"{where}: record {index} has neither 'question_id' nor 'id'")
    return found[1]


def id_key(question_id: Any) -> IdKey:
    """The key under which a question id is matched across files."""
    return str(question_id)


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON, creating the parent directory; atomically, so that an
    interrupted run never leaves half a metrics file."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    os.replace(tmp, path)
