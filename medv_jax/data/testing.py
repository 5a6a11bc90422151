"""Test helpers shared by many test suites: a small, fast, deterministic LLaDA-compatible tokenizer.

`build_test_tokenizer(out_dir)` writes a folder that `transformers.AutoTokenizer.from_pretrained`
loads like the real LLaDA tokenizer: a byte-level BPE (so any text round-trips exactly, as with the
real byte-level tokenizer) whose vocabulary is the 256 byte symbols plus a few hundred whole words,
and the LLaDA special tokens at their real ids (126080 ... 126348, docs/algorithm.md §1).

Why this shape:
- Real ids: code that hard-codes nothing still meets the real numbers, and shapes such as the
  126464-row embedding stay valid.
- No 126k vocabulary file: the tokenizers library accepts a vocabulary with gaps, so the file stays
  tiny and loading takes milliseconds. `len(tokenizer)` is then the number of entries, not 126349;
  pass `fill_vocab=True` for placeholder entries that make `len(tokenizer) == 126349` like the
  release (slower, ~0.5 s).
- `ignore_merges=True` with no merges: a listed word (with or without its leading space) is one
  token, any other text falls back to one token per byte. Deterministic and simple to reason about
  in hand-written expectations.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from medv_jax.data import tokenizer as tok_lib

# Special tokens of the release at their ids. 126084..126339 are reserved tokens except the mask.
_NAMED_CONTROL_TOKENS: dict[int, str] = {
    126080: tok_lib.BOS_TOKEN,
    126081: tok_lib.EOS_TOKEN,
    126082: "[CLS]",
    126083: "[gMASK]",
    126336: tok_lib.MASK_TOKEN,
    126340: "<role>",
    126341: "</role>",
    126342: "<|arithmetic_start|>",
    126343: "<|arithmetic_end|>",
    126344: "<|number_start|>",
    126345: "<|number_end|>",
    126346: tok_lib.START_HEADER_TOKEN,
    126347: tok_lib.END_HEADER_TOKEN,
    126348: tok_lib.EOT_TOKEN,
}
FIRST_CONTROL_ID = 126080
LAST_TOKEN_ID = 126348  # the release uses ids 0..126348


def special_tokens() -> dict[int, str]:
    """All special tokens of the release, id -> string (reserved ones included)."""
    out = {}
    for i in range(FIRST_CONTROL_ID, LAST_TOKEN_ID + 1):
        out[i] = _NAMED_CONTROL_TOKENS.get(i, f"<|reserved_token_{i - 126084}|>")
    return out


# Words that get a single token. Chat-template roles, the system prompts, and the vocabulary of
# medical VQA questions and answers (including the synthetic set's).
DEFAULT_WORDS: tuple[str, ...] = tuple(
    """
    system user assistant
    you are a helpful medical language and vision assistant able to understand the visual content
    that user provides assist with variety of tasks using natural answer concisely in english
    what is are there this image in on of which where how many does do show shown seen visible
    yes no the an it its picture scan photo kind type modality organ organs side lesion lesions
    abnormal abnormality normal mass nodule tumor fracture effusion opacity present absent
    ct mri x ray xray ultrasound pathology histology slide gross chest abdomen head brain lung
    lungs liver kidney kidneys heart spleen bone bones left right upper lower both one two three
    four five six seven eight nine ten zero small large big round bright dark image's plane
    axial coronal sagittal view contrast enhanced t1 t2 flair weighted located
    describe caption briefly detail findings patient shows showing appears
    """.split()
)


def compact_special_tokens() -> list[str]:
    """The named special tokens (no reserved ones) in id order: what a compact tokenizer
    (`build_test_tokenizer(..., special_ids_base=...)`) places at consecutive ids."""
    return [_NAMED_CONTROL_TOKENS[i] for i in sorted(_NAMED_CONTROL_TOKENS)]


def _byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def _word_forms(words: Iterable[str]) -> list[str]:
    """Each word as it appears after byte-level pre-tokenization: as given,
    capitalised and upper case (CT, MRI), each also after a space."""
    out: list[str] = []
    for w in words:
        for form in dict.fromkeys((w, w.capitalize(), w.upper())):
            out += [form, "Ġ" + form]
    # Newline runs that byte-level pre-tokenization keeps together ("\n\n" at the end of a header).
    out += ["ĊĊ", "ĊĊĊ"]
    return out


# A Jinja chat template with the release's behaviour (BOS before the first message only, content
# trimmed, generation header at the end); written here, not copied, so tests can compare
# `apply_chat_template` with our own prompt builder.
_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


# Llama-3's pre-tokenizer pattern (the published tiktoken-style split): contractions, letters with
# one leading non-letter, up to three digits, punctuation runs, newline runs, other whitespace.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pretokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    if kind == "gpt2":
        return ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "llama3":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ValueError(f"pretokenizer must be 'gpt2' or 'llama3', got {kind!r}")


def build_test_tokenizer(
    out_dir: str | os.PathLike[str],
    words: Sequence[str] | None = None,
    *,
    extra_words: Sequence[str] = (),
    fill_vocab: bool = False,
    special_ids_base: int | None = None,
    pretokenizer: str = "gpt2",
) -> str:
    """Writes a small LLaDA-compatible tokenizer folder into `out_dir` and returns its path.

    Args:
      out_dir: folder to write (created if missing): tokenizer.json, tokenizer_config.json,
        special_tokens_map.json.
      words: whole-word vocabulary (default `DEFAULT_WORDS`); other text is tokenized per byte.
      extra_words: added to `words` (e.g. a synthetic data set's vocabulary).
      fill_vocab: fill every unused id below 126080 with a placeholder so the vocabulary has the
        release's 126349 entries.
      special_ids_base: None (default) keeps the release ids. An int gives a *compact* tokenizer
        (e.g. for a tiny CPU demo model): only the named special tokens (`compact_special_tokens()`,
        no reserved ones) at consecutive ids from max(special_ids_base, number of byte/word
        entries), so `0` places them right after the words and the whole vocabulary is a few
        hundred ids. Code reading ids with `tokenizer.special_token_ids` works unchanged.
      pretokenizer: how text is cut before lookup: "gpt2" (byte-level with GPT-2's regex, where
        a newline run before a word splits off its last newline: "\\n\\nno" -> "\\n", "\\n", "no")
        or "llama3" (Llama-3's regex, which keeps a newline run in one piece whatever follows).

    Byte symbols take ids 0..255, word forms follow in a fixed order, special tokens sit at their
    real ids; the same arguments always give the same files.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    words = list(DEFAULT_WORDS if words is None else words) + list(extra_words)
    vocab: dict[str, int] = {}
    for piece in _byte_alphabet() + _word_forms(words):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    if len(vocab) >= FIRST_CONTROL_ID:
        raise ValueError(f"too many words: {len(vocab)} ids collide with the special ids")
    if fill_vocab and special_ids_base is not None:
        raise ValueError("fill_vocab and special_ids_base exclude each other")
    if fill_vocab:
        for i in range(len(vocab), FIRST_CONTROL_ID):
            vocab[f"<|placeholder_{i}|>"] = i
    if special_ids_base is None:
        specials = special_tokens()
    else:
        base = max(int(special_ids_base), len(vocab))
        specials = {base + k: s for k, s in enumerate(compact_special_tokens())}
    for i, s in specials.items():
        vocab[s] = i

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = _pretokenizer(pretokenizer)
    tok.decoder = decoders.ByteLevel()
    # Already in the model vocabulary, so they keep their ids; registering them as special makes
    # the tokenizer split text at them and skip them when decoding with skip_special_tokens.
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials.values()])

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    specials_map = {
        "bos_token": tok_lib.BOS_TOKEN,
        "eos_token": tok_lib.EOS_TOKEN,
        "pad_token": tok_lib.EOS_TOKEN,
        "cls_token": "[CLS]",
        "additional_special_tokens": [tok_lib.MASK_TOKEN, "<role>", "</role>"],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "chat_template": _CHAT_TEMPLATE,
        **specials_map,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(specials_map, f, indent=1, sort_keys=True)
    return out_dir


def load_test_tokenizer(out_dir: str | os.PathLike[str], **kwargs):
    """`build_test_tokenizer` then `load_tokenizer`: the one-liner most tests want."""
    return tok_lib.load_tokenizer(build_test_tokenizer(out_dir, **kwargs))
