"""The embedded synthetic medical-VQA set and the compact demo tokenizer."""
import itertools
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from medv_jax.data import conversation as conv
from medv_jax.data import synthetic as S
from medv_jax.data import testing
from medv_jax.data import tokenizer as tok_lib


def test_records_are_deterministic_and_splits_differ():
    a, b = S.SyntheticMedVQA("train", 50, seed=3), S.SyntheticMedVQA("train", 50, seed=3)
    for i in (0, 7, 49):
        ra, rb = a[i], b[i]
        assert ra["id"] == f"synth-train-{i}"
        assert ra["conversations"] == rb["conversations"] and ra["meta"] == rb["meta"]
        assert np.array_equal(np.asarray(ra["image"]), np.asarray(rb["image"]))
    test = S.SyntheticMedVQA("test", 50, seed=3)
    other_seed = S.SyntheticMedVQA("train", 50, seed=4)
    imgs = lambda src: {np.asarray(src[i]["image"]).tobytes() for i in range(20)}  # noqa: E731
    assert not imgs(a) & imgs(test) and not imgs(a) & imgs(other_seed)
    with pytest.raises(IndexError):
        a[50]


def test_record_format():
    r = S.SyntheticMedVQA("train", 10, image_size=64)[0]
    assert isinstance(r["image"], Image.Image) and r["image"].mode == "L" and r["image"].size == (64, 64)
    (h, g) = r["conversations"]
    assert h["from"] == "human" and h["value"].startswith("<image>\n") and g["from"] == "gpt"
    assert r["answer_type"] in ("closed", "open")
    assert r["template"] == h["value"].split("\n", 1)[1]
    cap = S.SyntheticMedVQA("train", 10, task="caption")[3]
    assert cap["answer_type"] == "caption" and cap["conversations"][1]["value"].endswith(".")
    assert cap["conversations"][1]["value"] == S.caption(S.Scene(**{**cap["meta"], "lesions": tuple(
        S.Lesion(**l) for l in cap["meta"]["lesions"])}))


def test_closed_answers_balanced_per_question_and_open_answers_uniform():
    src = S.SyntheticMedVQA("train", 3000, seed=0)
    yes = defaultdict(list)
    open_answers = defaultdict(Counter)
    for i in range(len(src)):
        d = src.describe(i)
        if d["answer_type"] == "closed":
            yes[d["question"]].append(d["answer"] == "yes")
        else:
            open_answers[d["question"]][d["answer"]] += 1
    assert set(yes) == {q.text for q in S.CLOSED_QUESTIONS}
    for q, v in yes.items():
        assert len(v) >= 50, q
        assert 0.4 <= np.mean(v) <= 0.6, (q, np.mean(v))  # the question alone predicts nothing
        assert np.mean(v) == 0.5  # exactly: records 2k, 2k+1 ask it with opposite answers
    for q in S.OPEN_QUESTIONS:
        counts = open_answers[q.text]
        assert set(counts) == set(q.answers), q.text
        top = max(counts.values()) / sum(counts.values())
        assert top < 1.6 / len(q.answers), (q.text, counts)


def test_answers_are_true_of_the_scene():
    src = S.SyntheticMedVQA("train", 600, seed=1)
    by_text = {q.text: q for q in S.CLOSED_QUESTIONS + S.OPEN_QUESTIONS}
    for i in range(len(src)):
        d = src.describe(i)
        q = by_text[d["question"]]
        if d["answer_type"] == "closed":
            assert q.truth(d["scene"]) == (d["answer"] == "yes")
        else:
            assert q.answer(d["scene"]) == d["answer"]
        assert all(l.side == ("left" if l.x < 0.5 else "right") for l in d["scene"].lesions)
        assert len(d["scene"].lesions) <= S.MAX_LESIONS


