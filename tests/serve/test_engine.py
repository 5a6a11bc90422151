"""The demo's model side without a browser: chat prompts, bucketed generation against the sampler,
the unmasking replay, settings parsing (fast modes included) and the errors the page shows."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from medv_jax.data import conversation as conv
from medv_jax.sampling import api
from medv_jax.sampling import multimodal as mm
from medv_jax.sampling.diffusion import SamplerConfig
from medv_jax.serve import engine as eng
from medv_jax.serve import examples as examples_lib

SMALL = SamplerConfig(gen_length=8, block_length=4, steps=4)


@pytest.fixture(scope="module")
def image(engine, tiny):
    return eng.load_image(engine.model, str(tiny["images"] / "scan.png"))[1]


def test_first_turn_prompt_is_the_generate_commands(engine, image):
    m = engine.model
    row = eng.build_prompt(m, [], "  <image> Is there a fracture? ", image)
    want = mm.question_prompt(m.tokenizer, "Is there a fracture?", image, m.system_prompt)
    np.testing.assert_array_equal(row.tokens, want.tokens)
    np.testing.assert_array_equal(row.image_mask, want.image_mask)
    assert row.image_mask.sum() == image.layout.num_tokens


def test_follow_up_prompt_extends_the_first(engine, image):
    """Turn 2 = turn 1's prompt without its assistant header + the answered assistant message + the
    new user message + the assistant header (each message tokenized on its own, as in training)."""
    m, tok = engine.model, engine.model.tokenizer
    first = eng.build_prompt(m, [], "Is there a fracture?", image)
    second = eng.build_prompt(m, [("Is there a fracture?", "no")], "Which side?", image)
    header = conv.generation_header_ids(tok)
    assert list(first.tokens[-len(header):]) == header
    want = list(first.tokens[: -len(header)])
    want += conv.encode_text_message(tok, "assistant", "no", first=False)
    want += conv.encode_text_message(tok, "user", "Which side?", first=False) + header
    np.testing.assert_array_equal(second.tokens, want)
    assert second.image_mask.sum() == first.image_mask.sum()  # the image stays in turn 1 only


def test_answer_is_the_samplers_and_padding_does_not_change_it(engine, image):
    answer = engine.answer([], "Is there a fracture?", image, SMALL, seed=0)
    m = engine.model
    row = eng.build_prompt(m, [], "Is there a fracture?", image)
    assert answer.prompt_length % engine.prompt_bucket == 0 and answer.prompt_length >= len(row.tokens)
    for batch in (
        engine.batch_for(row, answer.prompt_length),  # the server's padded batch
        mm.collate_prompts([row], pad_id=m.lm.eos_token_id, crop_size=m.config.vision.image_size),  # none
    ):
        out = mm.sample_medv(m.config, m.params, batch, jax.random.key(0), SMALL)
        n = int(out.answer_length[0])
        assert answer.token_ids == [int(t) for t in out.tokens[0, :n]]
        assert answer.steps_used == int(out.steps_run[0])
    assert answer.text == m.tokenizer.decode(answer.token_ids, skip_special_tokens=True).strip()
    # The replay: one frame per step, masked positions early, the answer at the end.
    assert len(answer.frames) == answer.steps_used >= 2
    assert None in answer.frames[0]
    assert answer.frames[-1] == answer.token_ids
    assert eng.MASK_GLYPH in eng.render_frame(m, answer.frames[0])
    assert answer.sample_s > 0 and answer.tokens_per_s > 0


def test_compiles_once_per_shape_not_per_value(engine, image):
    engine.answer([], "Is there a fracture?", image, SMALL)
    n = len(engine.compiled)
    again = engine.answer([], "Which side?", image, SMALL, seed=3)  # same length bucket, new seed
    assert again.compile_s == 0 and len(engine.compiled) == n
    # Greedy vs sampled is a different program; temperature values then reuse it.
    warm = engine.answer([], "Which side?", image, SMALL.replace(temperature=0.5))
    assert warm.compile_s > 0 and len(engine.compiled) == n + 1
    hot = engine.answer([], "Which side?", image, SMALL.replace(temperature=1.5))
    assert hot.compile_s == 0 and len(engine.compiled) == n + 1


def test_bad_questions_and_settings_raise_user_errors(engine, image):
    with pytest.raises(eng.UserError, match="type a question"):
        engine.answer([], "   ", image, SMALL)
    with pytest.raises(eng.UserError, match="gen_length=10 is not a multiple of block_length=4"):
        eng.sampler_config_from({"gen_length": 10.0, "block_length": 4, "steps": 4})
    with pytest.raises(eng.UserError, match="steps=4.5 must be a whole number"):
        eng.sampler_config_from({"gen_length": 8, "block_length": 4, "steps": 4.5})
    with pytest.raises(eng.UserError, match="temperature"):
        eng.sampler_config_from({"temperature": -1})
    max_pos = engine.model.lm.max_position_embeddings
    too_long = SamplerConfig(gen_length=max_pos, block_length=max_pos, steps=8)
    with pytest.raises(eng.UserError, match="gen_length"):
        engine.answer([], "Is there a fracture?", image, too_long)


def test_settings_cover_every_sampler_option():
    """The page's settings are read off SamplerConfig: every field (and the fields of optional
    sub-configs, i.e. the fast modes) round-trips, so options added later reach the sampler."""
    names = {s.name for s in eng.settings_of()}
    for field in dataclasses.fields(SamplerConfig):
        assert field.name in names
    defaults = SamplerConfig(gen_length=8, block_length=4, steps=4, temperature=0.5, remasking="random")
    values = {s.name: s.default for s in eng.settings_of(defaults)}
    assert eng.sampler_config_from(values) == defaults
    for s in eng.settings_of():  # switch each optional sub-config on, with its own defaults
        if s.parent is None and isinstance(s.default, bool) and s.default is False:
            on = dict(values, **{s.name: True})
            sub = getattr(eng.sampler_config_from(dict(on, remasking="low_confidence")), s.name)
            assert sub is not None and dataclasses.is_dataclass(sub)


def test_image_errors_name_the_file(engine, tiny):
    for name in ("corrupt.png", "notes.txt"):
        with pytest.raises(eng.UserError, match=name.replace(".", r"\.")):
            eng.load_image(engine.model, str(tiny["images"] / name))
    with pytest.raises(eng.UserError, match="center,width"):
        eng.parse_window("wide")
    assert eng.parse_window("40, 400") == (40.0, 400.0)
    assert eng.parse_window("auto") is None and eng.parse_window("lung") == "lung"


@pytest.mark.parametrize("name", ["corrupt.png", "notes.txt", "empty.png"])
def test_after_a_bad_upload_the_next_question_is_refused_not_answered_without_it(engine, tiny, name):
    from medv_jax.serve import app

    path = tiny["images"] / name
    if name == "empty.png":
        path.write_bytes(b"")
    preview, state, status = app.load_upload(engine.model, str(path), "auto")
    assert preview is None and isinstance(state, eng.RejectedImage) and name in status
    with pytest.raises(eng.UserError, match=f"{name}.*upload another image, or remove it"):
        engine.answer([], "Is there a lesion?", state, SMALL)
    # Removing the file: questions are asked without an image again.
    assert app.load_upload(engine.model, None, "auto")[1] is None


def test_examples_work_offline(engine, tmp_path):
    rows = examples_lib.write_examples(tmp_path, image_size=56)
    names = [os.path.basename(r[0]) for r in rows]
    assert "CT_small.dcm" in names and "MR_small.dcm" in names and sum(n.endswith(".png") for n in names) == 3
    previews = {}
    for path, question, window in rows:
        assert question.endswith("?")
        rgb, image = eng.load_image(engine.model, path, window)
        previews[os.path.basename(path)] = np.asarray(rgb)
        assert image.pixels.shape[1:] == (56, 56, 3)
    # The CT window changes what the model sees.
    ct_bone = np.asarray(eng.load_image(engine.model, str(tmp_path / "CT_small.dcm"), "bone")[0])
    assert not np.array_equal(ct_bone, previews["CT_small.dcm"])
    assert examples_lib.write_examples(tmp_path, image_size=56) == rows  # kept, not rewritten
    assert eng.is_dicom(str(tmp_path / "CT_small.dcm")) and not eng.is_dicom(rows[0][0])


def test_demo_defaults_match_the_demo_config():
    sys.path.insert(0, "configs")
    try:
        import demo
    finally:
        sys.path.remove("configs")
    from medv_jax.serve import cli

    c = demo.get_config()
    assert cli.DEMO_WORKDIR == c.workdir and c.tokenizer == "demo"
    assert cli.DEMO_SYSTEM_PROMPT == c.data.system_prompt
    want = (c.eval.gen_length, c.eval.block_length, c.eval.steps)
    assert (cli.DEMO_SAMPLER.gen_length, cli.DEMO_SAMPLER.block_length, cli.DEMO_SAMPLER.steps) == want


def test_missing_demo_model_says_how_to_train(tmp_path):
    repo = os.getcwd()
    env = dict(os.environ, PYTHONPATH=repo)
    proc = subprocess.run(
        [sys.executable, "-m", "medv_jax.serve"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "python -m medv_jax.train --config=configs/demo.py" in proc.stderr
    assert "workdir/demo/model" in proc.stderr


def test_default_model_paths_are_the_demo_training_output(tmp_path, monkeypatch):
    from medv_jax.serve import cli

    parser = cli.build_parser()
    for sub in ("model", "tokenizer"):
        (tmp_path / cli.DEMO_WORKDIR / sub).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    ckpt, tok, is_demo = cli.resolve_model_paths(parser.parse_args([]), parser)
    assert (ckpt, tok, is_demo) == ("workdir/demo/model", "workdir/demo/tokenizer", True)
    args = parser.parse_args(["--checkpoint", "workdir/demo/model", "--tokenizer", "workdir/demo/tokenizer"])
    assert cli.resolve_model_paths(args, parser)[2] is False
    with pytest.raises(SystemExit):  # one without the other
        cli.resolve_model_paths(parser.parse_args(["--checkpoint", "workdir/demo/model"]), parser)


def test_fast_modes_from_the_page_settings(engine, image):
    """Threshold decoding switched on from the page's flat settings: with threshold 0 every block
    fills in one step, and the replay has one frame per step used."""
    values = {s.name: s.default for s in eng.settings_of(SamplerConfig(gen_length=16, block_length=8, steps=8))}
    if "selection.threshold" not in values:
        pytest.skip("this SamplerConfig has no threshold selection")
    values.update({"selection": True, "selection.threshold": 0.0})
    sc = eng.sampler_config_from(values)
    answer = engine.answer([], "Is there a fracture?", image, sc)
    assert 1 <= answer.steps_used <= sc.num_blocks
    assert len(answer.frames) == answer.steps_used and answer.frames[-1] == answer.token_ids


def test_text_only_checkpoint(tiny, tmp_path, image):
    """A LLaDA (text-only) checkpoint answers without an image and rejects uploads by name."""
    import flax.linen as nn

    from medv_jax import checkpoint
    from medv_jax.models import llada
    from tests.serve.conftest import random_params

    config = tiny["config"].lm
    params = random_params(config, abstract=lambda c: nn.unbox(llada.abstract_params(c)))
    checkpoint.save_pretrained(tmp_path / "llada", config, params)
    text_engine = eng.Engine(api.load(str(tmp_path / "llada"), tiny["tokenizer"]))
    answer = text_engine.answer([], "What is a lesion?", None, SMALL)
    assert len(answer.frames) == answer.steps_used and answer.frames[-1] == answer.token_ids
    with pytest.raises(eng.UserError, match="scan.png: this checkpoint is a text-only LLaDA model"):
        eng.load_image(text_engine.model, str(tiny["images"] / "scan.png"))
    with pytest.raises(eng.UserError, match="text-only"):
        text_engine.answer([], "What is a lesion?", image, SMALL)


def test_an_emptied_setting_is_an_error_not_a_default():
    with pytest.raises(eng.UserError, match="gen_length is empty"):
        eng.sampler_config_from({"gen_length": None, "block_length": 4, "steps": 4})
