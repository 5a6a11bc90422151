"""Tokenizer loading, special ids read by string, and the test tokenizer helper."""
import os

import pytest

from medv_jax.data import testing
from medv_jax.data import tokenizer as tok_lib


def test_special_ids_read_from_tokenizer_match_spec(tokenizer):
    ids = tok_lib.special_token_ids(tokenizer)
    # docs/algorithm.md §1 values; runtime code never hard-codes them.
    assert ids.bos == tok_lib.RELEASED_CONTROL_IDS["bos"] == 126080
    assert ids.eos == ids.pad == 126081
    assert ids.mask == 126336
    assert (ids.start_header, ids.end_header, ids.eot) == (126346, 126347, 126348)
    assert ids.structural == {126080, 126346, 126347, 126348}
    assert tokenizer.bos_token_id == 126080 and tokenizer.pad_token_id == 126081


def test_loaded_through_autotokenizer_with_files(tmp_path):
    path = testing.build_test_tokenizer(tmp_path / "tok")
    assert sorted(os.listdir(path)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids("<|mdm_mask|>") == 126336


def test_build_is_deterministic(tmp_path):
    testing.load_test_tokenizer(tmp_path / "a")
    testing.build_test_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_encode_cache_returns_the_tokenizers_own_ids_per_tokenizer(tokenizer, tmp_path):
    """Pieces are cached per tokenizer: a hit equals the tokenizer's own call, a caller changing
    the list it got changes nothing cached, and another vocabulary gets its own ids."""
    text = "The left side shows two small lesions."
    own = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    first = tok_lib.encode(tokenizer, text)
    assert first == own
    first.append(-1)
    assert tok_lib.encode(tokenizer, text) == own
    words = testing.load_test_tokenizer(tmp_path / "words", words=["left", "side", "shows"])
    other = list(words(text, add_special_tokens=False)["input_ids"])
    assert other != own and tok_lib.encode(words, text) == other
    assert tok_lib.encode(tokenizer, text) == own


def test_text_round_trips_and_words_are_single_tokens(tokenizer):
    text = "Is there a lesion in the left lung?\n\nÄrztlicher Befund: 3 cm, T2 MRI."
    ids = tok_lib.encode(tokenizer, text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tok_lib.encode(tokenizer, " lung")) == ["Ġlung"]
    assert tokenizer.convert_ids_to_tokens(tok_lib.encode(tokenizer, "CT")) == ["CT"]
    # special token strings in text become their ids; nothing is added around the text
    assert tok_lib.encode(tokenizer, "yes<|eot_id|>") == [tokenizer.convert_tokens_to_ids("yes"), 126348]
    assert tok_lib.encode(tokenizer, "") == []
    # ordinary ids stay below the special range
    assert max(tok_lib.encode(tokenizer, text)) < testing.FIRST_CONTROL_ID


def test_fill_vocab_has_release_size(tmp_path):
    tok = testing.load_test_tokenizer(tmp_path / "full", fill_vocab=True)
    assert len(tok) == 126349
    assert tok_lib.special_token_ids(tok) == tok_lib.special_token_ids(
        testing.load_test_tokenizer(tmp_path / "small")
    )


def test_missing_special_token_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "plain"
    path.mkdir()
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(KeyError, match="startoftext|endoftext"):
        tok_lib.load_tokenizer(path)
    with pytest.raises(FileNotFoundError):
        tok_lib.load_tokenizer(tmp_path / "nowhere")
