"""PathVQA (He et al. 2020) as a TFDS dataset, from the official release in a manual folder."""
from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any, Iterator

from medv_jax.data.tfds import common


class PathVqa(common.VqaBuilder):
    """PathVQA: pathology VQA, official train / val / test splits (test: 6,761 questions, 3,391
    closed). Closed = a yes/no answer (the release has no type field; LLaVA-Med splits the same)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put ONE of these in the manual folder:
    * the official release `pvqa/`: `qas/train/train_qa.pkl`, `qas/val/val_qa.pkl`,
      `qas/test/test_qa.pkl` (pickled lists of {image, question, answer}; image is a name such as
      test_0001) and `images/train/`, `images/val/`, `images/test/` holding <image>.jpg;
    * the Hugging Face parquet release: `data/train-*.parquet`, `data/validation-*.parquet`,
      `data/test-*.parquet` with columns image, question, answer.
    """

    def release_rows(self, root: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        images = common.ImageIndex(root)
        for p in common.find_files(root, "*_qa.pkl"):
            split = common.SPLIT_ALIASES.get(p.name[: -len("_qa.pkl")].lower())
            if split is None:
                continue
            if split in out:
                raise common.ReleaseError(f"path_vqa: several {split} question files in {root} (second: {p})")
            bases = [p.parent.parent.parent / "images" / p.parent.name, p.parent.parent.parent / "images"]
            out[split] = _official_rows(p, split, common.ImageIndex(root, bases) if bases[0].is_dir() else images)
        if out:
            return out
        files = common.parquet_files(root)
        return {split: common.parquet_rows(paths, "path_vqa", split) for split, paths in files.items()}


class _SafeUnpickler(pickle.Unpickler):
    """The qa files hold lists of dicts of strings (possibly numpy strings): refuse any other
    class, so loading a question file runs no code."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                              ("numpy", "dtype")):
            return super().find_class(module, name)  # numpy scalars (np.str_) are rebuilt from bytes
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a question file")


def load_pickle(path: Path) -> Any:
    try:
        return _SafeUnpickler(io.BytesIO(path.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise common.ReleaseError(f"path_vqa: cannot read {path}: {e}") from e


def _official_rows(path: Path, split: str, images: common.ImageIndex) -> Iterator[dict[str, Any]]:
    data = load_pickle(path)
    if not isinstance(data, list):
        raise common.ReleaseError(f"path_vqa: {path} does not hold a list of questions")
    for n, row in enumerate(data):
        where = f"{path} row {n}"
        if not isinstance(row, dict):
            raise common.ReleaseError(f"{where}: not a dict")
        missing = [k for k in ("image", "question", "answer") if k not in row]
        if missing:
            raise common.ReleaseError(f"{where}: missing field(s) {missing}")
        name = str(row["image"]).strip()
        answer = common.text_of(row["answer"], "answer", where)
        path_ = images.find(name, where, suffixes=("", ".jpg", ".png", ".jpeg"))
        yield {
            "id": str(row.get("qid", row.get("id", f"{split}-{n}"))),
            "question": common.text_of(row["question"], "question", where),
            "answer": answer,
            "answer_type": "closed" if common.is_yes_no(answer) else "open",
            "image_name": path_.name,
            "image_path": path_,
        }
