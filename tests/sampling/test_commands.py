"""The generate and infer commands end to end on a converted tiny random MedV checkpoint, a small
test tokenizer (compact special ids, so nothing assumes the release ids) and image files written
here."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from medv_jax import checkpoint
from medv_jax.data.tokenizer import load_tokenizer, special_token_ids
from medv_jax.sampling import cli, generate, infer, multimodal
from medv_jax.sampling.diffusion import SamplerConfig
from tests.tiny_medv import write_tiny_medv

SAMPLER_FLAGS = ["--gen_length", "8", "--block_length", "4", "--steps", "4"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("commands")
    config, tok_dir, ckpt = write_tiny_medv(root, eot_scale=3.0)  # an end-of-turn that can win

    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)).save(images / "b.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(images / "c.png")  # grey
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(100))
    return dict(root=root, tokenizer=str(tok_dir), checkpoint=str(ckpt), images=images, config=config)


def model_flags(files):
    return ["--checkpoint", files["checkpoint"], "--tokenizer", files["tokenizer"]]


def test_help(capsys):
    for command in (generate, infer):
        with pytest.raises(SystemExit) as exit_info:
            command.main(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "--checkpoint" in out and "--gen_length" in out and "--cfg_scale" in out


def test_generate_json_with_steps(files, capsys):
    code = generate.main(
        model_flags(files)
        + ["--image", str(files["images"] / "b.jpg"), "--question", "Is there a fracture?"]
        + SAMPLER_FLAGS
        + ["--temperature", "0.5", "--seed", "3", "--json", "--show_steps"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    tokenizer = load_tokenizer(files["tokenizer"])
    ids = result["token_ids"]
    assert len(ids) == result["answer_length"] <= 8
    assert special_token_ids(tokenizer).eot not in ids
    assert result["answer"] == tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert 1 <= result["steps_used"] <= 4 and len(result["steps"]) == result["steps_used"]
    assert result["steps"][0].count("_") > 0  # masked positions visible after the first step
    # After the last step every answer position is committed.
    assert result["steps"][-1] == tokenizer.decode(ids, skip_special_tokens=False)
    assert set(result["timings"]) == {"load_s", "preprocess_s", "compile_s", "sample_s"}
    assert result["sampler"]["gen_length"] == 8 and result["prompt_tokens"] > 16


def test_generate_plain_matches_the_sampler(files, capsys):
    """The printed answer is the sampler's for the same prompt; --show_steps prints every step."""
    flags = ["--image", str(files["images"] / "a.png"), "--question", "<image> What organ is shown?"]
    assert generate.main(model_flags(files) + flags + SAMPLER_FLAGS + ["--show_steps"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert lines[0].startswith("[step 1/")
    answer = lines[-1]

    config, params = checkpoint.load_pretrained(files["checkpoint"])
    tokenizer = load_tokenizer(files["tokenizer"])
    config = multimodal.with_tokenizer_ids(config, tokenizer)
    from medv_jax.data.image import preprocess_image

    image = preprocess_image(files["images"] / "a.png", multimodal.image_config_for(config))
    row = multimodal.question_prompt(tokenizer, "What organ is shown?", image)
    batch = multimodal.collate_prompts([row], pad_id=config.lm.eos_token_id, crop_size=56)
    out = multimodal.sample_medv(config, params, batch, jax.random.key(0), SamplerConfig(8, 4, 4))
    want = tokenizer.decode(np.asarray(out.tokens[0, : int(out.answer_length[0])]), skip_special_tokens=True)
    assert answer == want.strip()
    assert len(lines) == int(out.steps_run[0]) + 1


def test_generate_reports_bad_input(files, capsys):
    code = generate.main(
        model_flags(files) + ["--image", str(files["images"] / "corrupt.png"), "--question", "q"]
    )
    assert code == 2 and "corrupt.png" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # invalid schedule: rejected before loading
        generate.main(model_flags(files) + ["--question", "q", "--gen_length", "10", "--block_length", "4"])
    assert exit_info.value.code == 2
    assert "gen_length" in capsys.readouterr().err


def test_infer_resume_and_bad_rows(files, capsys):
    root = files["root"]
    questions = [
        {"question_id": 1, "image": "a.png", "text": "Is this normal?"},
        {"question_id": "q2", "image": "missing.png", "text": "Where?"},
        {"question_id": 3, "image": "b.jpg", "text": "<image>\nWhat modality?"},
        {"question_id": 4, "image": "corrupt.png", "text": "Which side?"},
        {"question_id": 5, "image": "c.png", "text": "Any lesion?"},
        {"question_id": 6, "image": "a.png", "text": "Describe it."},
    ]
    qfile = root / "questions.jsonl"
    lines = [json.dumps(q) for q in questions]
    lines.insert(2, "{not json")
    qfile.write_text("\n".join(lines) + "\n")
    answers = root / "answers.jsonl"
    flags = model_flags(files) + [
        "--question_file", str(qfile), "--image_folder", str(files["images"]),
        "--answers_file", str(answers), "--batch_size", "2", "--model_id", "tiny", "--no_progress",
    ] + SAMPLER_FLAGS

    # First run: the first two questions only (one of them has a missing image).
    assert infer.main(flags + ["--limit", "2"]) == 0
    err = capsys.readouterr().err
    assert "'q2'" in err and "missing.png" in err and "line 3" in err
    first = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [a["question_id"] for a in first] == [1]
    # An interrupted write leaves a partial line; the next run drops it and resumes.
    with open(answers, "a") as f:
        f.write('{"question_id": 3, "pro')
    assert infer.main(flags) == 0
    err = capsys.readouterr().err
    assert "partly written" in err and "4" in err and "corrupt.png" in err
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [a["question_id"] for a in rows] == [1, 3, 5, 6]
    tokenizer = load_tokenizer(files["tokenizer"])
    assert rows[0] == first[0]  # untouched
    for a in rows:
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert a["model_id"] == "tiny" and isinstance(a["text"], str)
        meta = a["metadata"]
        assert set(meta) == {"num_tokens", "token_ids", "steps", "seconds", "batch_seconds", "batch_size",
                             "includes_compile"}
        assert meta["num_tokens"] == len(meta["token_ids"]) <= 8 and 1 <= meta["steps"] <= 8
        assert cli.decode(tokenizer, np.asarray(meta["token_ids"])) == a["text"]
        assert meta["seconds"] * meta["batch_size"] == pytest.approx(meta["batch_seconds"]) and meta["seconds"] > 0
    # the run's first batch compiled its program; a later batch of the same width did not
    assert rows[0]["metadata"]["includes_compile"] and not rows[3]["metadata"]["includes_compile"]
    assert rows[1]["prompt"] == "What modality?"
    # Nothing left: a third run answers nothing.
    assert infer.main(flags) == 0
    assert len(answers.read_text().splitlines()) == 4

    # A row's answer depends on its line in the file, not on its batch: batch size 3 from scratch.
    fresh = root / "fresh.jsonl"
    flags3 = [("--batch_size" if f == "--batch_size" else f) for f in flags]
    flags3[flags3.index("--answers_file") + 1] = str(fresh)
    flags3[flags3.index("--batch_size") + 1] = "3"
    assert infer.main(flags3) == 0
    again = {a["question_id"]: a["text"] for a in map(json.loads, fresh.read_text().splitlines())}
    assert again == {a["question_id"]: a["text"] for a in rows}


FAST_FLAGS = ["--cache", "prefix", "--cache_refresh", "2", "--threshold", "0.9", "--adaptive_stop",
              "--stop_patience", "0", "--stop_entropy", "0.5"]


def test_fast_flags_build_the_sampler_config():
    from medv_jax.sampling import cli
    from medv_jax.sampling.diffusion import AdaptiveStop, CachePolicy, ThresholdSelection

    required = {
        generate: ["--checkpoint", "c", "--tokenizer", "t", "--question", "q"],
        infer: ["--checkpoint", "c", "--tokenizer", "t", "--question_file", "f", "--answers_file", "a"],
    }
    for command, argv in required.items():
        parser = command.build_parser()
        config = cli.sampler_config_from(parser.parse_args(argv + SAMPLER_FLAGS + FAST_FLAGS), parser)
        assert config == SamplerConfig(
            8, 4, 4, cache=CachePolicy("prefix", 2), selection=ThresholdSelection(0.9),
            adaptive_stop=AdaptiveStop(0, 0.5),
        )
        plain = cli.sampler_config_from(parser.parse_args(argv), parser)
        assert plain == SamplerConfig()  # the fast modes are opt-in


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--cache", "prefix", "--cache_refresh", "0"], "--cache_refresh"),
        (["--cache_refresh", "4"], "--cache_refresh"),  # without --cache
        (["--threshold", "1.5"], "--threshold"),
        (["--threshold", "0.9", "--remasking", "random"], "--threshold"),
        (["--adaptive_stop", "--stop_entropy", "-1"], "--stop_entropy"),
        (["--stop_patience", "3"], "--stop_patience"),  # without --adaptive_stop
        (["--cache", "full"], "--cache"),
    ],
)
def test_fast_flags_validation(files, capsys, flags, named):
    for command, extra in ((generate, ["--question", "q"]),
                           (infer, ["--question_file", "q.jsonl", "--answers_file", "a.jsonl"])):
        with pytest.raises(SystemExit) as exit_info:  # rejected before anything is loaded
            command.main(model_flags(files) + extra + flags)
        assert exit_info.value.code == 2
        assert named in capsys.readouterr().err


