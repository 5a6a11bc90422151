"""Parameter-tree operations for LoRA adapters and weight-only quantization (``FlatDense``'s
``lora_a`` / ``lora_b`` / ``kernel_scale`` leaves): building the tree a configured model expects
from a plain checkpoint, merging adapters into their kernels, and quantizing kernels.

Trees are nested dicts of arrays keyed as the models' parameter trees; a kernel's leading
"layers" axis (the scan) is handled by shapes alone: quantization scales keep the kernel's rank with
size 1 on the contracted axes, and an adapter pair is contracted over its rank axis only.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from medv_jax.models import layers

LORA_A, LORA_B, KERNEL_SCALE = "lora_a", "lora_b", "kernel_scale"
# Quantized weights and the name of their scales (dense kernels, the token embedding).
SCALE_OF = {"kernel": KERNEL_SCALE, "embedding": "embedding_scale"}
SCALES = set(SCALE_OF.values())
QUANT_MAX = {"int8": 127, "int4": 7}


def quantize_kernel(kernel: jax.Array, scale_shape: tuple[int, ...], quant: str) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-output-channel quantization: ``(integers, float32 scale)`` with
    ``integers * scale ~= kernel``; ``scale_shape`` has the kernel's rank with 1 on every axis the
    absolute maximum is taken over (the contracted ones)."""
    w = jnp.asarray(kernel, jnp.float32)
    axes = tuple(i for i, (k, s) in enumerate(zip(w.shape, scale_shape)) if s == 1 and k != 1)
    top = QUANT_MAX[quant]
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / top
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w / scale), -top, top).astype(layers.QUANT_DTYPES[quant])
    return q, scale.reshape(scale_shape)


def dequantize_kernel(q: jax.Array, scale: jax.Array) -> jax.Array:
    return q.astype(jnp.float32) * scale.astype(jnp.float32)


def adapter_delta(lora_a: jax.Array, lora_b: jax.Array, kernel_shape: tuple[int, ...], scaling: float) -> jax.Array:
    """``lora_a @ lora_b * scaling`` in the kernel's shape (float32). ``lora_a`` is
    ``lead + in + (r,)``, ``lora_b`` ``lead + (r,) + features``; ``lead`` (the scanned layers) is
    the longest common prefix of the two and of the kernel."""
    a, b = jnp.asarray(lora_a, jnp.float32), jnp.asarray(lora_b, jnp.float32)
    n_lead = a.ndim - 1 - (len(kernel_shape) - (b.ndim - 1))  # kernel = lead + in + features
    lead = a.shape[:n_lead]
    rank = a.shape[-1]
    a2 = a.reshape(lead + (-1, rank))
    b2 = b.reshape(lead + (rank, -1))
    return (jnp.matmul(a2, b2) * scaling).reshape(kernel_shape)


def _module_groups(flat: dict[tuple, Any]) -> dict[tuple, dict[str, Any]]:
    modules: dict[tuple, dict[str, Any]] = {}
    for path, value in flat.items():
        modules.setdefault(path[:-1], {})[path[-1]] = value
    return modules


def merge_adapters(params: dict, scaling: float) -> dict:
    """The plain tree: every adapter pair folded into its kernel (``kernel + lora_a @ lora_b *
    scaling``, quantized kernels dequantized first), in float32 for the merged kernels; leaves
    without adapters or quantization are returned as they are."""
    out = {}
    for module, leaves in _module_groups(flatten_dict(params)).items():
        leaves = dict(leaves)
        for weight, scale in SCALE_OF.items():
            if scale in leaves:
                leaves[weight] = dequantize_kernel(leaves[weight], leaves.pop(scale))
        if LORA_A in leaves:
            a, b = leaves.pop(LORA_A), leaves.pop(LORA_B)
            kernel = jnp.asarray(leaves["kernel"], jnp.float32)
            leaves["kernel"] = kernel + adapter_delta(a, b, kernel.shape, scaling)
        out.update({module + (name,): value for name, value in leaves.items()})
    return unflatten_dict(out)


def adapter_leaves(params: dict) -> dict:
    """Only the adapter tensors of ``params`` (same nesting)."""
    return unflatten_dict({k: v for k, v in flatten_dict(params).items() if k[-1] in (LORA_A, LORA_B)})


def conform_params(params: dict, abstract: dict, rng: jax.Array | None = None) -> dict:
    """The tree ``abstract`` (unboxed ``ShapeDtypeStruct`` leaves of the configured model) describes,
    from ``params``: leaves present in both are cast to the abstract dtype; float kernels the
    model stores quantized are quantized (their ``kernel_scale`` computed); adapters missing from
    ``params`` start fresh (``lora_a`` ~ N(0, 1/fan_in), ``lora_b`` = 0, so the model's output is
    unchanged). Any other missing or extra leaf is an error. Traceable: under ``jax.jit`` with
    ``out_shardings`` it builds the tree straight into its shards."""
    flat_in, flat_abs = flatten_dict(params), flatten_dict(abstract)
    extra = [k for k in flat_in if k not in flat_abs and k[-1] not in (LORA_A, LORA_B)]
    if extra:
        raise ValueError(f"parameters the model does not have: {['/'.join(map(str, k)) for k in extra[:5]]}")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    out = {}
    for i, (path, leaf) in enumerate(sorted(flat_abs.items())):
        name = path[-1]
        if name in SCALES:
            continue
        if path in flat_in and name in SCALE_OF and jnp.issubdtype(leaf.dtype, jnp.integer) \
                and not jnp.issubdtype(flat_in[path].dtype, jnp.integer):
            scale_path = path[:-1] + (SCALE_OF[name],)
            quant = next(q for q, d in layers.QUANT_DTYPES.items() if jnp.dtype(d) == leaf.dtype)
            q, scale = quantize_kernel(flat_in[path], flat_abs[scale_path].shape, quant)
            out[path] = q
            out[scale_path] = scale
        elif path in flat_in:
            out[path] = jnp.asarray(flat_in[path]).astype(leaf.dtype)
            scale_path = path[:-1] + (SCALE_OF.get(name, KERNEL_SCALE),)
            if name in SCALE_OF and scale_path in flat_abs:
                if scale_path not in flat_in:
                    raise ValueError(f"{'/'.join(map(str, path))}: integer weights without their scale")
                out[scale_path] = jnp.asarray(flat_in[scale_path], jnp.float32)
        elif name == LORA_A:
            fan_in = int(np.prod(leaf.shape[:-1])) // _lead_size(flat_abs, path)
            value = jax.random.normal(jax.random.fold_in(rng, i), leaf.shape, jnp.float32) * fan_in**-0.5
            out[path] = value.astype(leaf.dtype)
        elif name == LORA_B:
            out[path] = jnp.zeros(leaf.shape, leaf.dtype)
        else:
            raise ValueError(f"missing parameter {'/'.join(map(str, path))}")
    return unflatten_dict(out)


def _lead_size(flat_abs: dict, a_path: tuple) -> int:
    """Product of the leading (scanned layer) axes of an adapter's kernel."""
    kernel = flat_abs[a_path[:-1] + ("kernel",)]
    b = flat_abs[a_path[:-1] + (LORA_B,)]
    a = flat_abs[a_path]
    n_lead = a.ndim - 1 - (kernel.ndim - (b.ndim - 1))
    return int(np.prod(a.shape[:n_lead])) if n_lead else 1
