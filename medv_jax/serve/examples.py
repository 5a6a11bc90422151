"""Example inputs that work offline: scans from the built-in synthetic set (held-out split, each
with its own question) and the real CT / MR files that pydicom ships with its test data."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from medv_jax.data.synthetic import SyntheticMedVQA

# (pydicom test file, question, DICOM window)
DICOM_EXAMPLES = (
    ("CT_small.dcm", "What modality is this?", "soft_tissue"),
    ("MR_small.dcm", "What organ is shown?", "auto"),
)
SYNTHETIC_INDICES = (0, 1, 3)


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medv_jax" / "serve_examples"


def write_examples(out_dir: str | os.PathLike[str], image_size: int = 64) -> list[list[str]]:
    """Write the example files into ``out_dir`` (kept if already there) and return the rows
    ``[file path, question, DICOM window]``. DICOM examples are left out, with a note on stderr,
    when pydicom or its test files are missing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    test = SyntheticMedVQA("test", max(SYNTHETIC_INDICES) + 1, seed=0, image_size=image_size)
    for i in SYNTHETIC_INDICES:
        path = out / f"synthetic_test_{i}_{image_size}px.png"
        if not path.exists():
            test[i]["image"].save(path)
        rows.append([str(path), test.describe(i)["question"], "auto"])
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        print("examples: pydicom is not installed; the DICOM examples are left out")
        return rows
    for name, question, window in DICOM_EXAMPLES:
        path = out / name
        if not path.exists():
            source = get_testdata_file(name, download=False)  # shipped inside the pydicom package
            if source is None:
                print(f"examples: pydicom has no test file {name}; left out")
                continue
            shutil.copyfile(source, path)
        rows.append([str(path), question, window])
    return rows
