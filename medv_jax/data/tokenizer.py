"""Tokenizer loading and the LLaDA special token ids.

The LLaDA-8B tokenizer is a plain `PreTrainedTokenizerFast` (tokenizer.json + tokenizer_config.json),
so `transformers.AutoTokenizer` loads it from a local folder without remote code. Every special id the
data pipeline, the loss and the sampler need is looked up *by its token string* in the loaded tokenizer,
so a different (e.g. the small test) tokenizer works unchanged. The ids of the released tokenizer
(docs/algorithm.md §1) are kept here only as documentation and for tests to assert against.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import weakref
from typing import Any, Iterator

from medv_jax.user_errors import UserError

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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[Any]:
    """Imports transformers without its advice for model users (we use it for tokenizers only:
    "PyTorch was not found" on an install without torch is not news to us) and, inside the
    block, without its warnings (a LLaDA-V folder's config.json names the multimodal model type,
    which AutoTokenizer reads and warns about though the tokenizer itself loads as it should)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers  # heavy import, only where a tokenizer is loaded

    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield transformers
    finally:
        logging.set_verbosity(level)


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Loads the tokenizer in the local folder `path` through `transformers.AutoTokenizer`.

    Never reaches a hub (`local_files_only`); fails early when a LLaDA special token is missing.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    with quiet_transformers() as transformers:
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    special_token_ids(tokenizer)  # validate
    return tokenizer


def open_tokenizer(path: str, flag: str = "--tokenizer") -> Any:
    """`load_tokenizer` of a user-given folder; a UserError naming `flag` when it is missing or
    holds no LLaDA tokenizer."""
    full = os.path.expanduser(path)
    if not path or not os.path.isdir(full):
        raise UserError(f"{flag} {path!r}: no such folder; give the tokenizer folder (e.g. the LLaDA-MedV download)")
    try:
        return load_tokenizer(full)
    except KeyError as e:
        raise UserError(f"{flag} {path!r} is not a LLaDA tokenizer: {e.args[0]}") from None
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{flag} {path!r}: cannot load a tokenizer from it ({e})") from None


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with nothing added (the chat template writes BOS itself).

    Special-token strings inside `text` (e.g. `<|eot_id|>`) become their single ids, as they do when
    the reference tokenizes a rendered chat template.
    """
    if not text:
        return []
    try:
        cache = _ENCODE_CACHE.setdefault(tokenizer, collections.OrderedDict())
    except TypeError:  # a tokenizer that cannot be weakly referenced: no caching
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = cache.get(text)
    if ids is None:
        ids = cache[text] = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(cache) > _ENCODE_CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(text)
    return list(ids)


# Token ids by text, per tokenizer: conversations are tokenized piece by piece (role headers,
# questions, answer sentences), the pieces repeat from record to record, and the tokenizer's own
# call costs several times its encoding (a batch of 32 report dialogues encoded in 41 ms uncached,
# 27 ms cached). Bounded LRU, per process.
_ENCODE_CACHE: "weakref.WeakKeyDictionary[Any, collections.OrderedDict]" = weakref.WeakKeyDictionary()
_ENCODE_CACHE_SIZE = 65536
