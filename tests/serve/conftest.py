"""A tiny random MedV checkpoint with the test tokenizer (compact special ids), as the sampling
command tests build it, plus image files written here."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from medv_jax import checkpoint
from medv_jax.data.synthetic import SyntheticMedVQA
from medv_jax.data.testing import build_test_tokenizer
from medv_jax.data.tokenizer import load_tokenizer
from medv_jax.models import medv
from medv_jax.sampling import api, multimodal


def random_params(config, seed: int = 0, abstract=lambda c: nn.unbox(medv.abstract_params(c))):
    """Random weights in numpy (no compiled init: the shared CPUs make that ~20 s): N(0, 0.02)
    kernels and embeddings, unit norm scales, zero biases."""
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return np.ones(leaf.shape, leaf.dtype)
        if name.endswith("['bias']"):
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(init, abstract(config))


def build_tiny_checkpoint(root) -> dict:
    tok_dir = build_test_tokenizer(root / "tokenizer", special_ids_base=0)
    tokenizer = load_tokenizer(tok_dir)
    vocab = multimodal.round_up(multimodal.tokenizer_vocab_size(tokenizer), 64)
    config = medv.MEDV_PRESETS["medv_tiny"]
    config = multimodal.with_tokenizer_ids(config.replace(lm=config.lm.replace(vocab_size=vocab)), tokenizer)
    params = random_params(config)
    # Sharper output distributions than a 0.02-std init, and an end-of-turn that can win
    # (so answers stop early and replays have several frames).
    kernel = params["lm"]["lm_head"]["kernel"] * np.float32(30.0)
    kernel[:, config.lm.eot_token_id] *= 3.0
    params["lm"]["lm_head"]["kernel"] = kernel
    ckpt = checkpoint.save_pretrained(root / "ckpt", config, params)

    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    # A held-out synthetic scan (grey PNG), as a user would upload.
    SyntheticMedVQA("test", 4, seed=0, image_size=128)[2]["image"].save(images / "scan.png")
    Image.fromarray(rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)).save(images / "scan.jpg", quality=90)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(100))
    (images / "notes.txt").write_text("not an image\n")
    return dict(root=root, tokenizer=str(tok_dir), checkpoint=str(ckpt), images=images, config=config)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def engine(tiny):
    from medv_jax.serve import engine as eng

    from medv_jax.serve import cli

    return eng.Engine(api.load(tiny["checkpoint"], tiny["tokenizer"]), prompt_bucket=cli.PROMPT_BUCKET)
