"""Fast sampling modes (KV cache, threshold decoding, adaptive stop): the cached forward against
the plain one, the cache refresh schedule, exactness of the degenerate settings (refresh every
step, threshold 1.0) against the exact sampler, and threshold / adaptive stop against the plain
reference (tests/sampling/reference.py). Same tiny random model as test_sampler.py."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medv_jax.models.llada import LLaDA, default_positions, init_cache
from medv_jax.sampling.diffusion import (
    AdaptiveStop,
    CachePolicy,
    SamplerConfig,
    ThresholdSelection,
    generate_text,
    sample,
)
from tests.sampling.reference import reference_sample
from tests.sampling.test_sampler import CASES, CFG, Case, case_inputs, model_params

FIELDS = ("tokens", "answer_length", "commit_step", "steps_run")
# Cases of test_sampler.py the degenerate fast settings must reproduce exactly: one block, several
# blocks with sampling, three blocks with random remasking + CFG + a stop.
EXACT_CASES = ("greedy_one_block", "sampled_two_blocks", "random_cfg_stop")
LOCAL_CASES = {
    # three blocks of four steps, no forced stop
    "three_blocks": Case(SamplerConfig(12, 4, 12), (3, 5), seed=8),
}


@functools.lru_cache(maxsize=None)
def run(name: str, **fast):
    """(output of the case's config with the fast fields, output of the exact config), numpy."""
    case = CASES[name] if name in CASES else LOCAL_CASES[name]
    params, _, embeds, mask, keys = case_inputs(case)
    exact = sample(CFG, params, embeds, mask, keys, case.config, case.processor)
    out = sample(CFG, params, embeds, mask, keys, case.config.replace(**fast), case.processor)
    return jax.tree.map(np.asarray, out), jax.tree.map(np.asarray, exact)


def assert_same(out, ref, what):
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(out, field), getattr(ref, field), err_msg=f"{what}: {field}")


# ---- the cached forward ------------------------------------------------------------------------


def test_forward_cached_is_exact_when_the_cache_is_fresh():
    """A refresh (span = everything) gives the plain forward's logits; a span recomputed against
    a cache taken from the same canvas gives the plain logits of that span (nothing is stale)."""
    params = model_params("plain")
    model = LLaDA(CFG)
    embeds = jax.random.normal(jax.random.key(1), (2, 20, CFG.hidden_size)) * 0.5
    mask = np.ones((2, 20), bool)
    mask[1, :3] = False  # left padding
    pos = default_positions(jnp.asarray(mask), 2, 20)
    plain = np.asarray(model.apply({"params": params}, embeds, mask, pos, method=LLaDA.forward_embeds))

    @jax.jit
    def refresh(embeds):
        return model.apply(
            {"params": params}, embeds, mask, pos, init_cache(CFG, 2, 20), 0, method=LLaDA.forward_cached
        )

    logits, cache = refresh(embeds)
    assert cache[0].shape == (CFG.num_layers, 2, 20, CFG.num_kv_heads, CFG.head_dim)
    np.testing.assert_allclose(np.asarray(logits), plain, rtol=1e-5, atol=1e-5)

    @functools.partial(jax.jit, static_argnums=(2,))
    def span(cache, lo, length):
        x = jax.lax.dynamic_slice_in_dim(embeds, lo, length, axis=1)
        p = jax.lax.dynamic_slice_in_dim(pos, lo, length, axis=1)
        return model.apply(
            {"params": params}, x, mask, p, cache, lo, 2, 4, method=LLaDA.forward_cached
        )[0]

    got = np.asarray(span(cache, jnp.int32(9), 7))
    np.testing.assert_allclose(got, plain[:, 11:15], rtol=1e-5, atol=1e-5)
    # A stale cache (from another canvas) changes the span's logits: the cache is really read.
    _, other = refresh(embeds + 1.0)
    assert np.abs(np.asarray(span(other, jnp.int32(9), 7)) - got).max() > 1e-3


# ---- refresh schedule --------------------------------------------------------------------------


def block_starts(commit_step: np.ndarray, config: SamplerConfig) -> list[int]:
    """First global step of each block that ran, from the batch's commit steps."""
    starts = []
    for b in range(config.num_blocks):
        steps = commit_step[:, b * config.block_length : (b + 1) * config.block_length]
        steps = steps[steps >= 0]
        if steps.size:
            starts.append(int(steps.min()))
    return starts


