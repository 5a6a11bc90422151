"""The compiled sampler: one ``lax.while_loop`` whose body is one diffusion step.

The algorithm, its random-draw convention and the fast modes are documented in
``medv_jax.sampling.diffusion``. ``run_sampler`` is traceable (the jitted entry points wrap it);
it builds a ``StepContext`` (everything a step reads and never changes), the initial
``SamplerState``, and loops ``diffusion_step``, which is built from the functions below:

* ``step_logits``: the guided, processed and banned fp32 logits of the current block, from
  ``block_logits`` (plain forward) or ``cached_logits`` (KV-cache modes);
* ``candidates``: each position's candidate token and its confidence;
* ``select_positions``: which eligible positions commit this step (the scheduled most confident
  ones, plus those above the threshold);
* ``adaptive_halt``: the adaptive stop, which may commit a row's whole draft of the block;
* ``commit``: writes the selected tokens, updates the stops and decides whether the block ends.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medv_jax.models.llada import LLaDA, LLaDAConfig, default_positions, init_cache
from medv_jax.sampling.sampler_config import Knobs, Plan

Array = jax.Array
# fn(logits [B, n, V] fp32, gen_index [n] int32) -> logits [B, n, V]: an optional hook applied to
# the (guided) logits of the current block before the bans; gen_index are the positions of those
# logits in the generated region. Must be hashable (it is a static argument of the program).
LogitsProcessor = Callable[[Array, Array], Array]

# Called on the host as each block is finished: (block index [], tokens [B, gen_length],
# stop [B]); positions before min(stop, (block + 1) * block_length) are final.
BlockCallback = Callable[[Any, Any, Any], None]

# Prefix-cache mode recomputes "the current block onward"; that span's length depends on the block,
# so each length is its own branch of one lax.switch. Blocks are grouped so that at most this many
# branches (model copies in the program) exist; a group's span starts at its first block.
PREFIX_SPAN_BRANCHES = 4


@flax.struct.dataclass
class SampleOutput:
    """Result of a generation; every array has a leading batch axis ``B``.

    tokens:        [B, gen_length] int32, the generated region; positions never committed (those
                   after the stop) hold the MASK id.
    answer_length: [B] int32, tokens before the first end-of-turn token (gen_length if none).
    commit_step:   [B, gen_length] int32, global step (0-based) at which each position was
                   committed, -1 if never; replaying it shows the answer unmasking.
    steps_run:     [B] int32, steps in which the row was still active (ran a step that could
                   commit something).
    confidence:    [B, gen_length] float32, the selection score each position had when it was
                   committed (softmax probability for "low_confidence", the uniform draw for
                   "random"), NaN if never committed.
    refreshed:     [B, steps] bool, True at the global steps that ran a full forward refreshing
                   the KV cache (all rows alike; all False without a cache and after the loop).
    """

    tokens: Array
    answer_length: Array
    commit_step: Array
    steps_run: Array
    confidence: Array
    refreshed: Array


@flax.struct.dataclass
class SamplerState:
    """The while loop's carry. B rows, P prompt positions, L = gen_length, Bl = block_length."""

    step: Array  # [] int32, global step (counts over all blocks; keys the random draws)
    block: Array  # [] int32, current block (the same for every row)
    block_step: Array  # [] int32, steps run in the current block
    canvas: Array  # [B, P + L, D], prompt embeddings then the generated region's embeddings
    tokens: Array  # [B, L] int32, MASK where not committed
    committed: Array  # [B, L] bool
    commit_step: Array  # [B, L] int32, global step of the commit, -1 if none
    confidence: Array  # [B, L] f32, selection score at the commit, NaN if none
    stop: Array  # [B] int32, index of the first committed eot in the generated region, L if none
    done: Array  # [B] bool, every position before the stop is committed
    steps_run: Array  # [B] int32, steps in which the row could commit
    block_masked: Array  # [B] int32, masked count of the current block at its start
    refreshed: Array  # [steps] bool, steps that refreshed the KV cache
    cache: Any  # (keys, values) [layers, B', P + L, KV, Dh] each (B' = 2B with CFG), or None
    draft: Any  # [B, Bl] int32, last step's draft (adaptive stop), or None
    stable: Any  # [B] int32, consecutive steps the draft was unchanged (adaptive stop), or None


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: compared and hashed by identity
class StepContext:
    """What every step reads and never changes. The arrays are computed once before the loop;
    the loop body captures them rather than carrying them."""

    model: LLaDA
    variables: Any  # {"params": the language model's parameters}
    plan: Plan
    knobs: Knobs
    logits_processor: LogitsProcessor | None
    on_block: BlockCallback | None
    row_keys: Array  # [B] typed PRNG keys
    batch: int  # B
    prompt_len: int  # P
    dtype: Any  # the embeddings' dtype (the canvas is kept in it)
    key_mask: Array  # [B', P + L] bool, valid keys (B' = 2B with CFG: conditional rows first)
    positions: Array  # [B', P + L] int32
    uncond_prompt: Array | None  # [B, P, D], the prompt with valid positions -> MASK (CFG only)
    banned: Array  # [V] bool, ids never sampled at a masked position
    gen_idx: Array  # [L] int32, 0..L-1
    blk_off: Array  # [Bl] int32, 0..Bl-1

    @property
    def block_len(self) -> int:
        return self.plan.block_length

    @property
    def lm_config(self) -> LLaDAConfig:
        return self.model.config


