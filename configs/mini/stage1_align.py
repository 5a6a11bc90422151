"""Mini recipe, stage 1 (the paper's biomedical alignment): image-caption pairs in caption format
(the prompt is the image alone), the language model frozen. The paper trains only the projector on
top of a pretrained SigLIP2 tower; this tower starts from random weights, so it trains here too, as
its stand-in for that pretraining. Captions state every attribute a report needs (modality,
region, each side's lesions with their sizes).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mini_base import PROJECTOR_AND_TOWER, ROOT, mini_config  # noqa: E402


def get_config():
    c = mini_config("stage1_align")
    c.init_from = f"{ROOT}/stage0_text/model"
    c.data.task = "caption"
    c.data.text_format = "caption"
    c.data.max_length = 48
    c.data.prompt_length = 48
    c.train.global_batch = 32
    c.train.num_steps = 800
    c.optim.param_groups = PROJECTOR_AND_TOWER
    return c
