"""layers.FlatDense: the same parameters and outputs as flax's Dense / DenseGeneral."""
import flax.linen as nn
import jax
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
