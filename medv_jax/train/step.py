"""Train state and the jitted, sharded train step.

The whole update (mask draws, forward, chunked loss, backward over the trainable params only,
gradient accumulation over micro-batches, clipping, AdamW) is one ``jax.jit`` with explicit
in/out shardings and the state donated. State is created sharded: ``init`` runs under ``jax.jit``
with ``out_shardings``, so no device ever holds the whole model.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from medv_jax import sharding as shd
from medv_jax.models import layers
from medv_jax.models.medv import MedV
from medv_jax.train import loss as loss_lib
from medv_jax.train.optimizer import merge_params, split_frozen

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array  # int32 scalar: optimizer updates done
    params: Any  # trainable params
    frozen: Any  # frozen params (no optimizer state)
    opt_state: Any
    rng: Array  # uint32[2] raw key data (checkpoint friendly)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    micro_batches: int = 1  # gradient accumulation: the global batch is split into this many
    ce_chunk: int = 512  # sequence chunk of the cross-entropy
    mask_times: str = "uniform"  # how each row's masking time t is drawn (loss.draw_times)
    mask_time_floor: float = 0.0  # t drawn from [floor, 1) (loss.draw_masks); 0 = the reference
    mask_span_fraction: float = 0.0  # share of rows given a span mask (loss.draw_span_masks); 0 = the reference


def create_state(params: Any, tx: optax.GradientTransformation, groups, rng: Array) -> TrainState:
    trainable, frozen = split_frozen(params, groups)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trainable,
        frozen=frozen,
        opt_state=tx.init(trainable),
        rng=rng,
    )


def state_shardings(abstract_boxed_state: TrainState, mesh, rules=shd.LOGICAL_AXIS_RULES) -> TrainState:
    """Shardings for every leaf of the state from the logical names its boxes carry (optimizer
    moments inherit their parameter's names; scalars are replicated)."""
    return shd.logical_shardings(abstract_boxed_state, mesh, rules)


def init_sharded_state(
    init_params_fn: Callable[[Array], Any],  # rng -> *boxed* params
    tx: optax.GradientTransformation,
    groups,
    mesh,
    seed: int,
    rules=shd.LOGICAL_AXIS_RULES,
) -> tuple[TrainState, TrainState]:
    """(state, its shardings), the state created directly in its shards."""

    def make(rng):
        params_rng, state_rng = jax.random.split(rng)
        return create_state(init_params_fn(params_rng), tx, groups, jax.random.key_data(state_rng))

    rng = jax.random.PRNGKey(seed)
    abstract = jax.eval_shape(make, rng)
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda r: nn.unbox(make(r)), out_shardings=shardings)(rng)
    return state, shardings


def state_from_params(params: Any, boxed_abstract_params: Any, tx, groups, mesh, seed: int,
                      rules=shd.LOGICAL_AXIS_RULES):
    """(state, shardings) around existing (e.g. converted) params, placed in their shards."""
    rng = jax.random.key_data(jax.random.PRNGKey(seed))
    abstract = jax.eval_shape(lambda: create_state(boxed_abstract_params, tx, groups, rng))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda p: create_state(p, tx, groups, rng), out_shardings=shardings)(params)
    return state, shardings


def _split_micro(x: Array, k: int) -> Array:
    return x.reshape((k, x.shape[0] // k) + x.shape[1:])


def make_train_step(model: MedV, tx: optax.GradientTransformation, config: StepConfig) -> Callable:
    """``step(state, batch) -> (state, metrics)``, not yet jitted (see ``jit_train_step``)."""

    use_dropout = model.config.lm.lora_rank > 0 and model.config.lm.lora_dropout > 0

    def loss_fn(trainable, frozen, batch, masked, p, dropout_rng):
        params = merge_params(trainable, frozen)
        return loss_lib.diffusion_loss(model, params, batch, masked, p, config.ce_chunk,
                                       dropout_rng if use_dropout else None)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict[str, Array]):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        # Mask draws for the whole global batch first, so accumulation equals the large batch.
        masked, p = loss_lib.draw_masks(step_rng, batch["labels"] != loss_lib.IGNORE_INDEX,
                                        times=config.mask_times, time_floor=config.mask_time_floor,
                                        span_fraction=config.mask_span_fraction)
        k = config.micro_batches
        # A key of its own for adapter dropout, so runs without it draw exactly the masks they did.
        dropout_keys = jax.random.split(jax.random.fold_in(step_rng, 1), k)
        if k == 1:
            (_, metrics), grads = grad_fn(state.params, state.frozen, batch, masked, p, dropout_keys[0])
        else:
            micro = jax.tree_util.tree_map(lambda x: _split_micro(x, k), (batch, masked, p)) + (dropout_keys,)

            def accumulate(grads, xs):
                (_, m), g = grad_fn(state.params, state.frozen, *xs)
                return jax.tree_util.tree_map(jnp.add, grads, g), m

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            grads, ms = jax.lax.scan(accumulate, zeros, micro)
            grads = jax.tree_util.tree_map(lambda g: g / k, grads)
            metrics = {
                "loss": ms["loss"].mean(),  # equal micro-batches: the mean of means is the mean
                "masked_ce": ms["masked_ce"].mean(),
                "masked_tokens": ms["masked_tokens"].sum(),
                "answer_tokens": ms["answer_tokens"].sum(),
            }
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng)
        )
        return new_state, metrics

    return step


def traced_with_layout(step_fn: Callable, mesh, rules, *args):
    """``step_fn(*args)`` traced with the models' activations laid out by ``rules`` on ``mesh``."""
    with layers.activation_sharding(mesh, rules):
        return step_fn(*args)


def jit_train_step(step_fn: Callable, shardings: TrainState, mesh, batch_example: dict[str, Any],
                   rules=shd.LOGICAL_AXIS_RULES):
    """Jit with the state's shardings in and out, the batch on the batch axes, state donated, and
    the activations inside laid out by the same logical-axis ``rules`` as the parameters."""
    batch_shardings = {k: shd.batch_sharding(mesh, len(v.shape)) for k, v in batch_example.items()}
    return jax.jit(
        functools.partial(traced_with_layout, step_fn, mesh, rules),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, shd.replicated(mesh)),
        donate_argnums=(0,),
    )
