"""VQA-RAD (Lau et al. 2018) as a TFDS dataset, from the official release in a manual folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from medv_jax.data.tfds import common

OFFICIAL_JSON = "VQA_RAD Dataset Public.json"


class VqaRad(common.VqaBuilder):
    """VQA-RAD: radiology VQA, test = the 451 questions whose phrase_type is test_* (the split the
    LLaVA-Med and LLaDA-MedV papers use; 272 closed), train = the other 1,797."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Put ONE of these in the manual folder:
    * the official OSF release: `{OFFICIAL_JSON}` (a JSON list of rows with qid, image_name,
      question, answer, answer_type CLOSED/OPEN, phrase_type) and the image folder
      `VQA_RAD Image Folder/` holding the images named by image_name;
    * the Hugging Face parquet release: `data/train-*.parquet` and `data/test-*.parquet` with
      columns image, question, answer (closed = a yes/no answer, as that release has no types).
    """

    def release_rows(self, root: Path) -> dict[str, Any]:
        found = common.find_files(root, OFFICIAL_JSON) or [
            p for p in common.find_files(root, "*.json") if _looks_official(p)]
        if found:
            if len(found) > 1:
                raise common.ReleaseError(f"vqa_rad: several release JSON files in {root}: {[str(p) for p in found]}")
            images = common.ImageIndex(root)
            return {split: _official_rows(found[0], images, split) for split in ("train", "test")}
        files = common.parquet_files(root)
        return {split: common.parquet_rows(paths, "vqa_rad", split) for split, paths in files.items()}


def _looks_official(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.lstrip().startswith("[") and '"phrase_type"' in head and '"image_name"' in head


def _official_rows(path: Path, images: common.ImageIndex, split: str) -> Iterator[dict[str, Any]]:
    """Rows of `split`: test = phrase_type test_freeform / test_para, train = the others."""
    data = common.read_json_list(path, "vqa_rad")
    for n, where, row in common.checked_rows(
            data, path, ("image_name", "question", "answer", "answer_type", "phrase_type")):
        if ("test" if str(row["phrase_type"]).strip().lower().startswith("test") else "train") != split:
            continue
        yield {
            "id": str(row.get("qid", n)),
            "question": common.text_of(row["question"], "question", where),
            "answer": common.text_of(row["answer"], "answer", where),
            "answer_type": common.answer_type_of(row["answer_type"], where),
            "image_name": str(row["image_name"]).strip(),
            "image_path": images.find(str(row["image_name"]).strip(), where),
        }
