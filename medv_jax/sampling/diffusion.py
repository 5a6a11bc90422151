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

Layout: ``sampler_config`` (the settings and their validation), ``program`` (the compiled loop),
``host`` (padding, embedding, validation, keys and replay on the host); this module holds the
jitted entry points and re-exports the public names of the others.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medv_jax.models.llada import LLaDA, LLaDAConfig
# The public names of the sampler live in these modules; they are re-exported here so that
# ``from medv_jax.sampling.diffusion import X`` is the one import users need.
from medv_jax.sampling.host import embed_prompt, left_pad, replay, row_keys_for, validate_prompt
from medv_jax.sampling.program import (
    PREFIX_SPAN_BRANCHES,
    BlockCallback,
    LogitsProcessor,
    SampleOutput,
    banned_ids,
    prefix_span_groups,
    run_sampler,
    transfer_counts,
)
from medv_jax.sampling.sampler_config import (
    CACHE_MODES,
    REMASKING,
    AdaptiveStop,
    CachePolicy,
    SamplerConfig,
    ThresholdSelection,
)

__all__ = [
    "CACHE_MODES",
    "PREFIX_SPAN_BRANCHES",
    "REMASKING",
    "AdaptiveStop",
    "BlockCallback",
    "CachePolicy",
    "LogitsProcessor",
    "SampleOutput",
    "SamplerConfig",
    "ThresholdSelection",
    "banned_ids",
    "compile_generate_text",
    "embed_prompt",
    "generate_text",
    "left_pad",
    "prefix_span_groups",
    "replay",
    "row_keys_for",
    "sample",
    "sample_loop",
    "transfer_counts",
    "validate_prompt",
]

Array = jax.Array


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
    return run_sampler(
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
    return run_sampler(
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
    return run_sampler(
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