def expected_refreshes(starts: list[int], loop_steps: int, every: int, total: int) -> np.ndarray:
    expected = np.zeros(total, bool)
    bounds = starts + [loop_steps]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        expected[lo:hi] = (np.arange(hi - lo) % every) == 0
    return expected


@pytest.mark.parametrize(
    "name, fast",
    [
        # exact schedule, 3 blocks of 4 steps, refresh every 3: steps 0, 3 | 4, 7 | 8, 11
        ("three_blocks", dict(cache=CachePolicy("dual", 3))),
        ("three_blocks", dict(cache=CachePolicy("prefix", 2))),
        # threshold decoding: blocks of varying step counts, every block start refreshes
        ("three_blocks", dict(cache=CachePolicy("prefix", 2), selection=ThresholdSelection(0.6))),
    ],
)
def test_cache_refreshed_at_block_starts_and_every_k_steps(name, fast):
    out, _ = run(name, **fast)
    config = LOCAL_CASES[name].config
    refreshed = out.refreshed
    assert refreshed.shape == (out.tokens.shape[0], config.steps)
    assert (refreshed == refreshed[:1]).all()  # one schedule for the whole batch
    loop_steps = int(out.commit_step.max()) + 1
    starts = block_starts(out.commit_step, config)
    expected = expected_refreshes(starts, loop_steps, fast["cache"].refresh_every, config.steps)
    np.testing.assert_array_equal(refreshed[0], expected)
    assert 0 < expected.sum() < loop_steps  # some steps really ran on the cache
    if fast.get("selection") is None:
        assert starts == [0, 4, 8] and loop_steps == 12
        if fast["cache"].refresh_every == 3:
            assert np.flatnonzero(refreshed[0]).tolist() == [0, 3, 4, 7, 8, 11]
    else:
        assert loop_steps < 12 and len(starts) == 3 and starts != [0, 4, 8]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_unrolled_layers_write_the_same_tokens(mode):
    """The cache is sliced per layer by the layer loop; written without the loop
    (``unroll_layers``) the cached sampler writes the same tokens at the same steps."""
    case = LOCAL_CASES["three_blocks"]
    params, _, embeds, mask, keys = case_inputs(case)
    config = case.config.replace(cache=CachePolicy(mode, 2))
    loop = sample(CFG, params, embeds, mask, keys, config)
    unrolled = sample(CFG.replace(unroll_layers=True), params, embeds, mask, keys, config)
    assert_same(jax.tree.map(np.asarray, unrolled), jax.tree.map(np.asarray, loop), f"{mode} cache, unrolled")


def test_no_cache_no_refresh_trace():
    out, _ = run("greedy_one_block", selection=ThresholdSelection(0.5))
    assert not out.refreshed.any()


# ---- degenerate settings are the exact sampler -------------------------------------------------


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("name", EXACT_CASES)
def test_refresh_every_step_equals_exact(name, mode):
    out, exact = run(name, cache=CachePolicy(mode, 1))
    assert_same(out, exact, f"{mode} cache, refresh every step")
    assert out.refreshed[:, : int(out.steps_run.max())].all()


@pytest.mark.parametrize("name", ["greedy_one_block", "sampled_two_blocks", "uneven_schedule"])
def test_threshold_one_equals_exact(name):
    out, exact = run(name, selection=ThresholdSelection(1.0))
    assert_same(out, exact, "threshold 1.0")
    config = CASES[name].config
    if config.steps == config.gen_length:  # one token per step
        for row in range(out.tokens.shape[0]):
            steps = out.commit_step[row][out.commit_step[row] >= 0]
            assert np.bincount(steps).max() == 1


def test_fast_modes_differ_from_exact_when_approximate():
    """Sanity: with a stale cache the logits really are approximate (else the equality tests
    above would prove nothing about which path ran)."""
    params, _, embeds, mask, keys = case_inputs(CASES["greedy_one_block"])
    config = SamplerConfig(8, 8, 8, cache=CachePolicy("dual", 8))
    out = sample(CFG, params, embeds, mask, keys, config)
    exact = sample(CFG, params, embeds, mask, keys, config.replace(cache=None))
    conf, conf_exact = np.asarray(out.confidence), np.asarray(exact.confidence)
    assert np.nanmax(np.abs(conf - conf_exact)) > 1e-6
    assert np.asarray(out.refreshed)[0].tolist() == [True] + [False] * 7


