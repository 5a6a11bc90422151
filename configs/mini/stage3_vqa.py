"""Mini recipe, stage 3 (the paper's dataset-specific fine-tuning): single-turn VQA on the synthetic
set's closed and open questions of every family, language model and projector, vision frozen;
scored as LLaVA-Med scores VQA (closed accuracy, open recall).
"""
from medv_jax.train.presets import LM_AND_PROJECTOR, MINI_ROOT, mini_config


def get_config():
    c = mini_config("stage3_vqa")
    c.init_from = f"{MINI_ROOT}/stage2_instruct/model"
    c.data.task = "vqa"
    c.data.closed_fraction = 0.5
    c.data.max_length = 32  # the longest record the data can draw: 30 tokens (tests/test_configs.py)
    c.data.prompt_length = 32
    c.data.test_size = 400
    c.train.global_batch = 32
    c.train.num_steps = 200
    c.optim.param_groups = LM_AND_PROJECTOR
    c.eval.num_examples = 400
    c.eval.batch_size = 50
    # Room for the longest answer, "one small and one large lesion" (6 tokens).
    c.eval.gen_length = 8
    c.eval.block_length = 8
    c.eval.steps = 8
    return c
