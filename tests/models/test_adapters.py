"""LoRA adapters and weight-only quantization on the LM's dense kernels (tiny random models)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from medv_jax.models import adapters, llada, medv

LM = llada.LLADA_PRESETS["llada_tiny"].replace(vocab_size=256)
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
MASK = jnp.arange(12)[None, :] >= jnp.array([[0], [3]])  # the second row left-padded


def _logits(config, params):
    return llada.LLaDA(config).apply({"params": params}, TOKENS, MASK)


def _lora_params(config, base, seed=2, b_scale=0.0):
    """Base params plus adapters; lora_b random (scaled by b_scale) so they change the output."""
    abstract = jax.tree_util.tree_map(lambda x: x, jax.eval_shape(lambda: llada.init_params(config, jax.random.key(0))))
    params = adapters.conform_params(base, abstract, jax.random.key(seed))
    if b_scale:
        flat = flatten_dict(params)
        for i, path in enumerate(k for k in flat if k[-1] == adapters.LORA_B):
            flat[path] = jax.random.normal(jax.random.key(100 + i), flat[path].shape) * b_scale
        from flax.traverse_util import unflatten_dict
        params = unflatten_dict(flat)
    return params


def test_adapters_sit_on_the_attention_and_mlp_projections_by_default():
    lora = LM.replace(lora_rank=4)
    flat = flatten_dict(jax.eval_shape(lambda: llada.init_params(lora, jax.random.key(0))))
    with_adapters = sorted("/".join(k[:-1]) for k in flat if k[-1] == "lora_a")
    assert with_adapters == sorted(
        [f"layers/attn/{p}_proj" for p in "qkvo"] + [f"layers/mlp/{p}_proj" for p in ("gate", "up", "down")])
    assert flat[("layers", "attn", "o_proj", "lora_a")].shape == (LM.num_layers, LM.num_heads, LM.head_dim, 4)
    assert flat[("layers", "attn", "o_proj", "lora_b")].shape == (LM.num_layers, 4, LM.hidden_size)
    only_q = LM.replace(lora_rank=4, lora_targets=r"q_proj/kernel$|lm_head")
    flat = flatten_dict(jax.eval_shape(lambda: llada.init_params(only_q, jax.random.key(0))))
    assert sorted("/".join(k[:-1]) for k in flat if k[-1] == "lora_b") == ["layers/attn/q_proj", "lm_head"]


def test_fresh_adapters_leave_the_model_exactly_unchanged():
    base = llada.init_params(LM, jax.random.key(0))
    lora = LM.replace(lora_rank=4, lora_alpha=8.0)
    params = _lora_params(lora, base)
    assert np.abs(np.asarray(params["layers"]["attn"]["q_proj"]["lora_a"])).max() > 0  # A random, B zero
    np.testing.assert_array_equal(np.asarray(_logits(lora, params)), np.asarray(_logits(LM, base)))


def test_merged_and_unmerged_adapters_give_the_same_logits():
    base = llada.init_params(LM, jax.random.key(0))
    lora = LM.replace(lora_rank=4, lora_alpha=8.0, lora_targets=llada.DEFAULT_LORA_TARGETS + "|lm_head")
    params = _lora_params(lora, base, b_scale=0.05)
    unmerged = np.asarray(_logits(lora, params))
    assert np.abs(unmerged - np.asarray(_logits(LM, base))).max() > 1e-2  # the adapters do something
    merged_params = adapters.merge_adapters(params, lora.lora_alpha / lora.lora_rank)
    assert jax.tree_util.tree_structure(merged_params) == jax.tree_util.tree_structure(base)
    merged = np.asarray(_logits(LM, merged_params))
    assert np.abs(merged - unmerged).max() <= 1e-5 * np.abs(unmerged).max()


@pytest.mark.parametrize("quant, tolerance", [("int8", 0.02), ("int4", 0.3)])
def test_weight_only_quantization_stays_close_to_the_float_model(quant, tolerance):
    base = llada.init_params(LM, jax.random.key(0))
    qcfg = LM.replace(weight_quant=quant)
    abstract = jax.eval_shape(lambda: llada.init_params(qcfg, jax.random.key(0)))
    params = adapters.conform_params(base, abstract)
    q = params["layers"]["mlp"]["up_proj"]
    assert q["kernel"].dtype == jnp.dtype(quant) and q["kernel_scale"].shape == (LM.num_layers, 1, LM.mlp_hidden_size)
    assert params["lm_head"]["kernel"].dtype == jnp.dtype(quant)
    embedding = params["embed_tokens"]  # quantized per row
    assert embedding["embedding"].dtype == jnp.dtype(quant) and embedding["embedding_scale"].shape == (256, 1)
    ref, out = np.asarray(_logits(LM, base)), np.asarray(_logits(qcfg, params))
    relative = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 0 < relative < tolerance, relative
    # The stored integers and scales reproduce the kernel to half a quantization step.
    w = np.asarray(base["layers"]["mlp"]["up_proj"]["kernel"])
    deq = np.asarray(adapters.dequantize_kernel(q["kernel"], q["kernel_scale"]))
    assert np.all(np.abs(deq - w) <= np.asarray(q["kernel_scale"]) * 0.5 + 1e-7)


def test_adapters_on_a_quantized_base_merge_like_on_the_dequantized_one():
    base = llada.init_params(LM, jax.random.key(0))
    qlora = LM.replace(weight_quant="int8", lora_rank=4)
    params = _lora_params(qlora, base, b_scale=0.05)
    merged = adapters.merge_adapters(params, qlora.lora_alpha / qlora.lora_rank)
    out, ref = np.asarray(_logits(qlora, params)), np.asarray(_logits(LM, merged))
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_projector_can_be_stored_apart_from_the_lm():
    cfg = medv.MEDV_PRESETS["medv_tiny"]
    cfg = cfg.replace(lm=cfg.lm.replace(param_dtype="bfloat16", lora_rank=2), projector_param_dtype="float32")
    flat = flatten_dict(jax.eval_shape(lambda: medv.init_params(cfg, jax.random.key(0))))
    assert all(v.dtype == jnp.float32 for k, v in flat.items() if k[0] == "projector")
    assert flat[("lm", "layers", "attn", "q_proj", "kernel")].dtype == jnp.bfloat16
    assert flat[("lm", "layers", "attn", "q_proj", "lora_a")].dtype == jnp.float32