# ---- threshold decoding ------------------------------------------------------------------------

THRESHOLD = 0.2
GREEDY_LONG = SamplerConfig(12, 12, 12)  # one token per step by schedule


@functools.lru_cache(maxsize=None)
def threshold_run(threshold: float, config: SamplerConfig = GREEDY_LONG, seed: int = 11):
    params = model_params("eot")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 480, size=n).tolist() for n in (3, 5, 4, 6)]
    keys = jax.random.split(jax.random.key(seed), len(prompts))
    fast = config.replace(selection=ThresholdSelection(threshold))
    out = jax.tree.map(np.asarray, generate_text(CFG, params, prompts, keys, fast))
    return out, params, prompts, keys, fast


def test_threshold_commits_at_least_one_and_only_confident_extras():
    out, *_ = threshold_run(THRESHOLD)
    saw_parallel = False
    for row in range(out.tokens.shape[0]):
        steps, conf = out.commit_step[row], out.confidence[row]
        for t in range(int(out.steps_run[row])):
            c = np.sort(conf[steps == t])[::-1]
            assert c.size >= 1, f"row {row} step {t} committed nothing"
            # All but the forced (most confident) commit are above the threshold.
            assert (c[1:] > THRESHOLD).all(), f"row {row} step {t}: {c}"
            saw_parallel |= c.size > 1
        assert np.isnan(conf[steps < 0]).all() and not np.isnan(conf[steps >= 0]).any()
    assert saw_parallel
    assert out.steps_run.sum() < sum(  # fewer steps than one per committed position
        int((out.commit_step[r] >= 0).sum()) for r in range(out.tokens.shape[0])
    )


@pytest.mark.parametrize(
    "threshold, config",
    [
        (THRESHOLD, GREEDY_LONG),
        (0.5, SamplerConfig(12, 4, 6, temperature=0.8, cfg_scale=0.5)),  # 2 per step scheduled
    ],
)
def test_threshold_matches_reference(threshold, config):
    """Each row alone (batch of one) against the plain reference's threshold rule."""
    _, params, prompts, keys, fast = threshold_run(threshold, config)
    for row, prompt in enumerate(prompts):
        # Left padded to one width (one compiled program for every row; padding does not change
        # a row's result, test_sampler.test_batched_equals_each_row_alone).
        out = generate_text(CFG, params, [prompt], keys[row : row + 1], fast, length=8)
        out = jax.tree.map(np.asarray, out)
        embeds = np.asarray(LLaDA(CFG).apply({"params": params}, jnp.asarray([prompt]), method=LLaDA.embed))[0]
        ref = reference_sample(CFG, params, embeds, keys[row], fast)
        for field in FIELDS:
            np.testing.assert_array_equal(
                np.asarray(getattr(out, field))[0], ref[field], err_msg=f"row {row} {field}"
            )


# ---- adaptive stop -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scripted:
    """Logits processor making the model sure of the answer 10 11 12 <eot> at generated positions
    0-3 (a stable, confident canvas); the rest is left to the random model."""

    answer: tuple[int, ...] = (10, 11, 12, CFG.eot_token_id)
    bias: float = 80.0

    def __call__(self, logits, gen_index):
        bias = jnp.zeros((gen_index.shape[0], logits.shape[-1]))
        for pos, tok in enumerate(self.answer):
            bias = bias.at[:, tok].add(jnp.where(gen_index == pos, self.bias, 0.0))
        return logits + bias


@pytest.mark.parametrize("patience", [0, 1, 2])
def test_adaptive_stop_ends_early_on_a_stable_confident_canvas(patience):
    params = model_params("plain")
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    keys = jax.random.split(jax.random.key(3), 2)
    config = SamplerConfig(16, 16, 16)
    processor = Scripted()
    exact = jax.tree.map(np.asarray, generate_text(CFG, params, prompts, keys, config, logits_processor=processor))
    fast = config.replace(adaptive_stop=AdaptiveStop(patience=patience, max_entropy=0.05))
    out = jax.tree.map(np.asarray, generate_text(CFG, params, prompts, keys, fast, logits_processor=processor))
    assert (exact.answer_length == 3).all() and (exact.steps_run == 4).all()  # one token per step
    np.testing.assert_array_equal(out.answer_length, exact.answer_length)
    np.testing.assert_array_equal(out.tokens[:, :4], exact.tokens[:, :4])
    # Stable for `patience` steps after the first: the whole draft lands at step `patience`.
    assert (out.steps_run == patience + 1).all(), out.steps_run
    assert (out.commit_step[:, :4].max(axis=1) == patience).all()
    assert (out.commit_step[:, 4:] == -1).all()


