"""Device mesh and the one table mapping logical axis names to mesh axes (the ZeRO-3 replacement).

Parameters carry logical axis names (``embed``, ``heads``, ``mlp``, ``vocab``, ``layers``...) from
their initializers. ``LOGICAL_AXIS_RULES`` maps them onto the mesh axes ``data``, ``fsdp`` and
``tensor``: parameters (and so gradients and optimizer state, which share their shardings) are
split along ``fsdp``; activations' batch axis along ``data`` x ``fsdp``.
"""
from __future__ import annotations

import errno
import os
import socket
import sys
import threading
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


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
    """``config.sharding_rules`` (pairs of a logical name and a mesh axis, a tuple of mesh axes or
    None) as the rules tuple; an unknown mesh axis is an error naming the rule."""
    out = []
    for rule in rules:
        name, axes = rule
        for axis in (axes,) if isinstance(axes, str) else tuple(axes or ()):
            if axis not in MESH_AXES:
                raise ValueError(f"config.sharding_rules: {name!r} -> {axes!r}: mesh axes are {MESH_AXES}")
        out.append((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


class DistributedSetupError(RuntimeError):
    """A multi-process run that cannot start; the message is one line naming the setting to fix."""


# Read by `maybe_initialize_distributed` (JAX itself reads only JAX_COORDINATOR_ADDRESS of these).
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
JOIN_TIMEOUT_ENV = "MEDV_DISTRIBUTED_TIMEOUT"  # seconds for every process to join (default 300)
HEARTBEAT_TIMEOUT_ENV = "MEDV_HEARTBEAT_TIMEOUT"  # seconds before a silent peer ends the run (default 100)
_CLUSTER_MARKERS = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _env_int(environ, name: str, default: int | None, minimum: int) -> int | None:
    raw = environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise DistributedSetupError(f"{name}={raw!r}: give an integer >= {minimum}")
    return value


def distributed_settings(environ=None) -> dict[str, Any] | None:
    """The ``jax.distributed.initialize`` arguments the environment asks for; None for one process.

    Explicit: JAX_COORDINATOR_ADDRESS=host:port with JAX_NUM_PROCESSES and JAX_PROCESS_ID (any
    launcher, e.g. the local one in docs/multihost.md). Detected by JAX: SLURM, TPU pods (then the
    coordinator and ids come from the cluster). Bad values raise DistributedSetupError."""
    environ = os.environ if environ is None else environ
    address = environ.get("JAX_COORDINATOR_ADDRESS", "")
    count = _env_int(environ, NUM_PROCESSES_ENV, None, 1)
    pid = _env_int(environ, PROCESS_ID_ENV, None, 0)
    timeouts = dict(initialization_timeout=_env_int(environ, JOIN_TIMEOUT_ENV, 300, 1),
                    heartbeat_timeout_seconds=_env_int(environ, HEARTBEAT_TIMEOUT_ENV, 100, 1))
    if (count is None) != (pid is None):
        raise DistributedSetupError(f"set both {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}, or neither")
    if count is not None:
        if pid >= count:
            raise DistributedSetupError(f"{PROCESS_ID_ENV}={pid} is out of range for {NUM_PROCESSES_ENV}={count} "
                                        f"(ids are 0..{count - 1})")
        if not address:
            raise DistributedSetupError(f"{NUM_PROCESSES_ENV}={count} needs JAX_COORDINATOR_ADDRESS=host:port "
                                        "(process 0's host, a free port)")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedSetupError(f"JAX_COORDINATOR_ADDRESS={address!r}: give host:port, e.g. 127.0.0.1:12355")
        return dict(coordinator_address=address, num_processes=count, process_id=pid, **timeouts)
    if address or any(environ.get(m) for m in _CLUSTER_MARKERS):
        return dict(coordinator_address=address or None, **timeouts)  # JAX's cluster detection fills the rest
    return None


def _check_port_free(address: str) -> None:
    """The coordinator (process 0) binds every interface at the port of ``address``; gRPC would
    share a port another server holds, so a taken port is caught here, by name."""
    port = int(address.rpartition(":")[2])
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
            return
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DistributedSetupError(f"JAX_COORDINATOR_ADDRESS={address}: port {port} is taken on this "
                                            "host; pick a free port for process 0") from None
            # no IPv6 here: try IPv4


def maybe_initialize_distributed(environ=None) -> None:
    """``jax.distributed.initialize`` when the environment names several processes
    (``distributed_settings``); no-op otherwise or when already initialised.

    JAX aborts the process (no Python exception) when the processes do not all join in time, so
    a watchdog stops first with one line (exit status 2); a process count that the coordinator
    does not confirm is an error too. A peer that dies later ends the others within the heartbeat
    timeout (JAX's own message)."""
    settings = distributed_settings(environ)
    if settings is None or jax.distributed.is_initialized():
        return
    join_s = settings["initialization_timeout"]
    count, pid = settings.get("num_processes"), settings.get("process_id")
    if pid == 0:
        _check_port_free(settings["coordinator_address"])
    where = settings["coordinator_address"] or "the cluster's coordinator"
    who = f"process {pid} of {count}" if count is not None else "this process"
    done = threading.Event()

    def give_up():
        if not done.wait(join_s):
            print(f"error: distributed start: {who} waited {join_s} s at {where} and not every process joined: "
                  f"a peer is missing or {NUM_PROCESSES_ENV} differs from the processes started "
                  f"(raise {JOIN_TIMEOUT_ENV} if they start slowly)", file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=give_up, daemon=True, name="distributed-join-watchdog").start()
    # JAX's own deadline lies beyond the watchdog's so that the line above is what a user sees.
    try:
        jax.distributed.initialize(**{**settings, "initialization_timeout": join_s + 60})
    except (RuntimeError, ValueError) as e:
        done.set()
        if count is None:  # a cluster JAX could not read (e.g. a SLURM allocation outside srun): one process
            print(f"jax.distributed.initialize() skipped: {e}", file=sys.stderr)
            return
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedSetupError(f"distributed start at {where} failed: {first}") from None
    done.set()
    if count is not None and jax.process_count() != count:
        raise DistributedSetupError(f"{NUM_PROCESSES_ENV}={count} but the coordinator at {where} formed a run of "
                                    f"{jax.process_count()} processes: give every process the same count")


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


def spec_for(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh, rules) -> PartitionSpec:
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
        lambda spec, a: NamedSharding(mesh, spec_for(spec, a.shape, mesh, rules)),
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
