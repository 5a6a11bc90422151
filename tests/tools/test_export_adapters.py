"""Exporting an adapters checkpoint merges the adapters into the Hugging Face weights: transformers
reloads the export and computes the logits the unmerged adapters give in medv_jax."""
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from transformers import LlamaForCausalLM

from medv_jax import checkpoint
from medv_jax.models import adapters, llada
from tests import hf_checkpoints as hf
from tools.convert_weights import export_checkpoint, import_checkpoint


def test_exported_merged_adapters_reload_with_transformers_and_match(tmp_path):
    hf.make_llama(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "base")
    base_cfg, base = checkpoint.load_pretrained(tmp_path / "base")
    lora_cfg = base_cfg.replace(lora_rank=3, lora_alpha=6.0)
    params = checkpoint.conform(lora_cfg, base)
    trained = {}
    for i, (path, value) in enumerate(flatten_dict(params).items()):
        if path[-1] in (adapters.LORA_A, adapters.LORA_B):  # B random too, so the adapters matter
            trained[path] = jax.random.normal(jax.random.key(i), value.shape) * 0.05
    checkpoint.save_adapters(tmp_path / "adapters", lora_cfg, unflatten_dict(trained), tmp_path / "base")

    config, unmerged = checkpoint.load_pretrained(tmp_path / "adapters")
    assert config.lora_rank == 3
    tokens = np.random.default_rng(0).integers(0, base_cfg.vocab_size, (2, 9))
    key_mask = np.arange(9)[None, :] >= np.array([[0], [2]])
    ours = np.asarray(llada.LLaDA(config).apply({"params": unmerged}, jnp.asarray(tokens), jnp.asarray(key_mask)))
    plain = np.asarray(llada.LLaDA(base_cfg).apply({"params": base}, jnp.asarray(tokens), jnp.asarray(key_mask)))
    assert np.abs(ours - plain).max() > 1e-2 * np.abs(plain).max()  # the adapters change the output

    export_checkpoint(tmp_path / "adapters", tmp_path / "export")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "export", torch_dtype=torch.float32).eval()
    reference = hf.llama_logits(model, tokens=tokens, key_mask=key_mask)
    valid = key_mask[:, :, None].repeat(ours.shape[-1], -1)  # padded query rows are not compared
    hf.assert_rel_close(np.where(valid, ours, 0), np.where(valid, reference, 0), 1e-5, "merged export")
