"""Device mesh and the one table mapping logical axis names to mesh axes (the ZeRO-3 replacement).

Parameters carry logical axis names (``embed``, ``heads``, ``mlp``, ``vocab``, ``layers``...) from
their initializers. ``LOGICAL_AXIS_RULES`` maps them onto the mesh axes ``data``, ``fsdp`` and
``tensor``: parameters (and so gradients and optimizer state, which share their shardings) are
split along ``fsdp``; activations' batch axis along ``data`` x ``fsdp``.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    # The input embedding table keeps its vocab rows whole: with rows over `tensor` and columns
    # over `fsdp`, XLA's partitioned gather dropped the gradient of the last row of a vocab shard
    # (jax/jaxlib 0.10.2, CPU; caught by tests/train/test_step.py). The head still splits vocab.
    ("embed_vocab", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("vit_embed", "fsdp"),
    ("vit_heads", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_patches", None),
)


def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when launched on several hosts (a coordinator is named in
    the environment, as on SLURM, TPU pods or with JAX_COORDINATOR_ADDRESS); no-op otherwise."""
    markers = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
    if any(os.environ.get(m) for m in markers) and jax.process_count() == 1:
        try:
            jax.distributed.initialize()
        except (RuntimeError, ValueError) as e:  # single-host SLURM job, already initialised...
            print(f"jax.distributed.initialize() skipped: {e}")


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one entry may be -1 (the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _spec_for(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh, rules) -> PartitionSpec:
    """Mesh spec for one array; a dimension its mesh axes do not divide stays replicated."""
    table = dict(rules)
    out, used = [], set()
    for name, dim in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """``NamedSharding`` for every leaf of a boxed abstract param tree (its logical names)."""
    specs = nn.get_partition_spec(abstract_boxed)
    shapes = nn.unbox(abstract_boxed)
    return jax.tree_util.tree_map(
        lambda spec, a: NamedSharding(mesh, _spec_for(spec, a.shape, mesh, rules)),
        specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's slice of the global batch -> global arrays sharded on the batch axes
    (``jax.make_array_from_process_local_data``; on one host it is the whole batch)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in local.items()
    }
