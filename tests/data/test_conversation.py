"""Conversation formatting: exact token/label layouts, placeholder expansion, truncation."""
import numpy as np
import pytest

from medv_jax.data import conversation as conv
from medv_jax.data.conversation import IGNORE_INDEX

IMG = "<IMG>"  # marks an image slot in the hand-written expectations below


def layout(tokenizer, sample):
    """(token string or IMG, labelled?) per position; checks labels equal ids where labelled."""
    toks = tokenizer.convert_ids_to_tokens(sample.input_ids.tolist())
    out = []
    for tok, tid, lab, img in zip(toks, sample.input_ids, sample.labels, sample.image_mask):
        assert lab in (IGNORE_INDEX, tid)
        out.append((IMG if img else tok, bool(lab != IGNORE_INDEX)))
    return out


def expect(spec):
    """Parses 'token:L' (labelled) / 'token' (ignored) items; 'IMGx3' expands to 3 image slots."""
    out = []
    for item in spec.split():
        if item.startswith("IMGx"):
            out += [(IMG, False)] * int(item[4:])
            continue
        tok, _, flag = item.partition(":")
        out.append((tok, flag == "L"))
    return out


TWO_TURNS = {
    "id": "dlg-2",
    "image": "scan.png",
    "conversations": [
        {"from": "human", "value": "<image>\nIs there a lesion?"},
        {"from": "gpt", "value": "Yes."},
        {"from": "human", "value": "Which side?"},
        {"from": "gpt", "value": "Left."},
    ],
}

# BOS only before the first message; in user turns only BOS/header ids/eot are labelled; assistant
# turns are labelled in full (header, role word, blank line, text, eot). "\n\n" right before the
# image is one byte-level token (ĊĊ), before text it splits as Ċ Ċ, as the real tokenizer does.
TWO_TURNS_EXPECTED = """
<|startoftext|>:L <|start_header_id|>:L user <|end_header_id|>:L ĊĊ IMGx3 Ċ Is Ġthere Ġa Ġlesion ? <|eot_id|>:L
<|start_header_id|>:L assistant:L <|end_header_id|>:L Ċ:L Ċ:L Yes:L .:L <|eot_id|>:L
<|start_header_id|>:L user <|end_header_id|>:L Ċ Ċ Which Ġside ? <|eot_id|>:L
<|start_header_id|>:L assistant:L <|end_header_id|>:L Ċ:L Ċ:L Left:L .:L <|eot_id|>:L
"""


def test_two_turn_dialogue_exact_layout(tokenizer):
    s = conv.format_conversation(TWO_TURNS, tokenizer, num_image_tokens=3, system_prompt=None)
    assert layout(tokenizer, s) == expect(TWO_TURNS_EXPECTED)
    assert s.sample_id == "dlg-2"
    assert s.input_ids.dtype == np.int32 and s.labels.dtype == np.int32 and s.image_mask.dtype == bool
    # image slots hold PAD (= EOS) and are never labelled; answer mask = labelled positions
    assert (s.input_ids[s.image_mask] == 126081).all()
    np.testing.assert_array_equal(s.answer_mask, s.labels != IGNORE_INDEX)
    assert s.input_ids[0] == 126080 and (s.input_ids == 126080).sum() == 1


def test_medical_system_prompt_is_default(tokenizer):
    s = conv.format_conversation(TWO_TURNS, tokenizer, num_image_tokens=3)
    words = conv.MEDICAL_SYSTEM_PROMPT.replace(".", " .").replace(",", " ,").split()
    system = ["You"] + ["Ġ" + w if w not in ".," else w for w in words[1:]]
    head = expect("<|startoftext|>:L <|start_header_id|>:L system <|end_header_id|>:L Ċ Ċ")
    head += [(t, False) for t in system] + [("<|eot_id|>", True)]
    got = layout(tokenizer, s)
    assert got[: len(head)] == head
    # the rest is the dialogue without its own BOS
    rest = expect(TWO_TURNS_EXPECTED)[1:]
    assert got[len(head):] == rest


def test_system_prompt_selectable(tokenizer):
    s = conv.format_conversation(TWO_TURNS, tokenizer, num_image_tokens=3, system_prompt="Be brief.")
    toks = tokenizer.convert_ids_to_tokens(s.input_ids[:8].tolist())
    assert toks == ["<|startoftext|>", "<|start_header_id|>", "system", "<|end_header_id|>", "Ċ", "Ċ", "B", "e"]
    rec = dict(TWO_TURNS, conversations=[{"from": "system", "value": "Be brief."}] + TWO_TURNS["conversations"])
    s2 = conv.format_conversation(rec, tokenizer, num_image_tokens=3)  # record's system message wins
    np.testing.assert_array_equal(s.input_ids, s2.input_ids)


def test_generation_prompt_matches_chat_template(tokenizer):
    """Text-only prompt == the tokenizer's chat template with the generation header."""
    rec = {"id": "q", "conversations": [{"from": "human", "value": "What organ is shown?"}]}
    s = conv.format_conversation(rec, tokenizer, add_generation_prompt=True)
    messages = [
        {"role": "system", "content": conv.MEDICAL_SYSTEM_PROMPT},
        {"role": "user", "content": "What organ is shown?"},
    ]
    ref = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert s.input_ids.tolist() == list(ref)
    assert s.labels[-4:].tolist() == [IGNORE_INDEX] * 4  # generation header unlabelled
    assert s.image_mask.sum() == 0


