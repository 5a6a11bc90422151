"""Mini recipe, stage 0 (stands in for the language model's own pretraining, which the paper's
LLaDA-8B-Instruct arrives with): the language model alone, on text only. Each dialogue gives a
scan's description in words, asks for the findings report, then asks a follow-up question; the
model learns the reports' language and to carry facts from its context into them.

    python -m medv_jax.train.chain configs/mini/ --workdir=workdir/mini     (all stages)
    python -m medv_jax.train --config=configs/mini/stage0_text.py           (this stage alone)
"""
from medv_jax.train.presets import LM_ONLY, mini_config


def get_config():
    c = mini_config("stage0_text")
    c.data.task = "text"
    c.data.turns = 2
    c.data.max_length = 112  # the longest dialogue the data can draw: 106 tokens (tests/test_configs.py)
    c.data.prompt_length = 64
    c.train.global_batch = 32
    c.train.num_steps = 200
    c.optim.param_groups = LM_ONLY
    return c
