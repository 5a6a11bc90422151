"""The model and optimizer every stage of the miniature recipe shares (configs/mini/stage*.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import base_config  # noqa: E402

ROOT = "workdir/mini"


def mini_config(stage: str):
    """A from-scratch model of the demo's shape (configs/demo.py) with the findings reports'
    tokenizer; `stage` names the workdir (workdir/mini/<stage>)."""
    c = base_config()
    c.workdir = f"{ROOT}/{stage}"
    c.tokenizer = "demo_reports"  # the demo's words plus the reports' (684 ids)

    c.model.lm_preset = "llada_tiny"
    c.model.lm_overrides.vocab_size = 768
    c.model.lm_overrides.hidden_size = 128
    c.model.lm_overrides.num_layers = 4
    c.model.lm_overrides.num_heads = 4
    c.model.lm_overrides.num_kv_heads = 4
    c.model.lm_overrides.head_dim = 32
    c.model.lm_overrides.mlp_hidden_size = 384
    c.model.lm_overrides.max_position_embeddings = 256
    c.model.lm_overrides.rope_theta = 10000.0  # short sequences (configs/demo.py)
    c.model.lm_overrides.init_std = 0.15  # at this width 0.02 learns late and by luck (configs/demo.py)
    c.model.vision_preset = "siglip_tiny"
    c.model.vision_overrides.image_size = 64
    c.model.vision_overrides.patch_size = 16
    c.model.vision_overrides.hidden_size = 64
    c.model.vision_overrides.num_layers = 2
    c.model.vision_overrides.num_heads = 4
    c.model.vision_overrides.mlp_hidden_size = 128
    c.model.vision_overrides.init_std = 0.15
    c.model.image_aspect_ratio = "square"
    c.model.mm_patch_merge_type = "flat"
    c.model.dtype = "float32"
    c.model.remat_policy = "none"

    c.data.source = "synthetic"
    c.data.train_size = 1_000_000  # drawn on the fly
    c.data.test_size = 200
    c.data.system_prompt = "none"
    c.data.max_crops = 1
    c.data.too_long = "raise"

    c.train.num_epochs = 0
    c.train.log_every = 50
    c.train.eval_every = 0
    c.train.checkpoint_every = 500
    c.train.ce_chunk = 128

    # From-scratch settings of the demo (configs/demo.py): Adam b2 0.95 against the 1/p-weighted
    # loss's rare large gradients, decoupled weight decay 0.1.
    c.optim.lr = 2e-3
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.warmup_ratio = 0.03
    c.mesh = (1, -1, 1)
    return c


# Parameter groups (regex over "part/.../name" paths; None = frozen). Frozen parts get no
# optimizer state and, unlike parts that merely receive no gradient, no weight decay either.
LM_ONLY = [("^vision/", None), ("^projector/", None), ("^image_newline", None)]
LM_AND_PROJECTOR = [("^vision/", None)]