def transfer_counts(masked: int, steps: int) -> list[int]:
    """Tokens committed at each of ``steps`` steps of a block holding ``masked`` masked positions."""
    return [masked // steps + (1 if i < masked % steps else 0) for i in range(steps)]


def banned_ids(lm_config: LLaDAConfig) -> np.ndarray:
    """[vocab_size] bool: ids never sampled at a masked position (docs/algorithm.md §5 step 3 and §1)."""
    banned = np.arange(lm_config.vocab_size) >= lm_config.tokenizer_vocab_size
    for token_id in (
        lm_config.bos_token_id,
        lm_config.eos_token_id,
        lm_config.start_header_id,
        lm_config.end_header_id,
    ):
        if 0 <= token_id < lm_config.vocab_size:
            banned[token_id] = True
    return banned


def prefix_span_groups(plan: Plan) -> int:
    """Blocks per prefix-cache span group (see PREFIX_SPAN_BRANCHES)."""
    return -(-plan.num_blocks // min(plan.num_blocks, PREFIX_SPAN_BRANCHES))


def _rank_desc(conf: Array) -> Array:
    """Rank of each entry of each row in descending order, ties to the lower index. [B, N]."""
    n = conf.shape[-1]
    ci = conf[:, None, :]  # the others
    cj = conf[:, :, None]  # the one being ranked
    lower = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]  # [j, i]: i < j
    beats = (ci > cj) | ((ci == cj) & lower[None])
    return jnp.sum(beats, axis=-1, dtype=jnp.int32)


def _entropy(logits: Array) -> Array:
    """Entropy (nats) of softmax(logits) over the last axis; -inf logits (bans) contribute 0."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def _embed(ctx: StepContext, tokens: Array) -> Array:
    return ctx.model.apply(ctx.variables, tokens, method=LLaDA.embed)


def _block_slice(ctx: StepContext, x: Array, g0: Array) -> Array:
    """Columns [g0, g0 + block_length) of a [B, L] array of the generated region."""
    return jax.lax.dynamic_slice_in_dim(x, g0, ctx.block_len, axis=1)


# ---- logits of the current block ---------------------------------------------------------------


def _model_input(ctx: StepContext, canvas: Array) -> Array:
    """[B', T, D]: the canvas, and with CFG its unconditional copy stacked after it."""
    if ctx.plan.guidance:
        uncond = jnp.concatenate([ctx.uncond_prompt, canvas[:, ctx.prompt_len:]], axis=1)
        return jnp.concatenate([canvas, uncond], axis=0)
    return canvas


def _guided(ctx: StepContext, logits: Array) -> Array:
    """Classifier-free guidance: combine the conditional and unconditional halves of the batch."""
    if ctx.plan.guidance:
        cond, uncond = logits[: ctx.batch], logits[ctx.batch:]
        return uncond + (ctx.knobs.cfg_scale + 1.0) * (cond - uncond)
    return logits


def block_logits(ctx: StepContext, canvas: Array, start: Array) -> Array:
    """fp32 logits [B, block_len, V] of canvas positions [start, start + block_len), from a plain
    forward over the whole canvas."""
    logits = ctx.model.apply(
        ctx.variables,
        _model_input(ctx, canvas),
        ctx.key_mask,
        ctx.positions,
        start,
        ctx.block_len,
        method=LLaDA.forward_embeds,
    )
    return _guided(ctx, logits)


def _refresh_logits(ctx: StepContext, start: Array, canvas: Array, cache: Any):
    """A refresh: the plain forward over everything, storing every layer's keys/values."""
    logits, cache = ctx.model.apply(
        ctx.variables,
        _model_input(ctx, canvas),
        ctx.key_mask,
        ctx.positions,
        cache,
        0,
        start,
        ctx.block_len,
        method=LLaDA.forward_cached,
    )
    return _guided(ctx, logits), cache


def _span_logits(ctx: StepContext, start: Array, lo: Any, length: int, canvas: Array, cache: Any):
    """Recompute canvas positions [lo, lo + length) (lo traced, length static) against the cache;
    logits of the current block (which starts at canvas position ``start``)."""
    x = jax.lax.dynamic_slice_in_dim(_model_input(ctx, canvas), lo, length, axis=1)
    pos = jax.lax.dynamic_slice_in_dim(ctx.positions, lo, length, axis=1)
    logits, _ = ctx.model.apply(
        ctx.variables, x, ctx.key_mask, pos, cache, lo, start - lo, ctx.block_len,
        method=LLaDA.forward_cached,
    )
    return _guided(ctx, logits), cache


def _prefix_span_logits(ctx: StepContext, start: Array, g0: Array, canvas: Array, cache: Any):
    """Prefix mode: recompute from the first block of the step's group to the end of the canvas.
    The span length is static per branch, hence one lax.switch branch per group."""
    plan, block_len = ctx.plan, ctx.block_len
    total = ctx.prompt_len + plan.gen_length
    group = prefix_span_groups(plan)
    branches = []
    for g in range(-(-plan.num_blocks // group)):
        lo = ctx.prompt_len + g * group * block_len
        branches.append(functools.partial(_span_logits, ctx, start, lo, total - lo))
    return jax.lax.switch(g0 // (group * block_len), branches, canvas, cache)


def cached_logits(ctx: StepContext, canvas: Array, cache: Any, g0: Array, block_step: Array):
    """(fp32 logits [B, block_len, V] of the current block, cache, refreshed?): a refresh at the
    block's first step and every ``refresh_every`` steps after it, a span against the cache
    otherwise."""
    start = ctx.prompt_len + g0
    refresh = block_step % ctx.knobs.refresh_every == 0
    if ctx.plan.cache_mode == "dual":
        partial = functools.partial(_span_logits, ctx, start, start, ctx.block_len)
    else:
        partial = functools.partial(_prefix_span_logits, ctx, start, g0)
    logits, cache = jax.lax.cond(
        refresh, functools.partial(_refresh_logits, ctx, start), partial, canvas, cache
    )
    return logits, cache, refresh


def step_logits(ctx: StepContext, st: SamplerState, g0: Array):
    """(logits [B, Bl, V] after guidance, the logits processor and the bans; cache; refreshed)."""
    cache, refreshed = st.cache, st.refreshed
    if ctx.plan.cache_mode is None:
        logits = block_logits(ctx, st.canvas, ctx.prompt_len + g0)
    else:
        logits, cache, did_refresh = cached_logits(ctx, st.canvas, st.cache, g0, st.block_step)
        refreshed = refreshed.at[st.step].set(did_refresh)
    if ctx.logits_processor is not None:
        logits = ctx.logits_processor(logits, g0 + ctx.blk_off)
    logits = jnp.where(ctx.banned, -jnp.inf, logits)  # [B, Bl, V]
    return logits, cache, refreshed


# ---- token selection ----------------------------------------------------------------------------


def candidates(ctx: StepContext, logits: Array, t: Array) -> tuple[Array, Array]:
    """(x0 [B, Bl] int32, confidence [B, Bl] f32): the candidate token of every position of the
    block (Gumbel-max at T > 0, argmax at T = 0) and its selection score (softmax probability for
    "low_confidence", a uniform draw for "random"). Draws use the row's step key fold_in(key, t)."""
    plan, block_len = ctx.plan, ctx.block_len
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(ctx.row_keys, t)
    if plan.sample:
        gumbel = jax.vmap(
            lambda key: jax.random.gumbel(
                jax.random.fold_in(key, 0), (block_len, ctx.lm_config.vocab_size), jnp.float32
            )
        )(step_keys)
        x0 = jnp.argmax(logits / ctx.knobs.temperature + gumbel, axis=-1)
    else:
        x0 = jnp.argmax(logits, axis=-1)
    x0 = x0.astype(jnp.int32)
    if plan.remasking == "low_confidence":
        probs = jax.nn.softmax(logits, axis=-1)
        conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    else:
        conf = jax.vmap(
            lambda key: jax.random.uniform(jax.random.fold_in(key, 1), (block_len,), jnp.float32)
        )(step_keys)
    return x0, conf


def select_positions(ctx: StepContext, conf: Array, eligible: Array, k: Array) -> Array:
    """[B, Bl] bool: the ``k`` [B] most confident eligible positions (``conf`` is -inf at the
    others), plus, with threshold decoding, every eligible one above the threshold."""
    select = eligible & (_rank_desc(conf) < k[:, None])
    if ctx.plan.threshold:
        select = select | (eligible & (conf > ctx.knobs.threshold))
    return select


def adaptive_halt(
    ctx: StepContext,
    st: SamplerState,
    logits: Array,
    x0: Array,
    committed_blk: Array,
    before_stop: Array,
    eligible: Array,
    select: Array,
    tokens_blk: Array,
):
    """The adaptive stop (``AdaptiveStop``): a row whose draft is stable and confident commits
    the whole draft. Returns (select, tokens_blk, draft, stable) updated."""
    block_len, eot_id = ctx.block_len, ctx.lm_config.eot_token_id
    best = x0 if not ctx.plan.sample else jnp.argmax(logits, axis=-1).astype(jnp.int32)
    draft = jnp.where(committed_blk | select, tokens_blk, best)  # [B, Bl]
    # The part of the draft that can end up in the answer: up to its first end-of-turn.
    is_eot = before_stop & (draft == eot_id)
    first = jnp.where(jnp.any(is_eot, axis=1), jnp.argmax(is_eot, axis=1), block_len)
    span = before_stop & (ctx.blk_off[None, :] <= first[:, None])
    draft = jnp.where(span, draft, -1)
    same = jnp.all(draft == st.draft, axis=1) & (st.block_step > 0)
    stable = jnp.where(same, st.stable + 1, 0)
    open_ = span & eligible & ~select  # still masked after this step's commits
    n_open = jnp.sum(open_, axis=1)
    mean_entropy = jnp.sum(jnp.where(open_, _entropy(logits), 0.0), axis=1) / jnp.maximum(n_open, 1)
    halt = (stable >= ctx.knobs.patience) & (mean_entropy < ctx.knobs.max_entropy)  # [B]
    fill = open_ & halt[:, None]
    select = select | fill
    tokens_blk = jnp.where(fill, best, tokens_blk)
    return select, tokens_blk, draft, stable


# ---- the step -----------------------------------------------------------------------------------


def commit(
    ctx: StepContext,
    st: SamplerState,
    g0: Array,
    select: Array,
    tokens_blk: Array,
    committed_blk: Array,
    conf: Array,
    eligible: Array,
) -> SamplerState:
    """Write the selected positions of the block (tokens, canvas embeddings, commit step and
    confidence), move each row's stop to its earliest committed end-of-turn, and advance the
    block once no row can commit in it any more. The fields the step's other parts own
    (block_masked, refreshed, cache, draft, stable) are left as in ``st``."""
    t, i = st.step, st.block_step
    plan, block_len, prompt_len = ctx.plan, ctx.block_len, ctx.prompt_len
    gen_len, eot_id = plan.gen_length, ctx.lm_config.eot_token_id

    def put(full, blk):
        return jax.lax.dynamic_update_slice_in_dim(full, blk, g0, axis=1)

    tokens = put(st.tokens, tokens_blk)
    committed_blk = committed_blk | select
    committed = put(st.committed, committed_blk)
    commit_step = put(st.commit_step, jnp.where(select, t, _block_slice(ctx, st.commit_step, g0)))
    confidence = put(st.confidence, jnp.where(select, conf, _block_slice(ctx, st.confidence, g0)))
    canvas_blk = jax.lax.dynamic_slice_in_dim(st.canvas, prompt_len + g0, block_len, axis=1)
    canvas_blk = jnp.where(select[..., None], _embed(ctx, tokens_blk).astype(ctx.dtype), canvas_blk)
    canvas = jax.lax.dynamic_update_slice_in_dim(st.canvas, canvas_blk, prompt_len + g0, axis=1)

    is_eot = committed & (tokens == eot_id)
    first_eot = jnp.where(
        jnp.any(is_eot, axis=1), jnp.argmax(is_eot, axis=1).astype(jnp.int32), gen_len
    )
    stop = jnp.minimum(st.stop, first_eot)
    pending = jnp.any(~committed & (ctx.gen_idx[None, :] < stop[:, None]), axis=1)
    done = st.done | ~pending
    active = jnp.any(eligible, axis=1)
    # The block advances for the whole batch once no row can commit in it any more (the exact
    # schedule fills it at its last step).
    left = ~committed_blk & ((g0 + ctx.blk_off)[None, :] < stop[:, None]) & ~done[:, None]
    advance = ~jnp.any(left) | (i + 1 >= plan.steps_per_block)
    if ctx.on_block is not None:
        # Every position of a finished block before a row's stop is committed: the answers
        # so far can be shown while later blocks are still being written.
        jax.lax.cond(
            advance,
            lambda: jax.debug.callback(ctx.on_block, st.block, tokens, stop, ordered=True),
            lambda: None,
        )
    return SamplerState(
        step=t + 1,
        block=st.block + advance.astype(jnp.int32),
        block_step=jnp.where(advance, 0, i + 1),
        canvas=canvas,
        tokens=tokens,
        committed=committed,
        commit_step=commit_step,
        confidence=confidence,
        stop=stop,
        done=done,
        steps_run=st.steps_run + active.astype(jnp.int32),
        block_masked=st.block_masked,
        refreshed=st.refreshed,
        cache=st.cache,
        draft=st.draft,
        stable=st.stable,
    )


def diffusion_step(ctx: StepContext, st: SamplerState) -> SamplerState:
    """One step: logits of the current block, candidates, selection, commit."""
    i = st.block_step
    spb = ctx.plan.steps_per_block
    g0 = st.block * ctx.block_len  # block start in the generated region
    committed_blk = _block_slice(ctx, st.committed, g0)
    block_masked = jnp.where(
        i == 0, jnp.sum(~committed_blk, axis=1, dtype=jnp.int32), st.block_masked
    )
    # The schedule: the block's masked count at its start spread over its steps (transfer_counts).
    k = block_masked // spb + (i < block_masked % spb).astype(jnp.int32)  # [B]

    logits, cache, refreshed = step_logits(ctx, st, g0)
    x0, conf = candidates(ctx, logits, st.step)

    before_stop = (g0 + ctx.blk_off)[None, :] < st.stop[:, None]
    eligible = ~committed_blk & before_stop & ~st.done[:, None]
    conf = jnp.where(eligible, conf, -jnp.inf)
    select = select_positions(ctx, conf, eligible, k)  # [B, Bl]
    tokens_blk = jnp.where(select, x0, _block_slice(ctx, st.tokens, g0))
    draft, stable = st.draft, st.stable
    if ctx.plan.adaptive:
        select, tokens_blk, draft, stable = adaptive_halt(
            ctx, st, logits, x0, committed_blk, before_stop, eligible, select, tokens_blk
        )
    return commit(ctx, st, g0, select, tokens_blk, committed_blk, conf, eligible).replace(
        block_masked=block_masked, refreshed=refreshed, cache=cache, draft=draft, stable=stable
    )


def _continues(plan: Plan, st: SamplerState) -> Array:
    return (st.step < plan.steps) & ~jnp.all(st.done) & (st.block < plan.num_blocks)


def run_sampler(
    lm_config: LLaDAConfig,
    plan: Plan,
    lm_params: Any,
    prompt_embeds: Array,  # [B, P, D]
    prompt_mask: Array,  # [B, P] bool
    row_keys: Array,  # [B] typed keys
    knobs: Knobs,
    logits_processor: LogitsProcessor | None = None,
    on_block: BlockCallback | None = None,
) -> SampleOutput:
    """The whole sampler, traceable: canvas setup, then ``diffusion_step`` in one while loop."""
    model = LLaDA(lm_config)
    variables = {"params": lm_params}
    batch, prompt_len, hidden = prompt_embeds.shape
    gen_len, block_len = plan.gen_length, plan.block_length
    total = prompt_len + gen_len
    mask_id = lm_config.mask_token_id

    mask_embed = model.apply(variables, jnp.full((1, 1), mask_id, jnp.int32), method=LLaDA.embed)[0, 0]  # [D]
    dtype = mask_embed.dtype
    prompt_embeds = prompt_embeds.astype(dtype)
    prompt_mask = prompt_mask.astype(jnp.bool_)
    canvas = jnp.concatenate(
        [prompt_embeds, jnp.broadcast_to(mask_embed, (batch, gen_len, hidden))], axis=1
    )
    key_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, gen_len), jnp.bool_)], axis=1)
    positions = default_positions(key_mask, batch, total)
    uncond_prompt = None
    if plan.guidance:
        # Unconditional pass: every valid prompt position (image features included) -> MASK.
        uncond_prompt = jnp.where(prompt_mask[..., None], mask_embed, prompt_embeds)
        key_mask = jnp.concatenate([key_mask, key_mask], axis=0)
        positions = jnp.concatenate([positions, positions], axis=0)
    ctx = StepContext(
        model=model,
        variables=variables,
        plan=plan,
        knobs=knobs,
        logits_processor=logits_processor,
        on_block=on_block,
        row_keys=row_keys,
        batch=batch,
        prompt_len=prompt_len,
        dtype=dtype,
        key_mask=key_mask,
        positions=positions,
        uncond_prompt=uncond_prompt,
        banned=jnp.asarray(banned_ids(lm_config)),
        gen_idx=jnp.arange(gen_len, dtype=jnp.int32),
        blk_off=jnp.arange(block_len, dtype=jnp.int32),
    )

    cache = None
    if plan.cache_mode is not None:
        cache = init_cache(lm_config, batch * (2 if plan.guidance else 1), total)
    init = SamplerState(
        step=jnp.zeros((), jnp.int32),
        block=jnp.zeros((), jnp.int32),
        block_step=jnp.zeros((), jnp.int32),
        canvas=canvas,
        tokens=jnp.full((batch, gen_len), mask_id, jnp.int32),
        committed=jnp.zeros((batch, gen_len), jnp.bool_),
        commit_step=jnp.full((batch, gen_len), -1, jnp.int32),
        confidence=jnp.full((batch, gen_len), jnp.nan, jnp.float32),
        stop=jnp.full((batch,), gen_len, jnp.int32),
        done=jnp.zeros((batch,), jnp.bool_),
        steps_run=jnp.zeros((batch,), jnp.int32),
        block_masked=jnp.zeros((batch,), jnp.int32),
        refreshed=jnp.zeros((plan.steps,), jnp.bool_),
        cache=cache,
        draft=jnp.full((batch, block_len), -1, jnp.int32) if plan.adaptive else None,
        stable=jnp.zeros((batch,), jnp.int32) if plan.adaptive else None,
    )
    final = jax.lax.while_loop(
        functools.partial(_continues, plan), functools.partial(diffusion_step, ctx), init
    )
    return SampleOutput(
        tokens=final.tokens,
        answer_length=final.stop,
        commit_step=final.commit_step,
        steps_run=final.steps_run,
        confidence=final.confidence,
        refreshed=jnp.broadcast_to(final.refreshed, (batch, plan.steps)),
    )
