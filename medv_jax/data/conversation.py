"""LLaVA-style conversation records -> token ids, diffusion labels and image slots (docs/algorithm.md §3 and §4).

Input records are LLaVA JSON entries::

    {"id": "rad_17", "image": "img.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nIs there a fracture?"},
                       {"from": "gpt", "value": "No."}]}

Two formatters:

* `format_conversation` (stage 2/3 SFT, LLaDA-V's `llava_llada` template), and `format_prompt`, the
  same conversation as an inference prompt. Each message is
  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`; `<|startoftext|>` is written
  before the first message only. Labels: assistant messages in full (header, content,
  `<|eot_id|>`); in system/user messages only the structural ids (BOS, header ids, eot) are
  labelled, the role word, the blank line, the text and the image are IGNORE_INDEX.

* `format_caption` (stage 1 projector pretraining, LLaDA-V's `llada_plain` template): image tokens,
  then the caption followed by "\\n"; no template, no BOS/EOS; the human prompt text is dropped; every
  caption token (and the final newline) is labelled, the image is not.

Pieces, not strings. A message is tokenized as separate pieces: its header (BOS, role and the blank
line), each stretch of content between image placeholders, and `<|eot_id|>`. So the ids of a
header never depend on what follows it, and an inference prompt (the conversation so far, then the
assistant header) is by construction a prefix of the training row of the same conversation, for
any tokenizer. Tokenizing a whole message as one string breaks that wherever the tokenizer's merges
look ahead: with GPT-2's pre-tokenizer `\\n\\n` is one token at the end of a prompt but two before
the answer's first word, so a model trained on whole strings meets a context at inference it never
saw in training. For tokenizers whose pre-tokenizer keeps a newline run in one piece whatever
follows (Llama-3's), the pieces give exactly the ids of the tokenizer's chat template (tested).

The `<image>` placeholder is expanded to `num_image_tokens` slots (the count comes from the image
preprocessing's token layout); their ids are a filler (`image_fill_id`, default PAD) and
`image_mask` marks them for the model to overwrite with projected image features.

Every labelled position is an "answer" position of the diffusion loss (LLaDA-V noises exactly the
positions whose label is not IGNORE_INDEX, and all assistant turns share one t), so the boolean
`answer_mask = labels != IGNORE_INDEX` is all the loss needs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medv_jax.data import tokenizer as tok_lib

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

# docs/algorithm.md §3: the system prompt LLaDA-MedV trains with (the default here).
MEDICAL_SYSTEM_PROMPT = (
    "You are a helpful medical language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
)
# LLaDA-V's general-domain prompt, for running the LLaDA-V checkpoint itself.
GENERAL_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
)
# The reference VQA demo appends this to every question (docs/algorithm.md §3); callers add it where wanted.
VQA_QUESTION_SUFFIX = " Answer concisely in English."

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclasses.dataclass(frozen=True)
class TokenizedSample:
    """One formatted sequence. All arrays have shape [L].

    input_ids: int32 token ids; image slots hold a filler id (see `image_mask`).
    labels: int32 targets; IGNORE_INDEX (-100) where the loss never looks.
    image_mask: bool, True at the slots the model fills with image features, in the order of the
      image token layout (slot k of the sequence <- layout token k).
    """

    sample_id: str
    input_ids: np.ndarray
    labels: np.ndarray
    image_mask: np.ndarray

    @property
    def answer_mask(self) -> np.ndarray:
        """bool [L]: positions the diffusion loss may mask and score (labels != IGNORE_INDEX)."""
        return self.labels != IGNORE_INDEX

    @property
    def num_image_tokens(self) -> int:
        return int(self.image_mask.sum())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclasses.dataclass
class _Builder:
    """Accumulates ids, labels and image flags segment by segment."""

    ids: list[int] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)
    image: list[bool] = dataclasses.field(default_factory=list)

    def text(self, ids: Sequence[int], labels: Sequence[int]) -> None:
        self.ids += ids
        self.labels += labels
        self.image += [False] * len(ids)

    def image_slots(self, n: int, fill_id: int) -> None:
        self.ids += [fill_id] * n
        self.labels += [IGNORE_INDEX] * n
        self.image += [True] * n

    def build(self, sample_id: str) -> TokenizedSample:
        return TokenizedSample(
            sample_id=sample_id,
            input_ids=np.asarray(self.ids, dtype=np.int32),
            labels=np.asarray(self.labels, dtype=np.int32),
            image_mask=np.asarray(self.image, dtype=bool),
        )


def sample_id_of(record: Mapping[str, Any]) -> str:
    return str(record.get("id", "<no id>"))


def normalize_messages(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(role, text) pairs with roles user/assistant/system, from a LLaVA record.

    Accepts `from`/`value` (LLaVA) or `role`/`content` keys. As in the reference, a first message
    that is not from the user (nor a system message) is dropped.
    """
    sid = sample_id_of(record)
    conv = record.get("conversations")
    if not conv:
        raise ValueError(f"sample {sid}: no conversations")
    out = []
    for m in conv:
        role = m.get("from", m.get("role"))
        text = m.get("value", m.get("content"))
        if role not in _ROLES or not isinstance(text, str):
            raise ValueError(f"sample {sid}: bad message {m!r}")
        out.append((_ROLES[role], text))
    if out[0][0] == "assistant":
        out = out[1:]
    return out


