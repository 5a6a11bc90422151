"""LLaVA records -> fixed-shape numpy batches, with grain (deterministic, resumable, per host).

Training batch (`make_loader`; every array has a static shape; B = per-process batch size,
T = `max_length`, C = `max_crops`, S = crop size)::

    tokens              int32   [B, T]     ids; image slots hold PAD; right padding is EOS
    labels              int32   [B, T]     -100 where ignored; EOS padding is LABELLED (SPEC 4)
    key_mask            bool    [B, T]     True at real tokens and at the labelled EOS padding;
                                           False only at unlabelled filler rows/positions
    pixels              float32 [B, C, S, S, 3]   crops of the row's image, unused crops zero
    image_index         int32   [B, T, 4]  4-tap gather into the row's C * N crop features
    image_weight        float32 [B, T, 4]  (crop c -> rows c*N .. c*N+N-1; N = patches per crop)
    image_newline_mask  bool    [B, T]     positions taking the learned image_newline
    example_id          str     [B]        record ids ("" for filler rows); drop before device put

Text positions have image_index 0, image_weight 0 and image_newline_mask False (see
`medv_jax.models.medv` and `image_layout.place_in_sequence`).

Inference prompts (`make_prompt_batches`, for the sampler): the same image arrays, with
`tokens`/`key_mask` LEFT-padded to P = `prompt_length` (key_mask False on padding), formatted with the
generation prompt (`<|start_header_id|>assistant<|end_header_id|>\\n\\n`), plus `answer`,
`answer_type`, `question` (str [B]) and `valid` (bool [B], False on filler rows of the last batch).

Grain: `make_loader` returns a `grain.python.DataLoader` over an `IndexSampler` (shuffled per
epoch with `seed`, sharded by `jax.process_index()/process_count()` unless shard arguments are
given), so `it = iter(loader)` has `it.get_state()` / `it.set_state(state)` for exact resume
(orbax's `grain.python.PyGrainCheckpointHandler` saves that state). Sources must have a stable
`repr` (grain checks it on restore): `SyntheticMedVQA` has one; wrap lists in `RecordList`.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain.python as gp
import numpy as np

from medv_jax.data import conversation as conv
from medv_jax.data import image as image_lib
from medv_jax.data import image_io
from medv_jax.data import image_layout
from medv_jax.data import tokenizer as tok_lib
from medv_jax.data.anyres import ImageConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = conv.IGNORE_INDEX
TAPS = image_layout.TAPS
TRAIN_KEYS = (
    "tokens", "labels", "key_mask", "pixels", "image_index", "image_weight", "image_newline_mask", "example_id",
)
PROMPT_KEYS = (
    "tokens", "key_mask", "pixels", "image_index", "image_weight", "image_newline_mask", "example_id",
    "answer", "answer_type", "question", "valid",
)


class SampleTooLongError(ValueError):
    """A record does not fit the configured length (or crop budget); the message names its id."""

    def __init__(self, sample_id: str, message: str):
        super().__init__(f"sample {sample_id}: {message}")
        self.sample_id = sample_id


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Shapes and formatting of batches.

    batch_size: rows per batch on this process (the global batch is batch_size * shard_count).
    max_length: T, training sequence length. prompt_length: P, inference prompt length.
    max_crops: C, crop slots per row (1 for square/pad; anyres needs up to 1 + rows * cols).
    image: preprocessing (mode, crop size, patch grid). Default: square 384 / 27 patches; the CPU
      demo uses `ImageConfig(crop_size=64, patches_per_side=8)` (64 tokens per image).
    text_format: "conversation" (SFT chat template, stages 2/3) or "caption" (stage 1).
    system_prompt: system message for "conversation" (None: no system message).
    too_long: "raise" (SampleTooLongError naming the id), "skip" (drop it, logged with its id) or
      "truncate" (cut the text at max_length, never through the image; see truncate_sample).
    image_root: folder that relative image paths in records are read from.
    """

    batch_size: int = 8
    max_length: int = 256
    prompt_length: int = 128
    max_crops: int = 1
    image: ImageConfig = dataclasses.field(default_factory=ImageConfig)
    text_format: str = "conversation"
    system_prompt: str | None = conv.MEDICAL_SYSTEM_PROMPT
    too_long: str = "raise"
    image_root: str | None = None

    def __post_init__(self):
        if self.text_format not in ("conversation", "caption"):
            raise ValueError(f"text_format must be 'conversation' or 'caption', got {self.text_format!r}")
        if self.too_long not in ("raise", "skip", "truncate"):
            raise ValueError(f"too_long must be 'raise', 'skip' or 'truncate', got {self.too_long!r}")
        if min(self.batch_size, self.max_length, self.prompt_length, self.max_crops) <= 0:
            raise ValueError("batch_size, max_length, prompt_length and max_crops must be positive")

    @property
    def tokens_per_crop(self) -> int:
        return self.image.tokens_per_crop


