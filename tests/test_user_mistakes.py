"""User mistakes across every command: each answered by one line that names the item, exit
status 2, no traceback, and nothing written or lost (files keep their bytes, no half-made
workdirs, run folders or checkpoints).

The commands run in process (their ``main(argv)``) on a tiny random checkpoint in the real format;
a few run as real processes where the process's own exit and output are what is tested.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medv_jax.data.testing import build_test_tokenizer
from medv_jax.data.tokenizer import load_tokenizer, special_token_ids
from medv_jax.sampling import generate, infer
from tests.serve.conftest import build_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
SAMPLER = "--gen_length 4 --block_length 4 --steps 4"


def _commands():
    from medv_jax.data.tfds import __main__ as tfds_cli
    from medv_jax.evaluate import __main__ as evaluate_cli
    from medv_jax.serve import api as serve_api
    from medv_jax.serve import cli as serve_cli
    from medv_jax.train import __main__ as train_cli
    from tools.convert_weights import __main__ as convert_cli

    return {
        "generate": generate.main,
        "infer": infer.main,
        "evaluate": evaluate_cli.main,
        "train": train_cli.main,
        "serve": serve_cli.main,
        "serve.api": serve_api.main,
        "convert": convert_cli.main,
        "tfds": tfds_cli.main,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every file the mistakes below refer to, under one root."""
    root = tmp_path_factory.mktemp("mistakes")
    tiny = build_tiny_checkpoint(root)
    paths = {k: str(v) for k, v in tiny.items() if k != "config"}
    config = tiny["config"]

    # A tokenizer whose special ids fit the model's vocabulary but are not the checkpoint's.
    base = special_token_ids(load_tokenizer(paths["tokenizer"]))
    other = build_test_tokenizer(root / "other_tokenizer", special_ids_base=base.bos + 3)
    other_ids = special_token_ids(load_tokenizer(other))
    assert other_ids.mask != base.mask and other_ids.eot < config.lm.vocab_size
    paths["other_tokenizer"] = other

    # A Hugging Face download: config.json naming the multimodal model, weights, its tokenizer.
    hf = root / "hf_download"
    shutil.copytree(paths["tokenizer"], hf)
    (hf / "config.json").write_text(json.dumps({"model_type": "llava_llada", "architectures": ["LlavaLLaDAModelLM"]}))
    (hf / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 16)
    paths["hf"] = str(hf)

    images = Path(paths["images"])
    (images / "headerless.dcm").write_bytes(np.random.default_rng(0).bytes(300))

    questions = root / "questions"
    questions.mkdir()

    def write_rows(name, rows):
        (questions / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    good = {"question_id": 1, "image": "scan.png", "text": "Is this normal?"}
    write_rows("good.jsonl", [good])
    write_rows("duplicate.jsonl", [good, {"question_id": 2, "image": "scan.png", "text": "Which side?"},
                                   {"question_id": 1, "image": "scan.jpg", "text": "What modality?"}])
    write_rows("empty.jsonl", [good, {"question_id": 2, "image": "scan.png", "text": "   "}])
    write_rows("image_only.jsonl", [{"question_id": "a", "image": "scan.png", "text": "<image>\n"}])
    # An answer file from an interrupted run: one answer and a partly written line.
    answers = root / "partial_answers.jsonl"
    answers.write_text(json.dumps({"question_id": 7, "text": "yes"}) + "\n" + '{"question_id": 8, "te')
    paths["answers"] = str(answers)

    evaluate = root / "evaluate"
    evaluate.mkdir()
    (evaluate / "empty.jsonl").write_text("")
    (evaluate / "answers.jsonl").write_text(json.dumps({"question_id": 1, "text": "yes"}) + "\n")
    (evaluate / "refs.json").write_text(json.dumps([{"id": 1, "answer_type": "CLOSED", "conversations": [
        {"from": "human", "value": "<image>\nIs it?"}, {"from": "gpt", "value": "yes"}]}]))
    (evaluate / "test.jsonl").write_text(json.dumps({"question_id": 1, "image": "scan.png", "text": "Is it?",
                                                     "answer_type": "CLOSED", "answer": "yes"}) + "\n")
    (root / "empty_folder").mkdir()
    # An adapters checkpoint whose base checkpoint has moved away.
    orphan = root / "orphan_adapters"
    (orphan / "params").mkdir(parents=True)
    shutil.copy(Path(paths["checkpoint"]) / "config.json", orphan / "config.json")
    (orphan / "adapters.json").write_text(json.dumps({"base": str(root / "moved_base")}))
    paths["orphan_adapters"] = str(orphan)
    (root / "existing_dst").mkdir()
    (root / "records.json").write_text("[]")
    paths.update(root=str(root), questions=str(questions), evaluate=str(evaluate), mismatch_ids=(base, other_ids))
    return paths


def snapshot(root: str) -> dict[str, str]:
    """Every file and folder under ``root`` with a hash of its bytes."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            found[os.path.relpath(os.path.join(folder, d), root)] = "folder"
        for f in files:
            path = os.path.join(folder, f)
            found[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


MODEL = "--checkpoint {checkpoint} --tokenizer {tokenizer}"
GEN = f"{MODEL} --image {{images}}/scan.png {SAMPLER}"
INFER = f"{MODEL} --image_folder {{images}} --answers_file {{answers}} --no_progress {SAMPLER}"
TRAIN = "--config=configs/demo.py --workdir={root}/run"
LORA_TRAIN = "--config=configs/stage3_lora.py:slake --workdir={root}/run --config.data.source=synthetic --config.tokenizer=demo"
STAGE2 = "--config=configs/stage2.py --workdir={root}/run"

# (case, command, arguments, what the one line must name)
MISTAKES = [
    # generate
    ("generate: no such checkpoint", "generate", "--checkpoint {root}/nope --tokenizer {tokenizer} --question q", ["--checkpoint", "no such folder"]),
    ("generate: Hugging Face folder as checkpoint", "generate", "--checkpoint {hf} --tokenizer {tokenizer} --question q", ["Hugging Face", "python -m tools.convert_weights --src"]),
    ("generate: an empty folder as checkpoint", "generate", "--checkpoint {root}/empty_folder --tokenizer {tokenizer} --question q", ["--checkpoint", "not a converted checkpoint"]),
    ("generate: no such tokenizer", "generate", "--checkpoint {checkpoint} --tokenizer {root}/nope --question q", ["--tokenizer", "no such folder"]),
    ("generate: a folder without a tokenizer", "generate", "--checkpoint {checkpoint} --tokenizer {images} --question q", ["--tokenizer", "cannot load"]),
    ("generate: another checkpoint's tokenizer", "generate", "--checkpoint {checkpoint} --tokenizer {other_tokenizer} --question q", ["--tokenizer", "does not belong", "mask {mask_other} vs {mask}", "--allow_tokenizer_mismatch"]),
    ("generate: unknown weight quantization", "generate", f"{GEN} --question q --weight_quant int3", ["--weight_quant", "int3"]),
    ("generate: adapters without their base", "generate", "--checkpoint {orphan_adapters} --tokenizer {tokenizer} --question q", ["--checkpoint", "moved_base", "not there"]),
    ("generate: empty question", "generate", f'{GEN} --question ""', ["--question is empty"]),
    ("generate: blank question", "generate", f'{GEN} --question "   "', ["--question is empty"]),
    ("generate: <image> only", "generate", f'{GEN} --question "<image>"', ["--question is empty", "<image>"]),
    ("generate: no such image", "generate", f"{MODEL} --image {{images}}/missing.png --question q", ["--image", "missing.png"]),
    ("generate: corrupt image", "generate", f"{MODEL} --image {{images}}/corrupt.png --question q", ["--image", "corrupt.png"]),
    ("generate: text file as image", "generate", f"{MODEL} --image {{images}}/notes.txt --question q", ["--image", "notes.txt"]),
    ("generate: DICOM without its header", "generate", f"{MODEL} --image {{images}}/headerless.dcm --question q", ["headerless.dcm", "--dicom_force"]),
    ("generate: unknown DICOM window", "generate", f"{GEN} --question q --dicom_window liver", ["--dicom_window", "liver"]),
    ("generate: block longer than answer", "generate", f"{MODEL} --question q --gen_length 10 --block_length 4", ["gen_length"]),
    ("generate: misspelt flag", "generate", f"{GEN} --question q --temprature 0.5", ["--temprature"]),
    ("generate: unknown dtype", "generate", f"{GEN} --question q --param_dtype bfloat17", ["--param_dtype", "bfloat17"]),
    ("generate: answer longer than the positions", "generate", f"{MODEL} --question q --gen_length 8192 --block_length 8192 --steps 4", ["--gen_length", "positions"]),
    ("generate: no question", "generate", f"{MODEL}", ["--question"]),
    # infer
    ("infer: no such question file", "infer", f"{INFER} --question_file {{questions}}/nope.jsonl", ["--question_file", "nope.jsonl"]),
    ("infer: duplicate question_id", "infer", f"{INFER} --question_file {{questions}}/duplicate.jsonl", ["question_id 1", "lines 1 and 3"]),
    ("infer: empty question", "infer", f"{INFER} --question_file {{questions}}/empty.jsonl", ["line 2", "question_id 2", "is empty"]),
    ("infer: <image> only", "infer", f"{INFER} --question_file {{questions}}/image_only.jsonl", ["line 1", "is empty"]),
    ("infer: answers file is a folder", "infer", f"{MODEL} --question_file {{questions}}/good.jsonl --answers_file {{root}}/empty_folder", ["--answers_file", "is a folder"]),
    ("infer: no such image folder", "infer", f"{INFER} --question_file {{questions}}/good.jsonl --image_folder {{root}}/nope", ["--image_folder", "no such folder"]),
    ("infer: another checkpoint's tokenizer", "infer", "--checkpoint {checkpoint} --tokenizer {other_tokenizer} --question_file {questions}/good.jsonl --answers_file {answers}", ["--tokenizer", "does not belong"]),
    ("infer: Hugging Face folder as checkpoint", "infer", "--checkpoint {hf} --tokenizer {hf} --question_file {questions}/good.jsonl --answers_file {answers}", ["Hugging Face", "convert"]),
    ("infer: batch size 0", "infer", f"{INFER} --question_file {{questions}}/good.jsonl --batch_size 0", ["--batch_size"]),
    ("infer: no questions given", "infer", f"{MODEL} --answers_file {{answers}}", ["--question_file", "--tfds"]),
    # evaluate
    ("evaluate vqa: empty predictions", "evaluate", "vqa --predictions {evaluate}/empty.jsonl --references {evaluate}/refs.json", ["--predictions", "no answers"]),
    ("evaluate vqa: empty references", "evaluate", "vqa --predictions {evaluate}/answers.jsonl --references {root}/records.json", ["--references", "no questions"]),
    ("evaluate vqa: no such predictions", "evaluate", "vqa --predictions {evaluate}/nope.jsonl --references {evaluate}/refs.json", ["nope.jsonl"]),
    ("evaluate vqa: no references given", "evaluate", "vqa --predictions {evaluate}/answers.jsonl", ["--references"]),
    ("evaluate lengths: empty answers", "evaluate", "lengths --answers {evaluate}/empty.jsonl", ["--answers", "no answers"]),
    ("evaluate: unknown subcommand", "evaluate", "score --predictions x", ["score"]),
    ("evaluate probe-words: a word of several tokens", "evaluate", "probe-words --checkpoint {checkpoint} --tokenizer {tokenizer} --questions {evaluate}/test.jsonl --words xylophonically", ["--words", "one token each"]),
    ("evaluate probe-words: canvas shorter than a reference", "evaluate", "probe-words --checkpoint {checkpoint} --tokenizer {tokenizer} --questions {evaluate}/test.jsonl --gen_length 1", ["question 1", "--gen_length 1"]),
    ("evaluate probe-words: captions without scan attributes", "evaluate", "probe-words --checkpoint {checkpoint} --tokenizer {tokenizer} --questions {evaluate}/test.jsonl --format caption", ["--format caption", "meta"]),
    ("evaluate run-vqa: Hugging Face folder as checkpoint", "evaluate", f"run-vqa --checkpoint {{hf}} --tokenizer {{tokenizer}} --questions {{evaluate}}/test.jsonl --image_folder {{images}} --out {{root}}/run_vqa {SAMPLER}", ["Hugging Face"]),
    # train
    ("train: unknown config field", "train", f"{TRAIN} --config.nonexistent=1", ["--config.nonexistent", "no field 'nonexistent'", "closest"]),
    ("train: misspelt config field", "train", f"{TRAIN} --config.train.num_step=1", ["train.num_step", "closest: train.num_steps"]),
    ("train: stage 2 without its data", "train", STAGE2, ["config.data.train_path"]),
    ("train: LoRA without a base model", "train", f"{LORA_TRAIN} --config.init_from=", ["config.model.lora.rank", "config.init_from"]),
    ("train: no such training file", "train", f"{STAGE2} --config.data.train_path={{root}}/nope.json", ["config.data.train_path", "nope.json"]),
    ("train: stage 2 without a tokenizer", "train", f"{STAGE2} --config.data.train_path={{root}}/records.json", ["config.tokenizer"]),
    ("train: unconverted init_from", "train", f"{STAGE2} --config.data.train_path={{root}}/records.json --config.tokenizer={{tokenizer}} --config.init_from={{hf}}", ["config.init_from", "Hugging Face"]),
    ("train: no such config file", "train", "--config=configs/nope.py --workdir={root}/run", ["--config", "configs/nope.py"]),
    ("train: no config", "train", "--workdir={root}/run", ["--config is not set"]),
    ("train: a number that is not one", "train", f"{TRAIN} --config.train.num_steps=abc", ["--config.train.num_steps", "abc"]),
    ("train: mask time floor out of range", "train", f"{TRAIN} --config.train.mask_time_floor=1.0", ["config.train.mask_time_floor", "[0, 1)"]),
    ("train: mask span fraction out of range", "train", f"{TRAIN} --config.train.mask_span_fraction=1.5", ["config.train.mask_span_fraction", "[0, 1]"]),
    ("train: unknown lesion layout", "train", f"{TRAIN} --config.data.layout=grid", ["config.data.layout", "'grid'", "slots"]),
    ("train: log every zero steps", "train", f"{TRAIN} --config.train.log_every=0", ["config.train.log_every", ">= 1"]),
    ("train: report_alone out of range", "train", f"{TRAIN} --config.data.report_alone=2.0", ["config.data.report_alone", "[0, 1]"]),
    ("train: unknown report wording", "train", f"{TRAIN} --config.data.report_wording=plain", ["config.data.report_wording", "'plain'", "house"]),
    ("train: rows shorter than the synthetic set's longest record", "train", f"{TRAIN} --config.data.max_length=36", ["config.data.max_length=36", "37 tokens", ">= 37"]),
    ("train: unknown preset", "train", f"{TRAIN} --config.model.lm_preset=llada_tiniest", ["config.model.lm_preset", "llada_tiny"]),
    # serve
    ("serve: Hugging Face folder as checkpoint", "serve", "--checkpoint {hf} --tokenizer {hf}", ["Hugging Face", "convert"]),
    ("serve: no such checkpoint", "serve", "--checkpoint {root}/nope --tokenizer {tokenizer}", ["--checkpoint", "no such folder"]),
    ("serve: checkpoint without tokenizer", "serve", "--checkpoint {checkpoint}", ["--tokenizer"]),
    ("serve: another checkpoint's tokenizer", "serve", "--checkpoint {checkpoint} --tokenizer {other_tokenizer}", ["does not belong"]),
    ("serve: no demo model", "serve", "", ["no demo model", "python -m medv_jax.train --config=configs/demo.py"]),
    ("serve: bad port", "serve", "--checkpoint {checkpoint} --tokenizer {tokenizer} --port 99999", ["--port"]),
    # serve.api
    ("serve.api: no such checkpoint", "serve.api", "--checkpoint {root}/nope --tokenizer {tokenizer}", ["--checkpoint", "no such folder"]),
    ("serve.api: another checkpoint's tokenizer", "serve.api", "--checkpoint {checkpoint} --tokenizer {other_tokenizer}", ["does not belong"]),
    ("serve.api: no demo model", "serve.api", "", ["no demo model", "python -m medv_jax.train --config=configs/demo.py"]),
    ("serve.api: batch sizes not numbers", "serve.api", "--checkpoint {checkpoint} --tokenizer {tokenizer} --batch_sizes 1,four", ["--batch_sizes", "1,four"]),
    ("serve.api: empty queue", "serve.api", "--checkpoint {checkpoint} --tokenizer {tokenizer} --max_queue 0", ["--max_queue"]),
    ("serve.api: bad sampler schedule", "serve.api", "--checkpoint {checkpoint} --tokenizer {tokenizer} --gen_length 10 --block_length 4", ["not a multiple of block_length"]),
    # convert_weights
    ("convert: no such source", "convert", "--src {root}/nope --dst {root}/converted", ["--src", "no such folder"]),
    ("convert: destination exists", "convert", "--src {hf} --dst {root}/existing_dst", ["--dst", "--overwrite"]),
    ("convert: unknown dtype", "convert", "--src {hf} --dst {root}/converted --dtype bf16x", ["--dtype", "bf16x"]),
    ("convert: source without weights", "convert", "--src {root}/empty_folder --dst {root}/converted", ["empty_folder"]),
    # data.tfds
    ("tfds: unknown data set", "tfds", "build vqa_radd --manual_dir {root}/empty_folder --data_dir {root}/tfds", ["vqa_radd"]),
    ("tfds: empty manual folder", "tfds", "build vqa_rad --manual_dir {root}/empty_folder --data_dir {root}/tfds", ["manual folder"]),
    ("tfds: data set not built", "tfds", "show vqa_rad:test --data_dir {root}/empty_folder", ["vqa_rad"]),
    ("tfds: spec without a split", "tfds", "show vqa_rad --data_dir {root}/empty_folder", ["vqa_rad"]),
]


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize("case, command, arguments, named", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_is_one_line_and_changes_nothing(world, case, command, arguments, named, capsys, monkeypatch):
    base, other = world["mismatch_ids"]
    values = {k: v for k, v in world.items() if isinstance(v, str)}
    argv = shlex.split(arguments.format(**values))
    monkeypatch.chdir(REPO if command == "train" else world["root"])
    before = snapshot(world["root"])
    capsys.readouterr()
    code = _exit_code(_commands()[command], argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (case, out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1, lines
    assert lines[0].startswith("python -m ") and "error:" in lines[0]
    for item in named:
        assert item.format(mask=base.mask, mask_other=other.mask) in lines[0], (item, lines[0])
    assert snapshot(world["root"]) == before  # nothing written, nothing truncated, no folders left


def test_the_table_covers_every_command():
    assert len(MISTAKES) >= 40
    assert {m[1] for m in MISTAKES} == set(_commands())


def _run(args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_real_process_prints_one_line_and_debug_shows_the_traceback(world):
    argv = ["-m", "medv_jax.generate", "--checkpoint", world["hf"], "--tokenizer", world["tokenizer"], "--question", "q"]
    proc = _run(argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("python -m medv_jax.generate: error: --checkpoint")
    debug = _run(argv + ["--debug"])
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr
    usage = _run(["-m", "medv_jax.infer", "--batch_size", "x"])
    assert usage.returncode == 2 and usage.stderr.startswith("python -m medv_jax.infer: error:")


def test_train_in_a_real_process_names_the_field_and_writes_nothing(tmp_path):
    proc = _run(["-m", "medv_jax.train", "--config=configs/stage2.py", f"--workdir={tmp_path}/run"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "python -m medv_jax.train: error: config.data.train_path is not set: give the training records, "
        "--config.data.train_path=FILE.json"
    )
    assert not (tmp_path / "run").exists()


def test_help_states_each_default_once():
    from medv_jax.serve import api as serve_api
    from medv_jax.serve import cli as serve_cli

    for parser in (generate.build_parser(), infer.build_parser(), serve_cli.build_parser(), serve_api.build_parser()):
        text = parser.format_help()
        flags = text.split("\n  -")[1:]
        assert len(flags) > 20
        for flag in flags:
            assert flag.lower().count("default") <= 1, flag
        assert "--debug" in text and "--allow_tokenizer_mismatch" in text
    assert "--dicom_window" in generate.build_parser().format_help()


def test_usage_names_the_module_the_user_ran(monkeypatch):
    from medv_jax.user_errors import command_name

    for path, module in (("medv_jax/generate.py", "medv_jax.generate"),
                         ("medv_jax/sampling/generate.py", "medv_jax.sampling.generate"),
                         ("medv_jax/train/__main__.py", "medv_jax.train"),
                         ("tools/convert_weights/__main__.py", "tools.convert_weights")):
        monkeypatch.setattr(sys, "argv", [str(REPO / path)])
        assert command_name(module.split(".")[0] + ".x") == f"python -m {module}"
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert command_name("medv_jax.infer") == "python -m medv_jax.infer"


def test_a_mismatched_tokenizer_is_allowed_when_asked(world):
    import argparse

    from medv_jax.sampling import cli

    args = argparse.Namespace(checkpoint=world["checkpoint"], tokenizer=world["other_tokenizer"],
                              param_dtype=None, dtype=None, allow_tokenizer_mismatch=True)
    config, tokenizer = cli.open_model(args)
    assert special_token_ids(tokenizer).mask == world["mismatch_ids"][1].mask != config.lm.mask_token_id


def test_a_multimodal_download_loads_its_tokenizer_without_warnings(world, capfd):
    load_tokenizer(world["hf"])
    assert "You are using a model of type" not in "".join(capfd.readouterr())


def test_no_pytorch_advice_where_only_tokenizers_are_used(world):
    # transformers' own check for torch, made to fail: as on an install without torch.
    script = (
        "import importlib.util, sys\n"
        "find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a, **k: None if name == 'torch' else find(name, *a, **k)\n"
        "from medv_jax.data.tokenizer import load_tokenizer\n"
        f"load_tokenizer({world['tokenizer']!r})\n"
        "import transformers\n"
        "assert not transformers.is_torch_available()\n"
    )
    proc = _run(["-c", script])
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch was not found" not in proc.stderr
