"""probe-words: the canvas is the one training lays, batched predictions equal a plain one-row
forward, and the counts are what the hand-worked case says."""
from __future__ import annotations

import json

import numpy as np
import pytest

from medv_jax.data import conversation as conv
from medv_jax.data import synthetic
from medv_jax.data import tokenizer as tok_lib
from medv_jax.data.pipeline import ANSWER_PADDINGS, BatchConfig, encode_example
from medv_jax.evaluate import synthetic_reports, word_probe
from medv_jax.models.medv import MedV
from medv_jax.sampling import api
from medv_jax.sampling import multimodal as mm
from medv_jax.user_errors import UserError
from tests.serve.conftest import build_tiny_checkpoint

L = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    tiny = build_tiny_checkpoint(root)
    model = api.load(tiny["checkpoint"], tiny["tokenizer"], system_prompt="none")
    path = synthetic_reports.write_question_set(str(root / "q"), 6, layout="slots")
    rows = [json.loads(line) for line in open(path)]
    return model, rows, str(root / "q")


@pytest.mark.parametrize("padding", ANSWER_PADDINGS)
def test_reference_canvas_is_the_answer_region_of_the_training_row(setup, padding):
    """With either answer padding, the probe's canvas is what training lays after the prompt."""
    model, rows, folder = setup
    tok = model.tokenizer
    row = rows[0]
    record = {"id": row["question_id"], "image": f"{folder}/{row['image']}",
              "conversations": [{"from": "human", "value": "<image>\n" + row["text"]},
                                {"from": "gpt", "value": row["answer"]}]}
    image = model.image(record["image"])
    prompt = model.prompt(row["text"], image)
    cfg = BatchConfig(max_length=len(prompt.tokens) + L, answer_padding=padding, system_prompt=None,
                      image=model.image_config)
    train_row = encode_example(record, tok, cfg)["tokens"]
    np.testing.assert_array_equal(train_row[: len(prompt.tokens)], prompt.tokens)
    canvas = word_probe._reference_of(tok, row, "chat", L, padding)
    np.testing.assert_array_equal(train_row[len(prompt.tokens):], canvas)
    assert canvas[-1] == getattr(tok_lib.special_token_ids(tok), padding)


def test_batched_predictions_equal_one_row_forwards(setup):
    """Prompts of different lengths (left padding) batched together give each row's own argmax."""
    model, rows, folder = setup
    tok = model.tokenizer
    eot = tok_lib.special_token_ids(tok).eot
    targets = sorted(word_probe.word_ids(tok, ["small", "large", "left"]))
    prompts, shown = [], []
    for row in rows:
        prompts.append(model.prompt(row["text"], model.image(f"{folder}/{row['image']}")))
        canvas = np.asarray(word_probe.reference_canvas(tok, row["answer"], L, eot, tok_lib.EOT_TOKEN))
        shown.append(np.where(np.isin(canvas, targets), model.lm.mask_token_id, canvas))
    assert len({len(p.tokens) for p in prompts}) > 1  # the padding is exercised
    batched = word_probe.predict_masked(model, prompts, shown)
    for p, canvas, got in zip(prompts, shown, batched):
        tokens = np.concatenate([p.tokens, canvas]).astype(np.int32)
        one = mm.collate_prompts([mm.PromptRow(tokens, np.concatenate([p.image_mask, np.zeros(L, bool)]), p.image)],
                                 pad_id=model.lm.eos_token_id, crop_size=model.config.vision.image_size,
                                 max_crops=model.max_crops)
        logits = MedV(model.config).apply({"params": model.params}, one.tokens, one.pixels, one.image_index,
                                          one.image_weight, one.image_newline_mask)
        np.testing.assert_array_equal(got, np.asarray(logits[0, -L:]).argmax(-1))


def test_counts_follow_the_predictions(setup, monkeypatch):
    """A stand-in forward that predicts the reference except at the first size word of row 0:
    every row right but that one, one word wrong."""
    model, rows, folder = setup
    tok = model.tokenizer
    eot = tok_lib.special_token_ids(tok).eot
    canvases = [np.asarray(word_probe.reference_canvas(tok, r["answer"], L, eot, tok_lib.EOT_TOKEN)) for r in rows]
    size_ids = sorted(word_probe.word_ids(tok, ["small", "large"]))
    with_sizes = [i for i, c in enumerate(canvases) if np.isin(c, size_ids).any()]
    assert len(with_sizes) >= 2
    first = with_sizes[0]

    def fake(model_, prompts, shown):
        assert len(shown) == len(rows)  # one batch
        out = np.stack(canvases)
        out[first, np.flatnonzero(np.isin(canvases[first], size_ids))[0]] = eot
        return out

    monkeypatch.setattr(word_probe, "predict_masked", fake)
    result = word_probe.probe_words(model, rows, ["small", "large"], image_folder=folder, gen_length=L, batch_size=len(rows))
    n_words = sum(int(np.isin(c, size_ids).sum()) for c in canvases)
    assert result["n_rows"] == len(with_sizes) and result["n_tokens"] == n_words
    assert result["row_accuracy"] == pytest.approx(100.0 * (len(with_sizes) - 1) / len(with_sizes))
    assert result["token_accuracy"] == pytest.approx(100.0 * (n_words - 1) / n_words)


def test_caption_format_lays_the_caption_after_the_image_slots(setup):
    model, rows, folder = setup
    row = rows[0]
    image = model.image(f"{folder}/{row['image']}")
    prompt = word_probe._prompt_row(model, row, image, "caption")
    assert bool(np.all(prompt.image_mask)) and len(prompt.tokens) == image.layout.num_tokens
    scene = synthetic_reports.scene_of(row["meta"])
    record = {"id": "c", "image": f"{folder}/{row['image']}",
              "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": synthetic.caption(scene)}]}
    sample = conv.format_caption(record, model.tokenizer, num_image_tokens=image.layout.num_tokens)
    canvas = word_probe.reference_canvas(model.tokenizer, synthetic.caption(scene), L,
                                         tok_lib.special_token_ids(model.tokenizer).eos, "\n")
    np.testing.assert_array_equal(canvas[: len(sample.input_ids) - len(prompt.tokens)],
                                  sample.input_ids[len(prompt.tokens):])


def test_words_of_several_tokens_and_absent_words_are_one_line_errors(setup):
    model, rows, folder = setup
    with pytest.raises(UserError, match="probe words of one token each"):
        word_probe.word_ids(model.tokenizer, ["smallish lesion"])
    with pytest.raises(UserError, match="no reference answer holds any of them"):
        word_probe.probe_words(model, rows, ["yes"], image_folder=folder, gen_length=L)
