"""Weight conversion between Hugging Face (PyTorch) checkpoints and medv_jax checkpoints.

    python -m tools.convert_weights --src HF_DIR --dst OUT_DIR [--dtype auto|float32|bfloat16]
    python -m tools.convert_weights --export --src OUT_DIR --dst HF_DIR
"""
from tools.convert_weights.convert import (
    ConversionError,
    convert_params,
    export_checkpoint,
    hf_config_for,
    hf_tensors,
    import_checkpoint,
)

__all__ = [
    "ConversionError",
    "convert_params",
    "export_checkpoint",
    "hf_config_for",
    "hf_tensors",
    "import_checkpoint",
]