def test_multi_turn_records_ask_distinct_true_questions_about_one_image():
    single, multi = S.SyntheticMedVQA("train", 300, seed=2), S.SyntheticMedVQA("train", 300, seed=2, turns=3)
    by_text = {q.text: q for q in S.CLOSED_QUESTIONS + S.OPEN_QUESTIONS}
    kinds = Counter()
    for i in range(len(multi)):
        r, first = multi[i], single.describe(i)
        conv_ = r["conversations"]
        assert [c["from"] for c in conv_] == ["human", "gpt"] * 3
        assert conv_[0]["value"] == f"<image>\n{first['question']}" and conv_[1]["value"] == first["answer"]
        assert all("<image>" not in c["value"] for c in conv_[2:])
        questions = [conv_[0]["value"].split("\n", 1)[1]] + [c["value"] for c in conv_[2::2]]
        assert len(set(questions)) == 3, questions
        scene = S.Scene(**{**r["meta"], "lesions": tuple(S.Lesion(**l) for l in r["meta"]["lesions"])})
        for question, answer in zip(questions[1:], [c["value"] for c in conv_[3::2]]):
            q = by_text[question]
            kinds[isinstance(q, S.ClosedQuestion)] += 1
            if isinstance(q, S.ClosedQuestion):
                assert q.truth(scene) == (answer == "yes"), (i, question, answer)
            else:
                assert q.answer(scene) == answer, (i, question, answer)
    assert kinds[True] > 200 and kinds[False] > 200  # closed_fraction 0.5 holds for later turns too
    with pytest.raises(ValueError, match="turns"):
        S.SyntheticConfig(turns=0)


def _lesion_disks(scene, size):
    c = (np.arange(size) + 0.5) / size
    xx, yy = np.meshgrid(c, c)
    m = np.zeros((size, size), bool)
    for l in scene.lesions:
        m |= (xx - l.x) ** 2 + (yy - l.y) ** 2 <= (0.7 * l.radius) ** 2
    return m


@pytest.mark.parametrize("modality", S.MODALITIES)
def test_lesions_are_visible_on_their_side(modality):
    """A scene and its lesion-free twin (same texture draws) differ only at the lesions, strongly,
    on the side the answer names."""
    rng = np.random.default_rng(5)
    checked = 0
    for k in range(40):
        scene = S.sample_scene_where(rng, lambda s: s.modality == modality and s.lesion_side in ("left", "right"))
        with_l = S.render_scene(scene, 64, np.random.default_rng(k)).astype(np.float32)
        without = S.render_scene(scene.without_lesions(), 64, np.random.default_rng(k)).astype(np.float32)
        diff = np.abs(with_l - without)
        half = diff[:, :32] if scene.lesion_side == "left" else diff[:, 32:]
        assert half.sum() >= 0.97 * diff.sum()
        inside = _lesion_disks(scene, 64)
        assert diff[inside].mean() > 60, (modality, k, diff[inside].mean())  # out of 255
        checked += 1
    assert checked == 40


def _full_disk(lesion, size):
    c = (np.arange(size) + 0.5) / size
    xx, yy = np.meshgrid(c, c)
    return (xx - lesion.x) ** 2 + (yy - lesion.y) ** 2 <= lesion.radius ** 2


