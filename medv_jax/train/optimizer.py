"""AdamW with a warmup-cosine schedule, global-norm clipping, per-group learning rates and frozen
groups, all selected by regexes over parameter paths ("lm/layers/attn/q_proj/kernel").

A group's learning rate is a number, None (frozen), or "*<factor>": that multiple of the default
learning rate (``optim.lr``), so overriding ``optim.lr`` moves the group with it
(``resolve_group_rates``).

Frozen parameters are split out of the trainable tree before differentiation: they get no
gradient, no optimizer state, and stay bit-identical.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import optax
from flax.traverse_util import flatten_dict, unflatten_dict

FROZEN = "frozen"


def param_path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def resolve_group_rates(groups: Sequence[tuple[str, Any]], default_lr: float) -> list[tuple[str, float | None]]:
    """``groups`` with every relative rate ("*0.1") turned into a number (``default_lr`` times the
    factor); a ValueError naming the group for a rate that is neither a number, None nor "*<factor>"."""
    out = []
    for pattern, lr in groups:
        rate = _group_rate(lr, default_lr)
        if rate is False:
            raise ValueError(f"optim.param_groups: group {pattern!r} has learning rate {lr!r}; give a number, "
                             'None (frozen) or "*<factor>" (a positive multiple of optim.lr, e.g. "*0.1")')
        out.append((pattern, rate))
    return out


def _group_rate(lr: Any, default_lr: float) -> float | None | bool:
    """The number a group's rate stands for (None: frozen); False when it is none of the forms."""
    if lr is None or (isinstance(lr, (int, float)) and not isinstance(lr, bool)):
        return lr
    if isinstance(lr, str) and lr.startswith("*"):
        try:
            factor = float(lr[1:])
        except ValueError:
            return False
        return default_lr * factor if factor > 0 else False
    return False


def group_of(path: str, groups: Sequence[tuple[str, float | None]]) -> str:
    """Name of the first group whose regex matches (``re.search``) the path; "default" if none.
    A group whose learning rate is None is frozen."""
    for i, (pattern, lr) in enumerate(groups):
        if re.search(pattern, path):
            return FROZEN if lr is None else f"group{i}"
    return "default"


def split_frozen(params: Any, groups: Sequence[tuple[str, float | None]]) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts holding disjoint leaves of ``params``."""
    flat = flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if group_of(param_path(k), groups) != FROZEN}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return unflatten_dict(trainable), unflatten_dict(frozen)


def merge_params(trainable: dict, frozen: dict) -> dict:
    return unflatten_dict({**flatten_dict(trainable), **flatten_dict(frozen)})


def learning_rate_schedule(
    peak: float, total_steps: int, warmup_ratio: float, final_lr_ratio: float = 0.0
) -> optax.Schedule:
    """Linear warmup over ``warmup_ratio`` of the steps to ``peak``, then cosine decay to
    ``final_lr_ratio * peak`` (0: to zero, the recipe's schedule)."""
    if not 0.0 <= final_lr_ratio <= 1.0:
        raise ValueError(f"optim.final_lr_ratio={final_lr_ratio} must be in [0, 1]")
    warmup = max(1, int(round(warmup_ratio * total_steps)))
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(total_steps, warmup + 1), final_lr_ratio * peak)


def make_optimizer(
    trainable: dict,
    groups: Sequence[tuple[str, float | None]],
    default_lr: float,
    total_steps: int,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    final_lr_ratio: float = 0.0,
) -> optax.GradientTransformation:
    """The optimizer over the *trainable* tree (see ``split_frozen``)."""
    rates = {"default": default_lr}
    rates.update({f"group{i}": lr for i, (_, lr) in enumerate(groups) if lr is not None})
    labels = unflatten_dict({k: group_of(param_path(k), groups) for k in flatten_dict(trainable)})
    per_group = {
        name: optax.adamw(learning_rate_schedule(lr, total_steps, warmup_ratio, final_lr_ratio), b1, b2, eps,
                          weight_decay=weight_decay)
        for name, lr in rates.items()
    }
    chain = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    return optax.chain(*chain, optax.multi_transform(per_group, labels))