# ----------------------------------------------------------------------------------------------
# Sources


class RecordList:
    """A list of records as a grain source with a stable repr (length + digest of the ids)."""

    def __init__(self, records: Sequence[Mapping[str, Any]], name: str = "records"):
        self._records = list(records)
        digest = hashlib.sha1("\x00".join(conv.sample_id_of(r) for r in self._records).encode()).hexdigest()[:12]
        self._repr = f"RecordList(name={name!r}, n={len(self._records)}, ids_sha1={digest})"

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        return self._records[int(index)]

    def __repr__(self) -> str:
        return self._repr


def as_source(records: Any) -> Any:
    """Lists/tuples become a RecordList; anything with __len__/__getitem__ is used as is."""
    if isinstance(records, (list, tuple)):
        return RecordList(records)
    return records


# ----------------------------------------------------------------------------------------------
# One record


@dataclasses.dataclass(frozen=True)
class _Image:
    pixels: np.ndarray  # [C, S, S, 3] zero-padded
    layout: image_layout.ImageTokenLayout | None


def _load_image(record: Mapping[str, Any], config: BatchConfig) -> _Image:
    sid = conv.sample_id_of(record)
    c, s = config.max_crops, config.image.crop_size
    pixels = np.zeros((c, s, s, 3), np.float32)
    src = record.get("image")
    if src is None:
        return _Image(pixels, None)
    if isinstance(src, (str, os.PathLike)) and config.image_root and not os.path.isabs(src):
        src = os.path.join(config.image_root, src)
    pre = image_lib.preprocess_pil(image_io.load_image(src), config.image)
    n = pre.pixels.shape[0]
    if n > c:
        raise SampleTooLongError(sid, f"its image has {n} crops but max_crops is {c}")
    pixels[:n] = pre.pixels
    return _Image(pixels, pre.layout)


def _format_uncached(record: Mapping[str, Any], tokenizer: Any, config: BatchConfig, num_image_tokens: int | None,
                     max_length: int | None, prompt: bool) -> conv.TokenizedSample:
    if config.text_format == "caption" and not prompt:
        if num_image_tokens is None:
            raise ValueError(f"sample {conv.sample_id_of(record)}: a caption record needs an image")
        return conv.format_caption(record, tokenizer, num_image_tokens=num_image_tokens, max_length=max_length)
    return conv.format_conversation(
        record, tokenizer, num_image_tokens=num_image_tokens, system_prompt=config.system_prompt,
        max_length=max_length, add_generation_prompt=prompt,
    )


# Formatted samples by conversation text, per tokenizer: VQA sets repeat the same few questions and
# answers, so tokenization mostly hits this cache. Bounded LRU, per process.
_FORMAT_CACHE: "weakref.WeakKeyDictionary[Any, collections.OrderedDict]" = weakref.WeakKeyDictionary()
_FORMAT_CACHE_SIZE = 8192


