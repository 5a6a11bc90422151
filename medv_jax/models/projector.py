"""The LLaVA "mlp2x_gelu" projector: Linear -> exact (erf) GELU -> Linear, with biases.

Parameter tree: ``fc1/{kernel [Dv, D], bias [D]}``, ``fc2/{kernel [D, D], bias [D]}``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from medv_jax.models import layers
from medv_jax.models.layers import Array


class Projector(nn.Module):
    """vision features ``[..., Dv]`` -> language-model embeddings ``[..., D]``."""

    out_features: int
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    init_std: float = 0.02  # normal init of both kernels (the MedV model passes the LM's)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def dense(names, name):
            return layers.FlatDense(
                self.out_features,
                dtype=layers.to_dtype(self.dtype),
                param_dtype=layers.to_dtype(self.param_dtype),
                kernel_init=layers.normal_init(self.init_std, names),
                bias_init=layers.param_init(nn.initializers.zeros, names[1:]),
                name=name,
            )

        # The reference uses torch.nn.GELU() (erf form), not the tanh form of the vision tower.
        h = nn.gelu(dense(("vit_embed", "mlp"), "fc1")(x), approximate=False)
        return dense(("mlp", "embed"), "fc2")(h)
