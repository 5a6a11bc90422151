"""Pieces shared by every model file: dtypes, attention, layer scanning and remat policies.

Every parameter is created with logical axis names (``nn.with_logical_partitioning``) so that one
table in ``medv_jax.sharding`` maps them onto mesh axes; without such a table in context the names
are inert and the params are plain arrays after ``nn.unbox``. Activations name their axes the same
way through ``constrain``, which lays them out on a mesh while ``activation_sharding`` is active
(the train step is traced inside it) and does nothing otherwise.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from medv_jax import sharding as shd

Array = jax.Array

# (mesh, logical-axis rules) while a program that lays out its activations is traced. Flax's own
# rules context is not used for this: under it flax also re-applies the parameter boxes'
# constraints inside nn.scan, with DenseGeneral kernels' pre-reshape rank, and fails.
_ACTIVATION_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("activation_layout", default=None)


@contextlib.contextmanager
def activation_sharding(mesh, rules=shd.LOGICAL_AXIS_RULES) -> Iterator[None]:
    """Within this context ``constrain`` places activations on ``mesh`` by ``rules``."""
    token = _ACTIVATION_LAYOUT.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_LAYOUT.reset(token)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """``x`` laid out by the logical axis ``names`` (a dimension its mesh axes do not divide stays
    whole), when traced inside ``activation_sharding``; ``x`` unchanged otherwise."""
    layout = _ACTIVATION_LAYOUT.get()
    if layout is None:
        return x
    mesh, rules = layout
    spec = shd.spec_for(jax.sharding.PartitionSpec(*names), x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

# Remat policies by name (MaxText style). "none" keeps every activation; "full" recomputes the
# whole layer in the backward pass; the "dots" variants keep matmul outputs only.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "per_head")
ATTENTION_CHOICES = ATTENTION_IMPLEMENTATIONS[1:]  # the ones a command line names (None = the default)


def to_dtype(name: str | Any) -> jnp.dtype:
    """Config dtypes are strings (so configs serialise to JSON); resolve them here."""
    return jnp.dtype(name)


def check_choice(value: Any, choices: Sequence[Any], field: str) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {list(choices)}")


def param_init(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """An initializer that tags its parameter with logical axis names."""
    return nn.with_logical_partitioning(init, names)


def normal_init(std: float, names: tuple[str | None, ...]) -> Callable:
    """N(0, std^2), tagged with logical axis names (the models' weight and embedding init)."""
    return param_init(nn.initializers.normal(stddev=std), names)


WEIGHT_QUANT = ("none", "int8", "int4")  # weight-only quantization of the LM's dense kernels
QUANT_DTYPES = {"int8": jnp.int8, "int4": jnp.int4}


class FlatDense(nn.Module):
    """A dense layer contracting the last ``in_axes`` axes of ``x`` into ``features`` (an int or a
    tuple: the kernel is ``x.shape[-in_axes:] + features``), computed as one 2-D matmul.

    Same parameters as ``nn.Dense`` / ``nn.DenseGeneral`` (names ``kernel``, ``bias``; shapes;
    initialisers), but the leading axes are flattened first: XLA:CPU computes the weight gradient
    of a ``[B, T, D] x [D, F]`` dot_general about 2x slower than that of the same product written
    as ``[B*T, D] x [D, F]`` (benchmarks/RESULTS.md, "Training step"); on GPU/TPU the two are
    the same program.

    ``weight_quant`` "int8" / "int4": the kernel is stored as symmetric integers with one float32
    scale per output channel (``kernel_scale``, shape ``(1,) * in_axes + features``); the scale is
    applied to the matmul's output, so the result equals ``x @ (kernel * kernel_scale)``.
    ``lora_rank`` > 0 adds a low-rank adapter ``x @ lora_a @ lora_b * lora_alpha / lora_rank``
    (``lora_a``: ``in_shape + (rank,)``, random; ``lora_b``: ``(rank,) + features``, zero, so a
    fresh adapter leaves the layer unchanged), kept in ``adapter_dtype``; with ``lora_dropout``
    its input is dropped out when a "dropout" rng is given (training).
    """

    features: int | tuple[int, ...]
    in_axes: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    weight_quant: str = "none"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    adapter_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [..., *in] -> [..., *features]
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = tuple(x.shape[-self.in_axes:])
        lead = x.shape[: x.ndim - self.in_axes]
        n_in, n_out = math.prod(in_shape), math.prod(features)
        x2 = x.astype(self.dtype).reshape((-1, n_in))
        if self.weight_quant == "none":
            kernel = self.param("kernel", self.kernel_init, in_shape + features, self.param_dtype)
            y = jnp.dot(x2, kernel.astype(self.dtype).reshape((n_in, n_out)))
        else:
            check_choice(self.weight_quant, WEIGHT_QUANT, "weight_quant")
            names = _axis_names(self.kernel_init)
            kernel = self.param("kernel", _tagged(nn.initializers.zeros, names), in_shape + features,
                                QUANT_DTYPES[self.weight_quant])
            scale_names = None if names is None else (None,) * self.in_axes + tuple(names[self.in_axes:])
            scale = self.param("kernel_scale", _tagged(nn.initializers.ones, scale_names),
                               (1,) * self.in_axes + features, jnp.float32)
            y = jnp.dot(x2, kernel.astype(self.dtype).reshape((n_in, n_out)))
            y = y * scale.reshape((n_out,)).astype(self.dtype)
        if self.lora_rank:
            names = _axis_names(self.kernel_init)
            a_names = None if names is None else tuple(names[: self.in_axes]) + (None,)
            b_names = None if names is None else (None,) + tuple(names[self.in_axes:])
            lora_a = self.param("lora_a", _tagged(nn.initializers.normal(n_in**-0.5), a_names),
                                in_shape + (self.lora_rank,), self.adapter_dtype)
            lora_b = self.param("lora_b", _tagged(nn.initializers.zeros, b_names),
                                (self.lora_rank,) + features, self.adapter_dtype)
            h = x2
            if self.lora_dropout > 0 and self.has_rng("dropout"):
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.lora_dropout, h.shape)
                h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0).astype(h.dtype)
            low = jnp.dot(h, lora_a.astype(self.dtype).reshape((n_in, self.lora_rank)))
            up = jnp.dot(low, lora_b.astype(self.dtype).reshape((self.lora_rank, n_out)))
            y = y + up * jnp.asarray(self.lora_alpha / self.lora_rank, self.dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, features, self.param_dtype)
            y = y + bias.astype(self.dtype).reshape((n_out,))
        return y.reshape(lead + features)


