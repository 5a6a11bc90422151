"""Stage 1 (paper): projector only (vision tower and LLM frozen), image-caption pairs, 2 epochs,
global batch 32, lr 1e-3 (LLaDA-V recipe), caption format, starting from converted LLaDA-8B-Instruct
+ SigLIP2 so400m weights:

    python -m tools.convert_weights --src ~/hf/LLaDA-8B-Instruct --dst ~/ckpt/llada-8b
    python -m tools.convert_weights --src ~/hf/siglip2-so400m-patch14-384 --dst ~/ckpt/siglip2
    python -m medv_jax.train --config=configs/stage1.py --config.data.train_path=captions.json \\
        --config.data.image_root=images/ --config.tokenizer=~/hf/LLaDA-8B-Instruct
"""
from medv_jax.train.presets import base_config


def get_config():
    c = base_config()
    c.workdir = "workdir/stage1"
    c.init_lm_from = "~/ckpt/llada-8b"
    c.init_vision_from = "~/ckpt/siglip2"
    c.data.text_format = "caption"
    c.train.global_batch = 32
    c.train.num_epochs = 2
    c.optim.lr = 1e-3
    c.optim.param_groups = [("^vision/", None), ("^lm/", None)]  # projector only
    return c
