"""The eager PyTorch reference of benchmarks/ (torch_reference.py) and medv_jax's exact sampler give
the same tokens on the same random checkpoint folder (fp32, greedy): a correctness check of the
benchmark's comparison, not a speed test."""
import numpy as np
import pytest
import torch

from benchmarks import models_setup as ms
from benchmarks import torch_reference as tr
from medv_jax.sampling.diffusion import SamplerConfig
from medv_jax.sampling.multimodal import PromptBatch, sample_medv

SHAPE = ms.SHAPES["tiny"]
PROMPT_LEN = 40  # 16 image tokens + text


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    # eot_scale makes the random model stop some answers early, so the stop rule is compared too.
    folder = ms.build_checkpoint(tmp_path_factory.mktemp("ckpt"), SHAPE, seed=0, eot_scale=8.0)
    ref = tr.load_reference(folder, SHAPE.ids)
    config, params = ms.load_jax(folder, SHAPE.ids)
    prompts = ms.make_prompts(SHAPE, 4, PROMPT_LEN, seed=0)
    return ref, config, params, prompts


@pytest.fixture()
def one_thread():
    # One torch thread: the 2-core test machine is shared, and oversubscribed OpenMP is slow.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _jax_batch(config, prompts):
    rows = [ms.jax_prompt_batch(config, p) for p in prompts]
    return PromptBatch(*(np.concatenate([getattr(r, f) for r in rows]) for f in PromptBatch.__dataclass_fields__))


def test_reference_and_jax_give_the_same_tokens(stacks, one_thread):
    ref, config, params, prompts = stacks
    # Two blocks of 8, 4 steps each: 2 commits per step, and a block boundary.
    gen_length, block_length, steps = 16, 8, 8
    sampler = SamplerConfig(gen_length=gen_length, block_length=block_length, steps=steps)
    out = sample_medv(config, params, _jax_batch(config, prompts), None, sampler)
    lengths = []
    for row, p in enumerate(prompts):
        r = tr.generate(ref, p.tokens, gen_length, block_length, steps, p.image_mask, p.pixels)
        assert r.tokens == np.asarray(out.tokens[row]).tolist(), f"prompt {row}"
        assert r.answer_length == int(out.answer_length[row]), f"prompt {row}"
        assert r.steps_run == int(out.steps_run[row]), f"prompt {row}"
        lengths.append(r.answer_length)
    # The comparison covered both an early stop and a full-length answer.
    assert min(lengths) < gen_length and max(lengths) == gen_length, lengths


def test_block_logits_equal_full_logits(stacks, one_thread):
    ref, _, _, prompts = stacks
    p = prompts[0]
    full = tr.generate(ref, p.tokens, 16, 8, 16, p.image_mask, p.pixels, logits="full")
    block = tr.generate(ref, p.tokens, 16, 8, 16, p.image_mask, p.pixels, logits="block")
    assert full.tokens == block.tokens and full.steps_run == block.steps_run == len(full.step_seconds)


def test_reference_rejects_bad_inputs(stacks):
    ref, _, _, prompts = stacks
    p = prompts[0]
    with pytest.raises(ValueError, match="bad schedule"):
        tr.generate(ref, p.tokens, 16, 6, 16, p.image_mask, p.pixels)
    with pytest.raises(ValueError, match="slots"):
        tr.generate(ref, p.tokens[:-1], 16, 8, 16, p.image_mask[:-1] | True, p.pixels)
    with pytest.raises(FileNotFoundError, match="config.json"):
        tr.load_reference(ms.Path("/nonexistent/folder"))
