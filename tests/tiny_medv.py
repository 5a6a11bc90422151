"""A tiny random MedV checkpoint + test tokenizer on disk, for the command-line tests."""
from __future__ import annotations

from pathlib import Path

import jax

from medv_jax import checkpoint
from medv_jax.data.testing import build_test_tokenizer
from medv_jax.data.tokenizer import load_tokenizer
from medv_jax.models import medv
from medv_jax.sampling import multimodal


def write_tiny_medv(root: Path, eot_scale: float = 1.0) -> tuple[medv.MedVConfig, Path, Path]:
    """(config, tokenizer folder, checkpoint folder) of a `medv_tiny` model with compact special ids.

    The LM head is scaled up (sharper output distributions than the 0.02-std init) and the
    end-of-turn column by `eot_scale` more, so answers can end early."""
    tok_dir = build_test_tokenizer(root / "tokenizer", special_ids_base=0)
    tokenizer = load_tokenizer(tok_dir)
    vocab = multimodal.round_up(multimodal.tokenizer_vocab_size(tokenizer), 64)
    config = medv.MEDV_PRESETS["medv_tiny"]
    config = multimodal.with_tokenizer_ids(config.replace(lm=config.lm.replace(vocab_size=vocab)), tokenizer)
    params = jax.jit(medv.init_params, static_argnums=0)(config, jax.random.key(0))
    kernel = params["lm"]["lm_head"]["kernel"] * 30.0
    params["lm"]["lm_head"]["kernel"] = kernel.at[:, config.lm.eot_token_id].multiply(eot_scale)
    ckpt = checkpoint.save_pretrained(root / "ckpt", config, params)
    return config, Path(tok_dir), Path(ckpt)