def _format(record: Mapping[str, Any], tokenizer: Any, config: BatchConfig, num_image_tokens: int | None,
            max_length: int | None, prompt: bool = False) -> conv.TokenizedSample:
    try:
        msgs = tuple((m.get("from", m.get("role")), m.get("value", m.get("content")))
                     for m in record.get("conversations") or ())
        key = (msgs, config.text_format, config.system_prompt, num_image_tokens, max_length, prompt)
        hash(key)
        cache = _FORMAT_CACHE.setdefault(tokenizer, collections.OrderedDict())
    except TypeError:  # unhashable content or tokenizer: no caching
        return _format_uncached(record, tokenizer, config, num_image_tokens, max_length, prompt)
    sample = cache.get(key)
    if sample is None:
        sample = _format_uncached(record, tokenizer, config, num_image_tokens, max_length, prompt)
        cache[key] = sample
        if len(cache) > _FORMAT_CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    sid = conv.sample_id_of(record)
    return sample if sample.sample_id == sid else dataclasses.replace(sample, sample_id=sid)


def _image_arrays(sample: conv.TokenizedSample, image: _Image, length: int, offset: int):
    """Per-position gather arrays [length, ...] with the sample placed at `offset`."""
    index = np.zeros((length, TAPS), np.int32)
    weight = np.zeros((length, TAPS), np.float32)
    newline = np.zeros(length, bool)
    if image.layout is not None:
        i, w, nl = image_layout.place_in_sequence(sample.image_mask, image.layout)
        n = len(sample)
        index[offset:offset + n], weight[offset:offset + n], newline[offset:offset + n] = i, w, nl
    return index, weight, newline


def encode_example(record: Mapping[str, Any], tokenizer: Any, config: BatchConfig) -> dict[str, np.ndarray]:
    """One record -> the training arrays of one row (shapes [T], [T, 4], [C, S, S, 3]), right-padded
    with labelled EOS. Raises SampleTooLongError (with the id) when it does not fit."""
    sid = conv.sample_id_of(record)
    specials = tok_lib.special_token_ids(tokenizer)
    image = _load_image(record, config)
    n_img = None if image.layout is None else image.layout.num_tokens
    t = config.max_length
    try:
        sample = _format(record, tokenizer, config, n_img, t if config.too_long == "truncate" else None)
    except ValueError as e:  # truncation through the image
        if config.too_long == "truncate" and "max_length" in str(e):
            raise SampleTooLongError(sid, str(e)) from e
        raise
    n = len(sample)
    if n > t:
        raise SampleTooLongError(sid, f"{n} tokens exceed max_length {t}")
    tokens = np.full(t, specials.eos, np.int32)
    labels = np.full(t, specials.eos, np.int32)
    tokens[:n], labels[:n] = sample.input_ids, sample.labels
    index, weight, newline = _image_arrays(sample, image, t, 0)
    return {
        "tokens": tokens,
        "labels": labels,
        "key_mask": np.ones(t, bool),
        "pixels": image.pixels,
        "image_index": index,
        "image_weight": weight,
        "image_newline_mask": newline,
        "example_id": np.asarray(sid),
    }


def _split_for_prompt(record: Mapping[str, Any]) -> tuple[dict[str, Any], str, str]:
    """(record without its final assistant turn, that turn's text, the last user question)."""
    msgs = list(record.get("conversations") or [])
    answer = ""
    if msgs and msgs[-1].get("from", msgs[-1].get("role")) in ("gpt", "assistant"):
        answer = msgs[-1].get("value", msgs[-1].get("content", ""))
        msgs = msgs[:-1]
    question = ""
    for m in reversed(msgs):
        if m.get("from", m.get("role")) in ("human", "user"):
            question = m.get("value", m.get("content", "")).replace(conv.IMAGE_PLACEHOLDER, "").strip()
            break
    return {**record, "conversations": msgs}, answer, question


