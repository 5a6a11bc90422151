"""The model and optimizer every stage of the miniature recipe shares (configs/mini/stage*.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import base_config, tiny_from_scratch  # noqa: E402

ROOT = "workdir/mini"


def mini_config(stage: str):
    """The demo's from-scratch model and optimizer (configs/common.py, tiny_from_scratch) with the
    findings reports' tokenizer; `stage` names the workdir (workdir/mini/<stage>)."""
    c = tiny_from_scratch(base_config(), vocab_size=768)
    c.workdir = f"{ROOT}/{stage}"
    c.tokenizer = "demo_reports"  # the demo's words plus the reports' (684 ids)
    c.data.test_size = 200
    c.train.log_every = 50
    c.train.eval_every = 0
    c.train.checkpoint_every = 500
    c.train.ce_chunk = 128
    return c


# Parameter groups (regex over "part/.../name" paths; None = frozen). Frozen parts get no
# optimizer state and, unlike parts that merely receive no gradient, no weight decay either.
LM_ONLY = [("^vision/", None), ("^projector/", None), ("^image_newline", None)]
LM_AND_PROJECTOR = [("^vision/", None)]