def test_generate_and_infer_with_fast_modes(files, capsys):
    """Both commands run the fast modes end to end; refresh every step + threshold 1.0 is exact."""
    flags = model_flags(files) + ["--image", str(files["images"] / "a.png"), "--question", "Which organ?"]
    assert generate.main(flags + SAMPLER_FLAGS + ["--json"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert generate.main(flags + SAMPLER_FLAGS + ["--json", "--cache", "dual", "--cache_refresh", "1",
                                                  "--threshold", "1.0"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["token_ids"] == exact["token_ids"] and same["steps_used"] == exact["steps_used"]
    assert same["cache_refreshes"] == same["steps_used"] and exact["cache_refreshes"] == 0
    assert same["sampler"]["cache"] == "dual" and same["sampler"]["threshold"] == 1.0

    root = files["root"]
    qfile = root / "fast_questions.jsonl"
    qfile.write_text("\n".join(json.dumps({"question_id": i, "image": "a.png", "text": f"Q{i}?"}) for i in range(3)))
    answers = root / "fast_answers.jsonl"
    assert infer.main(model_flags(files) + [
        "--question_file", str(qfile), "--image_folder", str(files["images"]), "--answers_file", str(answers),
        "--batch_size", "2", "--no_progress"] + SAMPLER_FLAGS + FAST_FLAGS) == 0
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == [0, 1, 2]
