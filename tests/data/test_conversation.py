"""Conversation formatting: exact token/label layouts, placeholder expansion, truncation."""
import numpy as np
import pytest

from medv_jax.data import conversation as conv
from medv_jax.data import testing
from medv_jax.data import tokenizer as tok_lib
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
# turns are labelled in full (header, role word, blank line, text, eot). The header is tokenized as
# a piece of its own, so its "\n\n" is one byte-level token (ĊĊ) whatever follows; the same string
# tokenized whole would split it as Ċ Ċ before a word with this (GPT-2-style) pre-tokenizer.
TWO_TURNS_EXPECTED = """
<|startoftext|>:L <|start_header_id|>:L user <|end_header_id|>:L ĊĊ IMGx3 Ċ Is Ġthere Ġa Ġlesion ? <|eot_id|>:L
<|start_header_id|>:L assistant:L <|end_header_id|>:L ĊĊ:L Yes:L .:L <|eot_id|>:L
<|start_header_id|>:L user <|end_header_id|>:L ĊĊ Which Ġside ? <|eot_id|>:L
<|start_header_id|>:L assistant:L <|end_header_id|>:L ĊĊ:L Left:L .:L <|eot_id|>:L
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
    head = expect("<|startoftext|>:L <|start_header_id|>:L system <|end_header_id|>:L ĊĊ")
    head += [(t, False) for t in system] + [("<|eot_id|>", True)]
    got = layout(tokenizer, s)
    assert got[: len(head)] == head
    # the rest is the dialogue without its own BOS
    rest = expect(TWO_TURNS_EXPECTED)[1:]
    assert got[len(head):] == rest


def test_system_prompt_selectable(tokenizer):
    s = conv.format_conversation(TWO_TURNS, tokenizer, num_image_tokens=3, system_prompt="Be brief.")
    toks = tokenizer.convert_ids_to_tokens(s.input_ids[:7].tolist())
    assert toks == ["<|startoftext|>", "<|start_header_id|>", "system", "<|end_header_id|>", "ĊĊ", "B", "e"]
    rec = dict(TWO_TURNS, conversations=[{"from": "system", "value": "Be brief."}] + TWO_TURNS["conversations"])
    s2 = conv.format_conversation(rec, tokenizer, num_image_tokens=3)  # record's system message wins
    np.testing.assert_array_equal(s.input_ids, s2.input_ids)


def _chat_template_ids(tokenizer, messages, add_generation_prompt):
    ref = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref)


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    return testing.load_test_tokenizer(tmp_path_factory.mktemp("llama3_tok"), pretokenizer="llama3")


def test_prompt_and_rows_match_chat_template_with_a_llama3_pretokenizer(llama3_tokenizer):
    """With a pre-tokenizer that keeps a newline run in one piece (Llama-3's), tokenizing by pieces
    gives exactly the tokenizer's chat template: the inference prompt and a two-turn training row."""
    tok = llama3_tokenizer
    rec = {"id": "q", "conversations": [{"from": "human", "value": "What organ is shown?"}]}
    s = conv.format_prompt(rec, tok)
    messages = [
        {"role": "system", "content": conv.MEDICAL_SYSTEM_PROMPT},
        {"role": "user", "content": "What organ is shown?"},
    ]
    assert s.input_ids.tolist() == _chat_template_ids(tok, messages, True)
    assert s.labels[-4:].tolist() == [IGNORE_INDEX] * 4  # generation header unlabelled
    assert s.image_mask.sum() == 0
    text_only = {"id": "t", "conversations": [m for m in TWO_TURNS["conversations"]]}
    text_only["conversations"][0] = {"from": "human", "value": "Is there a lesion?"}
    row = conv.format_conversation(text_only, tok)
    messages = [{"role": "system", "content": conv.MEDICAL_SYSTEM_PROMPT}] + [
        {"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]}
        for m in text_only["conversations"]]
    assert row.input_ids.tolist() == _chat_template_ids(tok, messages, False)


def test_pieces_differ_from_whole_strings_where_a_gpt2_pretokenizer_looks_ahead(tokenizer):
    """The case the pieces exist for: whole-string tokenization splits the header's blank line
    before the answer's first word but not at a prompt's end; the builder's ids do not."""
    whole = tok_lib.encode(tokenizer, "<|end_header_id|>\n\nYes.")
    at_end = tok_lib.encode(tokenizer, "<|end_header_id|>\n\n")
    assert whole[: len(at_end)] != at_end
    row = conv.format_conversation(TWO_TURNS, tokenizer, num_image_tokens=3, system_prompt=None)
    prompt = conv.format_prompt({**TWO_TURNS, "conversations": TWO_TURNS["conversations"][:1]}, tokenizer,
                                num_image_tokens=3, system_prompt=None)
    assert row.input_ids[: len(prompt)].tolist() == prompt.input_ids.tolist()


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
    # the prompt a caption model continues: the image slots alone, a prefix of the training row
    prompt = conv.format_caption_prompt(rec, tokenizer, num_image_tokens=4)
    assert layout(tokenizer, prompt) == expect("IMGx4")
    np.testing.assert_array_equal(prompt.input_ids, s.input_ids[:4])
    with pytest.raises(ValueError, match="cap-1"):
        conv.format_caption_prompt(rec, tokenizer, num_image_tokens=0)


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


# ----------------------------------------------------------------------------------------------
# The prefix property: what the model sees before an answer at inference is what it saw before
# that answer in training, token for token, whatever the tokenizer.


def _word_level_tokenizer(out_dir):
    """A word-level tokenizer (whitespace/punctuation split, one id per word, no byte fallback)
    carrying the LLaDA special tokens, saved and loaded like any other tokenizer folder."""
    import json
    import os

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = testing.compact_special_tokens()
    words = ["[UNK]"] + sorted(set(testing.DEFAULT_WORDS) | {w.capitalize() for w in testing.DEFAULT_WORDS}
                               | {".", "?", ",", "-", "CT", "MRI", "X"})
    vocab = {w: i for i, w in enumerate(words + specials)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok_lib.BOS_TOKEN,
              "eos_token": tok_lib.EOS_TOKEN, "pad_token": tok_lib.EOS_TOKEN, "unk_token": "[UNK]"}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return tok_lib.load_tokenizer(out_dir)


@pytest.fixture(scope="module", params=["demo_gpt2_bpe", "llama3_byte_bpe", "word_level"])
def any_tokenizer(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "demo_gpt2_bpe":
        from medv_jax.data import synthetic

        return synthetic.load_demo_tokenizer(out)
    if request.param == "llama3_byte_bpe":
        return testing.load_test_tokenizer(out, pretokenizer="llama3")
    return _word_level_tokenizer(out)


DIALOGUE = [
    {"from": "human", "value": "<image>\nIs this an MRI scan?"},
    {"from": "gpt", "value": "no"},
    {"from": "human", "value": "What modality is this?"},
    {"from": "gpt", "value": "CT"},
    {"from": "human", "value": "Which side?"},
    {"from": "gpt", "value": "\n left, mostly."},  # leading whitespace and punctuation on purpose
]


@pytest.mark.parametrize("system_prompt", [None, conv.MEDICAL_SYSTEM_PROMPT], ids=["no_system", "system"])
@pytest.mark.parametrize("turns", [1, 3])
def test_every_prompt_is_a_prefix_of_the_training_row(any_tokenizer, system_prompt, turns):
    rec = {"id": "d", "image": "x.png", "conversations": DIALOGUE[: 2 * turns]}
    row = conv.format_conversation(rec, any_tokenizer, num_image_tokens=4, system_prompt=system_prompt)
    for t in range(turns):  # the prompt before each answer, as a chat would send it
        before = {**rec, "conversations": DIALOGUE[: 2 * t + 2]}  # ends with answer t (dropped)
        prompt = conv.format_prompt(before, any_tokenizer, num_image_tokens=4, system_prompt=system_prompt)
        n = len(prompt)
        assert row.input_ids[:n].tolist() == prompt.input_ids.tolist(), f"turn {t}"
        assert row.image_mask[:n].tolist() == prompt.image_mask.tolist()
        # ... and what follows in the row is answer t itself, then its end of turn
        answer = tok_lib.encode(any_tokenizer, DIALOGUE[2 * t + 1]["value"])
        eot = tok_lib.special_token_ids(any_tokenizer).eot
        assert row.input_ids[n: n + len(answer) + 1].tolist() == answer + [eot]
        assert (row.labels[n: n + len(answer) + 1] != IGNORE_INDEX).all()


def test_chat_record_places_image_and_rejects_a_bad_history():
    rec = conv.chat_record(["<image> Is it?", "Where?"], ["yes"], has_image=True, sample_id="c")
    assert rec == {"id": "c", "conversations": [
        {"from": "human", "value": "<image>\nIs it?"}, {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "Where?"}]}
    assert conv.chat_record(["<image>Is it?"], has_image=False)["conversations"][0]["value"] == "Is it?"
    with pytest.raises(ValueError, match="one question more than answers"):
        conv.chat_record(["a", "b"], [], has_image=False)
