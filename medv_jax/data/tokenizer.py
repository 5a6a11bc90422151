"""Tokenizer loading and the LLaDA special token ids.

The LLaDA-8B tokenizer is a plain `PreTrainedTokenizerFast` (tokenizer.json + tokenizer_config.json),
so `transformers.AutoTokenizer` loads it from a local folder without remote code. Every special id the
data pipeline, the loss and the sampler need is looked up *by its token string* in the loaded tokenizer,
so a different (e.g. the small test) tokenizer works unchanged. The ids of the released tokenizer
(docs/algorithm.md §1) are kept here only as documentation and for tests to assert against.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

# Token strings of the LLaDA tokenizer (docs/algorithm.md §1).
BOS_TOKEN = "<|startoftext|>"  # written by the chat template before the first message only
EOS_TOKEN = "<|endoftext|>"  # also the padding token (padding is labelled in the loss)
MASK_TOKEN = "<|mdm_mask|>"  # the diffusion [MASK]
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"  # end of turn; the sampler's stop token

# Ids in the released LLaDA-8B / LLaDA-V tokenizer. Documentation and test expectations only:
# runtime code reads the ids from the tokenizer with `special_token_ids`.
RELEASED_CONTROL_IDS: dict[str, int] = {
    "bos": 126080,
    "eos": 126081,
    "pad": 126081,
    "mask": 126336,
    "start_header": 126346,
    "end_header": 126347,
    "eot": 126348,
}


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the special tokens the data, loss and sampling code need."""

    bos: int
    eos: int
    pad: int
    mask: int
    start_header: int
    end_header: int
    eot: int

    @property
    def structural(self) -> frozenset[int]:
        """Ids labelled even inside system/user turns (docs/algorithm.md §4: BOS, header ids, end of turn)."""
        return frozenset((self.bos, self.start_header, self.end_header, self.eot))


def token_id(tokenizer: Any, token: str) -> int:
    """Id of `token` in `tokenizer`, or KeyError when the tokenizer does not know it as one token.

    `convert_tokens_to_ids` silently returns the unknown id (or None) for missing tokens, so the
    round trip id -> token is checked as well.
    """
    idx = tokenizer.convert_tokens_to_ids(token)
    if idx is None or tokenizer.convert_ids_to_tokens(idx) != token:
        raise KeyError(f"tokenizer has no token {token!r}")
    return int(idx)


def special_token_ids(tokenizer: Any) -> SpecialTokenIds:
    """Reads the LLaDA special ids from `tokenizer` by their token strings.

    PAD is the tokenizer's pad token when it has one (the LLaDA release sets it to EOS), else EOS.
    """
    eos = token_id(tokenizer, EOS_TOKEN)
    pad = tokenizer.pad_token_id
    return SpecialTokenIds(
        bos=token_id(tokenizer, BOS_TOKEN),
        eos=eos,
        pad=eos if pad is None else int(pad),
        mask=token_id(tokenizer, MASK_TOKEN),
        start_header=token_id(tokenizer, START_HEADER_TOKEN),
        end_header=token_id(tokenizer, END_HEADER_TOKEN),
        eot=token_id(tokenizer, EOT_TOKEN),
    )


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Loads the tokenizer in the local folder `path` through `transformers.AutoTokenizer`.

    Never reaches a hub (`local_files_only`); fails early when a LLaDA special token is missing.
    """
    from transformers import AutoTokenizer  # heavy import, only where a tokenizer is loaded

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    special_token_ids(tokenizer)  # validate
    return tokenizer


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with nothing added (the chat template writes BOS itself).

    Special-token strings inside `text` (e.g. `<|eot_id|>`) become their single ids, as they do when
    the reference tokenizes a rendered chat template.
    """
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