def encode_prompt(record: Mapping[str, Any], tokenizer: Any, config: BatchConfig) -> dict[str, np.ndarray]:
    """One record -> an inference prompt row, LEFT-padded to P (key_mask False on padding).

    The final assistant turn (the reference answer) is removed and the generation prompt added.
    """
    sid = conv.sample_id_of(record)
    specials = tok_lib.special_token_ids(tokenizer)
    image = _load_image(record, config)
    n_img = None if image.layout is None else image.layout.num_tokens
    prompt_record, answer, question = _split_for_prompt(record)
    sample = _format(prompt_record, tokenizer, config, n_img, None, prompt=True)
    p, n = config.prompt_length, len(sample)
    if n > p:
        raise SampleTooLongError(sid, f"prompt of {n} tokens exceeds prompt_length {p}")
    off = p - n
    tokens = np.full(p, specials.pad, np.int32)
    tokens[off:] = sample.input_ids
    key_mask = np.zeros(p, bool)
    key_mask[off:] = True
    index, weight, newline = _image_arrays(sample, image, p, off)
    return {
        "tokens": tokens,
        "key_mask": key_mask,
        "pixels": image.pixels,
        "image_index": index,
        "image_weight": weight,
        "image_newline_mask": newline,
        "example_id": np.asarray(sid),
        "answer": np.asarray(answer),
        "answer_type": np.asarray(str(record.get("answer_type", ""))),
        "question": np.asarray(question),
        "valid": np.asarray(True),
    }


# ----------------------------------------------------------------------------------------------
# Batching