def move_image_to_front(text: str) -> str:
    """A message with one `<image>` not at its start gets it moved to the front, followed by a
    newline (LLaVA's preprocess_multimodal); other messages are unchanged."""
    if text.count(IMAGE_PLACEHOLDER) == 1 and not text.startswith(IMAGE_PLACEHOLDER):
        text = IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()
        text = text.strip()
    return text


def _structural_ids(tokenizer: Any, specials: tok_lib.SpecialTokenIds) -> frozenset[int]:
    """Ids labelled inside system/user turns.

    docs/algorithm.md §4: BOS, header ids, eot. The reference also lists the token "\\n\\n", looked up with
    `convert_tokens_to_ids("\\n\\n")`; with a byte-level vocabulary (newline stored as "Ċ") that
    lookup finds nothing, so it only counts when the tokenizer really has such a literal token.
    """
    ids = set(specials.structural)
    try:
        ids.add(tok_lib.token_id(tokenizer, "\n\n"))
    except KeyError:
        pass
    return frozenset(ids)


def _add_pieces(
    b: _Builder,
    tokenizer: Any,
    role: str,
    content: str,
    *,
    first: bool,
    structural: frozenset[int],
    num_image_tokens: int | None,
    image_fill_id: int,
) -> None:
    """Appends one message as its pieces (header, content stretches around `<image>`, eot), each
    tokenized on its own (see the module docstring), with its labels."""
    supervised = role == "assistant"

    def add_text(text: str) -> None:
        ids = tok_lib.encode(tokenizer, text)
        labels = ids if supervised else [t if t in structural else IGNORE_INDEX for t in ids]
        b.text(ids, labels)

    add_text(_header(role, first=first))
    for i, chunk in enumerate(content.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            assert num_image_tokens is not None
            b.image_slots(num_image_tokens, image_fill_id)
        if chunk:
            add_text(chunk)
    add_text(tok_lib.EOT_TOKEN)


def _check_placeholders(sid: str, messages: Sequence[tuple[str, str]], num_image_tokens: int | None) -> None:
    count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in messages)
    if num_image_tokens is None:
        if count:
            raise ValueError(f"sample {sid}: has {IMAGE_PLACEHOLDER} but no image token count was given")
        return
    if num_image_tokens <= 0:
        raise ValueError(f"sample {sid}: num_image_tokens must be positive, got {num_image_tokens}")
    if count != 1:
        raise ValueError(f"sample {sid}: expected one {IMAGE_PLACEHOLDER} placeholder for its image, found {count}")


def _header(role: str, *, first: bool = False) -> str:
    """A message's header piece: BOS (first message only), role, blank line."""
    bos = tok_lib.BOS_TOKEN if first else ""
    return f"{bos}{tok_lib.START_HEADER_TOKEN}{role}{tok_lib.END_HEADER_TOKEN}\n\n"


def message_pieces(role: str, content: str, *, first: bool) -> tuple[str, ...]:
    """One message in the LLaDA chat template as the pieces it is tokenized in (header, content,
    eot); `"".join` of them is the template's text. Content with `<image>` is split further there."""
    return (_header(role, first=first),) + ((content,) if content else ()) + (tok_lib.EOT_TOKEN,)


