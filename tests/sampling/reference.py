"""A deliberately plain reimplementation of docs/algorithm.md §5, for the agreement tests.

One row at a time, no padding, Python loops and numpy; the model runs once per step (twice with
CFG) over the whole canvas through the ordinary ``LLaDA.forward_embeds`` (no logits slice). The
random draws follow the convention documented in ``medv_jax.sampling.diffusion``: row key ``key``,
step key ``fold_in(key, t)`` for the global step ``t``, Gumbel noise from ``fold_in(step_key, 0)``
with shape ``[block_length, vocab]``, "random" confidences from ``fold_in(step_key, 1)`` with
shape ``[block_length]``. Confidences are computed in float64 here (as the PyTorch reference).

Optional fast-mode token selection (``config.selection``: threshold decoding; ``config.adaptive_stop``)
as ``medv_jax.sampling.diffusion`` documents them, for a batch of one row (the jitted sampler
advances blocks for the whole batch at once). No KV cache here: cached modes are approximations
of this same loop and are tested by their own properties.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from medv_jax.models.llada import LLaDA


@functools.lru_cache(maxsize=None)
def _forward_fn(lm_config):
    model = LLaDA(lm_config)

    @jax.jit
    def forward(params, embeds):  # [1, T, D] -> [1, T, V]
        return model.apply({"params": params}, embeds, method=LLaDA.forward_embeds)

    return forward


def reference_sample(lm_config, params, prompt_embeds, key, config, logits_processor=None):
    """prompt_embeds: [P, D] numpy (one row, no padding); key: a typed PRNG key;
    logits_processor: the sampler's optional hook, applied to the whole generated region.

    Returns a dict with tokens [L], answer_length, commit_step [L], steps_run, like SampleOutput.
    """
    forward = _forward_fn(lm_config)
    table = np.asarray(params["embed_tokens"]["embedding"], np.float32)
    mask_id, eot_id = lm_config.mask_token_id, lm_config.eot_token_id
    vocab = lm_config.vocab_size
    banned = [lm_config.bos_token_id, lm_config.eos_token_id, lm_config.start_header_id,
              lm_config.end_header_id] + list(range(lm_config.tokenizer_vocab_size, vocab))
    prompt_embeds = np.asarray(prompt_embeds, np.float32)
    prompt_len = prompt_embeds.shape[0]
    gen_len, block_len = config.gen_length, config.block_length
    num_blocks = gen_len // block_len
    steps_per_block = config.steps // num_blocks

    tokens = [mask_id] * gen_len
    committed = [False] * gen_len
    commit_step = [-1] * gen_len
    stop = None
    steps_run = 0

    def logits_of(canvas):
        out = forward(params, jnp.asarray(canvas[None]))
        return np.array(out[0, prompt_len:], np.float32)  # generated region only (a writable copy)

    threshold = None if config.selection is None else config.selection.threshold
    adaptive = config.adaptive_stop
    for block in range(num_blocks):
        lo, hi = block * block_len, (block + 1) * block_len
        if stop is not None and stop <= lo:
            break  # later blocks are skipped
        n = sum(1 for j in range(lo, hi) if not committed[j])
        counts = [n // steps_per_block + (1 if i < n % steps_per_block else 0)
                  for i in range(steps_per_block)]
        previous_draft, stable = None, 0
        for i in range(steps_per_block):
            end = hi if stop is None else min(hi, stop)
            eligible = [j for j in range(lo, end) if not committed[j]]
            if not eligible:
                break
            # Global step = steps run so far (the exact schedule gives block * steps_per_block +
            # i; with fast modes a block may end early).
            t = steps_run
            steps_run += 1

            gen = np.stack([table[tokens[j]] if committed[j] else table[mask_id]
                            for j in range(gen_len)])
            canvas = np.concatenate([prompt_embeds, gen], axis=0)
            logits = logits_of(canvas)
            if config.cfg_scale > 0:
                uncond = canvas.copy()
                uncond[:prompt_len] = table[mask_id]
                un_logits = logits_of(uncond)
                w = np.float32(config.cfg_scale)
                logits = un_logits + (w + np.float32(1.0)) * (logits - un_logits)
            if logits_processor is not None:
                logits = np.array(logits_processor(
                    jnp.asarray(logits[None]), jnp.arange(gen_len, dtype=jnp.int32))[0])
            logits[:, banned] = -np.inf

            step_key = jax.random.fold_in(key, t)
            if config.temperature > 0:
                gumbel = np.asarray(jax.random.gumbel(
                    jax.random.fold_in(step_key, 0), (block_len, vocab), jnp.float32))
            if config.remasking == "random":
                uniform = np.asarray(jax.random.uniform(
                    jax.random.fold_in(step_key, 1), (block_len,), jnp.float32))

            candidate, confidence = {}, {}
            for j in eligible:
                row = logits[j]
                if config.temperature > 0:
                    x0 = int(np.argmax(row / np.float32(config.temperature) + gumbel[j - lo]))
                else:
                    x0 = int(np.argmax(row))
                candidate[j] = x0
                if config.remasking == "low_confidence":
                    r64 = row.astype(np.float64)
                    p = np.exp(r64 - r64.max())
                    confidence[j] = p[x0] / p.sum()
                else:
                    confidence[j] = float(uniform[j - lo])
            chosen = sorted(eligible, key=lambda j: (-confidence[j], j))[: counts[i]]
            if threshold is not None:  # plus everything strictly above the threshold
                chosen += [j for j in eligible if j not in chosen and confidence[j] > threshold]
            for j in chosen:
                tokens[j] = candidate[j]
                committed[j] = True
                commit_step[j] = t
            if adaptive is not None:
                # Draft: committed tokens, else the argmax; cut after its first end-of-turn.
                draft = []
                for j in range(lo, end):
                    draft.append(tokens[j] if committed[j] else int(np.argmax(logits[j])))
                    if draft[-1] == eot_id:
                        break
                stable = stable + 1 if i > 0 and draft == previous_draft else 0
                previous_draft = draft
                still = [j for j in range(lo, lo + len(draft)) if not committed[j]]
                entropies = []
                for j in still:
                    r64 = logits[j].astype(np.float64)
                    logp = r64 - r64.max() - np.log(np.exp(r64 - r64.max()).sum())
                    p = np.exp(logp)
                    entropies.append(-np.sum(p[p > 0] * logp[p > 0]))
                mean_entropy = float(np.mean(entropies)) if still else 0.0
                if stable >= adaptive.patience and mean_entropy < adaptive.max_entropy:
                    for j in still:  # commit the whole draft
                        tokens[j] = draft[j - lo]
                        committed[j] = True
                        commit_step[j] = t
            eots = [j for j in range(gen_len) if committed[j] and tokens[j] == eot_id]
            if eots:
                stop = min(eots) if stop is None else min(stop, min(eots))
            end = hi if stop is None else min(hi, stop)
            if not any(not committed[j] for j in range(lo, end)):
                break  # the block is filled (or the row stopped inside it)
    return dict(
        tokens=np.asarray(tokens, np.int32),
        answer_length=gen_len if stop is None else stop,
        commit_step=np.asarray(commit_step, np.int32),
        steps_run=steps_run,
    )
