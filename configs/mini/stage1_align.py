"""Mini recipe, stage 1 (the paper's biomedical alignment): image-caption pairs in caption format
(the prompt is the image alone). Captions state every attribute a report needs (modality, region,
each side's lesions with their sizes).

The paper trains only the projector here, between a pretrained SigLIP2 tower and a frozen LLaDA.
This tower starts from random weights, so this stage is also its stand-in for SigLIP2's
pretraining, and that needs a decoder that learns along: with the language model frozen the
caption loss stalls near 1.0 and the tower never learns the lesions (report field accuracy after
stage 2: count 34 %, each side 26-33 %, benchmarks/RESULTS.md "Miniature recipe"). So every part
trains in this stage; stages 2 and 3 freeze the tower as the paper does.
"""
from medv_jax.train.presets import MINI_ROOT, mini_config


def get_config():
    c = mini_config("stage1_align")
    c.init_from = f"{MINI_ROOT}/stage0_text/model"
    c.data.task = "caption"
    c.data.text_format = "caption"
    # The longest caption is 28 tokens after the 4 image tokens: rows of 36 keep every caption with
    # at least 4 EOS after it and spend a quarter fewer positions on padding than 48 did.
    c.data.max_length = 36
    c.data.prompt_length = 48
    c.train.global_batch = 32
    # With stage 2's 1500: the sides held on three seeds; 3000 / 1100 lost them on one seed
    # (docs/mini_recipe.md, "Margins").
    c.train.num_steps = 3500
    c.optim.param_groups = []  # everything trains (see above)
    return c
