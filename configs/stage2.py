"""Stage 2 (paper): LLM + projector (vision frozen) on multi-turn biomedical instruction dialogues
(LLaVA-Med's 60K), 4 epochs, global batch 8, lr 1e-5 (LLaDA-V recipe), from stage 1's model:

    python -m medv_jax.train --config=configs/stage2.py --config.data.train_path=llava_med_instruct_60k.json \\
        --config.data.image_root=images/ --config.tokenizer=~/hf/LLaDA-8B-Instruct
"""
from medv_jax.train.presets import finetune_config


def get_config():
    return finetune_config("stage2", "workdir/stage1/model", epochs=4)
