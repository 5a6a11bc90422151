"""The Python API (medv_jax.load -> model.answer / answer_batch) on a tiny random checkpoint: its
answers are the sampler's for the documented prompt and keys, alone or batched."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import medv_jax
from medv_jax.data import image as image_lib
from medv_jax.sampling import api
from medv_jax.sampling import multimodal as mm
from medv_jax.sampling.diffusion import AdaptiveStop, CachePolicy, SamplerConfig, ThresholdSelection
from medv_jax.user_errors import UserError
from tests.serve.conftest import build_tiny_checkpoint

SMALL = SamplerConfig(gen_length=8, block_length=4, steps=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def model(tiny):
    return medv_jax.load(tiny["checkpoint"], tiny["tokenizer"])


def test_answer_is_the_samplers_for_the_documented_prompt_and_key(model, tiny):
    scan = tiny["images"] / "scan.png"
    answer = model.answer(scan, "<image> Is there a fracture?", seed=3, sampler=SMALL, temperature=0.5)
    # Built by hand from the lower layers: the medical system prompt, the image first, key fold_in(key(3), 0).
    image = image_lib.preprocess_image(str(scan), mm.image_config_for(model.config))
    row = mm.question_prompt(model.tokenizer, "Is there a fracture?", image, mm.system_prompt_for("medical"))
    batch = mm.collate_prompts([row], pad_id=model.lm.eos_token_id, crop_size=model.config.vision.image_size)
    out = mm.sample_medv(model.config, model.params, batch, jax.random.key(3), SMALL.replace(temperature=0.5))
    n = int(out.answer_length[0])
    assert answer.token_ids == [int(t) for t in out.tokens[0, :n]]
    assert answer.steps == int(out.steps_run[0]) and answer.prompt_tokens == len(row.tokens)
    assert answer.text == model.tokenizer.decode(answer.token_ids, skip_special_tokens=True).strip()
    assert answer.stopped == (n < SMALL.gen_length) and answer.seconds > 0
    fields = answer.to_json()
    assert fields["token_ids"] == answer.token_ids and fields["steps_used"] == answer.steps


def test_batched_rows_equal_their_answers_alone(model, tiny):
    images = [tiny["images"] / "scan.png", tiny["images"] / "scan.jpg", None, tiny["images"] / "scan.png"]
    questions = ["Is there a fracture?", "Which side?", "What is a lesion?", "Is it normal? " * 12]
    together = model.answer_batch(images, questions, seed=7, sampler=SMALL, temperature=0.8)
    in_twos = model.answer_batch(images, questions, seed=7, sampler=SMALL, temperature=0.8, batch_size=2)
    for i, (image, question) in enumerate(zip(images, questions)):
        # Row i draws from fold_in(key(seed), i): alone, that is row 0 of a batch asked with that key.
        alone = model.run([model.prompt(question, None if image is None else model.image(image))],
                          [api.row_key(7, i)], SMALL.replace(temperature=0.8))[0]
        assert together[i].token_ids == alone.token_ids == in_twos[i].token_ids, i
    assert together[0].batch_size == 4 and in_twos[0].batch_size == 2
    # Prompts of different length buckets share one batch (the longer question needs a wider one).
    assert len({model.prompt_width(a.prompt_tokens, 8) for a in together}) == 2


def test_history_and_system_prompt_shape_the_prompt(model, tiny):
    scan = tiny["images"] / "scan.png"
    first = model.prompt("Is there a fracture?", model.image(scan))
    second = model.prompt("Which side?", model.image(scan), [("Is there a fracture?", "No.")])
    assert list(second.tokens[: len(first.tokens)]) == list(first.tokens)  # a chat grows by appending
    none = model.prompt("Is there a fracture?", model.image(scan), system_prompt=None)
    assert len(none.tokens) < len(first.tokens)


def test_settings_are_the_commands_flags(model):
    config = api.sampler_config(SMALL, cache="dual", cache_refresh=2, threshold=0.9, adaptive_stop=True,
                                stop_patience=3)
    assert config.cache == CachePolicy("dual", 2) and config.selection == ThresholdSelection(0.9)
    assert config.adaptive_stop == AdaptiveStop(3, AdaptiveStop().max_entropy)
    assert api.sampler_config(config, cache="none", threshold=None, adaptive_stop=False) == SMALL
    for settings, message in (
        ({"gen_lenght": 8}, "unknown sampler setting"),
        ({"block_length": 3}, "not a multiple of block_length"),
        ({"cache_refresh": 2, "cache": "none"}, "cache_refresh needs"),
        ({"stop_patience": 9}, "need adaptive_stop"),
        ({"threshold": 2.0}, "threshold"),
        ({"remasking": "sometimes"}, "remasking"),
    ):
        with pytest.raises(UserError, match=message):
            api.sampler_config(SMALL, **settings)


def test_mistakes_are_one_line_user_errors(model, tiny):
    with pytest.raises(UserError, match="the question is empty"):
        model.answer(None, " <image> ", sampler=SMALL)
    with pytest.raises(UserError, match="'nope.png'.*cannot read it as an image"):
        model.answer("nope.png", "Is it?", sampler=SMALL)
    with pytest.raises(UserError, match="2 images for 1 questions"):
        model.answer_batch([None, None], ["Is it?"], sampler=SMALL)
    with pytest.raises(UserError, match="exceed the model's"):
        model.answer(None, "lesion " * 9000, sampler=SMALL)
    with pytest.raises(UserError, match="checkpoint .*no such folder"):
        medv_jax.load(str(tiny["root"] / "nope"), tiny["tokenizer"])


def test_answers_do_not_depend_on_the_block_callback(model, tiny):
    """The server's program (with the per-block host callback) answers as the plain one."""
    rows = [model.prompt("Is there a fracture?", model.image(tiny["images"] / "scan.png")),
            model.prompt("Which side?", None)]
    keys = [api.row_key(1), api.row_key(2)]
    seen = []
    plain = model.run(rows, keys, SMALL, batch_size=4)
    called = model.run(rows, keys, SMALL, batch_size=4, on_block=lambda b, t, s: seen.append(int(b)))
    assert [a.token_ids for a in plain] == [a.token_ids for a in called]
    assert seen == sorted(seen) and seen[0] == 0 and len(seen) <= SMALL.num_blocks
    assert np.array_equal(plain[0].commit_step, called[0].commit_step)
