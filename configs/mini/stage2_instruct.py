"""Mini recipe, stage 2 (the paper's end-to-end instruction tuning): findings reports of one scan,
half asked alone and half in two-turn dialogues, the report asked at either turn and a follow-up
question at the other. Evaluated as
the paper's conversation setting in miniature: reports of 200 held-out scans written block by
block (L = 64, B = 32, N = 64) and scored by field accuracy (medv_jax.data.synthetic.field_accuracy).

The paper keeps its pretrained SigLIP2 tower frozen here. This tower has seen only stage 1's
captions. Frozen here, its reports carried extra side sentences (field accuracy 72.1 % and 84.0 %
on two runs, the lesion sizes read right); trained at the stage's learning rate, it lost the sizes
stage 1 had taught it (size words read right, teacher-forced: 100 % after stage 1, 80.7 % after
stage 2); at a fifth of the rate, one seed of three lost the CT / MRI distinction. So it trains here
at a tenth of the rate (docs/mini_recipe.md); stage 3 freezes it.
"""
from medv_jax.train.presets import MINI_ROOT, mini_config


def get_config():
    c = mini_config("stage2_instruct")
    c.init_from = f"{MINI_ROOT}/stage1_align/model"
    c.data.task = "report"
    c.data.turns = 2
    # Half the reports asked alone, followed by nothing but the stop-token padding: the state the
    # sampler starts from (docs/mini_recipe.md).
    c.data.report_alone = 0.5
    c.data.max_length = 88
    c.data.answer_padding = "eot"
    c.data.prompt_length = 32
    c.train.global_batch = 32
    c.train.num_steps = 1500  # with stage 1's 3500 (see there)
    # Half the rows masked as one contiguous run of the answer: the states the sampler passes
    # through (the report's start written, the rest masked, stop tokens further right), which
    # i.i.d. masks almost never show; without them reports carried extra side sentences
    # (docs/mini_recipe.md).
    c.train.mask_span_fraction = 0.5
    c.optim.param_groups = [("^vision/", "*0.1")]  # a tenth of c.optim.lr, which moves with it; the rest at c.optim.lr
    c.eval.num_examples = 200
    c.eval.batch_size = 50
    # Two blocks of 32: a report (26-35 tokens) fills most of the first. Rows of 88 tokens hold the
    # longest training dialogue the data can draw (83 tokens, tests/test_configs.py) with room for
    # the stop-token padding, at about 0.73x the compute of the earlier rows of 120 (scored at
    # L = 96); block length moves field accuracy by under a point (docs/mini_recipe.md).
    c.eval.gen_length = 64
    c.eval.block_length = 32
    c.eval.steps = 64
    return c
