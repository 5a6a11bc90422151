"""The jitted reverse-diffusion sampler against a plain reference, plus property and validation
tests. Tiny random model (vocabulary 512, special ids moved inside it)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medv_jax.models.llada import LLADA_PRESETS, LLaDA, init_params
from medv_jax.sampling import diffusion
from medv_jax.sampling.diffusion import SamplerConfig, embed_prompt, generate_text, sample, transfer_counts
from tests.sampling.reference import reference_sample

CFG = LLADA_PRESETS["llada_tiny"].replace(
    vocab_size=512,
    tokenizer_vocab_size=500,
    bos_token_id=490,
    eos_token_id=491,
    mask_token_id=495,
    start_header_id=496,
    end_header_id=497,
    eot_token_id=498,
    max_position_embeddings=64,
)
TEXT_IDS = 480  # prompts use ids below this (no special ids)


@dataclasses.dataclass(frozen=True)
class EotAt:
    """Logits processor: add ``bias`` to the end-of-turn logit at the given generated positions
    (row-agnostic, so a row's result still depends on that row only)."""

    positions: tuple[int, ...]
    bias: float = 50.0

    def __call__(self, logits, gen_index):
        hit = jnp.isin(gen_index, jnp.asarray(self.positions, jnp.int32))
        return logits.at[..., CFG.eot_token_id].add(jnp.where(hit, self.bias, 0.0))


@functools.lru_cache(maxsize=None)
def model_params(variant: str):
    """'plain': random weights with a sharpened head (peaked, realistic-looking distributions);
    'eot': the same with the end-of-turn column copied from the most popular token's column, so
    sampling (T > 0) emits end-of-turn at random places."""
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
    kernel = params["lm_head"]["kernel"] * 30.0
    if variant == "eot":
        tokens = jnp.asarray([[1, 2, 3, 4] + [CFG.mask_token_id] * 12])
        logits = jax.jit(LLaDA(CFG).apply)({"params": dict(params, lm_head={"kernel": kernel})}, tokens)
        popular = int(np.bincount(np.asarray(logits[0, 4:].argmax(-1))).argmax())
        kernel = kernel.at[:, CFG.eot_token_id].set(kernel[:, popular] * 0.98)
    return dict(params, lm_head={"kernel": kernel})


@dataclasses.dataclass(frozen=True)
class Case:
    config: SamplerConfig
    prompt_lengths: tuple[int, ...]
    params: str = "plain"
    processor: EotAt | None = None
    image: bool = False  # splice random "image feature" vectors into the prompts
    seed: int = 0


S = SamplerConfig
CASES = {
    # one block, greedy, single row
    "greedy_one_block": Case(S(8, 8, 8), (5,)),
    # two blocks, Gumbel sampling, end-of-turn prone model
    "sampled_two_blocks": Case(S(8, 4, 4, temperature=0.7), (3, 7), params="eot", seed=1),
    # three blocks, random remasking, CFG, a forced stop in the middle block
    "random_cfg_stop": Case(
        S(12, 4, 6, remasking="random", cfg_scale=1.5), (4, 2, 6), processor=EotAt((6,)), seed=2
    ),
    # four blocks of 2, random remasking with sampling and CFG
    "random_sampled_cfg": Case(
        S(8, 2, 8, temperature=1.0, remasking="random", cfg_scale=0.5),
        (6, 3, 5),
        params="eot",
        seed=3,
    ),
    # uneven schedule (6 tokens over 4 steps: 2, 2, 1, 1) with a stop late in the block
    "uneven_schedule": Case(S(6, 6, 4, temperature=0.5), (2, 5), processor=EotAt((4,), 20.0), seed=4),
    # stop in the first of three blocks: later blocks skipped
    "early_stop": Case(S(12, 4, 12), (3, 4, 5), processor=EotAt((1, 9)), seed=5),
    # image-like prompt embeddings, sampling, CFG (the uncond pass masks the image positions too)
    "image_prompt": Case(
        S(8, 4, 8, temperature=0.8, cfg_scale=1.0), (6, 4), params="eot", image=True, seed=6
    ),
    # end-of-turn committed at the very first position: empty answer
    "empty_answer": Case(S(8, 8, 8, remasking="random"), (4, 3), processor=EotAt((0,)), seed=7),
}


def case_inputs(case: Case):
    params = model_params(case.params)
    rng = np.random.default_rng(case.seed)
    prompts = [rng.integers(0, TEXT_IDS, size=n).tolist() for n in case.prompt_lengths]
    embeds, mask = embed_prompt(CFG, params, prompts)
    embeds = np.array(embeds)
    if case.image:  # replace up to 3 valid positions per row by random vectors
        width = embeds.shape[1]
        for row, n in enumerate(case.prompt_lengths):
            lo = width - n + 1
            embeds[row, lo : lo + min(3, n - 1)] = rng.normal(0, 0.5, (min(3, n - 1), CFG.hidden_size))
    keys = jax.random.split(jax.random.key(100 + case.seed), len(prompts))
    return params, prompts, jnp.asarray(embeds), mask, keys


@functools.lru_cache(maxsize=None)
def run_case(name: str):
    """(jitted output as numpy, list of reference outputs per row, inputs)."""
    case = CASES[name]
    params, prompts, embeds, mask, keys = case_inputs(case)
    out = sample(CFG, params, embeds, mask, keys, case.config, case.processor)
    out = jax.tree.map(np.asarray, out)
    width = embeds.shape[1]
    refs = [
        reference_sample(
            CFG, params, np.asarray(embeds[row, width - n :]), keys[row], case.config, case.processor
        )
        for row, n in enumerate(case.prompt_lengths)
    ]
    return out, refs


def row_of(out, row):
    return dict(
        tokens=out.tokens[row],
        answer_length=int(out.answer_length[row]),
        commit_step=out.commit_step[row],
        steps_run=int(out.steps_run[row]),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    out, refs = run_case(name)
    for row, ref in enumerate(refs):
        got = row_of(out, row)
        np.testing.assert_array_equal(got["tokens"], ref["tokens"], err_msg=f"row {row} tokens")
        np.testing.assert_array_equal(
            got["commit_step"], ref["commit_step"], err_msg=f"row {row} commit_step"
        )
        assert got["answer_length"] == ref["answer_length"], f"row {row}"
        assert got["steps_run"] == ref["steps_run"], f"row {row}"


def check_properties(row: dict, config: SamplerConfig):
    gen_len, block_len = config.gen_length, config.block_length
    spb = config.steps_per_block
    tokens, step, n, steps_run = (
        row["tokens"], row["commit_step"], row["answer_length"], row["steps_run"]
    )
    committed = step >= 0
    # The answer: everything before the stop committed, no end-of-turn inside it.
    assert committed[:n].all()
    assert not (tokens[:n] == CFG.eot_token_id).any()
    assert not np.isin(tokens[committed], [CFG.bos_token_id, CFG.eos_token_id,
                                           CFG.start_header_id, CFG.end_header_id]).any()
    assert (tokens[committed] < CFG.tokenizer_vocab_size).all()
    assert (tokens[~committed] == CFG.mask_token_id).all()
    if n < gen_len:
        assert tokens[n] == CFG.eot_token_id and committed[n]
    else:
        assert committed.all() and steps_run == config.steps
    # Nothing committed after an end-of-turn once it was committed (it is seen after its step).
    for e in np.flatnonzero(committed & (tokens == CFG.eot_token_id)):
        later = step[e + 1 :]
        assert ((later == -1) | (later <= step[e])).all(), f"commit after the stop at {e}"
    # Only while running; each step inside its block; the scheduled count per step (only the
    # last step of a stopped row may commit fewer, but at least one).
    assert (step < steps_run).all()
    positions = np.flatnonzero(committed)
    np.testing.assert_array_equal(positions // block_len, step[positions] // spb)
    schedule = transfer_counts(block_len, spb)
    for t in range(steps_run):
        count = int((step == t).sum())
        if t < steps_run - 1 or n == gen_len:
            assert count == schedule[t % spb], f"step {t}: {count} != {schedule[t % spb]}"
        else:
            assert 1 <= count <= schedule[t % spb], f"last step {t}: {count}"


@pytest.mark.parametrize("name", list(CASES))
def test_properties(name):
    out, _ = run_case(name)
    for row in range(out.tokens.shape[0]):
        check_properties(row_of(out, row), CASES[name].config)


def test_grid_covers_stop_situations():
    seen = set()
    for name, case in CASES.items():
        out, _ = run_case(name)
        spb = case.config.steps_per_block
        for row in range(out.tokens.shape[0]):
            r = row_of(out, row)
            n, step = r["answer_length"], r["commit_step"]
            if n == case.config.gen_length:
                seen.add("no stop")
                continue
            seen.add("stop")
            if n == 0:
                seen.add("empty answer")
            if r["steps_run"] <= case.config.steps - spb:
                seen.add("later blocks skipped")
            if (step[:n] > step[n]).any():
                seen.add("filled before the stop after finding it")
            if r["steps_run"] < (step[n] // spb + 1) * spb:
                seen.add("block left early")
    assert seen >= {
        "no stop",
        "stop",
        "empty answer",
        "later blocks skipped",
        "filled before the stop after finding it",
        "block left early",
    }, seen


def test_batched_equals_each_row_alone():
    """Batch of three prompts of different lengths (text path: embedding inside the program) ==
    each row alone without padding (embeddings path), with sampling, random remasking and CFG."""
    case = CASES["random_sampled_cfg"]
    params, prompts, _, _, keys = case_inputs(case)
    batched = jax.tree.map(np.asarray, generate_text(CFG, params, prompts, keys, case.config))
    for row, prompt in enumerate(prompts):
        embeds, mask = embed_prompt(CFG, params, [prompt])
        alone = jax.tree.map(np.asarray, sample(CFG, params, embeds, mask, keys[row : row + 1], case.config))
        for field in ("tokens", "answer_length", "commit_step", "steps_run"):
            np.testing.assert_array_equal(
                getattr(batched, field)[row], getattr(alone, field)[0], err_msg=f"{field} row {row}"
            )


def test_transfer_counts():
    assert transfer_counts(6, 4) == [2, 2, 1, 1]
    assert transfer_counts(8, 8) == [1] * 8
    assert transfer_counts(128, 128) == [1] * 128
    assert transfer_counts(64, 64) == [1] * 64
    assert sum(transfer_counts(10, 3)) == 10 and transfer_counts(10, 3) == [4, 3, 3]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(gen_length=10, block_length=4, steps=5), "gen_length"),
        (dict(gen_length=8, block_length=4, steps=5), "steps"),
        (dict(gen_length=8, block_length=8, steps=9), "steps"),
        (dict(gen_length=0, block_length=8, steps=8), "gen_length"),
        (dict(gen_length=8, block_length=0, steps=8), "block_length"),
        (dict(gen_length=8, block_length=8, steps=0), "steps"),
        (dict(remasking="top_k"), "remasking"),
        (dict(temperature=-1.0), "temperature"),
        (dict(cfg_scale=-0.5), "cfg_scale"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**kwargs)


def test_prompt_validation():
    params = model_params("plain")
    config = S(8, 8, 8)
    compiled = diffusion._sample_program._cache_size(), diffusion._generate_program._cache_size()
    with pytest.raises(ValueError, match="empty batch"):
        generate_text(CFG, params, [], None, config)
    with pytest.raises(ValueError, match="empty batch"):
        sample(CFG, params, jnp.zeros((0, 4, CFG.hidden_size)), None, None, config)
    # 60 + 8 > max_position_embeddings = 64
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate_text(CFG, params, [[1] * 60], None, config)
    with pytest.raises(ValueError, match="hidden size"):
        sample(CFG, params, jnp.zeros((1, 4, 3)), None, None, config)
    with pytest.raises(ValueError, match="prompt_mask"):
        sample(CFG, params, jnp.zeros((1, 4, CFG.hidden_size)), jnp.ones((1, 5), bool), None, config)
    with pytest.raises(ValueError, match="rng"):
        generate_text(CFG, params, [[1, 2], [3]], jax.random.split(jax.random.key(0), 3), config)
    with pytest.raises(ValueError, match="config"):
        generate_text(CFG, params, [[1, 2]], None, dict(gen_length=8))
    # Every error was raised before anything was traced or compiled.
    assert compiled == (
        diffusion._sample_program._cache_size(), diffusion._generate_program._cache_size()
    )
