"""TFDS builders on fake releases written here in the official file layouts, and read_split."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from medv_jax.data import image_io
from medv_jax.data import tfds as builders  # tensorflow-datasets is a core dependency: no skipping
from medv_jax.data import tfds_vqa


def write_image(path, seed, mode="RGB", size=(24, 16), fmt=None):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(path, format=fmt)
    return path


def human(question):
    return {"from": "human", "value": f"<image>\n{question}"}


def check_image(rec, original):
    """The record's image is a cached copy of the release file, byte for byte."""
    assert os.path.isabs(rec["image"]) and os.path.isfile(rec["image"])
    assert open(rec["image"], "rb").read() == original.read_bytes()
    np.testing.assert_array_equal(np.asarray(image_io.load_image(rec["image"])),
                                  np.asarray(image_io.load_image(original)))


# ---------------------------------------------------------------------------------------------
# VQA-RAD


def fake_vqa_rad(root):
    folder = root / "VQA_RAD Image Folder"
    imgs = {n: write_image(folder / n, i) for i, n in enumerate(["synpic1.jpg", "synpic2.jpg", "synpic3.jpg"])}
    write_image(folder / "synpic4.png", 9, mode="L")  # grey PNG
    imgs["synpic4.png"] = folder / "synpic4.png"
    rows = [
        dict(qid=0, image_name="synpic1.jpg", question="Is there a fracture?", answer="No",
             answer_type="CLOSED", phrase_type="freeform"),
        dict(qid=1, image_name="synpic2.jpg", question="What organ is shown?", answer="Brain",
             answer_type="OPEN", phrase_type="test_freeform"),
        dict(qid=2, image_name="synpic1.jpg", question="How many lesions?", answer=2,
             answer_type="OPEN ", phrase_type="para"),
        dict(qid=3, image_name="synpic2.jpg", question="Is this an MRI?", answer="yes",
             answer_type="closed", phrase_type="test_para"),
        dict(qid=3, image_name="synpic3.jpg", question="Is it normal?", answer="no",
             answer_type="CLOSED", phrase_type="test_freeform"),  # repeated qid
        dict(qid=5, image_name="synpic4.png", question="Which side?", answer="left",
             answer_type="OPEN", phrase_type="test_freeform"),
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    return rows, imgs


def test_vqa_rad_official(tmp_path):
    manual, data = tmp_path / "manual", tmp_path / "data"
    rows, imgs = fake_vqa_rad(manual)
    built = builders.build("vqa_rad", str(manual), str(data))
    assert built.info.splits["test"].num_examples == 3  # one example per image
    assert built.info.splits["train"].num_examples == 1
    test = tfds_vqa.read_split("vqa_rad:test", str(data))
    assert [r["id"] for r in test] == ["1", "3", "3#2", "5"]  # release order, unique ids
    assert test[0] == {"id": "1", "image": test[0]["image"], "answer_type": "open",
                       "conversations": [human("What organ is shown?"), {"from": "gpt", "value": "Brain"}]}
    assert [r["answer_type"] for r in test] == ["open", "closed", "closed", "open"]
    for rec, name in zip(test, ["synpic2.jpg", "synpic2.jpg", "synpic3.jpg", "synpic4.png"]):
        check_image(rec, imgs[name])
    train = tfds_vqa.read_split("VQA-RAD:train", str(data))
    assert [(r["id"], r["conversations"][1]["value"], r["answer_type"]) for r in train] == [
        ("0", "No", "closed"), ("2", "2", "open")]
    assert train[0]["image"] == train[1]["image"]  # one cached file per image
    # a rerun reuses the cached files
    mtime = os.stat(test[0]["image"]).st_mtime_ns
    assert tfds_vqa.read_split("vqa_rad:test", str(data)) == test
    assert os.stat(test[0]["image"]).st_mtime_ns == mtime


def test_vqa_rad_bad_release_names_the_row(tmp_path):
    manual = tmp_path / "manual"
    rows, _ = fake_vqa_rad(manual)
    rows[2]["answer_type"] = "MAYBE"
    (manual / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    with pytest.raises(builders.ReleaseError, match="qid 2.*MAYBE"):
        builders.build("vqa_rad", str(manual), str(tmp_path / "data"))
    rows[2]["answer_type"] = "OPEN"
    rows[3]["image_name"] = "missing.jpg"
    (manual / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    with pytest.raises(builders.ReleaseError, match="missing.jpg"):
        builders.build("vqa_rad", str(manual), str(tmp_path / "data2"))


def test_vqa_rad_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    manual, data = tmp_path / "manual", tmp_path / "data"
    (manual / "data").mkdir(parents=True)
    a = write_image(tmp_path / "a.jpg", 1).read_bytes()
    b = write_image(tmp_path / "b.png", 2).read_bytes()
    for split, rows in {"train": [(a, "is it normal?", "yes"), (b, "where?", "left lobe")],
                        "test": [(b, "what plane?", "axial"), (b, "is it ct?", "no"), (a, "any mass?", "Yes")]}.items():
        table = pa.table({"image": [{"bytes": x, "path": None} for x, _, _ in rows],
                          "question": [q for _, q, _ in rows], "answer": [y for _, _, y in rows]})
        pq.write_table(table, manual / "data" / f"{split}-00000-of-00001-abc.parquet")
    builders.build("vqa_rad", str(manual), str(data))
    test = tfds_vqa.read_split("vqa_rad:test", str(data))
    assert [r["id"] for r in test] == ["test-0", "test-1", "test-2"]
    assert [r["answer_type"] for r in test] == ["open", "closed", "closed"]
    assert [open(r["image"], "rb").read() for r in test] == [b, b, a]
    assert test[0]["image"] == test[1]["image"] and test[0]["image"].endswith(".png")
    assert len(tfds_vqa.read_split("vqa_rad:train", str(data))) == 2


# ---------------------------------------------------------------------------------------------
# SLAKE


def fake_slake(root):
    rel = root / "Slake1.0"
    imgs = {f"xmlab{i}/source.jpg": write_image(rel / "imgs" / f"xmlab{i}" / "source.jpg", 10 + i) for i in range(3)}
    write_image(rel / "imgs" / "xmlab0" / "mask.png", 20, mode="L")  # masks are ignored

    def row(qid, img, q, a, t, lang="en"):
        return dict(img_id=int(img[5]), img_name=img, question=q, answer=a, q_lang=lang, answer_type=t,
                    location="Abdomen", modality="CT", qid=qid, base_type="vqa", content_type="Organ")

    splits = {
        "train.json": [row(0, "xmlab0/source.jpg", "Is this a CT?", "Yes", "CLOSED"),
                       row(1, "xmlab0/source.jpg", "这是CT吗？", "是", "CLOSED", "zh"),
                       row(2, "xmlab1/source.jpg", "Which organ is abnormal?", "Liver", "OPEN")],
        "validate.json": [row(3, "xmlab1/source.jpg", "Where is the liver?", "Left", "OPEN")],
        "test.json": [row(4, "xmlab2/source.jpg", "Which is bigger, liver or spleen?", "Liver", "CLOSED"),
                      row(5, "xmlab2/source.jpg", "图中有几个器官？", "2", "OPEN", "zh"),
                      row(6, "xmlab0/source.jpg", "How many organs?", 2, "OPEN")],
    }
    for fname, rows in splits.items():
        (rel / fname).write_text(json.dumps(rows, ensure_ascii=False))
    return imgs


def test_slake_english_only(tmp_path):
    manual, data = tmp_path / "manual", tmp_path / "data"
    imgs = fake_slake(manual)
    built = builders.build("slake", str(manual), str(data))
    assert sorted(built.info.splits) == ["test", "train", "validation"]
    train = tfds_vqa.read_split("slake:train", str(data))
    assert [r["id"] for r in train] == ["0", "2"]  # the Chinese question is dropped
    assert [r["answer_type"] for r in train] == ["closed", "open"]
    check_image(train[0], imgs["xmlab0/source.jpg"])
    check_image(train[1], imgs["xmlab1/source.jpg"])
    assert train[0]["image"] != train[1]["image"]  # same base name "source.jpg", distinct cache files
    test = tfds_vqa.read_split("slake:test", str(data))
    assert [(r["id"], r["conversations"][1]["value"], r["answer_type"]) for r in test] == [
        ("4", "Liver", "closed"), ("6", "2", "open")]
    assert test[0]["conversations"][0] == human("Which is bigger, liver or spleen?")
    assert [r["id"] for r in tfds_vqa.read_split("slake:validate", str(data))] == ["3"]


# ---------------------------------------------------------------------------------------------
# PathVQA


def fake_path_vqa(root):
    pvqa = root / "pvqa"
    imgs, qa = {}, {}
    for split, n in (("train", 2), ("val", 1), ("test", 2)):
        for i in range(n):
            imgs[f"{split}_{i:04d}"] = write_image(pvqa / "images" / split / f"{split}_{i:04d}.jpg", hash(split) % 97 + i)
    qa["train"] = [dict(image="train_0000", question="Is this an adenoma?", answer="yes"),
                   dict(image="train_0001", question="What is present?", answer="neutrophils"),
                   dict(image="train_0000", question="Are nuclei lost?", answer="No")]
    qa["val"] = [dict(image="val_0000", question="What have lost their nuclei?", answer="neutrophils")]
    qa["test"] = [dict(image="test_0001", question="How is the tissue stained?", answer="with h&e"),
                  dict(image=np.str_("test_0000"), question="Is fibrosis seen?", answer=np.str_("yes"))]
    for split, rows in qa.items():
        (pvqa / "qas" / split).mkdir(parents=True)
        with open(pvqa / "qas" / split / f"{split}_qa.pkl", "wb") as f:
            pickle.dump(rows, f)
    with open(pvqa / "qas" / "trainval_ans2label.pkl", "wb") as f:  # other release pickles are ignored
        pickle.dump({"yes": 0}, f)
    return imgs


def test_path_vqa_official(tmp_path):
    manual, data = tmp_path / "manual", tmp_path / "data"
    imgs = fake_path_vqa(manual)
    built = builders.build("pathvqa", str(manual), str(data))
    assert sorted(built.info.splits) == ["test", "train", "validation"]
    train = tfds_vqa.read_split("path_vqa:train", str(data))
    assert [r["id"] for r in train] == ["train-0", "train-1", "train-2"]
    assert [r["answer_type"] for r in train] == ["closed", "open", "closed"]  # yes/no = closed
    check_image(train[0], imgs["train_0000"])
    check_image(train[1], imgs["train_0001"])
    test = tfds_vqa.read_split("path_vqa:test", str(data))
    assert test[0]["conversations"] == [human("How is the tissue stained?"), {"from": "gpt", "value": "with h&e"}]
    check_image(test[0], imgs["test_0001"])
    assert (test[1]["conversations"][1]["value"], test[1]["answer_type"]) == ("yes", "closed")  # numpy strings
    check_image(test[1], imgs["test_0000"])
    assert len(tfds_vqa.read_split("path_vqa:val", str(data))) == 1


def test_path_vqa_refuses_code_in_pickles(tmp_path):
    manual = tmp_path / "manual"
    fake_path_vqa(manual)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with open(manual / "pvqa" / "qas" / "test" / "test_qa.pkl", "wb") as f:
        pickle.dump([Evil()], f)
    with pytest.raises(builders.ReleaseError, match="test_qa.pkl.*refusing"):
        builders.build("path_vqa", str(manual), str(tmp_path / "data"))


# ---------------------------------------------------------------------------------------------
# LLaVA-Med JSON


def test_llava_med_json(tmp_path):
    manual, data = tmp_path / "manual", tmp_path / "data"
    img = write_image(manual / "images" / "PMC1_fig2.jpg", 3)
    train = [
        {"id": "a1", "image": "PMC1_fig2.jpg", "conversations": [
            human("Describe the figure."), {"from": "gpt", "value": "A CT scan."},
            {"from": "human", "value": "Any lesion?"}, {"from": "gpt", "value": "No."}]},
        {"id": "t1", "conversations": [{"from": "human", "value": "What is MRI?"}, {"from": "gpt", "value": "Imaging."}]},
    ]
    (manual / "train.json").write_text(json.dumps(train))
    test = [{"question_id": 7, "image": "PMC1_fig2.jpg", "answer_type": "CLOSED",
             "conversatons": [human("Is it a CT?"), {"from": "gpt", "value": "yes"}]},
            {"question_id": 8, "image": "PMC1_fig2.jpg", "text": "What organ?", "answer": "lung"}]
    (manual / "test.jsonl").write_text("\n".join(json.dumps(r) for r in test) + "\n")
    builders.build("llava_med", str(manual), str(data))
    got = tfds_vqa.read_split("llava_med:train", str(data))
    assert [r["id"] for r in got] == ["a1", "t1"]
    assert got[0]["conversations"] == train[0]["conversations"] and "image" not in got[1]
    check_image(got[0], img)
    got = tfds_vqa.read_split("llava_med:test", str(data))
    assert got[0] == {"id": "7", "image": got[0]["image"], "answer_type": "closed",
                      "conversations": test[0]["conversatons"]}
    assert got[1]["conversations"] == [human("What organ?"), {"from": "gpt", "value": "lung"}]
    assert "answer_type" not in got[1]


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_manual_folder_and_unbuilt_dataset(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"slake.*{missing}"):
        builders.build("slake", str(missing), str(tmp_path / "data"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        builders.build("vqa_rad", str(tmp_path / "empty"), str(tmp_path / "data"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("nothing here")
    with pytest.raises(builders.ReleaseError, match="no release files.*junk"):
        builders.build("path_vqa", str(tmp_path / "junk"), str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="vqa_rad is not built.*medv_jax.data.tfds build vqa_rad"):
        tfds_vqa.read_split("vqa_rad:test", str(tmp_path / "data"))


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="NAME:SPLIT"):
        tfds_vqa.read_split("vqa_rad", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'mimic'.*vqa_rad"):
        tfds_vqa.read_split("mimic:test", str(tmp_path))
    manual, data = tmp_path / "manual", tmp_path / "data"
    fake_vqa_rad(manual)
    builders.build("vqa_rad", str(manual), str(data))
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\]"):
        tfds_vqa.read_split("vqa_rad:val", str(data))


def test_cache_names_are_flat_and_distinct():
    names = ["synpic1.jpg", "xmlab1/source.jpg", "xmlab1__source.jpg", "a b.png", "../x.png"]
    out = [tfds_vqa.cache_name(n) for n in names]
    assert out[0] == "synpic1.jpg" and len(set(out)) == len(out)
    assert all("/" not in o and not o.startswith(".") for o in out)
    assert out[1] == tfds_vqa.cache_name("xmlab1/source.jpg")  # deterministic


# ---------------------------------------------------------------------------------------------
# Consumers: the trainer's data source, infer --tfds, evaluate vqa --tfds


@pytest.fixture(scope="module")
def built_vqa_rad(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_rad")
    fake_vqa_rad(root / "manual")
    builders.build("vqa_rad", str(root / "manual"), str(root / "data"))
    return root


def test_trainer_tfds_source(built_vqa_rad):
    import ml_collections

    from medv_jax.data import pipeline, synthetic, testing
    from medv_jax.data.anyres import ImageConfig
    from medv_jax.train import trainer

    data_dir = str(built_vqa_rad / "data")
    config = ml_collections.ConfigDict({"data": {"source": "tfds", "tfds": "vqa_rad:train",
                                                 "tfds_test": "vqa_rad:test", "tfds_data_dir": data_dir}})
    train, test = trainer.data_sources(config)
    assert isinstance(train, pipeline.RecordList) and len(train) == 2 and len(test) == 4
    assert [test[i] for i in range(4)] == tfds_vqa.read_split("vqa_rad:test", data_dir)
    assert "vqa_rad:train" in repr(train)
    # the records go through the batch pipeline as JSON records do (images read from the cache)
    tok = testing.load_test_tokenizer(built_vqa_rad / "tok", words=synthetic.vocabulary(), special_ids_base=0)
    cfg = pipeline.BatchConfig(batch_size=2, max_length=64, image=ImageConfig(crop_size=32, patches_per_side=4),
                               system_prompt=None)
    batch = next(iter(pipeline.make_loader(train, tok, cfg, shuffle=False, shard_index=0, shard_count=1)))
    assert list(batch["example_id"]) == ["0", "2"] and batch["pixels"].shape == (2, 1, 32, 32, 3)
    config.data.tfds = ""
    with pytest.raises(ValueError, match="config.data.tfds"):
        trainer.data_sources(config)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import jax

    from medv_jax import checkpoint
    from medv_jax.data.testing import build_test_tokenizer
    from medv_jax.data.tokenizer import load_tokenizer
    from medv_jax.models import medv
    from medv_jax.sampling import multimodal

    root = tmp_path_factory.mktemp("ckpt")
    tok_dir = build_test_tokenizer(root / "tokenizer", special_ids_base=0)
    tokenizer = load_tokenizer(tok_dir)
    config = medv.MEDV_PRESETS["medv_tiny"]
    vocab = multimodal.round_up(multimodal.tokenizer_vocab_size(tokenizer), 64)
    config = multimodal.with_tokenizer_ids(config.replace(lm=config.lm.replace(vocab_size=vocab)), tokenizer)
    params = jax.jit(medv.init_params, static_argnums=0)(config, jax.random.key(0))
    return str(checkpoint.save_pretrained(root / "ckpt", config, params)), str(tok_dir)


def test_infer_and_evaluate_with_tfds(built_vqa_rad, tiny_checkpoint, tmp_path, capsys):
    from medv_jax.sampling import infer

    data_dir = str(built_vqa_rad / "data")
    ckpt, tok = tiny_checkpoint
    answers = tmp_path / "answers.jsonl"
    flags = ["--checkpoint", ckpt, "--tokenizer", tok, "--tfds", "vqa_rad:test", "--tfds_data_dir", data_dir,
             "--answers_file", str(answers), "--batch_size", "2", "--no_progress",
             "--gen_length", "4", "--block_length", "4", "--steps", "2"]
    assert infer.main(flags) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["1", "3", "3#2", "5"]
    assert [r["prompt"] for r in rows] == ["What organ is shown?", "Is this an MRI?", "Is it normal?", "Which side?"]
    assert infer.main(flags) == 0  # resume: nothing left
    assert len(answers.read_text().splitlines()) == 4
    from medv_jax.evaluate.__main__ import main as evaluate

    out = tmp_path / "scores.json"
    assert evaluate(["vqa", "--predictions", str(answers), "--tfds", "vqa_rad:test", "--tfds_data_dir", data_dir,
                     "--output", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert (scores["n_closed"], scores["n_open"], scores["n_missing"]) == (2, 2, 0)
    capsys.readouterr()
    bad = ["--checkpoint", ckpt, "--tokenizer", tok, "--tfds", "vqa_rad:dev", "--tfds_data_dir", data_dir,
           "--answers_file", str(tmp_path / "x.jsonl")]
    assert infer.main(bad) == 2
    assert "no split 'validation'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one question source only
        infer.build_parser().parse_args(["--checkpoint", ckpt, "--tfds", "a:b", "--question_file", "q",
                                         "--answers_file", "x"])


def test_evaluate_vqa_with_tfds_references(built_vqa_rad, tmp_path, capsys):
    """Predictions equal to the ground truths score 100; wrong ones 0: the references (answers,
    types, ids) come through --tfds intact."""
    from medv_jax.evaluate.__main__ import main as evaluate

    data_dir = str(built_vqa_rad / "data")
    right = {"1": "brain", "3": "yes", "3#2": "no", "5": "left"}
    wrong = {"1": "heart", "3": "no", "3#2": "yes", "5": "right"}
    for preds, want in ((right, 100.0), (wrong, 0.0)):
        path = tmp_path / "preds.jsonl"
        path.write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n" for k, v in preds.items()))
        out = tmp_path / "scores.json"
        assert evaluate(["vqa", "--predictions", str(path), "--tfds", "vqa_rad:test", "--tfds_data_dir", data_dir,
                         "--output", str(out)]) == 0
        scores = json.loads(out.read_text())
        assert scores["closed_accuracy"] == scores["open_recall"] == want
        assert scores["references"] == "tfds vqa_rad:test"
    assert evaluate(["vqa", "--predictions", str(path), "--tfds", "vqa_rad:nope", "--tfds_data_dir", data_dir]) == 2
    assert "no split 'nope'" in capsys.readouterr().err


def test_build_and_show_commands(tmp_path, capsys):
    from medv_jax.data.tfds.__main__ import main

    manual, data = tmp_path / "manual", tmp_path / "data"
    fake_slake(manual)
    assert main(["build", "slake", "--manual_dir", str(manual), "--data_dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "slake:test: 2 examples, 2 records" in out and "slake:train: 2 examples, 2 records" in out
    assert main(["show", "slake:train", "--data_dir", str(data), "-n", "1"]) == 0
    rec = json.loads(capsys.readouterr().out.strip())
    assert rec["id"] == "0" and rec["conversations"][1] == {"from": "gpt", "value": "Yes"}
    assert main(["build", "slake", "--manual_dir", str(tmp_path / "none"), "--data_dir", str(data)]) == 2
    assert "none" in capsys.readouterr().err
