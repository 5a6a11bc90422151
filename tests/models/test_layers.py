"""layers.FlatDense: the same parameters and outputs as flax's Dense / DenseGeneral; the per-head
attention: the same outputs and gradients as JAX's own dot_product_attention."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medv_jax.models import layers


@pytest.mark.parametrize("features, in_axes, use_bias, x_shape", [
    (24, 1, True, (2, 5, 16)),  # nn.Dense
    ((3, 8), 1, False, (2, 5, 16)),  # DenseGeneral to (heads, head_dim)
    (16, 2, True, (2, 5, 3, 8)),  # DenseGeneral over (heads, head_dim)
    (7, 1, True, (16,)),  # no leading axes
])
def test_flat_dense_equals_dense_general(features, in_axes, use_bias, x_shape):
    x = np.random.RandomState(0).randn(*x_shape).astype(np.float32)
    flat = layers.FlatDense(features, in_axes=in_axes, use_bias=use_bias, bias_init=nn.initializers.normal(1.0))
    general = nn.DenseGeneral(features, axis=tuple(range(-in_axes, 0)), use_bias=use_bias,
                              bias_init=nn.initializers.normal(1.0))
    params = flat.init(jax.random.key(1), x)
    reference_params = general.init(jax.random.key(1), x)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, reference_params)
    out = flat.apply(params, x)
    np.testing.assert_allclose(out, general.apply(params, x), rtol=1e-5, atol=1e-6)
    # The gradient (the reason for the 2-D form) agrees too.
    g_flat = jax.grad(lambda p: (flat.apply(p, x) ** 2).sum())(params)
    g_ref = jax.grad(lambda p: (general.apply(p, x) ** 2).sum())(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g_flat, g_ref)


@pytest.mark.parametrize("batch, q_len, kv_len, heads, kv_heads", [
    (2, 7, 7, 4, 4),  # self-attention
    (3, 5, 11, 4, 2),  # a span over a longer cache, grouped-query heads
    (1, 9, 9, 2, 1),  # multi-query
])
@pytest.mark.parametrize("masked", [False, True])
def test_per_head_attention_equals_jax_attention(batch, q_len, kv_len, heads, kv_heads, masked):
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(batch, q_len, heads, 8), jnp.float32) * 2
    k = jnp.asarray(rng.randn(batch, kv_len, kv_heads, 8), jnp.float32) * 2
    v = jnp.asarray(rng.randn(batch, kv_len, kv_heads, 8), jnp.float32)
    key_mask = None
    if masked:  # ragged left padding; the last row has no valid key at all (a filler row)
        key_mask = jnp.arange(kv_len)[None, :] >= jnp.arange(batch)[:, None] * 2
        key_mask = key_mask.at[-1].set(False)

    def run(impl):
        return lambda q, k, v: layers.attention(q, k, v, key_mask, impl)

    out = run("per_head")(q, k, v)
    reference = run("xla")(q, k, v)
    assert out.shape == reference.shape == (batch, q_len, heads, 8)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
    grads = jax.grad(loss(run("per_head")), argnums=(0, 1, 2))(q, k, v)
    reference_grads = jax.grad(loss(run("xla")), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, reference_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_per_head_attention_in_bfloat16_stays_close():
    rng = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rng.randn(2, 16, 4, 32), jnp.bfloat16) for _ in range(3))
    out = layers.attention(q, k, v, None, "per_head")
    assert out.dtype == jnp.bfloat16
    reference = layers.attention(q, k, v, None, "xla").astype(jnp.float32)
    np.testing.assert_allclose(out.astype(jnp.float32), reference, atol=2e-2)


def test_default_attention_is_per_head_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the default differs by backend")
    rng = np.random.RandomState(2)
    q = jnp.asarray(rng.randn(1, 6, 2, 8), jnp.float32)
    hlo_default = jax.jit(lambda q: layers.attention(q, q, q, None, None)).lower(q).as_text()
    hlo_per_head = jax.jit(lambda q: layers.attention(q, q, q, None, "per_head")).lower(q).as_text()
    assert hlo_default == hlo_per_head


def test_unknown_attention_implementation_is_rejected():
    q = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        layers.attention(q, q, q, None, "flash")
