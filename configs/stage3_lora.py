"""Stage 3 with LoRA (configs/stage3.py's data, epochs and evaluation): adapters of rank 64 on the
LM's attention and MLP projections and the projector trained fully; the LM's base weights frozen in
bfloat16 and the vision tower frozen. Only the trained tensors are checkpointed; the run ends with
workdir/adapters, which every sampling command loads on top of the base (merged with
--merge_adapters) and python -m tools.convert_weights --export merges. QLoRA:
--config.model.base_quant=int8 (or int4). The dataset is the config's argument:

    python -m medv_jax.train --config=configs/stage3_lora.py:slake --config.data.train_path=slake/train.json \\
        --config.data.test_path=slake/test.json --config.data.image_root=slake/images --config.tokenizer=...
"""
from medv_jax.train.presets import lora_finetune_config, stage3_epochs


def get_config(dataset: str):
    epochs = stage3_epochs("configs/stage3_lora.py", dataset)
    c = lora_finetune_config(f"stage3_lora_{dataset}", "workdir/stage2/model", epochs=epochs)
    c.eval.num_examples = 100000  # the whole test split
    return c
