"""A staged recipe as one run: each stage is a training config, trained in turn, each starting from
the model the stage before it exported.

    python -m medv_jax.train.chain configs/mini/ --workdir=workdir/mini [--seed=1] [--set train.num_steps=5]

The stages are the ``stage*.py`` files of the folder, in name order. A stage config names its
predecessor the way the standalone configs do: ``init_from`` points at the other stage's default
``workdir`` + ``/model``. The chain puts every stage under one root (``<root>/<stage name>``) and
moves such references along, so a config runs the same alone (``python -m medv_jax.train
--config=configs/mini/stage2_instruct.py``) as inside the chain.

Finished work is never redone: a stage whose workdir holds its ``summary.json`` is skipped, and an
interrupted stage resumes from its last checkpoint (the trainer's own resume).
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from medv_jax.train import trainer
from medv_jax.user_errors import UserError, closest


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # the config file's stem, e.g. "stage1_align"
    path: Path
    config: ml_collections.ConfigDict


def load_config_file(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config()`` (or ``get_config(arg)``) of a config file."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every field of ``config`` as a dotted name (sections and the fields inside them)."""
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            names += field_names(value, f"{prefix}{key}.")
    return names


def check_field(config: ml_collections.ConfigDict, key: str, flag: str) -> None:
    """A UserError naming ``flag`` and the closest existing fields when ``config`` has no ``key``."""
    node: Any = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            near = closest(key, field_names(config))
            if not near and isinstance(node, ml_collections.ConfigDict):  # nothing alike: its section's fields
                near = [".".join([*parts[:i], name]) for name in list(node.keys())[:8]]
            hint = f"; closest: {', '.join(near)}" if near else ""
            raise UserError(f"{flag}: the config has no field {key!r}{hint}")
        node = node[part]


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
    """``"train.num_steps=5"``: sets an existing field, parsing the value as the field's type
    (Python literals for tuples, lists and numbers); an unknown field is an error naming it."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. train.num_steps=5")
    key = key.strip()
    check_field(config, key, f"--set {assignment!r}")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    current = node[leaf]
    if isinstance(current, str):
        value: Any = text
    elif isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set {assignment!r}: {key} takes true or false")
        value = text.lower() in ("true", "1")
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"--set {assignment!r}: cannot read {text!r} as a value for {key}") from None
        if isinstance(current, float) and isinstance(value, int):
            value = float(value)
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
    try:
        node[leaf] = value
    except TypeError as e:  # ml_collections keeps a field's type
        raise ValueError(f"--set {assignment!r}: {key} holds a {type(current).__name__}: {e}") from None


def discover_stages(folder: str | Path) -> list[Stage]:
    """The ``stage*.py`` configs of ``folder`` in name order."""
    folder = Path(folder)
    paths = sorted(folder.glob("stage*.py"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no stage*.py config files (a chain folder holds one per stage)")
    return [Stage(p.stem, p, load_config_file(p)) for p in paths]


def place_stages(stages: Sequence[Stage], root: str | Path, seed: int | None = None,
                 overrides: Sequence[str] = ()) -> list[Stage]:
    """Stages with workdirs under ``root`` and ``init_from`` references to an earlier stage's
    default workdir moved along; ``seed`` (model init, data order, masks) and ``overrides`` applied
    to every stage. A reference to a later stage, or to itself, is an error."""
    root = Path(root)
    defaults = {str(Path(s.config.workdir)): i for i, s in enumerate(stages)}
    placed = []
    for i, s in enumerate(stages):
        c = ml_collections.ConfigDict(s.config.to_dict())
        if seed is not None:
            c.seed = int(seed)
        for assignment in overrides:
            apply_override(c, assignment)
        c.workdir = str(root / s.name)
        ref = c.get("init_from") or ""
        if ref:
            parent = str(Path(ref).parent)
            j = defaults.get(parent)
            if j is not None:
                if j >= i:
                    raise ValueError(f"{s.path}: init_from={ref} is not an earlier stage")
                c.init_from = str(root / stages[j].name / Path(ref).name)
        placed.append(Stage(s.name, s.path, c))
    return placed


def run_chain(folder: str | Path, root: str | Path, seed: int | None = None,
              overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Trains every stage of ``folder`` in turn under ``root``; returns (and writes to
    ``<root>/chain_summary.json``) each stage's summary and the total seconds."""
    return run_stages(place_stages(discover_stages(folder), root, seed, overrides), root)


def run_stages(stages: Sequence[Stage], root: str | Path) -> dict[str, Any]:
    """``run_chain`` for stages already placed under ``root`` (``place_stages``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    out: dict[str, Any] = {"stages": {}}
    for k, s in enumerate(stages):
        summary_path = Path(s.config.workdir) / "summary.json"
        if summary_path.exists():
            print(f"[{k + 1}/{len(stages)}] {s.name}: finished before, skipped ({summary_path})")
            out["stages"][s.name] = json.loads(summary_path.read_text())
            continue
        start = s.config.get("init_from") or "random weights"
        print(f"[{k + 1}/{len(stages)}] {s.name}: from {start}", flush=True)
        out["stages"][s.name] = trainer.train(s.config, s.config.workdir)
        if "preempted_at" in out["stages"][s.name]:
            print(f"{s.name}: stopped by SIGTERM; run the same command again to resume")
            return out
    out["total_seconds"] = round(time.time() - t0, 1)
    (root / "chain_summary.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m medv_jax.train.chain", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a folder of stage*.py configs, e.g. configs/mini/")
    parser.add_argument("--workdir", required=True, help="root: each stage trains in <workdir>/<stage name>")
    parser.add_argument("--seed", type=int, default=None, help="config.seed of every stage (default: the configs')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field for every stage, e.g. train.num_steps=5 (repeatable)")
    args = parser.parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        stages = place_stages(discover_stages(args.folder), args.workdir, args.seed, args.overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    out = run_stages(stages, args.workdir)  # placed (and so checked) before anything trains
    for name, s in out["stages"].items():
        extra = ""
        if "reports" in s:
            extra = f"  report field accuracy {s['reports']['field_accuracy']:.1f} %"
        elif "vqa" in s:
            extra = f"  closed {s['vqa']['closed_accuracy']:.1f} % / open {s['vqa']['open_recall']:.1f} %"
        print(f"{name:>18}: {s.get('steps', '?')} steps, final loss {s.get('final_loss', float('nan')):.4f}, "
              f"{s.get('total_seconds', 0):.0f} s{extra}")
    if "total_seconds" in out:
        print(f"chain finished in {out['total_seconds']:.0f} s; models under {args.workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
