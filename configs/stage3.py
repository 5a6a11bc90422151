"""Stage 3 (paper): LLM + projector fine-tuned on one VQA training set, global batch 8, lr 1e-5
(LLaDA-V recipe), from stage 2's model, for the paper's epoch count of that set; evaluated with
the paper's VQA sampler settings (L = B = N = 128) on the whole test split. The dataset is the
config's argument:

    python -m medv_jax.train --config=configs/stage3.py:slake --config.data.train_path=slake/train.json \\
        --config.data.test_path=slake/test.json --config.data.image_root=slake/images --config.tokenizer=...
"""
from medv_jax.train.presets import finetune_config, stage3_epochs


def get_config(dataset: str):
    epochs = stage3_epochs("configs/stage3.py", dataset)
    c = finetune_config(f"stage3_{dataset}", "workdir/stage2/model", epochs=epochs)
    c.eval.num_examples = 100000  # the whole test split
    return c