def test_placeholder_expansion_and_move_to_front(tokenizer):
    rec = {
        "id": "p",
        "conversations": [
            {"from": "human", "value": "Is this a CT? <image>"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    for n in (1, 729, 730, 2779):
        s = conv.format_conversation(rec, tokenizer, num_image_tokens=n, system_prompt=None)
        idx = np.flatnonzero(s.image_mask)
        assert idx.size == n and (np.diff(idx) == 1).all()  # one contiguous run of n slots
        # moved to the front of the message: "...<|end_header_id|>\n\n" [image] "\nIs this a CT?"
        assert tokenizer.convert_ids_to_tokens(s.input_ids[idx[0] - 2 : idx[0]].tolist()) == ["<|end_header_id|>", "ĊĊ"]
        after = tokenizer.decode(s.input_ids[idx[-1] + 1 :].tolist())
        assert after.startswith("\nIs this a CT?<|eot_id|>")
    assert conv.move_image_to_front("Is this a CT? <image>") == "<image>\nIs this a CT?"
    assert conv.move_image_to_front("<image> x") == "<image> x"


def test_placeholder_errors(tokenizer):
    with pytest.raises(ValueError, match="dlg-2.*no image token count"):
        conv.format_conversation(TWO_TURNS, tokenizer)
    two = [{"from": "human", "value": "<image> a <image>"}, {"from": "gpt", "value": "b"}]
    rec = dict(TWO_TURNS, conversations=two)
    with pytest.raises(ValueError, match="found 2"):
        conv.format_conversation(rec, tokenizer, num_image_tokens=5)
    rec = dict(TWO_TURNS, conversations=[{"from": "human", "value": "no image"}, {"from": "gpt", "value": "b"}])
    with pytest.raises(ValueError, match="found 0"):
        conv.format_conversation(rec, tokenizer, num_image_tokens=5)
    with pytest.raises(ValueError, match="bad message"):
        conv.format_conversation({"id": "z", "conversations": [{"from": "robot", "value": "x"}]}, tokenizer)


def test_leading_assistant_message_dropped(tokenizer):
    rec = dict(TWO_TURNS, conversations=[{"from": "gpt", "value": "Hello."}] + TWO_TURNS["conversations"])
    a = conv.format_conversation(rec, tokenizer, num_image_tokens=3)
    b = conv.format_conversation(TWO_TURNS, tokenizer, num_image_tokens=3)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_caption_format(tokenizer):
    rec = {
        "id": "cap-1",
        "image": "x.png",
        "conversations": [
            {"from": "human", "value": "Describe the image briefly.\n<image>"},
            {"from": "gpt", "value": "Axial CT of the chest"},
        ],
    }
    s = conv.format_caption(rec, tokenizer, num_image_tokens=4)
    # image slots, then caption + "\n", all caption tokens (and the newline) labelled; no BOS/EOS,
    # the human prompt text is dropped
    assert layout(tokenizer, s) == expect("IMGx4 Axial:L ĠCT:L Ġof:L Ġthe:L Ġchest:L Ċ:L")
    assert conv.format_caption(rec, tokenizer, num_image_tokens=729).image_mask[:729].all()
    with pytest.raises(ValueError, match="cap-1"):
        conv.format_caption(dict(rec, conversations=rec["conversations"] * 2), tokenizer, num_image_tokens=4)


def test_truncation_keeps_image_whole(tokenizer):
    full = conv.format_conversation(TWO_TURNS, tokenizer, num_image_tokens=50, system_prompt=None)
    img = np.flatnonzero(full.image_mask)
    # longer than the sequence: unchanged
    assert conv.truncate_sample(full, len(full)) is full
    # cut in the text after the image: plain tail cut, like the reference
    cut = conv.format_conversation(
        TWO_TURNS, tokenizer, num_image_tokens=50, system_prompt=None, max_length=img[-1] + 4
    )
    assert len(cut) == img[-1] + 4
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[: img[-1] + 4])
    np.testing.assert_array_equal(cut.labels, full.labels[: img[-1] + 4])
    assert cut.num_image_tokens == 50
    # exactly up to the last image slot is fine, one less would cut through the image
    assert conv.truncate_sample(full, img[-1] + 1).num_image_tokens == 50
    with pytest.raises(ValueError, match="dlg-2.*cut through the image"):
        conv.truncate_sample(full, img[-1])
    # image tokens alone exceed the limit
    with pytest.raises(ValueError, match="dlg-2.*50 image tokens alone exceed max_length 49"):
        conv.format_conversation(TWO_TURNS, tokenizer, num_image_tokens=50, max_length=49)
    with pytest.raises(ValueError, match="cap-2"):
        rec = {"id": "cap-2", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}
        conv.format_caption(rec, tokenizer, num_image_tokens=10, max_length=9)
