"""The evaluation commands answer through the Python API with infer's batching: the sampler
settings of their flags must be exactly those infer's flags give."""

from __future__ import annotations

import argparse
import json

import pytest

from medv_jax.evaluate import __main__ as evaluate_command
from medv_jax.evaluate import generation, run_vqa
from medv_jax.sampling import cli, infer
from medv_jax.user_errors import UserError


def _args(extra: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    run_vqa.add_arguments(parser, evaluate_command.generation_flags)
    return parser.parse_args(["--checkpoint", "ck", "--tokenizer", "tok", "--out", "run"] + extra)


SAMPLER = ["--gen_length", "64", "--block_length", "32", "--steps", "16", "--temperature", "0.5",
           "--cfg_scale", "1.5", "--cache", "dual", "--cache_refresh", "4", "--threshold", "0.9",
           "--adaptive_stop", "--stop_patience", "3", "--stop_entropy", "0.25"]


def test_sampler_settings_are_infers_for_the_same_flags():
    args = _args(["--questions", "q.json", "--seed", "3", "--batch_size", "4"] + SAMPLER)
    parser = infer.build_parser()
    flags = parser.parse_args(["--checkpoint", "ck", "--tokenizer", "tok", "--question_file", "q",
                               "--answers_file", "a"] + SAMPLER)
    assert generation.sampler_for(args) == cli.sampler_config_from(flags, parser)
    # An override (a sweep's setting) wins over the flag.
    assert generation.sampler_for(args, {"steps": 32}) == cli.sampler_config_from(flags, parser).replace(steps=32)
    # The defaults are the benchmark's paper schedule, no fast mode.
    plain = generation.sampler_for(_args(["--questions", "q.json"]))
    assert (plain.gen_length, plain.block_length, plain.steps) == (128, 128, 128)
    assert plain.cache is None and plain.selection is None and plain.adaptive_stop is None
    with pytest.raises(UserError, match="not a multiple of block_length"):
        generation.sampler_for(_args(["--questions", "q.json", "--gen_length", "10", "--block_length", "4"]))


def test_question_rows_from_llava_and_flat_records():
    records = [
        {"id": "a1", "image": "x.png", "answer_type": "CLOSED",
         "conversations": [{"from": "human", "value": "<image>\nIs it?"}, {"from": "gpt", "value": "yes"}]},
        {"question_id": 2, "text": "Where?", "answer": "left", "answer_type": "OPEN"},
    ]
    assert run_vqa.question_rows(records, "f.json") == [
        {"question_id": "a1", "text": "<image>\nIs it?", "image": "x.png"},
        {"question_id": 2, "text": "Where?"},
    ]


def test_timed_answers_spreads_each_call_over_its_answers(tmp_path):
    answers = [{"question_id": i, "text": "a b"} for i in (1, 2, 3)]
    answers.append({"question_id": 4, "text": "c", "metadata": {"seconds": 9.0, "num_tokens": 7}})
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    timing = [{"answered": 2, "wall_seconds": 3.0, "question_ids": ["1", "2"]},
              {"answered": 1, "wall_seconds": 0.5, "question_ids": ["3"]}]
    (tmp_path / "timing.jsonl").write_text("".join(json.dumps(t) + "\n" for t in timing))
    rows = generation.timed_answers(str(tmp_path))
    assert [r.get("seconds") for r in rows] == [1.5, 1.5, 0.5, 9.0]  # the row's own figure wins
    assert [r.get("num_tokens") for r in rows] == [None, None, None, 7]


def test_tfds_questions_come_from_read_split(monkeypatch):
    """--tfds reads the split through medv_jax.data.tfds_vqa.read_split (imported lazily); its
    records (absolute image paths, lower-case answer types) become rows and references."""
    import sys
    import types

    calls = []

    def read_split(spec, data_dir=None):
        calls.append((spec, data_dir))
        return [{"id": "rad_1", "image": "/cache/images/synpic1.jpg", "answer_type": "closed",
                 "conversations": [{"from": "human", "value": "<image>\nIs it?"},
                                   {"from": "gpt", "value": "yes"}]}]

    monkeypatch.setitem(sys.modules, "medv_jax.data.tfds_vqa", types.SimpleNamespace(read_split=read_split))
    args = _args(["--tfds", "vqa_rad:test", "--tfds_data_dir", "/data"])
    records, where = run_vqa.read_questions(args)
    assert calls == [("vqa_rad:test", "/data")] and where == "tfds vqa_rad:test"
    assert run_vqa.question_rows(records, where)[0]["image"] == "/cache/images/synpic1.jpg"
    from medv_jax.evaluate.vqa_scoring import references_from_records

    assert references_from_records(records)[0].answer_type == "closed"