def encode_text_message(tokenizer: Any, role: str, content: str, *, first: bool) -> list[int]:
    """Token ids of one text-only message, exactly as the conversation builders write them."""
    return [t for piece in message_pieces(role, content, first=first) for t in tok_lib.encode(tokenizer, piece)]


def generation_header_ids(tokenizer: Any) -> list[int]:
    """Ids of the assistant header that ends every inference prompt."""
    return tok_lib.encode(tokenizer, _header("assistant"))


def format_conversation(
    record: Mapping[str, Any],
    tokenizer: Any,
    *,
    num_image_tokens: int | None = None,
    system_prompt: str | None = MEDICAL_SYSTEM_PROMPT,
    max_length: int | None = None,
    add_generation_prompt: bool = False,
    image_fill_id: int | None = None,
) -> TokenizedSample:
    """Formats a (multi-turn) LLaVA record for SFT, or as an inference prompt.

    Args:
      record: LLaVA record (`id`, optional `image`, `conversations`).
      tokenizer: a transformers tokenizer with the LLaDA special tokens.
      num_image_tokens: slots the `<image>` placeholder expands to (from the image token layout);
        None for a text-only record.
      system_prompt: text of the system message, or None for no system message (then BOS goes
        before the first user message). A leading `system` message in the record overrides it.
      max_length: truncate to this many positions (see `truncate_sample`).
      add_generation_prompt: append `<|start_header_id|>assistant<|end_header_id|>\\n\\n` (unlabelled),
        for building an inference prompt from the user turns.
      image_fill_id: id written at image slots (default the tokenizer's PAD).

    Returns a TokenizedSample of length L (<= max_length when given).
    """
    sid = sample_id_of(record)
    specials = tok_lib.special_token_ids(tokenizer)
    structural = _structural_ids(tokenizer, specials)
    fill = specials.pad if image_fill_id is None else image_fill_id

    messages = [(role, move_image_to_front(text)) for role, text in normalize_messages(record)]
    if messages and messages[0][0] == "system":
        system_prompt = messages[0][1]
        messages = messages[1:]
    _check_placeholders(sid, messages, num_image_tokens)
    if system_prompt is not None:
        messages = [("system", system_prompt)] + messages
    if not messages:
        raise ValueError(f"sample {sid}: nothing to format")

    b = _Builder()
    for i, (role, content) in enumerate(messages):
        _add_pieces(b, tokenizer, role, content, first=i == 0, structural=structural,
                    num_image_tokens=num_image_tokens, image_fill_id=fill)
    if add_generation_prompt:
        ids = generation_header_ids(tokenizer)
        b.text(ids, [IGNORE_INDEX] * len(ids))
    sample = b.build(sid)
    return sample if max_length is None else truncate_sample(sample, max_length)


def chat_record(
    questions: Sequence[str], answers: Sequence[str] = (), *, has_image: bool, sample_id: str = "prompt"
) -> dict[str, Any]:
    """A LLaVA record of a chat waiting for its next answer: question i then answer i, the last
    question unanswered (so `len(questions) == len(answers) + 1`). The image placeholder goes to the
    start of the first question; one written anywhere in a question is removed first, as
    LLaVA-Med's evaluation does."""
    if len(questions) != len(answers) + 1:
        raise ValueError(f"a chat waiting for an answer has one question more than answers, got "
                         f"{len(questions)} questions and {len(answers)} answers")
    conversations = []
    for i, question in enumerate(questions):
        text = question.replace(IMAGE_PLACEHOLDER, "").strip()
        if i == 0 and has_image:
            text = IMAGE_PLACEHOLDER + "\n" + text
        conversations.append({"from": "human", "value": text})
        if i < len(answers):
            conversations.append({"from": "gpt", "value": answers[i]})
    return {"id": sample_id, "conversations": conversations}