class QuantizedEmbed(nn.Module):
    """An embedding table stored as symmetric integers with one float32 scale per row
    (``embedding``: ``[num_embeddings, features]`` integers, ``embedding_scale``:
    ``[num_embeddings, 1]``); a lookup gathers the rows and their scales only."""

    num_embeddings: int
    features: int
    weight_quant: str
    dtype: Any = jnp.float32
    names: tuple[str | None, ...] = ("embed_vocab", "embed")

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        table = self.param("embedding", param_init(nn.initializers.zeros, self.names),
                           (self.num_embeddings, self.features), QUANT_DTYPES[self.weight_quant])
        scale = self.param("embedding_scale", param_init(nn.initializers.ones, (self.names[0], None)),
                           (self.num_embeddings, 1), jnp.float32)
        rows = jnp.take(table, tokens, axis=0).astype(self.dtype)
        return rows * jnp.take(scale, tokens, axis=0).astype(self.dtype)


def _axis_names(init: Callable) -> tuple[str | None, ...] | None:
    """The logical axis names a ``param_init`` initializer tags its parameter with (None if untagged).

    nn.with_logical_partitioning returns a plain function, so the names are read off one call on
    abstract shapes (nothing is allocated)."""
    try:
        boxed = jax.eval_shape(lambda: init(jax.random.key(0), (1,) * 8))
    except Exception:  # noqa: BLE001 - an untagged or rank-specific initializer
        return None
    return tuple(boxed.names) if isinstance(boxed, nn.LogicallyPartitioned) else None


def _tagged(init: Callable, names: tuple[str | None, ...] | None) -> Callable:
    return init if names is None else param_init(init, names)