def test_slot_layout_puts_each_lesion_inside_one_quadrant_of_its_side():
    """In the "slots" layout every lesion's pixels lie in one quadrant of the scan (a 32 px patch at
    64 px), on its side; a side with two lesions fills both of its quadrants, and the lesion's area
    tells the size."""
    src = S.SyntheticMedVQA("train", 300, seed=1, task="report", layout="slots")
    areas = {"small": [], "large": []}
    two_on_a_side = 0
    for i in range(300):
        scene = S.Scene(**{**src[i]["meta"], "lesions": tuple(S.Lesion(**l) for l in src[i]["meta"]["lesions"])})
        cells = []
        for lesion in scene.lesions:
            disk = _full_disk(lesion, 64)
            rows, cols = np.nonzero(disk)
            assert len({r // 32 for r in rows}) == 1 and len({c // 32 for c in cols}) == 1, (i, lesion)
            cell = (rows[0] // 32, cols[0] // 32)
            assert cell[1] == (0 if lesion.side == "left" else 1), (i, lesion, cell)
            cells.append(cell)
            areas[lesion.size].append(disk.sum())
            # Drawn whole: no part of a lesion is cut off by the body outline.
            lab = S._label_map(S.Scene(scene.modality, scene.region, (lesion,)), 64, np.random.default_rng(i))
            assert (lab == S._LESION).sum() >= 0.95 * disk.sum(), (i, lesion)
        assert len(set(cells)) == len(cells)  # one lesion per slot
        two_on_a_side += any(sum(l.side == side for l in scene.lesions) == 2 for side in S.SIDES)
    assert max(areas["small"]) < 0.4 * min(areas["large"])
    assert two_on_a_side > 30
    # The layout changes where lesions lie, not what a scan holds: record i has the same modality,
    # region and lesions (sides, sizes) in both layouts.
    free = S.SyntheticMedVQA("train", 300, seed=1, task="report")
    outline = lambda scene: (scene.modality, scene.region, sorted((l.side, l.size) for l in scene.lesions))  # noqa: E731
    for i in range(300):
        assert outline(free.describe(i)["scene"]) == outline(src.describe(i)["scene"])
    with pytest.raises(ValueError, match="lesion layout must be one of"):
        S.SyntheticConfig(layout="grid")


def _features(img):
    x = np.asarray(img, np.float32) / 255.0
    lap = np.abs(4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:])
    roughness = np.median(lap[x[1:-1, 1:-1] > 0.05])  # grain of the tissue
    return np.array([roughness, (x < 0.02).mean(), x[:4].mean()])


def _nearest_centroid_accuracy(feats, labels, n_train):
    feats = (feats - feats[:n_train].mean(0)) / (feats[:n_train].std(0) + 1e-6)
    classes = sorted(set(labels))
    cents = np.stack([feats[:n_train][np.asarray(labels[:n_train]) == c].mean(0) for c in classes])
    pred = np.argmin(((feats[n_train:, None] - cents[None]) ** 2).sum(-1), axis=1)
    return np.mean([classes[p] == l for p, l in zip(pred, labels[n_train:])])


def test_modality_and_region_are_visible_at_64_pixels():
    """Crude learnability proxy: a nearest-centroid classifier on a few pixel statistics (modality)
    or on an 8x8 thumbnail (region) is already near perfect."""
    src = S.SyntheticMedVQA("train", 400, seed=2)
    recs = [src[i] for i in range(300)]
    mod = [r["meta"]["modality"] for r in recs]
    reg = [r["meta"]["region"] for r in recs]
    f_mod = np.stack([_features(r["image"]) for r in recs])
    thumbs = np.stack([np.asarray(r["image"].resize((8, 8), Image.Resampling.BOX), np.float32).ravel() for r in recs])
    assert _nearest_centroid_accuracy(f_mod, mod, 200) >= 0.95
    for m in S.MODALITIES:  # region from the shape, within one modality
        sel = [i for i, x in enumerate(mod) if x == m]
        n_train = 2 * len(sel) // 3
        assert _nearest_centroid_accuracy(thumbs[sel], [reg[i] for i in sel], n_train) >= 0.9, m


def test_vocabulary_covers_every_text():
    vocab = set(S.vocabulary())
    assert {"system", "user", "assistant", "yes", "no", "ct", "mri", "x", "ray", "left", "right"} <= vocab
    assert len(vocab) < 80
    # Every question family but "findings" with the demo vocabulary; captions and the "findings"
    # questions (the miniature recipe's) with the reports' vocabulary, which the recipe uses.
    reports_vocab = set(S.vocabulary(reports=True))
    basic = tuple(f for f in S.OPEN_FAMILIES if f != "findings")
    for task, families, words_of in (("vqa", basic, vocab), ("vqa", S.OPEN_FAMILIES, reports_vocab),
                                     ("caption", S.OPEN_FAMILIES, reports_vocab)):
        src = S.SyntheticMedVQA("train", 300, task=task, open_families=families)
        texts = [m["value"].replace("<image>", "") for i in range(300) for m in src[i]["conversations"]]
        words = {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}
        assert words <= words_of, (task, words - words_of)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown closed family"):
        S.SyntheticConfig(closed_families=("nope",))
    with pytest.raises(ValueError, match="split"):
        S.SyntheticMedVQA("dev", 3)
    src = S.SyntheticMedVQA("train", 200, closed_fraction=1.0, closed_families=("modality",))
    assert {src.describe(i)["question_type"] for i in range(200)} == {"modality"}


# ---------------------------------------------------------------------------------------------
# The compact-id tokenizer for the CPU demo


@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    return S.load_demo_tokenizer(tmp_path_factory.mktemp("compact"))


def test_demo_image_config():
    c = S.demo_image_config()
    assert (c.crop_size, c.tokens_per_crop, c.aspect_ratio) == (64, 64, "square")


def test_compact_tokenizer_ids_are_small_and_contiguous(compact):
    ids = tok_lib.special_token_ids(compact)
    vocab = compact.get_vocab()
    assert max(vocab.values()) + 1 == len(compact) == len(vocab) < 700
    specials = testing.compact_special_tokens()
    first = min(ids.bos, ids.eos, ids.mask, ids.eot)
    assert [compact.convert_tokens_to_ids(s) for s in specials] == list(range(first, first + len(specials)))
    assert first + len(specials) == len(compact)  # right after the byte and word entries
    assert ids.pad == ids.eos and len({ids.bos, ids.eos, ids.mask, ids.start_header, ids.end_header, ids.eot}) == 6


def test_compact_tokenizer_round_trip(compact):
    src = S.SyntheticMedVQA("train", 50)
    for i in range(50):
        for m in src[i]["conversations"]:
            text = m["value"]
            assert compact.decode(tok_lib.encode(compact, text)) == text
    for w in S.vocabulary():
        for form in (w, " " + w):
            assert len(tok_lib.encode(compact, form)) == 1, form
    r = src[0]
    s = conv.format_conversation(r, compact, num_image_tokens=64, system_prompt=None)
    ids = tok_lib.special_token_ids(compact)
    assert s.input_ids[0] == ids.bos and s.input_ids[-1] == ids.eot
    assert int(s.input_ids.max()) < len(compact)
    assert compact.decode(s.input_ids[~s.image_mask], skip_special_tokens=True).endswith(
        r["conversations"][1]["value"])


def test_generation_prompt_is_a_prefix_of_the_training_row(compact):
    # What the model sees before its answer at inference must be what it saw before the answer in
    # training; otherwise it learns one context and is asked to continue another.
    r = S.SyntheticMedVQA("train", 1)[0]
    full = conv.format_conversation(r, compact, num_image_tokens=64)
    prompt_record = {**r, "conversations": r["conversations"][:-1]}
    prompt = conv.format_conversation(prompt_record, compact, num_image_tokens=64, add_generation_prompt=True)
    assert list(full.input_ids[:len(prompt)]) == list(prompt.input_ids)


def test_compact_base_and_release_layout_unchanged(tmp_path):
    tok = testing.load_test_tokenizer(tmp_path / "a", words=["yes", "no"], special_ids_base=1000)
    assert tok_lib.special_token_ids(tok).bos == 1000
    release = testing.load_test_tokenizer(tmp_path / "b", words=["yes", "no"])
    assert tok_lib.special_token_ids(release).bos == 126080
    with pytest.raises(ValueError):
        testing.build_test_tokenizer(tmp_path / "c", special_ids_base=0, fill_vocab=True)


# ----------------------------------------------------------------------------------------------
# Findings reports


def test_every_report_parses_back_to_its_scene_and_fits_24_to_64_tokens(tmp_path):
    tok = S.load_demo_tokenizer(tmp_path, reports=True)
    rng = np.random.default_rng(11)
    lengths, forms = [], set()
    for _ in range(400):
        scene = S.sample_scene(rng)
        text = S.report(scene, rng)
        assert S.parse_report(text) == S.report_fields(scene), text
        assert S.field_accuracy(text, scene) == 1.0
        lengths.append(len(tok(text, add_special_tokens=False)["input_ids"]))
        forms.add(_forms(text))
    assert 24 <= min(lengths) and max(lengths) <= 64, (min(lengths), max(lengths))
    assert len(forms) >= 6  # the wording varies: each side's form and the study's


def _forms(text):
    """The first word of each sentence: which form each sentence of a report takes."""
    return tuple(sentence.split(" ")[0] for sentence in text.split(". "))


def test_house_reports_are_a_function_of_the_exam_type_and_use_every_form(tmp_path):
    tok = S.load_demo_tokenizer(tmp_path, reports=True)
    rng = np.random.default_rng(5)
    style, lengths = {}, []
    for _ in range(400):
        scene = S.sample_scene(rng, "slots")
        text = S.report(scene, rng, "house")
        assert S.parse_report(text) == S.report_fields(scene), text
        lengths.append(len(tok(text, add_special_tokens=False)["input_ids"]))
        # Another draw of the rng does not change a house-style report.
        assert S.report(scene, np.random.default_rng(rng.integers(1 << 30)), "house") == text
        form = _forms(text)
        assert (form[2] == "The") == (form[3] == "The")  # the left and right sentences take the same form
        house = (form[0], form[2] == "The")
        assert style.setdefault((scene.modality, scene.region), house) == house
    assert len(style) == 9  # every exam type came up
    studies = {S._house_forms(S.Scene(m, r, ()))[0] for m in S.MODALITIES for r in S.REGIONS}
    sides = {S._house_forms(S.Scene(m, r, ()))[1] for m in S.MODALITIES for r in S.REGIONS}
    assert studies == {0, 1, 2} and sides == {0, 1}  # every form is some exam type's style
    assert 24 <= min(lengths) and max(lengths) <= 64


def test_templated_reports_name_the_modality_first_in_the_exam_types_forms(tmp_path):
    rng = np.random.default_rng(2)
    forms = {}
    for _ in range(300):
        scene = S.sample_scene(rng, "slots")
        text = S.report(scene, rng, "templated")
        assert S.parse_report(text) == S.report_fields(scene), text
        assert text.split(" ")[0] == S._MODALITY_DISPLAY[scene.modality]  # no article before it
        # The same forms as the house style, only the study sentence reordered.
        house = S.report(scene, np.random.default_rng(0), "house")
        assert text.split(". ", 1)[1] == house.split(". ", 1)[1]
        assert forms.setdefault((scene.modality, scene.region), _forms(text)[1:]) == _forms(text)[1:]
    assert len(forms) == 9


def test_report_alone_asks_that_share_of_reports_in_one_turn_and_leaves_the_test_split_alone():
    kw = dict(task="report", layout="slots", turns=2)
    mixed = S.SyntheticMedVQA("train", 400, seed=1, report_alone=0.5, **kw)
    turns = [len(mixed[i]["conversations"]) // 2 for i in range(400)]
    assert set(turns) == {1, 2} and 150 < turns.count(1) < 250
    alone = next(i for i, n in enumerate(turns) if n == 1)
    assert mixed[alone]["conversations"][0]["value"].startswith("<image>\n")
    assert mixed[alone]["conversations"][0]["value"].split("\n", 1)[1] in S.REPORT_REQUESTS
    # One-turn sources (the test split) draw exactly what they drew without the option.
    for i in range(20):
        a = S.SyntheticMedVQA("test", 20, seed=1, task="report", layout="slots", report_alone=0.5)[i]
        b = S.SyntheticMedVQA("test", 20, seed=1, task="report", layout="slots")[i]
        assert a["conversations"] == b["conversations"]
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    with pytest.raises(ValueError, match="report_alone"):
        S.SyntheticConfig(report_alone=1.5)


def test_report_wording_changes_only_the_words():
    """Records of the wordings hold the same scans, images and follow-up turns."""
    kw = dict(task="report", layout="slots", turns=2)
    varied = S.SyntheticMedVQA("train", 50, seed=3, **kw)
    for wording in ("house", "templated"):
        _assert_same_records_other_words(varied, S.SyntheticMedVQA("train", 50, seed=3, report_wording=wording, **kw))
    with pytest.raises(ValueError, match="report_wording"):
        S.SyntheticConfig(report_wording="plain")


def _assert_same_records_other_words(varied, house):
    differ = 0
    for i in range(50):
        a, b = varied[i], house[i]
        assert a["meta"] == b["meta"]
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        assert [t["value"] for t in a["conversations"][::2]] == [t["value"] for t in b["conversations"][::2]]
        reports = [(x["value"], y["value"]) for x, y in zip(a["conversations"][1::2], b["conversations"][1::2])
                   if x["value"] != y["value"]]
        for x, y in reports:
            assert S.parse_report(x) == S.parse_report(y)
        differ += bool(reports)
    assert differ > 10  # the coin flips and the other wording disagree often


def _scene(modality="ct", region="chest", lesions=()):
    return S.Scene(modality, region, tuple(S.Lesion(0.5, 0.5, 0.1, side, size) for side, size in lesions))


def test_field_accuracy_hand_worked_cases():
    scene = _scene("mri", "brain", [("left", "small"), ("right", "large"), ("right", "small")])
    good = ("This is an MRI image of the brain. The skull and the ventricles are visible. The left side "
            "shows one small lesion. Right side: one small and one large lesion.")
    assert S.parse_report(good) == {"modality": "mri", "region": "brain", "count": 3,
                                    "left": (1, ("small",)), "right": (2, ("large", "small"))}
    assert S.field_accuracy(good, scene) == 1.0
    # wrong modality: 4 of 5 fields
    assert S.field_accuracy(good.replace("an MRI", "a CT"), scene) == 0.8
    # the right side's large lesion missed: right side and count (two, from the sides) wrong
    missed = good.replace("one small and one large lesion", "one small lesion")
    assert S.field_accuracy(missed, scene) == 0.6
    # a side stated twice in contradiction is not known, nor is the count; stated twice alike, it is
    assert S.field_accuracy(good + " The left side shows two large lesions.", scene) == 0.6
    assert S.field_accuracy(good + " Left side: one small lesion.", scene) == 1.0
    # a hallucinated lesion on a normal scan: count and right side wrong
    normal = _scene("ct", "abdomen")
    hallucinated = "CT scan of the abdomen. The left side shows no lesions. Right side: one large lesion."
    assert S.parse_report(hallucinated)["right"] == (1, ("large",))
    assert S.field_accuracy(hallucinated, normal) == 0.6
    # a finding outside the reports' words ("three small lesions" on one side) is not read
    assert S.parse_report("Left side: three small lesions. Right side: no lesions.")["left"] is None
    # nothing stated about lesions is not "no lesions": those three fields are wrong
    assert S.field_accuracy("CT scan of the abdomen.", normal) == 0.4
    assert S.field_accuracy("", normal) == 0.0
    # one side stated: that side is right; the other side and the count are missing
    assert S.field_accuracy("the left side shows no lesions", normal) == 0.2


def test_report_dialogues_ask_follow_ups_about_the_same_scan():
    src = S.SyntheticMedVQA("train", 60, seed=3, task="report", turns=3)
    positions = []
    for i in range(60):
        r = src[i]
        conv_ = r["conversations"]
        assert len(conv_) == 6 and conv_[0]["value"].startswith("<image>\n")
        assert sum("<image>" in m["value"] for m in conv_) == 1
        questions = [m["value"].replace("<image>\n", "") for m in conv_[0::2]]
        at = [k for k, q in enumerate(questions) if q in S.REPORT_REQUESTS]
        assert len(at) == 1
        positions.append(at[0])
        scene = src.describe(i)["scene"]
        assert S.field_accuracy(conv_[2 * at[0] + 1]["value"], scene) == 1.0
        for k, (q, a) in enumerate(zip(questions, conv_[1::2])):
            if k != at[0]:
                assert q not in S.REPORT_REQUESTS and a["value"] in S.all_answers()[
                    "closed" if a["value"] in ("yes", "no") else next(
                        f for f, ans in S.all_answers().items() if a["value"] in ans)]
        assert r["answer_type"] == "report"
    assert set(positions) == {0, 1, 2}  # the report is asked first, in the middle and last
    assert src[5]["conversations"] == S.SyntheticMedVQA("train", 60, seed=3, task="report", turns=3)[5]["conversations"]
    # one turn: the report alone, asked with the image
    single = S.SyntheticMedVQA("test", 5, task="report")[2]["conversations"]
    assert len(single) == 2 and single[0]["value"].split("\n", 1)[1] in S.REPORT_REQUESTS


def test_captions_state_each_sides_lesions_with_sizes():
    lesion = lambda side, size: S.Lesion(0.3, 0.5, 0.1, side, size)  # noqa: E731
    scene = S.Scene("mri", "chest", (lesion("left", "small"), lesion("right", "large"), lesion("right", "small")))
    assert S.caption(scene) == ("MRI scan of the chest with one small lesion on the left side and one small "
                                "and one large lesion on the right side.")
    assert S.caption(S.Scene("ct", "brain", ())) == "CT scan of the brain with no lesions."
    two = S.Scene("x-ray", "abdomen", (lesion("right", "large"), lesion("right", "large")))
    assert S.caption(two) == "X-ray scan of the abdomen with two large lesions on the right side."


def test_text_task_gives_the_scan_in_words_and_no_image():
    text = S.SyntheticMedVQA("train", 50, task="text", turns=2)
    report = S.SyntheticMedVQA("train", 50, task="report", turns=2)
    for i in range(20):
        r, twin = text[i], report[i]
        assert "image" not in r and "<image>" not in r["conversations"][0]["value"]
        asked = [k for k, m in enumerate(r["conversations"]) if "\n" in m["value"] and m["from"] == "human"]
        assert len(asked) == 1 and len(r["conversations"]) == 4
        description, request = r["conversations"][asked[0]]["value"].split("\n")
        scene = text.describe(i)["scene"]
        assert description == S.caption(scene) and request in S.REPORT_REQUESTS
        assert S.field_accuracy(r["conversations"][asked[0] + 1]["value"], scene) == 1.0
        # the same scene and wording as the report task's record i, which shows the scan instead
        plain = [m["value"].replace(description + "\n", "") for m in r["conversations"]]
        assert plain == [m["value"].replace("<image>\n", "") for m in twin["conversations"]]
        assert r["meta"] == twin["meta"]
    with pytest.raises(ValueError, match="task must be one of"):
        S.SyntheticConfig(task="story")


def test_findings_questions_state_a_sides_lesions_with_sizes():
    def scene(*lesions):
        return S.Scene("ct", "chest", tuple(S.Lesion(0.3 if s == "left" else 0.7, 0.5, 0.1, s, z)
                                            for s, z in lesions))
    left, right = (q for q in S.OPEN_QUESTIONS if q.family == "findings")
    assert (left.text, right.text) == ("What is seen on the left side?", "What is seen on the right side?")
    both = scene(("left", "large"), ("right", "small"), ("left", "small"))
    assert left.answer(both) == "one small and one large lesion" and right.answer(both) == "one small lesion"
    assert left.answer(scene(("right", "large"), ("right", "large"))) == "no lesions"
    assert right.answer(scene(("right", "large"), ("right", "large"))) == "two large lesions"
    assert set(left.answers) == set(S.SIDE_FINDINGS) and len(S.SIDE_FINDINGS) == 6


# ----------------------------------------------------------------------------------------------
# The longest record a source can draw


def test_scene_outlines_are_every_drawable_scene_once():
    outlines = S.scene_outlines()
    keys = [(s.modality, s.region, tuple((l.side, l.size) for l in s.lesions)) for s in outlines]
    assert len(keys) == len(set(keys)) == 3 * 3 * 27  # 6 x 6 side findings, less the 9 with 4 lesions
    rng = np.random.default_rng(5)
    for _ in range(300):
        s = S.sample_scene(rng, "slots")
        key = (s.modality, s.region, tuple(sorted((l.side, l.size) for l in s.lesions)))
        assert key in {(m, r, tuple(sorted(ls))) for m, r, ls in keys}


def _dialogue_length(tok):
    def length(record):
        image = "<image>" in record["conversations"][0]["value"]
        return len(conv.format_conversation(record, tok, num_image_tokens=4 if image else None, system_prompt=None))
    return length


@pytest.mark.parametrize("kw", [dict(task="report", turns=2, report_wording="varied"),
                                dict(task="text", turns=2, report_wording="templated"),
                                dict(task="vqa", turns=3), dict(task="caption")],
                         ids=lambda kw: f"{kw['task']}-{kw.get('turns', 1)}")
def test_longest_record_bounds_every_dialogue(tmp_path, kw):
    """No dialogue is longer than `longest_record`'s: neither 400 drawn records nor every first
    turn with its follow-ups in every order (all pairs of a third of them with three turns) over a
    spread of outlines (all of them would take minutes)."""
    tok = S.load_demo_tokenizer(tmp_path, reports=True)
    length = _dialogue_length(tok)
    src = S.SyntheticMedVQA("train", 400, seed=3, layout="slots", **kw)
    longest = src.longest_record(length)
    bound = length(longest)
    assert longest["conversations"][0]["value"].startswith("<image>\n") == (kw["task"] != "text")
    assert len(longest["conversations"]) == 2 * (1 if kw["task"] == "caption" else src.config.turns)
    drawn = max(length(src[i]) for i in range(len(src)))
    assert drawn <= bound
    more = 0 if kw["task"] == "caption" else src.config.turns - 1
    record = lambda turns: {"id": "x", "image": None, "conversations": src._conversations(turns)}
    for scene in S.scene_outlines()[::13]:
        for first in src._first_turns(scene)[::2]:
            rest = [t for t in src._follow_ups(scene) if t[0] != first[0]]
            for extra in itertools.permutations(rest, more) if more < 2 else itertools.combinations(rest[::3], more):
                for order in itertools.permutations([first, *extra]):
                    assert length(record(list(order))) <= bound
