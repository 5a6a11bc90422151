"""The masked-diffusion SFT loss (docs/algorithm.md §4, paper Eq. 4).

Per sequence: t ~ U(0, 1), p = (1 - eps) t + eps; every answer position (label != -100) is masked
independently with probability p by replacing its input embedding with the MASK embedding. The
sequence's loss is the sum over masked positions of CE / p, divided by its number of answer
positions; the batch loss is the mean over sequences. All assistant turns of a dialogue share t.

The cross-entropy is computed in chunks over the sequence, each chunk's fp32 logits recomputed in
the backward pass, so ``[batch, length, vocab]`` fp32 logits never exist at once; and only where it
is used: the masked positions are gathered to the front of each row first and chunks holding none
are skipped, so the LM head's cost follows the masked tokens, not the sequence length.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from medv_jax.models.medv import MedV

Array = jax.Array
IGNORE_INDEX = -100
MASK_EPS = 1e-3


MASK_TIMES = ("uniform", "stratified")


def draw_times(rng: Array, batch: int, kind: str = "uniform") -> Array:
    """t [B] in [0, 1): "uniform" draws each independently (the reference); "stratified" draws one
    u and spreads the batch evenly, t_i = (u + i / B) mod 1, a low-discrepancy draw (as in MDLM):
    each t_i is still U(0, 1), so the loss's expectation is unchanged, but every batch covers the
    whole range of masking ratios, which lowers the variance of the 1/p-weighted loss."""
    if kind == "uniform":
        return jax.random.uniform(rng, (batch,))
    if kind == "stratified":
        u = jax.random.uniform(rng, ())
        return jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
    raise ValueError(f"mask time sampling must be one of {MASK_TIMES}, got {kind!r}")


def draw_masks(rng: Array, answer_mask: Array, eps: float = MASK_EPS,
               times: str = "uniform", time_floor: float = 0.0, span_fraction: float = 0.0) -> tuple[Array, Array]:
    """(masked [B, T] bool, p [B]) for one batch: one t per sequence (drawn as `draw_times` says),
    masks only answer positions. `time_floor` > 0 draws t from [floor, 1) instead of [0, 1): every
    row is masked at least that much, so a masked token is predicted from little of its answer (a
    departure from the reference's objective, for answers whose parts give each other away).
    `span_fraction` > 0 gives that share of the rows a span mask instead (`draw_span_masks`)."""
    if not 0.0 <= time_floor < 1.0:
        raise ValueError(f"mask time floor must be in [0, 1), got {time_floor}")
    if not 0.0 <= span_fraction <= 1.0:
        raise ValueError(f"mask span fraction must be in [0, 1], got {span_fraction}")
    rng_t, rng_m = jax.random.split(rng)
    batch = answer_mask.shape[0]
    t = draw_times(rng_t, batch, times)
    if time_floor:  # (0 leaves the draw bit-identical to the reference's)
        t = time_floor + (1.0 - time_floor) * t
    p = (1.0 - eps) * t + eps
    masked = (jax.random.uniform(rng_m, answer_mask.shape) < p[:, None]) & answer_mask
    if span_fraction:  # (0 leaves the draw bit-identical to the reference's)
        rng_pick, rng_span = jax.random.split(jax.random.fold_in(rng, 2))
        span, span_p = draw_span_masks(rng_span, answer_mask)
        pick = jax.random.uniform(rng_pick, (batch,)) < span_fraction
        masked = jnp.where(pick[:, None], span, masked)
        p = jnp.where(pick, span_p, p)
    return masked, p


def draw_span_masks(rng: Array, answer_mask: Array) -> tuple[Array, Array]:
    """(masked [B, T], p [B]): per row one contiguous run of its answer positions (counted over
    the answer positions only, so a run may span the user turn between two answers), its start
    and end drawn uniformly, and p the share of the row's answer positions it covers (the loss's
    1/p weighting then averages the run's cross-entropy).

    The sampler's states are not i.i.d. masks: it commits the answer's confident tokens first, and
    near the end of an answer it holds the words written so far, a run of masked positions, and
    stop tokens committed further right. Under i.i.d. masks such a state (a whole answer visible
    with a long masked run after it) has vanishing probability, so a small model never learns where
    that run's answer ends; span rows show it directly (docs/algorithm.md §4)."""
    rng_start, rng_end = jax.random.split(rng)
    batch = answer_mask.shape[0]
    n = answer_mask.sum(axis=1)  # [B] answer positions per row
    rank = jnp.cumsum(answer_mask, axis=1) - 1  # [B, T] index of each answer position
    start = jnp.floor(jax.random.uniform(rng_start, (batch,)) * n).astype(jnp.int32)
    end = start + 1 + jnp.floor(jax.random.uniform(rng_end, (batch,)) * (n - start)).astype(jnp.int32)
    masked = answer_mask & (rank >= start[:, None]) & (rank < end[:, None])
    p = jnp.where(n > 0, (end - start) / jnp.maximum(n, 1), 1.0).astype(jnp.float32)
    return masked, p


def chunked_token_ce(
    logits_fn: Callable[[Array], Array],  # hidden [B, c, D] -> fp32 logits [B, c, V]
    hidden: Array,  # [B, T, D]
    targets: Array,  # [B, T] int (any valid id where ignored)
    chunk: int,
    needed: Array | None = None,  # [B, T] bool: the positions whose CE is used
) -> Array:  # [B, T] fp32 token cross-entropy (0 where not needed)
    """Token cross-entropy in sequence chunks of ``chunk`` positions, each chunk's logits recomputed
    in the backward pass.

    With ``needed`` (the loss reads the CE of masked positions only), each row's needed positions
    are first moved to the front (a stable sort, undone at the end) and a chunk none of whose
    positions is needed in any row is skipped (``lax.cond``): the LM head then runs over
    ``ceil(max needed per row / chunk)`` chunks instead of all of them (prompts, image tokens and
    unmasked answer tokens cost nothing). The result is the same as without ``needed`` at the
    needed positions, and 0 elsewhere (with a single chunk nothing is skipped or moved).
    """
    batch, length, _ = hidden.shape
    chunk = min(chunk, length)
    used = needed
    if chunk == length:  # one chunk: nothing to skip, so positions stay where they are
        needed = None
    inverse = None
    if needed is not None:
        order = jnp.argsort(~needed, axis=1, stable=True)  # [B, T]: needed positions first
        inverse = jnp.argsort(order, axis=1)
        hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        needed = jnp.take_along_axis(needed, order, axis=1)
    pad = (-length) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        if needed is not None:
            needed = jnp.pad(needed, ((0, 0), (0, pad)))
    n = hidden.shape[1] // chunk
    h = hidden.reshape(batch, n, chunk, -1).swapaxes(0, 1)  # [n, B, c, D]
    y = targets.reshape(batch, n, chunk).swapaxes(0, 1)  # [n, B, c]

    @jax.checkpoint  # keep only the chunk's inputs; its logits are recomputed for the backward pass
    def one_chunk(h_c, y_c):
        logits = logits_fn(h_c).astype(jnp.float32)
        target_logit = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - target_logit

    if needed is None:
        ce = jax.lax.map(lambda xs: one_chunk(*xs), (h, y))  # [n, B, c]
    else:
        use = needed.reshape(batch, n, chunk).swapaxes(0, 1)  # [n, B, c]

        def maybe_chunk(xs):
            h_c, y_c, use_c = xs
            skip = lambda h_c, y_c: jnp.zeros(y_c.shape, jnp.float32)  # noqa: E731
            return jax.lax.cond(jnp.any(use_c), one_chunk, skip, h_c, y_c)

        ce = jax.lax.map(maybe_chunk, (h, y, use))
    ce = ce.swapaxes(0, 1).reshape(batch, -1)[:, :length]
    if inverse is not None:
        ce = jnp.take_along_axis(ce, inverse, axis=1)
    return ce if used is None else jnp.where(used, ce, 0.0)


def sequence_losses(token_ce: Array, masked: Array, p: Array, answer_mask: Array) -> Array:
    """[B]: sum_masked CE / p, over the sequence's answer count (0 for a sequence without any)."""
    n_answer = jnp.maximum(answer_mask.sum(axis=1), 1)
    return jnp.sum(jnp.where(masked, token_ce, 0.0), axis=1) / p / n_answer


def diffusion_loss(
    model: MedV,
    params: Any,
    batch: dict[str, Array],
    masked: Array,  # [B, T] bool, from draw_masks
    p: Array,  # [B]
    ce_chunk: int = 512,
    dropout_rng: Array | None = None,  # LoRA dropout (None: none, as in evaluation)
) -> tuple[Array, dict[str, Array]]:
    labels = batch["labels"]
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    answer_mask = labels != IGNORE_INDEX
    variables = {"params": params}
    embeds = model.apply(
        variables,
        batch["tokens"],
        batch["pixels"],
        batch["image_index"],
        batch["image_weight"],
        batch["image_newline_mask"],
        method=MedV.embed_inputs,
    )
    mask_id = jnp.full((1, 1), model.config.lm.mask_token_id, jnp.int32)
    mask_embed = model.apply(variables, mask_id, method=lambda m, x: m.lm.embed(x))[0, 0]
    embeds = jnp.where(masked[..., None], mask_embed.astype(embeds.dtype), embeds)
    hidden = model.apply(
        variables, embeds, batch.get("key_mask"), method=lambda m, e, k: m.lm.hidden_states(e, k), rngs=rngs
    )
    logits_fn = lambda h: model.apply(variables, h, method=lambda m, x: m.lm.logits(x), rngs=rngs)
    targets = jnp.where(answer_mask, labels, 0)
    token_ce = chunked_token_ce(logits_fn, hidden, targets, ce_chunk, needed=masked)
    per_seq = sequence_losses(token_ce, masked, p, answer_mask)
    metrics = {
        "loss": jnp.mean(per_seq),
        "masked_tokens": masked.sum(),
        "answer_tokens": answer_mask.sum(),
        # Plain CE of the masked tokens (no 1/p weight): easier to read as training progresses.
        "masked_ce": jnp.sum(jnp.where(masked, token_ce, 0.0)) / jnp.maximum(masked.sum(), 1),
    }
    return jnp.mean(per_seq), metrics
