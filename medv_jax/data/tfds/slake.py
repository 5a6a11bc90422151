"""SLAKE (Liu et al. 2021), English questions only, as a TFDS dataset from a manual folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from medv_jax.data.tfds import common

RELEASE_FILES = {"train": "train.json", "validation": "validate.json", "test": "test.json"}


class Slake(common.VqaBuilder):
    """SLAKE, English subset (q_lang "en"): official train / validate / test splits (test: 1,061
    English questions, 416 closed, as in the LLaVA-Med and LLaDA-MedV papers)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put ONE of these in the manual folder:
    * the official release (e.g. Slake1.0/): `train.json`, `validate.json`, `test.json` (JSON lists
      of rows with qid, img_name, question, answer, answer_type CLOSED/OPEN, q_lang en/zh) and the
      `imgs/` folder beside them (img_name is relative to it, e.g. xmlab102/source.jpg);
    * a parquet release with columns image, question, answer [, answer_type, q_lang] in files
      named train-*/validation-*/test-*.parquet.
    """

    def release_rows(self, root: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        images = common.ImageIndex(root, [p.parent / "imgs" for p in common.find_files(root, "*.json")])
        for split, fname in RELEASE_FILES.items():
            found = common.find_files(root, fname)
            if len(found) > 1:
                raise common.ReleaseError(f"slake: several {fname} files in {root}: {[str(p) for p in found]}")
            if found:
                out[split] = _official_rows(found[0], images)
        if out:
            return out
        files = common.parquet_files(root)
        return {split: common.parquet_rows(paths, "slake", split) for split, paths in files.items()}


def _official_rows(path: Path, images: common.ImageIndex) -> Iterator[dict[str, Any]]:
    data = common.read_json_list(path, "slake")
    for n, where, row in common.checked_rows(data, path, ("img_name", "question", "answer", "answer_type", "q_lang")):
        if str(row["q_lang"]).strip().lower() != "en":
            continue
        name = str(row["img_name"]).strip()
        yield {
            "id": str(row.get("qid", n)),
            "question": common.text_of(row["question"], "question", where),
            "answer": common.text_of(row["answer"], "answer", where),
            "answer_type": common.answer_type_of(row["answer_type"], where),
            "image_name": name,
            "image_path": images.find(name, where),
        }
