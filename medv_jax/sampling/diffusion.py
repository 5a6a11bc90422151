"""Reverse-diffusion sampling for LLaDA / LLaDA-MedV as one compiled program.

The algorithm is docs/algorithm.md §5 (the reference code: LLaDA-V's
``LLaDAModelLM.generate_with_embeds``):

* canvas = prompt embeddings followed by ``gen_length`` MASK positions; the generated region is
  cut into ``num_blocks = gen_length // block_length`` blocks, filled left to right, each given
  ``steps_per_block = steps // num_blocks`` steps;
* at the start of a block with ``n`` masked positions, step ``i`` of the block commits
  ``n // steps_per_block + (i < n % steps_per_block)`` tokens;
* each step runs the model over the whole canvas; at masked positions the ids BOS, EOS and the two
  header ids, and every id ``>= tokenizer_vocab_size``, are banned (-inf); candidate
  ``x0 = argmax(logits / T + gumbel)`` (plain argmax at ``T = 0``); confidence is the softmax
  probability of ``x0`` under the un-noised logits ("low_confidence") or ``U(0, 1)`` ("random");
  the ``k`` most confident eligible positions are committed, eligible = still masked, inside the
  current block and before the row's stop;
* classifier-free guidance (``cfg_scale = w > 0``): a second pass with every valid prompt
  position (image features included) replaced by the MASK embedding,
  ``logits = uncond + (w + 1) * (cond - uncond)``; the bans are applied after the combination;
* stop: after each step the earliest *committed* end-of-turn token of the row is its stop;
  positions after it are never committed, later blocks are skipped, and the answer is the tokens
  before it. A row is done once every position before its stop is committed (or all steps ran);
  the loop ends as soon as every row is done.

Only committed tokens take part in the stop rule and every position before the current block is
already committed, so the only logits a step needs are those of the current block: the LM head
runs on ``[B, block_length]`` positions (``LLaDA.forward_embeds``' logits slice), never on the
whole canvas.

Random draws (defined here so that a plain reimplementation can reproduce them): every row ``r``
has its own key ``key_r``; at global step ``t`` (``0 <= t < steps``, counted over all blocks) the
row's step key is ``fold_in(key_r, t)``; the Gumbel noise of the current block is
``jax.random.gumbel(fold_in(step_key, 0), (block_length, vocab_size), float32)`` and the "random"
confidences are ``jax.random.uniform(fold_in(step_key, 1), (block_length,), float32)``. A row's
draws therefore depend on its own key only, not on its place in the batch.

Ties in confidence are broken towards the lower position (as ``lax.top_k``); argmax ties towards
the lower id.

Fast modes (opt-in fields of ``SamplerConfig``; each is still one jitted while loop):

* ``cache=CachePolicy("prefix" | "dual", refresh_every=K)``: a KV cache (``LLaDA.forward_cached``).
  At the first step of every block and every K steps after it the full canvas runs and every
  layer's keys/values are stored; the other steps recompute only the current block onward
  ("prefix", the span starts at the block's group, see ``PREFIX_SPAN_BRANCHES``) or only the
  current block ("dual"), reading the other positions' keys/values from the cache. Approximate
  (bidirectional attention: cached entries go stale as the canvas fills); K = 1 is exact.
  ``SampleOutput.refreshed`` records the steps that refreshed.
* ``selection=ThresholdSelection(threshold)``: besides the scheduled count, every eligible
  position with confidence > threshold is committed in the same step; 1.0 is exact.
* ``adaptive_stop=AdaptiveStop(patience, max_entropy)``: a row whose draft of the block (committed
  tokens + argmax elsewhere, up to its first end-of-turn) is unchanged for ``patience`` steps and
  whose open positions have mean entropy < ``max_entropy`` commits the whole draft at once.

With any fast mode the blocks advance for the whole batch once no row can commit in the current
block (the exact schedule does this after ``steps_per_block`` steps; threshold decoding and the
adaptive stop usually much earlier); a row that filled its block early waits (not counted in its
``steps_run``). The global step ``t`` (random draws, refresh schedule) is then a batch-level count,
so with several blocks a row with random draws (T > 0 or "random" remasking) or a cache may
depend on its batch-mates; with one block, or deterministic decoding without a cache, it does not.

Differences from the reference code (docs/algorithm.md wins where they disagree):

* Gumbel-max in fp32 as ``argmax(logits / T + g)`` (docs/algorithm.md §5); the reference uses
  float64 and the equivalent form ``exp(logits) / (-log u) ** T``. Softmax confidences are fp32 too.
* Ids ``>= tokenizer_vocab_size`` are banned at masked positions (docs/algorithm.md §1); the
  reference leaves them.
* "Masked" is tracked as an explicit per-position state rather than by comparing embeddings with
  the MASK embedding: a committed token whose id happens to be MASK (not banned in
  docs/algorithm.md §5) stays committed, and MASK embeddings inside the prompt are never treated as positions to fill.
* When fewer eligible positions remain than the step's scheduled count (only after a stop),
  only the eligible ones are committed; the reference's ``topk`` would also pick -inf positions.
* The stop rule always applies (the reference applies it only when given ``stopping_criteria``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medv_jax.models.llada import LLaDA, LLaDAConfig, default_positions, init_cache

Array = jax.Array
# fn(logits [B, n, V] fp32, gen_index [n] int32) -> logits [B, n, V]: an optional hook applied to
# the (guided) logits of the current block before the bans; gen_index are the positions of those
# logits in the generated region. Must be hashable (it is a static argument of the program).
LogitsProcessor = Callable[[Array, Array], Array]

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("prefix", "dual")
# Prefix-cache mode recomputes "the current block onward"; that span's length depends on the block,
# so each length is its own branch of one lax.switch. Blocks are grouped so that at most this many
# branches (model copies in the program) exist; a group's span starts at its first block.
PREFIX_SPAN_BRANCHES = 4


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value > 0


# Called on the host as each block is finished: (block index [], tokens [B, gen_length],
# stop [B]); positions before min(stop, (block + 1) * block_length) are final.
BlockCallback = Callable[[Any, Any, Any], None]


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """KV cache for the fast modes (approximate: attention is bidirectional, so cached keys/values
    go stale as the canvas changes).

    mode:          "prefix": keys/values of every position are stored at a refresh; between
                   refreshes each step recomputes the current block and everything after it,
                   reading the positions before the block (prompt and finished blocks) from the
                   cache. "dual": the positions after the block (the masked tail) are read from
                   the cache too, so each step recomputes the current block only.
    refresh_every: K: a refresh (a full forward, whose logits that step uses) runs at the first
                   step of every block and then every K steps of the block (steps i of the block
                   with i % K == 0). K = 1 refreshes at every step, which is the exact sampler.
    """

    mode: str = "prefix"
    refresh_every: int = 8

    def __post_init__(self):
        if self.mode not in CACHE_MODES:
            raise ValueError(f"cache mode={self.mode!r} is not one of {list(CACHE_MODES)}")
        if not _positive_int(self.refresh_every):
            raise ValueError(f"cache refresh_every={self.refresh_every!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class ThresholdSelection:
    """Confidence-threshold parallel decoding: besides the step's scheduled count (the most
    confident eligible positions, at least one), every eligible position whose confidence is
    strictly above ``threshold`` is committed, so a block ends as soon as it is filled and easy
    answers take far fewer steps. ``threshold = 1.0`` commits nothing extra (a softmax
    probability never exceeds 1): the exact sampler. Needs ``remasking="low_confidence"``."""

    threshold: float = 0.9

    def __post_init__(self):
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold={t!r} must be a number in [0, 1]")


@dataclasses.dataclass(frozen=True)
class AdaptiveStop:
    """Adaptive stopping, after transformers' DiffusionGemma ``StableAndConfidentStoppingCriteria``
    (stop when the argmax canvas is unchanged for ``stability_threshold`` steps and the mean token
    entropy is below ``confidence_threshold``), transposed to a masked model:

    * the row's *draft* of the current block is its committed tokens plus the argmax prediction at
      every still-masked position; only the part that can end up in the answer counts, i.e. the
      positions up to and including the draft's first end-of-turn;
    * stable: that draft is identical to the previous step's for ``patience`` consecutive steps
      (0: no stability condition); confident: the mean entropy (nats) of the predictive
      distributions (after the bans) over the draft's still-masked positions is below
      ``max_entropy``;
    * when both hold the row commits its whole draft at once (so a drafted end-of-turn stops it)
      and its block is finished.
    """

    patience: int = 1
    max_entropy: float = 0.1

    def __post_init__(self):
        p = self.patience
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0:
            raise ValueError(f"adaptive_stop patience={p!r} must be an integer >= 0")
        e = self.max_entropy
        if isinstance(e, bool) or not isinstance(e, (int, float, np.floating)) or not (np.isfinite(e) and e > 0):
            raise ValueError(f"adaptive_stop max_entropy={e!r} must be a finite number > 0")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Schedule and settings of one generation (validated on construction).

    Paper settings: VQA ``gen_length = block_length = steps = 128``; open conversation
    ``gen_length = 256, block_length = 64, steps = 256``.

    Fast modes (opt-in, each still one compiled program): ``cache`` (a ``CachePolicy``: prefix or
    dual KV cache), ``selection`` (a ``ThresholdSelection``: confidence-threshold parallel
    decoding), ``adaptive_stop`` (an ``AdaptiveStop``). With any of them the blocks advance when
    every row of the batch has filled the current one (or stopped), so ``steps`` is an upper bound
    and ``SampleOutput.steps_run`` the steps a row used.
    """

    gen_length: int = 128
    block_length: int = 128
    steps: int = 128
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    cache: CachePolicy | None = None
    selection: ThresholdSelection | None = None
    adaptive_stop: AdaptiveStop | None = None

    def __post_init__(self):
        for name in ("gen_length", "block_length", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}"
            )
        if self.steps % self.num_blocks:
            raise ValueError(
                f"steps={self.steps} is not a multiple of the number of blocks "
                f"(gen_length // block_length = {self.num_blocks})"
            )
        if self.steps > self.gen_length:
            raise ValueError(f"steps={self.steps} exceeds gen_length={self.gen_length}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r} is not one of {list(REMASKING)}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0")
        if not np.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"cfg_scale={self.cfg_scale!r} must be a finite number >= 0")
        for name, kind in (("cache", CachePolicy), ("selection", ThresholdSelection), ("adaptive_stop", AdaptiveStop)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"{name}: expected a {kind.__name__} or None, got {type(value).__name__}")
        if self.selection is not None and self.remasking != "low_confidence":
            raise ValueError(
                f"selection (threshold decoding) needs remasking='low_confidence', got remasking={self.remasking!r}"
            )

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def replace(self, **changes: Any) -> "SamplerConfig":
        return dataclasses.replace(self, **changes)

    def _plan(self) -> "_Plan":
        return _Plan(
            gen_length=self.gen_length,
            block_length=self.block_length,
            steps=self.steps,
            remasking=self.remasking,
            sample=self.temperature > 0,
            guidance=self.cfg_scale > 0,
            cache_mode=None if self.cache is None else self.cache.mode,
            threshold=self.selection is not None,
            adaptive=self.adaptive_stop is not None,
        )

    def _knobs(self) -> "_Knobs":
        """The traced (recompile-free) values of the configuration."""
        return _Knobs(
            temperature=jnp.float32(self.temperature),
            cfg_scale=jnp.float32(self.cfg_scale),
            refresh_every=jnp.int32(1 if self.cache is None else self.cache.refresh_every),
            threshold=jnp.float32(1.0 if self.selection is None else self.selection.threshold),
            patience=jnp.int32(0 if self.adaptive_stop is None else self.adaptive_stop.patience),
            max_entropy=jnp.float32(0.0 if self.adaptive_stop is None else self.adaptive_stop.max_entropy),
        )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static (shape- and branch-deciding) part of a SamplerConfig: the jit cache key.

    Temperature and CFG scale values are traced, so changing them does not recompile.
    """

    gen_length: int
    block_length: int
    steps: int
    remasking: str
    sample: bool
    guidance: bool
    cache_mode: str | None = None
    threshold: bool = False
    adaptive: bool = False

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def fast(self) -> bool:
        return self.cache_mode is not None or self.threshold or self.adaptive


@flax.struct.dataclass
class _Knobs:
    """Traced scalars of a SamplerConfig (changing them does not recompile)."""

    temperature: Array  # [] f32
    cfg_scale: Array  # [] f32
    refresh_every: Array  # [] int32
    threshold: Array  # [] f32
    patience: Array  # [] int32
    max_entropy: Array  # [] f32


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
class _State:
    step: Array  # [] int32, global step
    block: Array  # [] int32, current block (the same for every row)
    block_step: Array  # [] int32, steps run in the current block
    canvas: Array  # [B, P + L, D]
    tokens: Array  # [B, L] int32
    committed: Array  # [B, L] bool
    commit_step: Array  # [B, L] int32
    confidence: Array  # [B, L] f32
    stop: Array  # [B] int32, index of the first committed eot in the generated region, L if none
    done: Array  # [B] bool
    steps_run: Array  # [B] int32
    block_masked: Array  # [B] int32, masked count of the current block at its start
    refreshed: Array  # [steps] bool
    cache: Any  # (keys, values) [layers, B', P + L, KV, Dh] each (B' = 2B with CFG), or None
    draft: Any  # [B, Bl] int32, last step's draft (adaptive stop), or None
    stable: Any  # [B] int32, consecutive steps the draft was unchanged (adaptive stop), or None


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


def prefix_span_groups(plan: "_Plan") -> int:
    """Blocks per prefix-cache span group (see PREFIX_SPAN_BRANCHES)."""
    return -(-plan.num_blocks // min(plan.num_blocks, PREFIX_SPAN_BRANCHES))


def _run(
    lm_config: LLaDAConfig,
    plan: _Plan,
    lm_params: Any,
    prompt_embeds: Array,  # [B, P, D]
    prompt_mask: Array,  # [B, P] bool
    row_keys: Array,  # [B] typed keys
    knobs: _Knobs,
    logits_processor: LogitsProcessor | None = None,
    on_block: BlockCallback | None = None,
) -> SampleOutput:
    model = LLaDA(lm_config)
    variables = {"params": lm_params}
    batch, prompt_len, hidden = prompt_embeds.shape
    gen_len, block_len = plan.gen_length, plan.block_length
    spb = plan.steps_per_block
    total = prompt_len + gen_len
    vocab = lm_config.vocab_size
    mask_id, eot_id = lm_config.mask_token_id, lm_config.eot_token_id
    temperature, cfg_scale = knobs.temperature, knobs.cfg_scale

    def embed(tokens):
        return model.apply(variables, tokens, method=LLaDA.embed)

    mask_embed = embed(jnp.full((1, 1), mask_id, jnp.int32))[0, 0]  # [D]
    dtype = mask_embed.dtype
    prompt_embeds = prompt_embeds.astype(dtype)
    prompt_mask = prompt_mask.astype(jnp.bool_)
    canvas = jnp.concatenate(
        [prompt_embeds, jnp.broadcast_to(mask_embed, (batch, gen_len, hidden))], axis=1
    )
    key_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, gen_len), jnp.bool_)], axis=1)
    positions = default_positions(key_mask, batch, total)
    if plan.guidance:
        # Unconditional pass: every valid prompt position (image features included) -> MASK.
        uncond_prompt = jnp.where(prompt_mask[..., None], mask_embed, prompt_embeds)
        key_mask = jnp.concatenate([key_mask, key_mask], axis=0)
        positions = jnp.concatenate([positions, positions], axis=0)
    banned = jnp.asarray(banned_ids(lm_config))
    gen_idx = jnp.arange(gen_len, dtype=jnp.int32)
    blk_off = jnp.arange(block_len, dtype=jnp.int32)

    def model_input(canvas):
        """[B', T, D]: the canvas, and with CFG its unconditional copy stacked after it."""
        if plan.guidance:
            uncond = jnp.concatenate([uncond_prompt, canvas[:, prompt_len:]], axis=1)
            return jnp.concatenate([canvas, uncond], axis=0)
        return canvas

    def guided(logits):
        if plan.guidance:
            cond, uncond = logits[:batch], logits[batch:]
            return uncond + (cfg_scale + 1.0) * (cond - uncond)
        return logits

    def block_logits(canvas, start):
        """fp32 logits [B, block_len, V] of canvas positions [start, start + block_len)."""
        return guided(
            model.apply(
                variables,
                model_input(canvas),
                key_mask,
                positions,
                start,
                block_len,
                method=LLaDA.forward_embeds,
            )
        )

    def cached_logits(canvas, cache, g0, block_step):
        """(fp32 logits [B, block_len, V] of the current block, cache, refreshed?)."""
        start = prompt_len + g0
        refresh = block_step % knobs.refresh_every == 0

        def full(canvas, cache):
            # A refresh: the plain forward over everything, storing every layer's keys/values.
            logits, cache = model.apply(
                variables,
                model_input(canvas),
                key_mask,
                positions,
                cache,
                0,
                start,
                block_len,
                method=LLaDA.forward_cached,
            )
            return guided(logits), cache

        def span(lo, length, canvas, cache):
            """Recompute canvas positions [lo, lo + length) (lo traced, length static) against
            the cache; logits of the current block."""
            x = jax.lax.dynamic_slice_in_dim(model_input(canvas), lo, length, axis=1)
            pos = jax.lax.dynamic_slice_in_dim(positions, lo, length, axis=1)
            logits, _ = model.apply(
                variables, x, key_mask, pos, cache, lo, start - lo, block_len,
                method=LLaDA.forward_cached,
            )
            return guided(logits), cache

        if plan.cache_mode == "dual":
            partial = functools.partial(span, start, block_len)
        else:  # prefix: from the first block of the step's group to the end of the canvas
            group = prefix_span_groups(plan)
            branches = []
            for g in range(-(-plan.num_blocks // group)):
                lo = prompt_len + g * group * block_len
                branches.append(functools.partial(span, lo, total - lo))
            partial = lambda c, k: jax.lax.switch(g0 // (group * block_len), branches, c, k)  # noqa: E731
        logits, cache = jax.lax.cond(refresh, full, partial, canvas, cache)
        return logits, cache, refresh

    def cond_fn(st: _State):
        return (st.step < plan.steps) & ~jnp.all(st.done) & (st.block < plan.num_blocks)

    def body_fn(st: _State) -> _State:
        t = st.step
        i = st.block_step
        g0 = st.block * block_len  # block start in the generated region
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, g0, block_len, axis=1)  # noqa: E731
        committed_blk = sl(st.committed)
        block_masked = jnp.where(
            i == 0, jnp.sum(~committed_blk, axis=1, dtype=jnp.int32), st.block_masked
        )
        k = block_masked // spb + (i < block_masked % spb).astype(jnp.int32)  # [B]

        cache, refreshed = st.cache, st.refreshed
        if plan.cache_mode is None:
            logits = block_logits(st.canvas, prompt_len + g0)
        else:
            logits, cache, did_refresh = cached_logits(st.canvas, st.cache, g0, i)
            refreshed = refreshed.at[t].set(did_refresh)
        if logits_processor is not None:
            logits = logits_processor(logits, g0 + blk_off)
        logits = jnp.where(banned, -jnp.inf, logits)  # [B, Bl, V]

        step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, t)
        if plan.sample:
            gumbel = jax.vmap(
                lambda key: jax.random.gumbel(
                    jax.random.fold_in(key, 0), (block_len, vocab), jnp.float32
                )
            )(step_keys)
            x0 = jnp.argmax(logits / temperature + gumbel, axis=-1)
        else:
            x0 = jnp.argmax(logits, axis=-1)
        x0 = x0.astype(jnp.int32)
        if plan.remasking == "low_confidence":
            probs = jax.nn.softmax(logits, axis=-1)
            conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
        else:
            conf = jax.vmap(
                lambda key: jax.random.uniform(
                    jax.random.fold_in(key, 1), (block_len,), jnp.float32
                )
            )(step_keys)

        before_stop = (g0 + blk_off)[None, :] < st.stop[:, None]
        eligible = ~committed_blk & before_stop & ~st.done[:, None]
        conf = jnp.where(eligible, conf, -jnp.inf)
        select = eligible & (_rank_desc(conf) < k[:, None])  # [B, Bl]
        if plan.threshold:
            select = select | (eligible & (conf > knobs.threshold))
        tokens_blk = jnp.where(select, x0, sl(st.tokens))
        draft, stable = st.draft, st.stable
        if plan.adaptive:
            best = x0 if not plan.sample else jnp.argmax(logits, axis=-1).astype(jnp.int32)
            draft = jnp.where(committed_blk | select, tokens_blk, best)  # [B, Bl]
            # The part of the draft that can end up in the answer: up to its first end-of-turn.
            is_eot = before_stop & (draft == eot_id)
            first = jnp.where(jnp.any(is_eot, axis=1), jnp.argmax(is_eot, axis=1), block_len)
            span = before_stop & (blk_off[None, :] <= first[:, None])
            draft = jnp.where(span, draft, -1)
            same = jnp.all(draft == st.draft, axis=1) & (i > 0)
            stable = jnp.where(same, st.stable + 1, 0)
            open_ = span & eligible & ~select  # still masked after this step's commits
            n_open = jnp.sum(open_, axis=1)
            mean_entropy = jnp.sum(jnp.where(open_, _entropy(logits), 0.0), axis=1) / jnp.maximum(n_open, 1)
            halt = (stable >= knobs.patience) & (mean_entropy < knobs.max_entropy)  # [B]
            fill = open_ & halt[:, None]
            select = select | fill
            tokens_blk = jnp.where(fill, best, tokens_blk)

        def put(full, blk):
            return jax.lax.dynamic_update_slice_in_dim(full, blk, g0, axis=1)

        tokens = put(st.tokens, tokens_blk)
        committed_blk = committed_blk | select
        committed = put(st.committed, committed_blk)
        commit_step = put(st.commit_step, jnp.where(select, t, sl(st.commit_step)))
        confidence = put(st.confidence, jnp.where(select, conf, sl(st.confidence)))
        canvas_blk = jax.lax.dynamic_slice_in_dim(st.canvas, prompt_len + g0, block_len, axis=1)
        canvas_blk = jnp.where(select[..., None], embed(tokens_blk).astype(dtype), canvas_blk)
        canvas = jax.lax.dynamic_update_slice_in_dim(
            st.canvas, canvas_blk, prompt_len + g0, axis=1
        )

        is_eot = committed & (tokens == eot_id)
        first_eot = jnp.where(
            jnp.any(is_eot, axis=1), jnp.argmax(is_eot, axis=1).astype(jnp.int32), gen_len
        )
        stop = jnp.minimum(st.stop, first_eot)
        pending = jnp.any(~committed & (gen_idx[None, :] < stop[:, None]), axis=1)
        done = st.done | ~pending
        active = jnp.any(eligible, axis=1)
        # The block advances for the whole batch once no row can commit in it any more (the exact
        # schedule fills it at its last step).
        left = ~committed_blk & ((g0 + blk_off)[None, :] < stop[:, None]) & ~done[:, None]
        advance = ~jnp.any(left) | (i + 1 >= spb)
        if on_block is not None:
            # Every position of a finished block before a row's stop is committed: the answers
            # so far can be shown while later blocks are still being written.
            jax.lax.cond(
                advance,
                lambda: jax.debug.callback(on_block, st.block, tokens, stop, ordered=True),
                lambda: None,
            )
        return _State(
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
            block_masked=block_masked,
            refreshed=refreshed,
            cache=cache,
            draft=draft,
            stable=stable,
        )

    cache = None
    if plan.cache_mode is not None:
        cache = init_cache(lm_config, batch * (2 if plan.guidance else 1), total)
    init = _State(
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
    final = jax.lax.while_loop(cond_fn, body_fn, init)
    return SampleOutput(
        tokens=final.tokens,
        answer_length=final.stop,
        commit_step=final.commit_step,
        steps_run=final.steps_run,
        confidence=final.confidence,
        refreshed=jnp.broadcast_to(final.refreshed, (batch, plan.steps)),
    )


def sample_loop(
    lm_config: LLaDAConfig,
    lm_params: Any,
    prompt_embeds: Array,
    prompt_mask: Array,
    row_keys: Array,
    config: SamplerConfig,
    logits_processor: LogitsProcessor | None = None,
) -> SampleOutput:
    """The traceable sampler, for use inside a caller's own ``jax.jit`` (e.g. one program that
    encodes images, builds the prompt embeddings and samples). No validation of array values;
    call ``validate_prompt`` on the host first. ``row_keys``: [B] typed PRNG keys."""
    return _run(
        lm_config,
        config._plan(),
        lm_params,
        prompt_embeds,
        prompt_mask,
        row_keys,
        config._knobs(),
        logits_processor,
    )


_STATIC = ("lm_config", "plan", "logits_processor", "on_block")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_program(
    lm_params,
    prompt_embeds,
    prompt_mask,
    row_keys,
    knobs,
    *,
    lm_config,
    plan,
    logits_processor,
    on_block=None,
):
    return _run(
        lm_config,
        plan,
        lm_params,
        prompt_embeds,
        prompt_mask,
        row_keys,
        knobs,
        logits_processor,
        on_block,
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_program(
    lm_params,
    prompt_tokens,
    prompt_mask,
    row_keys,
    knobs,
    *,
    lm_config,
    plan,
    logits_processor,
    on_block=None,
):
    embeds = LLaDA(lm_config).apply({"params": lm_params}, prompt_tokens, method=LLaDA.embed)
    return _run(
        lm_config,
        plan,
        lm_params,
        embeds,
        prompt_mask,
        row_keys,
        knobs,
        logits_processor,
        on_block,
    )


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


def sample(
    lm_config: LLaDAConfig,
    lm_params: Any,
    prompt_embeds: Array,
    prompt_mask: Array | None,
    rng: Any,
    config: SamplerConfig,
    logits_processor: LogitsProcessor | None = None,
) -> SampleOutput:
    """Generate from prompt embeddings ``[B, P, D]`` (text and/or image features already spliced
    in), left padded with ``prompt_mask [B, P]`` (True = valid; None = no padding).

    ``lm_params`` are the language model's parameters (``params['lm']`` of a MedV model). One
    compiled program per (model config, gen/block/steps/remasking, T > 0, cfg > 0, shapes).
    """
    shape = tuple(np.shape(prompt_embeds))
    if len(shape) != 3:
        raise ValueError(f"prompt_embeds: expected [batch, prompt_len, hidden], got shape {list(shape)}")
    batch, prompt_len, hidden = shape
    if hidden != lm_config.hidden_size:
        raise ValueError(f"prompt_embeds: hidden size {hidden} != the model's {lm_config.hidden_size}")
    validate_prompt(lm_config, config, batch, prompt_len, prompt_mask)
    if prompt_mask is None:
        prompt_mask = jnp.ones((batch, prompt_len), jnp.bool_)
    return _sample_program(
        lm_params,
        prompt_embeds,
        jnp.asarray(prompt_mask, jnp.bool_),
        row_keys_for(rng, batch),
        config._knobs(),
        lm_config=lm_config,
        plan=config._plan(),
        logits_processor=logits_processor,
    )


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


def generate_text(
    lm_config: LLaDAConfig,
    lm_params: Any,
    prompts: Sequence[Sequence[int]],
    rng: Any,
    config: SamplerConfig,
    length: int | None = None,
    logits_processor: LogitsProcessor | None = None,
    on_block: BlockCallback | None = None,
) -> SampleOutput:
    """Text-only generation from token id lists (ragged; left padded with EOS to ``length`` or
    the longest). The prompt embedding happens inside the same compiled program. ``on_block``:
    called on the host as each block is finished (``BlockCallback``)."""
    if len(prompts) == 0:
        raise ValueError("prompts: empty batch (batch size 0)")
    tokens, mask = left_pad(prompts, lm_config.eos_token_id, length)
    validate_prompt(lm_config, config, tokens.shape[0], tokens.shape[1], mask)
    return _generate_program(
        lm_params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        row_keys_for(rng, tokens.shape[0]),
        config._knobs(),
        lm_config=lm_config,
        plan=config._plan(),
        logits_processor=logits_processor,
        on_block=on_block,
    )


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


def compile_generate_text(
    lm_config: LLaDAConfig,
    lm_params: Any,
    prompts: Sequence[Sequence[int]],
    rng: Any,
    config: SamplerConfig,
    length: int | None = None,
    logits_processor: LogitsProcessor | None = None,
    on_block: BlockCallback | None = None,
):
    """Ahead-of-time compiled ``generate_text`` for these prompt shapes (to time compilation apart).
    Returns ``run(prompts, rng) -> SampleOutput`` for prompts padded to the same length."""
    if len(prompts) == 0:
        raise ValueError("prompts: empty batch (batch size 0)")
    tokens, mask = left_pad(prompts, lm_config.eos_token_id, length)
    width = tokens.shape[1]
    validate_prompt(lm_config, config, tokens.shape[0], width, mask)
    compiled = _generate_program.lower(
        lm_params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        row_keys_for(rng, tokens.shape[0]),
        config._knobs(),
        lm_config=lm_config,
        plan=config._plan(),
        logits_processor=logits_processor,
        on_block=on_block,
    ).compile()

    def run(prompts: Sequence[Sequence[int]], rng: Any, settings: SamplerConfig | None = None) -> SampleOutput:
        """``settings``: other values of the traced settings of the same plan (default: ``config``)."""
        settings = config if settings is None else settings
        if settings._plan() != config._plan():
            raise ValueError("settings: a different sampler plan needs its own compiled program")
        tokens, mask = left_pad(prompts, lm_config.eos_token_id, width)
        return compiled(
            lm_params,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            row_keys_for(rng, tokens.shape[0]),
            settings._knobs(),
        )

    return run