def _filler_like(example: Mapping[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """A filler row: unlabelled, key_mask False, no image, empty id."""
    out = {}
    for k, v in example.items():
        if k in ("tokens",):
            out[k] = np.full_like(v, pad_id)
        elif k == "labels":
            out[k] = np.full_like(v, IGNORE_INDEX)
        elif v.dtype.kind == "U":
            out[k] = np.asarray("")
        else:
            out[k] = np.zeros_like(v)
    return out


def collate(examples: Sequence[Mapping[str, np.ndarray]], batch_size: int | None = None,
            pad_id: int | None = None) -> dict[str, np.ndarray]:
    """Stacks rows into a batch; with `batch_size`, appends filler rows up to it (needs pad_id)."""
    rows = list(examples)
    if not rows:
        raise ValueError("no examples to collate")
    if batch_size is not None and len(rows) < batch_size:
        if pad_id is None:
            raise ValueError("pad_id is needed to fill a batch")
        rows += [_filler_like(rows[0], pad_id)] * (batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def padding_fraction(batch: Mapping[str, np.ndarray], pad_id: int) -> float:
    """Fraction of the batch's positions that are padding: the trailing run of `pad_id` of each
    row (training batches end every real sequence with a non-pad token: <|eot_id|> or the caption's
    newline) plus filler rows. Log it to see the waste of a fixed T."""
    tokens = np.asarray(batch["tokens"])
    not_pad = tokens != pad_id
    last = np.where(not_pad.any(-1), tokens.shape[1] - 1 - np.argmax(not_pad[:, ::-1], axis=-1), -1)
    real = last + 1
    if "key_mask" in batch:  # filler rows (key_mask all False) count as padding entirely
        real = np.where(np.asarray(batch["key_mask"]).any(-1), real, 0)
    return float(1.0 - real.sum() / tokens.size)


def sequence_lengths(records: Any, tokenizer: Any, config: BatchConfig, limit: int | None = None) -> np.ndarray:
    """Formatted lengths (before padding) of the first `limit` records: to choose T and P."""
    src = as_source(records)
    n = len(src) if limit is None else min(limit, len(src))
    out = []
    for i in range(n):
        rec = src[i]
        image = _load_image(rec, config)
        n_img = None if image.layout is None else image.layout.num_tokens
        out.append(len(_format(rec, tokenizer, config, n_img, None)))
    return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------------------------
# grain


class EncodeExample(gp.MapTransform):
    """grain MapTransform: record -> padded row, or None for a too-long record under
    too_long="skip" (logged with its id; `DropSkipped` removes it). Picklable for worker processes."""

    def __init__(self, tokenizer: Any, config: BatchConfig):
        self.tokenizer = tokenizer
        self.config = config

    def map(self, record):
        try:
            return encode_example(record, self.tokenizer, self.config)
        except SampleTooLongError as e:
            if self.config.too_long == "raise":
                raise
            log.warning("skipping %s", e)
            return None


class DropSkipped(gp.FilterTransform):
    """grain FilterTransform dropping the None rows of skipped records."""

    def filter(self, element) -> bool:
        return element is not None


class _Collate:
    """Picklable batch_fn: stacks rows, filling up to `batch_size` when given."""

    def __init__(self, batch_size: int | None, pad_id: int):
        self.batch_size, self.pad_id = batch_size, pad_id

    def __call__(self, rows):
        return collate(rows, self.batch_size, self.pad_id)


def shard_options(shard_index: int | None = None, shard_count: int | None = None):
    """grain ShardOptions: explicit (index, count), or this JAX process's slice by default.
    Every shard gets the same number of records (the remainder is dropped)."""
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither")
    if shard_index is None:
        return gp.ShardByJaxProcess(drop_remainder=True)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} out of range for {shard_count} shards")
    return gp.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app (tests, notebooks) they are
    unparsed, so mark them parsed with their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_loader(
    records: Any,
    tokenizer: Any,
    config: BatchConfig,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_threads: int = 2,
    prefetch: int | None = None,
):
    """A grain DataLoader of training batches (see the module docstring for the contract).

    records: a grain-style random-access source (e.g. `SyntheticMedVQA`) or a list of records.
    seed/shuffle: a different permutation each epoch, the same for the same seed.
    num_epochs: None repeats forever. drop_remainder=False keeps the last partial batch, filled up
      to batch_size with filler rows (key_mask False, labels -100, example_id "") - for evaluation.
    worker_count: grain worker processes (0: in this process; reading still uses `read_threads`).
    shard_index/shard_count: this process's slice; default jax.process_index()/process_count().

    `it = iter(loader)`; `next(it)`; `it.get_state()` -> bytes; a fresh `iter(loader)` with
    `set_state(state)` continues with exactly the same next batch.
    """
    source = as_source(records)
    if worker_count > 0:
        _ensure_absl_flags_parsed()
    sampler = gp.IndexSampler(
        num_records=len(source),
        shard_options=shard_options(shard_index, shard_count),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed if shuffle else None,
    )
    pad_id = tok_lib.special_token_ids(tokenizer).pad
    b = config.batch_size
    batch_fn = _Collate(None if drop_remainder else b, pad_id)
    ops = [EncodeExample(tokenizer, config), DropSkipped(),
           gp.Batch(batch_size=b, drop_remainder=drop_remainder, batch_fn=batch_fn)]
    return gp.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=ops,
        worker_count=worker_count,
        read_options=gp.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch or 2 * b),
    )


def make_prompt_batches(
    records: Any,
    tokenizer: Any,
    config: BatchConfig,
    *,
    batch_size: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    limit: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Inference-prompt batches over `records` in order (one pass, no shuffling), the last one
    filled up with invalid rows (`valid` False, key_mask False). With shard arguments, this
    process takes records shard_index, shard_index + shard_count, ... (all records are covered).
    Too-long prompts raise SampleTooLongError."""
    src = as_source(records)
    n = len(src) if limit is None else min(limit, len(src))
    b = batch_size or config.batch_size
    pad_id = tok_lib.special_token_ids(tokenizer).pad
    indices = range(n) if shard_index is None else range(shard_index, n, shard_count)
    rows: list[dict[str, np.ndarray]] = []
    for i in indices:
        rows.append(encode_prompt(src[i], tokenizer, config))
        if len(rows) == b:
            yield collate(rows)
            rows = []
    if rows:
        batch = collate(rows, b, pad_id)
        yield batch
