"""The demo's model with LoRA on a base checkpoint: adapters (rank 4) on the LM's attention and MLP
projections, the projector trained fully, everything else frozen (for the LoRA training tests;
``config.init_from`` is given on the command line)."""
import runpy
from pathlib import Path

from medv_jax.train.presets import lora_groups


def get_config():
    c = runpy.run_path(str(Path(__file__).resolve().parents[2] / "configs" / "demo.py"))["get_config"]()
    c.model.lora.rank = 4
    c.model.lora.alpha = 8.0
    c.model.projector_param_dtype = "float32"
    c.optim.param_groups = lora_groups(1e-2)
    return c
