"""Host-side helpers of the sampler: prompt padding and embedding, shape validation, per-row
PRNG keys, and replaying a row's unmasking from a ``SampleOutput``."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medv_jax.models.llada import LLaDA, LLaDAConfig
from medv_jax.sampling.sampler_config import SamplerConfig

Array = jax.Array


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token id lists to ``[B, length]`` (default: the longest). Returns (tokens int32,
    mask bool with True at real tokens)."""
    lengths = [len(p) for p in prompts]
    width = max(lengths, default=0) if length is None else length
    if lengths and max(lengths) > width:
        raise ValueError(f"length={width} is shorter than the longest prompt ({max(lengths)})")
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.bool_)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, width - len(prompt):] = np.asarray(prompt, np.int32)
            mask[row, width - len(prompt):] = True
    return tokens, mask


def embed_prompt(
    lm_config: LLaDAConfig, lm_params: Any, prompts: Sequence[Sequence[int]], length: int | None = None
) -> tuple[Array, Array]:
    """Text-only prompt embeddings: token id lists -> (embeds [B, P, D], mask [B, P]), left padded
    with EOS (the padding id). Feed the result to ``sample``."""
    tokens, mask = left_pad(prompts, lm_config.eos_token_id, length)
    embeds = LLaDA(lm_config).apply({"params": lm_params}, jnp.asarray(tokens), method=LLaDA.embed)
    return embeds, jnp.asarray(mask)


def validate_prompt(
    lm_config: LLaDAConfig,
    config: SamplerConfig,
    batch: int,
    prompt_len: int,
    prompt_mask: Any = None,
) -> None:
    """Shape checks done on the host before compiling; raise ValueError naming the parameter."""
    if not isinstance(config, SamplerConfig):
        raise ValueError(f"config: expected a SamplerConfig, got {type(config).__name__}")
    if batch <= 0:
        raise ValueError("prompt: empty batch (batch size 0)")
    if prompt_len + config.gen_length > lm_config.max_position_embeddings:
        raise ValueError(
            f"prompt length {prompt_len} + gen_length {config.gen_length} exceeds the model's "
            f"max_position_embeddings={lm_config.max_position_embeddings}"
        )
    if prompt_mask is not None and not isinstance(prompt_mask, jax.core.Tracer):
        shape = tuple(np.shape(prompt_mask))
        if shape != (batch, prompt_len):
            raise ValueError(f"prompt_mask: shape {list(shape)} != [batch, prompt_len] = {[batch, prompt_len]}")


def row_keys_for(rng: Any, batch: int) -> Array:
    """Per-row PRNG keys: ``rng`` may be None (key 0), one key (row r gets ``fold_in(rng, r)``),
    or ``batch`` keys (typed ``[B]`` or raw ``uint32 [B, 2]``), used as given. Pass per-row keys
    to make a row's result independent of its place in the batch."""
    if rng is None:
        rng = jax.random.key(0)
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.dtype != jnp.uint32 or rng.shape[-1:] != (2,):
            raise ValueError(f"rng: expected a PRNG key or uint32 [..., 2] key data, got {rng.dtype}{list(rng.shape)}")
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 0:
        return jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(batch, dtype=jnp.uint32))
    if rng.shape != (batch,):
        raise ValueError(f"rng: expected one key or {batch} keys, got key shape {list(rng.shape)}")
    return rng


def replay(
    tokens: Any, commit_step: Any, steps_run: int, eot_id: int
) -> list[list[int | None]]:
    """The canvas of one row after each step it ran, rebuilt from ``SampleOutput`` on the host.

    tokens, commit_step: the row's ``[gen_length]`` arrays. Returns one list per step: token ids
    with None at still-masked positions, cut before the first end-of-turn committed so far (the
    answer as it stood after that step).
    """
    tokens = np.asarray(tokens)
    commit_step = np.asarray(commit_step)
    frames = []
    for t in range(int(steps_run)):
        shown = (commit_step >= 0) & (commit_step <= t)
        eot = np.flatnonzero(shown & (tokens == eot_id))
        end = int(eot[0]) if eot.size else tokens.shape[0]
        frames.append([int(tokens[j]) if shown[j] else None for j in range(end)])
    return frames
