"""LLaDA parity against transformers' LlamaForCausalLM (bidirectional mask) on random weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medv_jax import checkpoint
from medv_jax.models import llada
from tests import hf_checkpoints as hf
from tools.convert_weights import convert_params, import_checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return folder, hf.make_llama(folder)


def _tokens(batch, length, seed=0):
    return np.random.RandomState(seed).randint(0, hf.LM_DIMS["vocab_size"], size=(batch, length))


def test_logits_match_transformers(llama):
    folder, torch_model = llama
    config, params = convert_params(folder)
    tokens = _tokens(2, 11)
    out = llada.LLaDA(config).apply({"params": params}, tokens)
    hf.assert_rel_close(out, hf.llama_logits(torch_model, tokens), what="logits")


def test_key_padding_matches_and_padding_does_not_leak(llama):
    folder, torch_model = llama
    config, params = convert_params(folder)
    tokens = _tokens(2, 12, seed=1)
    key_mask = np.ones((2, 12), bool)
    key_mask[1, :4] = False  # left padding on row 1
    model = llada.LLaDA(config)
    out = np.asarray(model.apply({"params": params}, tokens, key_mask=key_mask))
    ref = hf.llama_logits(torch_model, tokens, key_mask=key_mask)
    hf.assert_rel_close(out[:, 4:], ref[:, 4:], what="padded logits")
    # The padded row equals the same row without its padding.
    alone = np.asarray(model.apply({"params": params}, tokens[1:, 4:]))
    hf.assert_rel_close(out[1, 4:], alone[0], what="row alone")


def test_logits_slice_equals_full_logits(llama):
    folder, _ = llama
    config, params = convert_params(folder)
    model = llada.LLaDA(config)
    tokens = _tokens(2, 10, seed=2)
    embeds = model.apply({"params": params}, tokens, method=llada.LLaDA.embed)
    full = model.apply({"params": params}, tokens)
    sliced = jax.jit(
        lambda p, e, s: model.apply({"params": p}, e, None, None, s, 3, method=llada.LLaDA.forward_embeds)
    )(params, embeds, jnp.int32(5))
    assert sliced.shape == (2, 3, config.vocab_size)
    np.testing.assert_array_equal(np.asarray(sliced), np.asarray(full)[:, 5:8])


def test_olmo_names_convert_to_identical_params(llama, tmp_path):
    folder, torch_model = llama
    hf.write_olmo_copy(tmp_path / "olmo", torch_model)
    config_llama, params_llama = convert_params(folder)
    config_olmo, params_olmo = convert_params(tmp_path / "olmo")
    # Architecture fields agree; the two config.json files record different special ids/lengths.
    ignore = dict(max_position_embeddings=0, eos_token_id=0, mask_token_id=0)
    assert config_olmo.replace(**ignore) == config_llama.replace(**ignore)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_olmo, params_llama)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_bf16_compute_with_fp32_params_and_remat(llama, remat):
    folder, torch_model = llama
    config, params = convert_params(folder)
    tokens = _tokens(1, 8, seed=3)
    config = config.replace(dtype="bfloat16", remat_policy=remat)
    model = llada.LLaDA(config)
    out = model.apply({"params": params}, tokens)
    assert out.dtype == jnp.float32 and params["lm_head"]["kernel"].dtype == np.float32
    ref = hf.llama_logits(torch_model, tokens)
    # bf16 compute is approximate: close, not exact.
    hf.assert_rel_close(out, ref, tol=5e-2, what="bf16 logits")
    loss = lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)
    grads = jax.grad(loss)(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_load_pretrained_round_trip(llama, tmp_path):
    folder, torch_model = llama
    import_checkpoint(folder, tmp_path / "ckpt")
    config, params = checkpoint.load_pretrained(tmp_path / "ckpt")
    assert isinstance(config, llada.LLaDAConfig)
    tokens = _tokens(1, 7, seed=4)
    hf.assert_rel_close(llada.LLaDA(config).apply({"params": params}, tokens),
                        hf.llama_logits(torch_model, tokens), what="loaded logits")


def test_rope_theta_is_read_from_config(tmp_path):
    torch_model = hf.make_llama(tmp_path, seed=5, rope_theta=10000.0)
    config, params = convert_params(tmp_path)
    assert config.rope_theta == 10000.0
    tokens = _tokens(1, 9, seed=6)
    hf.assert_rel_close(llada.LLaDA(config).apply({"params": params}, tokens),
                        hf.llama_logits(torch_model, tokens), what="theta 1e4 logits")
