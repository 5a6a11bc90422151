"""LLaVA-Med-style JSON (instruction dialogues, captions, converted VQA test files) as a TFDS dataset."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from medv_jax.data.tfds import common

SPLIT_FILES = ("train", "validation", "test")


class LlavaMed(tfds.core.GeneratorBasedBuilder):
    """LLaVA-style records ({id, image, conversations [, answer_type]}) with their images: one
    example per record (image bytes as released; records without an image are text-only)."""

    VERSION = common.VERSION
    RELEASE_NOTES = {"1.0.0": "One example per record; conversations as JSON text; array_record."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put `train.json` / `validation.json` / `test.json` (or .jsonl) in the manual folder, each a
    LLaVA-Med JSON list (or JSON Lines) of records {"id", "image", "conversations": [{"from":
    "human"|"gpt", "value"}] [, "answer_type": CLOSED|OPEN]}; e.g. link
    llava_med_instruct_60k_inline_mention.json as train.json. LLaVA-Med's misspelled
    "conversatons" key and question rows {"question_id", "image", "text"} are read too. Image
    paths are relative to the manual folder or to its `images/` folder.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # file bytes; b"" = no image
            "image_name": tfds.features.Text(),
            "conversations": tfds.features.Text(),  # JSON list of {"from", "value"}
            "answer_type": tfds.features.Text(),  # "closed" / "open" / ""
        }))

    def _split_generators(self, dl_manager):
        root = common.manual_folder(dl_manager, self.name)
        out = {}
        for split in SPLIT_FILES:
            found = [p for ext in (".json", ".jsonl") for p in [root / f"{split}{ext}"] if p.is_file()]
            if len(found) > 1:
                raise common.ReleaseError(f"llava_med: both {found[0]} and {found[1]} exist; keep one")
            if found:
                out[split] = self._generate_examples(found[0], common.ImageIndex(root, [root, root / "images"]))
        if not out:
            raise common.ReleaseError(f"llava_med: no train/validation/test .json(l) in {root}\n"
                                      f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return out

    def _generate_examples(self, path: Path, images: common.ImageIndex) -> Iterator[tuple[str, dict[str, Any]]]:
        from medv_jax.data.records import load_records

        try:
            records = load_records(path)
        except (OSError, ValueError) as e:
            raise common.ReleaseError(f"llava_med: {e}") from e
        seen: set[str] = set()
        for n, rec in enumerate(records):
            rid = str(rec.get("id", rec.get("question_id", n)))
            where = f"{path} record {n} (id {rid!r})"
            if rid in seen:
                raise common.ReleaseError(f"{where}: duplicate id")
            seen.add(rid)
            conversations = conversations_of(rec, where)
            name = str(rec.get("image") or "").strip()
            data = images.find(name, where).read_bytes() if name else b""
            kind = rec.get("answer_type")
            yield rid, {
                "id": rid,
                "index": n,
                "image": data,
                "image_name": name,
                "conversations": json.dumps(conversations, ensure_ascii=False),
                "answer_type": common.answer_type_of(kind, where) if kind not in (None, "") else "",
            }


def conversations_of(rec: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The record's turns as [{"from", "value"}]; question rows ({"text"} and an optional answer)
    become one human turn (with <image> first when there is an image) and one gpt turn."""
    turns = rec.get("conversations", rec.get("conversatons"))
    if turns is None and "text" in rec:
        question = str(rec["text"]).replace("<image>", "").strip()
        turns = [{"from": "human", "value": ("<image>\n" if rec.get("image") else "") + question}]
        for key in ("answer", "gpt4_answer", "gt_answer"):
            if rec.get(key) is not None:
                turns.append({"from": "gpt", "value": str(rec[key])})
                break
    if not isinstance(turns, list) or not turns:
        raise common.ReleaseError(f"{where}: no 'conversations' list (nor a 'text' question)")
    out = []
    for t in turns:
        if not isinstance(t, dict) or t.get("from") not in ("human", "gpt", "user", "assistant", "system"):
            raise common.ReleaseError(f"{where}: bad turn {t!r}")
        out.append({"from": str(t["from"]), "value": str(t.get("value", ""))})
    return out