def test_adaptive_stop_does_not_fire_on_an_unsure_canvas():
    """A threshold no random-model canvas meets: identical to the exact sampler."""
    out, exact = run("sampled_two_blocks", adaptive_stop=AdaptiveStop(patience=1, max_entropy=1e-9))
    assert_same(out, exact, "adaptive stop that never fires")


@pytest.mark.parametrize("patience, max_entropy", [(1, 4.0), (0, 2.5)])
def test_adaptive_stop_matches_reference(patience, max_entropy):
    params = model_params("eot")
    config = SamplerConfig(12, 4, 12, adaptive_stop=AdaptiveStop(patience, max_entropy))
    rng = np.random.default_rng(21)
    fired = False
    for row, n in enumerate((3, 6, 4)):
        prompt = rng.integers(0, 480, size=n).tolist()
        key = jax.random.key(50 + row)
        out = jax.tree.map(np.asarray, generate_text(CFG, params, [prompt], key[None], config, length=8))
        embeds = np.asarray(LLaDA(CFG).apply({"params": params}, jnp.asarray([prompt]), method=LLaDA.embed))[0]
        ref = reference_sample(CFG, params, embeds, key, config)
        for field in FIELDS:
            np.testing.assert_array_equal(np.asarray(getattr(out, field))[0], ref[field], err_msg=f"row {row} {field}")
        fired |= np.bincount(out.commit_step[0][out.commit_step[0] >= 0]).max() > 1
    assert fired, "the adaptive stop never fired: the test would not test it"


# ---- everything at once, and validation --------------------------------------------------------


def test_combined_modes_keep_the_sampler_invariants():
    """Prefix cache + threshold + adaptive stop, several blocks, sampling and CFG: every committed
    token is allowed, nothing is committed after a stop, the answer is fully committed."""
    case = CASES["random_sampled_cfg"]
    config = SamplerConfig(8, 4, 8, temperature=0.9, cfg_scale=0.5).replace(
        cache=CachePolicy("prefix", 2), selection=ThresholdSelection(0.3), adaptive_stop=AdaptiveStop(1, 1.0)
    )
    params, _, embeds, mask, keys = case_inputs(case)
    out = jax.tree.map(np.asarray, sample(CFG, params, embeds, mask, keys, config))
    for row in range(out.tokens.shape[0]):
        n, steps, tokens = int(out.answer_length[row]), out.commit_step[row], out.tokens[row]
        assert (steps[:n] >= 0).all() and not (tokens[:n] == CFG.eot_token_id).any()
        assert (tokens[steps < 0] == CFG.mask_token_id).all()
        assert (tokens[steps >= 0] < CFG.tokenizer_vocab_size).all()
        if n < config.gen_length:
            assert tokens[n] == CFG.eot_token_id and ((steps[n + 1 :] <= steps[n])).all()
    assert (out.steps_run <= config.steps).all() and out.refreshed[0, 0]


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: CachePolicy("full"), "mode"),
        (lambda: CachePolicy("prefix", 0), "refresh_every"),
        (lambda: CachePolicy("dual", 2.5), "refresh_every"),
        (lambda: ThresholdSelection(1.5), "threshold"),
        (lambda: ThresholdSelection(float("nan")), "threshold"),
        (lambda: AdaptiveStop(patience=-1), "patience"),
        (lambda: AdaptiveStop(max_entropy=0.0), "max_entropy"),
        (lambda: SamplerConfig(remasking="random", selection=ThresholdSelection(0.9)), "selection"),
        (lambda: SamplerConfig(cache="prefix"), "cache"),
        (lambda: SamplerConfig(adaptive_stop=0.1), "adaptive_stop"),
    ],
)
def test_fast_config_validation(make, field):
    with pytest.raises(ValueError, match=field):
        make()
