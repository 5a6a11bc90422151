"""Converted checkpoints on disk: ``config.json`` (our config, tagged with its kind) + ``params/``
(an orbax checkpoint of the parameter tree).

``load_pretrained(path)`` is the one function that gives ``(config, params)`` back, with the tree
every module expects; pass ``shardings`` (a tree of ``jax.sharding.Sharding`` matching the params)
to restore straight into sharded device arrays without ever holding the whole model on one device.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Union

import flax.linen as nn
import jax
import numpy as np

from medv_jax.models import llada, medv, siglip
from medv_jax.user_errors import UserError

Config = Union[llada.LLaDAConfig, siglip.SiglipConfig, medv.MedVConfig]

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
_KINDS = {"llada": llada.LLaDAConfig, "siglip": siglip.SiglipConfig, "medv": medv.MedVConfig}


def config_kind(config: Config) -> str:
    for kind, cls in _KINDS.items():
        if isinstance(config, cls):
            return kind
    raise TypeError(f"not a model config: {type(config).__name__}")


def config_to_dict(config: Config) -> dict[str, Any]:
    return {"kind": config_kind(config), **dataclasses.asdict(config)}


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def config_from_dict(data: dict[str, Any]) -> Config:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"config has unknown kind {kind!r}; expected one of {list(_KINDS)}")
    if kind == "medv":
        data["lm"] = llada.LLaDAConfig(**data["lm"])
        data["vision"] = siglip.SiglipConfig(**data["vision"])
    return _KINDS[kind](**{k: _tuplify(v) for k, v in data.items()})


def model_for(config: Config) -> nn.Module:
    if isinstance(config, medv.MedVConfig):
        return medv.MedV(config)
    if isinstance(config, llada.LLaDAConfig):
        return llada.LLaDA(config)
    return siglip.SiglipVisionTower(config)


def abstract_params(config: Config) -> Any:
    """Boxed (logical axis names attached) ``ShapeDtypeStruct`` tree of ``config``'s params."""
    module = {"medv": medv, "llada": llada, "siglip": siglip}[config_kind(config)]
    return module.abstract_params(config)


def save_pretrained(path: str | os.PathLike, config: Config, params: Any, overwrite: bool = False) -> Path:
    """Write ``config`` and ``params`` atomically: everything lands in a temporary folder beside
    ``path`` that is renamed into place only once complete, so a failure leaves nothing at ``path``.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
        # One writer: in a multi-process run only the calling process takes part (orbax would
        # otherwise wait for all of them), so params must be host arrays (numpy) there.
        me = jax.process_index()
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}))
        checkpointer.save(tmp / PARAMS_DIR, nn.unbox(params))
        checkpointer.wait_until_finished()
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_hugging_face_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a Hugging Face model (its config.json names a model_type or
    architectures, or it has safetensors / PyTorch weight files)."""
    file = folder / CONFIG_FILE
    if file.is_file():
        try:
            data = json.loads(file.read_text())
        except ValueError:
            return False
        if isinstance(data, dict) and "kind" not in data and ("model_type" in data or "architectures" in data):
            return True
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def check_converted(path: str | os.PathLike, flag: str = "--checkpoint") -> Config:
    """The config of the converted checkpoint at ``path``, read without loading any weights; a
    UserError naming ``flag`` and what to do when ``path`` is missing, a Hugging Face download
    (with the command that converts it) or anything else that is not a converted checkpoint."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{flag} {os.fspath(path)!r}: no such folder")
    if is_hugging_face_folder(folder) and not (folder / PARAMS_DIR).is_dir():
        dst = f"{os.fspath(path).rstrip(os.sep)}-medv_jax"
        raise UserError(
            f"{flag} {os.fspath(path)!r} is a Hugging Face checkpoint, not a converted one: convert it with "
            f"python -m tools.convert_weights --src {os.fspath(path)} --dst {dst} and pass {flag} {dst}"
        )
    if not (folder / CONFIG_FILE).is_file() or not (folder / PARAMS_DIR).is_dir():
        raise UserError(
            f"{flag} {os.fspath(path)!r} is not a converted checkpoint (it needs {CONFIG_FILE} and {PARAMS_DIR}/): "
            "give the folder python -m tools.convert_weights or python -m medv_jax.train wrote"
        )
    try:
        return load_config(folder)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{flag} {os.fspath(path)!r}: unreadable {CONFIG_FILE} ({e})") from None


def load_config(path: str | os.PathLike) -> Config:
    file = Path(path).expanduser() / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: is {path} a converted medv_jax checkpoint?")
    return config_from_dict(json.loads(file.read_text()))


def load_pretrained(
    path: str | os.PathLike,
    shardings: Any = None,
    dtype: str | None = None,
) -> tuple[Config, Any]:
    """Load a converted checkpoint: returns ``(config, params)``.

    shardings: optional tree of ``jax.sharding.Sharding`` (same structure as the params) to restore
      into; by default every array lands on the first local device.
    dtype: optional dtype to cast the params to on restore (config.param_dtype is updated).
    """
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().absolute()
    config = load_config(path)
    if dtype is not None:
        config = _with_param_dtype(config, dtype)
    abstract = nn.unbox(abstract_params(config))
    checkpointer = ocp.StandardCheckpointer()
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, abstract)
        # A restore onto this process's own device involves no other process (each process of a
        # multi-process inference run loads its own copy, whenever it gets to it).
        me = jax.process_index()
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}))
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    params = checkpointer.restore(path / PARAMS_DIR, target)
    return config, params


def _with_param_dtype(config: Config, dtype: str) -> Config:
    np.dtype(jax.numpy.dtype(dtype))  # validates the name
    if isinstance(config, medv.MedVConfig):
        return config.replace(
            lm=config.lm.replace(param_dtype=dtype), vision=config.vision.replace(param_dtype=dtype)
        )
    return config.replace(param_dtype=dtype)