def attention(
    q: Array,  # [batch, q_len, heads, head_dim]
    k: Array,  # [batch, kv_len, kv_heads, head_dim]
    v: Array,  # [batch, kv_len, kv_heads, head_dim]
    key_mask: Array | None,  # [batch, kv_len] bool, True = attend
    implementation: str | None,
) -> Array:  # [batch, q_len, heads, head_dim]
    """Bidirectional scaled dot-product attention with an optional key-padding mask.

    ``implementation``: "cudnn" / "xla" are passed to ``jax.nn.dot_product_attention`` (cuDNN flash
    attention on GPU; JAX's portable einsum form); "per_head" is ``attention_per_head``; None
    picks "per_head" on CPU (1.1-1.7x faster there, forward and backward: benchmarks/RESULTS.md)
    and lets JAX choose elsewhere.
    """
    check_choice(implementation, ATTENTION_IMPLEMENTATIONS, "attention_impl")
    if implementation == "per_head" or (implementation is None and jax.default_backend() == "cpu"):
        return attention_per_head(q, k, v, key_mask)
    mask = None if key_mask is None else key_mask[:, None, None, :].astype(jnp.bool_)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=q.shape[-1] ** -0.5, implementation=implementation
    )


def attention_per_head(q: Array, k: Array, v: Array, key_mask: Array | None) -> Array:
    """``attention`` written as one pair of 3-D matmuls per head (shapes as ``attention``), with
    the softmax normalisation applied after the value product.

    The same math and precisions as JAX's einsum form (logits and softmax in fp32, probabilities
    cast to the value dtype, masked keys at a large finite negative so a row with no valid key
    attends uniformly; fp32 results agree to ~1e-6, not bit for bit), but XLA:CPU runs it 1.1-1.7x
    faster: the [batch, heads, q, kv] form makes it copy the
    probabilities between layouts, and normalising the [q, head_dim] output instead of the
    [q, kv] probabilities saves a pass over the largest tensor.
    """
    groups = q.shape[2] // k.shape[2]  # grouped-query attention: heads per key/value head
    scale = q.shape[-1] ** -0.5
    large_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
    outputs = []
    for h in range(q.shape[2]):
        k_h, v_h = k[:, :, h // groups], v[:, :, h // groups]  # [B, T, Dh]
        logits = jnp.einsum("bsd,btd->bst", q[:, :, h], k_h, preferred_element_type=jnp.float32) * scale
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, :], logits, large_negative)
        weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, S, T] unnormalised
        out = jnp.einsum("bst,btd->bsd", weights.astype(v.dtype), v_h, preferred_element_type=jnp.float32)
        outputs.append((out / jnp.sum(weights, axis=-1, keepdims=True)).astype(q.dtype))
    return jnp.stack(outputs, axis=2)


def scan_layers(
    block: type[nn.Module], num_layers: int, remat_policy: str, in_axes: Any = nn.broadcast,
    unroll: bool = False, **block_kwargs
):
    """Repeat ``block`` ``num_layers`` times under ``nn.scan`` (params stacked on a leading
    "layers" axis), rematerialised by the named policy. Returns the module instance.

    ``unroll``: the layers as straight-line code instead of a loop (same parameters, same math).
    A loop makes XLA slice each layer's weights out of the stacks and write each layer's
    activations into stacked buffers for the backward pass; for a few small layers on CPU that
    bookkeeping costs a sixth to a fifth of a train step (benchmarks/RESULTS.md, "Training step").
    Compile time and program size grow with depth, so large models keep the loop.

    The block is called as ``block(x, *args) -> (x, per_layer_output)``; ``in_axes`` says which
    args every layer sees whole (``nn.broadcast``, the default for all) and which are sliced on
    their leading layer axis (0), as a tuple with one entry per arg.
    """
    check_choice(remat_policy, list(REMAT_POLICIES), "remat_policy")
    if remat_policy != "none":
        # prevent_cse=False is safe (and faster) under scan, which already blocks CSE across steps.
        block = nn.remat(block, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=num_layers,
        unroll=num_layers if unroll else 1,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(**block_kwargs)


def count_params(tree: Any) -> int:
    """Number of scalars in a (possibly abstract, possibly boxed) parameter tree."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(nn.unbox(tree)))
