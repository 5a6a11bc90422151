"""Converted checkpoints on disk: ``config.json`` (our config, tagged with its kind) + ``params/``
(an orbax checkpoint of the parameter tree).

``load_pretrained(path)`` is the one function that gives ``(config, params)`` back, with the tree
every module expects; pass ``shardings`` (a tree of ``jax.sharding.Sharding`` matching the params)
to restore straight into sharded device arrays without ever holding the whole model on one device.

An *adapters* checkpoint (written by a LoRA run) holds only the trained tensors (the adapters and
whatever else trained, e.g. the projector) with ``adapters.json`` naming the base checkpoint they
apply to; ``load_pretrained`` gives it back on top of its base, unmerged (the adapters kept beside
the kernels) or merged into them. ``weight_quant`` quantizes the LM's dense kernels on load.
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

from medv_jax.models import adapters as adapters_lib
from medv_jax.models import layers, llada, medv, siglip
from medv_jax.user_errors import UserError

Config = Union[llada.LLaDAConfig, siglip.SiglipConfig, medv.MedVConfig]

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
ADAPTERS_FILE = "adapters.json"
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


def save_pretrained(path: str | os.PathLike, config: Config, params: Any, overwrite: bool = False,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write ``config`` and ``params`` (and ``extra_files``: name -> text) atomically: everything
    lands in a temporary folder beside ``path`` that is renamed into place only once complete, so a
    failure leaves nothing at ``path``.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
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
        config = load_config(folder)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{flag} {os.fspath(path)!r}: unreadable {CONFIG_FILE} ({e})") from None
    if (folder / ADAPTERS_FILE).is_file():
        base = adapters_base(folder)
        if not (Path(base) / CONFIG_FILE).is_file() or not (Path(base) / PARAMS_DIR).is_dir():
            raise UserError(f"{flag} {os.fspath(path)!r} holds adapters for the base checkpoint {base!r}, "
                            f"which is not there: restore it or edit {ADAPTERS_FILE}")
    return config


def save_adapters(path: str | os.PathLike, config: Config, trained: Any, base: str | os.PathLike,
                  overwrite: bool = False) -> Path:
    """An adapters checkpoint: ``config`` (with its LoRA fields), the trained tensors only, and the
    base checkpoint's path (absolute) in ``adapters.json``."""
    meta = {"base": str(Path(base).expanduser().absolute())}
    return save_pretrained(path, config, trained, overwrite, {ADAPTERS_FILE: json.dumps(meta, indent=2) + "\n"})


def adapters_base(path: str | os.PathLike) -> str:
    return json.loads((Path(path).expanduser() / ADAPTERS_FILE).read_text())["base"]


def is_adapters(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / ADAPTERS_FILE).is_file()


def lm_config_of(config: Config) -> llada.LLaDAConfig | None:
    if isinstance(config, medv.MedVConfig):
        return config.lm
    return config if isinstance(config, llada.LLaDAConfig) else None


def with_lm(config: Config, **changes: Any) -> Config:
    """``config`` with LM fields changed (a MedV config's ``lm``, or a LLaDA config itself)."""
    if isinstance(config, medv.MedVConfig):
        return config.replace(lm=config.lm.replace(**changes))
    if isinstance(config, llada.LLaDAConfig):
        return config.replace(**changes)
    raise ValueError(f"a {type(config).__name__} has no LM to quantize or adapt")


def conform(config: Config, params: Any) -> Any:
    """``params`` turned into the tree ``config``'s model expects (adapters.conform_params)."""
    return adapters_lib.conform_params(params, nn.unbox(abstract_params(config)))


def load_config(path: str | os.PathLike) -> Config:
    file = Path(path).expanduser() / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: is {path} a converted medv_jax checkpoint?")
    return config_from_dict(json.loads(file.read_text()))


def load_pretrained(
    path: str | os.PathLike,
    shardings: Any = None,
    dtype: str | None = None,
    merge_adapters: bool = False,
    weight_quant: str | None = None,
) -> tuple[Config, Any]:
    """Load a converted checkpoint: returns ``(config, params)``.

    shardings: optional tree of ``jax.sharding.Sharding`` (same structure as the params) to restore
      into; by default every array lands on the first local device. Not for adapters checkpoints.
    dtype: optional dtype to cast the params to on restore (config.param_dtype is updated).
    merge_adapters: an adapters checkpoint comes back merged into a plain model (LoRA rank 0)
      instead of with its adapters beside the kernels.
    weight_quant: "int8" / "int4" quantizes the LM's dense kernels (after any merge); "none" keeps
      them float; None keeps the checkpoint's own setting.
    """
    if weight_quant is not None:
        layers.check_choice(weight_quant, layers.WEIGHT_QUANT, "weight_quant")
    path = Path(path).expanduser().absolute()
    if is_adapters(path):
        if shardings is not None:
            raise ValueError("an adapters checkpoint is loaded onto one device (shardings=None)")
        config, params = _load_with_adapters(path, dtype, merge_adapters, weight_quant)
    else:
        config, params = _restore(path, shardings, dtype)
    lm = lm_config_of(config)
    if weight_quant is not None and lm is not None and lm.weight_quant != weight_quant:
        target = with_lm(config, weight_quant=weight_quant)
        params, config = requantize(params, target), target
    return config, params


def requantize(params: Any, target: Config) -> Any:
    """``params`` (kernels float or quantized, adapters or not) with the LM's kernels stored as
    ``target`` says: quantized kernels are dequantized first; adapters are kept as they are."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(params)
    kept = {k: v for k, v in flat.items() if k[-1] in (adapters_lib.LORA_A, adapters_lib.LORA_B)}
    plain = adapters_lib.merge_adapters(unflatten_dict({k: v for k, v in flat.items() if k not in kept}), 1.0)
    return conform(target, unflatten_dict({**flatten_dict(plain), **kept}))


def _load_with_adapters(path: Path, dtype: str | None, merge: bool, weight_quant: str | None):
    """(config, params) of an adapters checkpoint on top of its base (see ``load_pretrained``)."""
    import orbax.checkpoint as ocp
    from flax.traverse_util import flatten_dict, unflatten_dict

    config = load_config(path)
    if dtype is not None:
        config = _with_param_dtype(config, dtype)
    _, base = load_pretrained(adapters_base(path), dtype=dtype)
    me = jax.process_index()
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))
    trained = checkpointer.restore(path / PARAMS_DIR)
    params = unflatten_dict({**flatten_dict(base), **flatten_dict(trained)})
    lm = lm_config_of(config)
    if weight_quant is not None and not merge:
        config = with_lm(config, weight_quant=weight_quant)
    params = conform(config, params)
    if merge:
        params = adapters_lib.merge_adapters(params, lm.lora_alpha / lm.lora_rank)
        config = with_lm(config, lora_rank=0, weight_quant="none")
        params = conform(config, params)
    return config, params


def _restore(path: Path, shardings: Any, dtype: str | None) -> tuple[Config, Any]:
    import orbax.checkpoint as ocp

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