def split_final_answer(record: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(the record without a final assistant turn, that turn's text or "")."""
    msgs = list(record.get("conversations") or [])
    answer = ""
    if msgs and _ROLES.get(msgs[-1].get("from", msgs[-1].get("role"))) == "assistant":
        answer = msgs[-1].get("value", msgs[-1].get("content", ""))
        msgs = msgs[:-1]
    return {**record, "conversations": msgs}, answer


def format_prompt(
    record: Mapping[str, Any],
    tokenizer: Any,
    *,
    num_image_tokens: int | None = None,
    system_prompt: str | None = MEDICAL_SYSTEM_PROMPT,
    image_fill_id: int | None = None,
) -> TokenizedSample:
    """The inference prompt of a conversation: its messages up to the last user turn (a final
    assistant turn, the reference answer, is dropped), then the assistant header. Its ids are a
    prefix of `format_conversation` of the same record with the answer (tested)."""
    prompt_record, _ = split_final_answer(record)
    return format_conversation(prompt_record, tokenizer, num_image_tokens=num_image_tokens,
                               system_prompt=system_prompt, add_generation_prompt=True,
                               image_fill_id=image_fill_id)


def format_caption(
    record: Mapping[str, Any],
    tokenizer: Any,
    *,
    num_image_tokens: int,
    max_length: int | None = None,
    image_fill_id: int | None = None,
) -> TokenizedSample:
    """Formats a stage-1 caption pair: [image slots] + tokens(caption + "\\n"), no template.

    The record must hold exactly two messages, a human one containing `<image>` (its text is
    dropped, as in LLaVA's plain format) and the caption. Labels: image slots IGNORE_INDEX, every
    caption token and the closing newline labelled.
    """
    sid = sample_id_of(record)
    specials = tok_lib.special_token_ids(tokenizer)
    fill = specials.pad if image_fill_id is None else image_fill_id
    messages = normalize_messages(record)
    if len(messages) != 2 or messages[0][0] != "user" or messages[1][0] != "assistant":
        raise ValueError(f"sample {sid}: a caption record needs exactly one human and one gpt message")
    if IMAGE_PLACEHOLDER not in messages[0][1]:
        raise ValueError(f"sample {sid}: caption record without {IMAGE_PLACEHOLDER}")
    if num_image_tokens <= 0:
        raise ValueError(f"sample {sid}: num_image_tokens must be positive, got {num_image_tokens}")
    b = _Builder()
    b.image_slots(num_image_tokens, fill)
    ids = tok_lib.encode(tokenizer, messages[1][1] + "\n")
    b.text(ids, ids)
    sample = b.build(sid)
    return sample if max_length is None else truncate_sample(sample, max_length)


def format_caption_prompt(record: Mapping[str, Any], tokenizer: Any, *, num_image_tokens: int,
                          image_fill_id: int | None = None) -> TokenizedSample:
    """The inference prompt of a caption record: the image slots alone, the prefix of
    `format_caption`'s row that a caption model continues (the caption itself is dropped)."""
    if num_image_tokens <= 0:
        raise ValueError(f"sample {sample_id_of(record)}: a caption prompt needs an image "
                         f"(num_image_tokens {num_image_tokens})")
    specials = tok_lib.special_token_ids(tokenizer)
    b = _Builder()
    b.image_slots(num_image_tokens, specials.pad if image_fill_id is None else image_fill_id)
    return b.build(sample_id_of(record))


def truncate_sample(sample: TokenizedSample, max_length: int) -> TokenizedSample:
    """Cuts the sequence to `max_length` positions from the end, never through the image.

    Like the reference (which cuts the spliced sequence to `tokenizer_model_max_length`), text after
    the limit is dropped, labelled or not. A cut that would fall inside the image slots raises a
    ValueError naming the sample: either the image tokens alone exceed `max_length`, or the text
    before the image plus the image do.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if len(sample) <= max_length:
        return sample
    img = np.flatnonzero(sample.image_mask)
    if img.size:
        if img.size > max_length:
            raise ValueError(
                f"sample {sample.sample_id}: its {img.size} image tokens alone exceed max_length {max_length}"
            )
        if img[-1] >= max_length:
            raise ValueError(
                f"sample {sample.sample_id}: image tokens end at position {img[-1] + 1}, beyond max_length "
                f"{max_length}; truncation would cut through the image"
            )
    return dataclasses.replace(
        sample,
        input_ids=sample.input_ids[:max_length],
        labels=sample.labels[:max_length],
        image_mask=sample.image_mask[:max_length],
    )
