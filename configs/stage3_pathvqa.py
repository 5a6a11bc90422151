"""Stage 3 (paper): LLM + projector fine-tuned on the pathvqa training set, 7 epochs, global batch 8,
lr 1e-5 (LLaDA-V recipe), from stage 2's model; evaluated with the paper's VQA sampler settings
(L = B = N = 128):

    python -m medv_jax.train --config=configs/stage3_pathvqa.py --config.data.train_path=pathvqa/train.json \
        --config.data.test_path=pathvqa/test.json --config.data.image_root=pathvqa/images --config.tokenizer=...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import finetune_config  # noqa: E402


def get_config():
    c = finetune_config("stage3_pathvqa", "workdir/stage2/model", epochs=7)
    c.eval.num_examples = 100000  # the whole test split
    return c
