"""LLaVA records -> fixed-shape numpy batches, with grain (deterministic, resumable, per host).

Training batch (`make_loader`; every array has a static shape; B = per-process batch size,
T = `max_length`, C = `max_crops`, S = crop size)::

    tokens              int32   [B, T]     ids; image slots hold PAD; right padding is EOS
    labels              int32   [B, T]     -100 where ignored; EOS padding is LABELLED (docs/algorithm.md §4)
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

Grain: `make_loader` returns a `grain.python.DataLoader` whose elements are whole batches planned
by a pure function of (seed, epoch) (`plan_epoch`: shuffled per epoch; optionally length-bucketed,
see `BatchConfig.length_buckets`), each process encoding its own rows of every global batch
(default `jax.process_index()/process_count()`). So `it = iter(loader)` has `it.get_state()` /
`it.set_state(state)` for exact resume (orbax's `grain.python.PyGrainCheckpointHandler` saves that
state), and the batches are the same for any `worker_count`. Sources must have a stable `repr`
(grain checks it on restore): `SyntheticMedVQA` has one; wrap lists in `RecordList`.
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
from PIL import Image as PILImage

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


ANSWER_PADDINGS = ("eos", "eot")


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
    length_buckets: per-batch lengths (below max_length) to pad batches to, e.g. (64, 128, 256);
      empty: every batch is max_length long. Records are batched with others of similar length
      (sorted within windows of `bucket_window` batches of a shuffled epoch). Each distinct
      length compiles the train step once, so keep the set small.
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
    length_buckets: tuple[int, ...] = ()
    bucket_window: int = 64
    answer_padding: str = "eos"

    def __post_init__(self):
        if self.text_format not in ("conversation", "caption"):
            raise ValueError(f"text_format must be 'conversation' or 'caption', got {self.text_format!r}")
        if self.too_long not in ("raise", "skip", "truncate"):
            raise ValueError(f"too_long must be 'raise', 'skip' or 'truncate', got {self.too_long!r}")
        if self.answer_padding not in ANSWER_PADDINGS:
            raise ValueError(f"answer_padding must be one of {ANSWER_PADDINGS}, got {self.answer_padding!r}")
        if min(self.batch_size, self.max_length, self.prompt_length, self.max_crops) <= 0:
            raise ValueError("batch_size, max_length, prompt_length and max_crops must be positive")
        if any(int(b) <= 0 for b in self.length_buckets) or self.bucket_window <= 0:
            raise ValueError(f"length_buckets {self.length_buckets} and bucket_window must be positive")
        object.__setattr__(self, "length_buckets", tuple(sorted(int(b) for b in self.length_buckets)))

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
    if config.text_format == "caption":
        if num_image_tokens is None:
            raise ValueError(f"sample {conv.sample_id_of(record)}: a caption record needs an image")
        if prompt:  # a caption model continues the image directly, with no chat template
            return conv.format_caption_prompt(record, tokenizer, num_image_tokens=num_image_tokens)
        return conv.format_caption(record, tokenizer, num_image_tokens=num_image_tokens, max_length=max_length)
    if prompt:
        return conv.format_prompt(record, tokenizer, num_image_tokens=num_image_tokens,
                                  system_prompt=config.system_prompt)
    return conv.format_conversation(
        record, tokenizer, num_image_tokens=num_image_tokens, system_prompt=config.system_prompt,
        max_length=max_length,
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


def answer_padding_id(config: BatchConfig, tokenizer: Any) -> int:
    """The id that pads each row after its last turn (`BatchConfig.answer_padding`)."""
    return padding_token_id(tokenizer, config.answer_padding)


def padding_token_id(tokenizer: Any, padding: str) -> int:
    """The id of an answer padding (one of `ANSWER_PADDINGS`) in `tokenizer`."""
    specials = tok_lib.special_token_ids(tokenizer)
    return specials.eot if padding == "eot" else specials.eos


def encode_example(record: Mapping[str, Any], tokenizer: Any, config: BatchConfig) -> dict[str, np.ndarray]:
    """One record -> the training arrays of one row (shapes [T], [T, 4], [C, S, S, 3]), right-padded
    with labelled EOS (or eot, `BatchConfig.answer_padding`). Raises SampleTooLongError (with the id) when it does not fit."""
    sid = conv.sample_id_of(record)
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
    fill = answer_padding_id(config, tokenizer)
    tokens = np.full(t, fill, np.int32)
    labels = np.full(t, fill, np.int32)
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


def _last_question(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last user message, without the image placeholder."""
    for m in reversed(messages):
        if m.get("from", m.get("role")) in ("human", "user"):
            return m.get("value", m.get("content", "")).replace(conv.IMAGE_PLACEHOLDER, "").strip()
    return ""


def encode_prompt(record: Mapping[str, Any], tokenizer: Any, config: BatchConfig) -> dict[str, np.ndarray]:
    """One record -> an inference prompt row, LEFT-padded to P (key_mask False on padding).

    The final assistant turn (the reference answer) is removed and the generation prompt added.
    """
    sid = conv.sample_id_of(record)
    specials = tok_lib.special_token_ids(tokenizer)
    image = _load_image(record, config)
    n_img = None if image.layout is None else image.layout.num_tokens
    prompt_record, answer = conv.split_final_answer(record)
    question = _last_question(prompt_record["conversations"])
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
    newline) plus filler rows. Log it to see the waste of a fixed T. With rows padded by
    <|eot_id|> (`BatchConfig.answer_padding = "eot"`) pass that id; each row's closing <|eot_id|>
    then counts as padding too (one position per row)."""
    tokens = np.asarray(batch["tokens"])
    not_pad = tokens != pad_id
    last = np.where(not_pad.any(-1), tokens.shape[1] - 1 - np.argmax(not_pad[:, ::-1], axis=-1), -1)
    real = last + 1
    if "key_mask" in batch:  # filler rows (key_mask all False) count as padding entirely
        real = np.where(np.asarray(batch["key_mask"]).any(-1), real, 0)
    return float(1.0 - real.sum() / tokens.size)


def _image_size(src: Any, config: BatchConfig) -> tuple[int, int]:
    """(width, height) of a record's image without decoding pixels (only anyres needs it)."""
    if isinstance(src, np.ndarray):
        return int(src.shape[1]), int(src.shape[0])
    if hasattr(src, "size") and not isinstance(src, (str, os.PathLike)):
        return tuple(src.size)  # PIL image
    path = os.fspath(src)
    if config.image_root and not os.path.isabs(path):
        path = os.path.join(config.image_root, path)
    if image_io._is_dicom_path(path):  # rare: read it as the pipeline will
        return image_io.load_image(path).size
    try:
        with PILImage.open(path) as img:  # reads the header only
            return img.size
    except (OSError, ValueError, SyntaxError) as e:
        raise image_io.ImageReadError(f"cannot read image file {path!r}: {e}") from e


def record_length(record: Mapping[str, Any], tokenizer: Any, config: BatchConfig) -> int:
    """A record's formatted training length (image tokens included) before padding, read cheaply:
    tokenization is cached and the image is not preprocessed (its size only matters for anyres)."""
    src = record.get("image")
    n_img = None
    if src is not None:
        size = _image_size(src, config) if config.image.is_anyres else (config.image.crop_size,) * 2
        n_img = image_layout.num_image_tokens(size, config.image)
    return len(_format(record, tokenizer, config, n_img, None))


def sequence_lengths(records: Any, tokenizer: Any, config: BatchConfig, limit: int | None = None,
                     progress: bool = False) -> np.ndarray:
    """Formatted lengths (before padding) of the first `limit` records: to choose T, P and the
    length buckets."""
    from tqdm import tqdm

    src = as_source(records)
    n = len(src) if limit is None else min(limit, len(src))
    return np.asarray([record_length(src[i], tokenizer, config)
                       for i in tqdm(range(n), desc="record lengths", unit="rec", disable=not progress)], np.int64)


# ----------------------------------------------------------------------------------------------
# grain: a source of whole batches
#
# Each grain element is one global batch, planned by a pure function of (seed, epoch): which
# records, in which rows, padded to which length. This process encodes its own rows of it. So:
# batches do not depend on worker_count (grain hands whole elements to workers and restores their
# order), every process of a multi-host run uses the same per-batch length (global arrays need
# one shape), and the iterator state (the next element index) resumes exactly.


def bucket_lengths(config: BatchConfig) -> tuple[int, ...]:
    """The per-batch lengths in use: the configured buckets below max_length, then max_length."""
    return tuple(sorted({b for b in config.length_buckets if b < config.max_length} | {config.max_length}))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length (the last bucket for longer ones: they raise, skip or truncate)."""
    i = int(np.searchsorted(np.asarray(buckets), length))
    return int(buckets[min(i, len(buckets) - 1)])


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Global batches of one epoch: `rows[j]` holds the record indices of batch j (-1 = filler row),
    shape [num_batches, batch_size * shard_count]; `lengths[j]` its padded length T_j."""

    rows: np.ndarray
    lengths: np.ndarray


def plan_epoch(num_records: int, global_batch: int, epoch: int, *, seed: int, shuffle: bool,
               drop_remainder: bool, record_lengths: np.ndarray | None = None,
               buckets: Sequence[int] = (), window: int = 64) -> BatchPlan:
    """The batches of `epoch` (a pure function of its arguments).

    Records are permuted with seed (seed, epoch) when `shuffle`. With `record_lengths` (-1 marks
    a record to leave out), each window of `window` batches is sorted by length and cut into
    batches, each padded to the smallest bucket holding its longest record, and (when shuffling)
    the batch order is permuted, so short and long batches mix over the epoch.
    drop_remainder=False keeps the last partial batch (its missing rows are fillers)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_records) if shuffle else np.arange(num_records)
    buckets = tuple(buckets) or (0,)
    if record_lengths is not None:
        order = order[record_lengths[order] >= 0]
    n = len(order)
    if record_lengths is not None and len(buckets) > 1:
        w = global_batch * window
        chunks = [order[i:i + w] for i in range(0, n, w)]
        # stable sort (by length, then position) so ties keep the permutation's order
        order = np.concatenate([c[np.argsort(record_lengths[c], kind="stable")] for c in chunks]) if chunks else order
    num_batches = n // global_batch if drop_remainder else -(-n // global_batch)
    rows = np.full((num_batches, global_batch), -1, np.int64)
    flat = order[:num_batches * global_batch]
    rows.reshape(-1)[:len(flat)] = flat
    if record_lengths is not None and len(buckets) > 1:
        longest = np.where(rows >= 0, record_lengths[np.maximum(rows, 0)], 0).max(axis=1, initial=0)
        lengths = np.asarray([bucket_for(int(x), buckets) for x in longest], np.int64)
        if shuffle:
            perm = rng.permutation(num_batches)
            rows, lengths = rows[perm], lengths[perm]
    else:
        lengths = np.full(num_batches, buckets[-1], np.int64)
    return BatchPlan(rows, lengths)


def padding_waste(plan: BatchPlan, record_lengths: np.ndarray) -> float:
    """Fraction of a plan's token positions that are padding (filler rows included)."""
    real = np.where(plan.rows >= 0, record_lengths[np.maximum(plan.rows, 0)], 0).sum()
    total = (plan.lengths[:, None] * np.ones_like(plan.rows)).sum()
    return float(1.0 - real / max(total, 1))


def _filler_row(config: BatchConfig, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row that trains nothing: PAD tokens, labels ignored, key_mask False, no image."""
    c, s = config.max_crops, config.image.crop_size
    return {
        "tokens": np.full(length, pad_id, np.int32),
        "labels": np.full(length, IGNORE_INDEX, np.int32),
        "key_mask": np.zeros(length, bool),
        "pixels": np.zeros((c, s, s, 3), np.float32),
        "image_index": np.zeros((length, TAPS), np.int32),
        "image_weight": np.zeros((length, TAPS), np.float32),
        "image_newline_mask": np.zeros(length, bool),
        "example_id": np.asarray(""),
    }


_SEQ_KEYS = ("tokens", "labels", "key_mask", "image_index", "image_weight", "image_newline_mask")


def encode_batch(records: Sequence[Mapping[str, Any] | None], length: int, tokenizer: Any,
                 config: BatchConfig) -> dict[str, np.ndarray]:
    """Rows (None = filler) -> one training batch of shape [len(records), length]. A too-long
    record raises (too_long="raise") or becomes a filler row, logged with its id ("skip")."""
    pad_id = tok_lib.special_token_ids(tokenizer).pad
    rows = []
    for rec in records:
        row = None
        if rec is not None:
            try:
                row = encode_example(rec, tokenizer, config)
            except SampleTooLongError as e:
                if config.too_long == "raise":
                    raise
                log.warning("skipping %s", e)
        if row is None:
            rows.append(_filler_row(config, length, pad_id))
            continue
        if length < config.max_length:
            # positions >= length hold only padding (the plan chose length >= the record's)
            row = {k: (v[:length] if k in _SEQ_KEYS else v) for k, v in row.items()}
        rows.append(row)
    return {k: np.stack([r[k] for r in rows]) for k in TRAIN_KEYS}


class PlannedBatches:
    """grain source of whole training batches: element g is global batch g (epoch g // per_epoch)
    of the plan, this process's rows of it. Picklable; stable repr for resume checks."""

    def __init__(self, records: Any, config: BatchConfig, *, seed: int, shuffle: bool,
                 drop_remainder: bool, shard_index: int, shard_count: int,
                 record_lengths: np.ndarray | None = None, window: int = 64, num_epochs: int | None = None):
        self.records, self.config = records, config
        self.num_epochs = num_epochs
        self.seed, self.shuffle, self.drop_remainder, self.window = seed, shuffle, drop_remainder, window
        self.shard_index, self.shard_count = shard_index, shard_count
        self.record_lengths = record_lengths
        self.buckets = bucket_lengths(config) if record_lengths is not None else (config.max_length,)
        self.global_batch = config.batch_size * shard_count
        self.per_epoch = len(self._plan(0).rows)
        lengths_digest = ("none" if record_lengths is None else
                          hashlib.sha1(np.ascontiguousarray(record_lengths).tobytes()).hexdigest()[:12])
        self._repr = (f"PlannedBatches(records={records!r}, batch={config.batch_size}x{shard_count}, "
                      f"shard={shard_index}, seed={seed}, shuffle={shuffle}, drop_remainder={drop_remainder}, "
                      f"buckets={self.buckets}, window={window}, epochs={num_epochs}, lengths={lengths_digest})")

    def _plan(self, epoch: int) -> BatchPlan:
        cache = self.__dict__.setdefault("_cache", {})
        if epoch not in cache:
            if len(cache) > 2:
                cache.clear()
            cache[epoch] = plan_epoch(len(self.records), self.global_batch, epoch, seed=self.seed,
                                      shuffle=self.shuffle, drop_remainder=self.drop_remainder,
                                      record_lengths=self.record_lengths, buckets=self.buckets,
                                      window=self.window)
        return cache[epoch]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_cache", None)
        return state

    def __len__(self) -> int:
        # grain reads element (index % len): the length must cover every epoch (2**62 ~ forever)
        return self.per_epoch * self.num_epochs if self.num_epochs is not None else 2**62

    def batch(self, index: int) -> tuple[list[int], int]:
        """(this process's record indices (-1 = filler), padded length) of global batch `index`."""
        if self.per_epoch == 0:
            raise IndexError("no batches: fewer records than one global batch")
        plan = self._plan(index // self.per_epoch)
        j = index % self.per_epoch
        b = self.config.batch_size
        return [int(i) for i in plan.rows[j, self.shard_index * b:(self.shard_index + 1) * b]], int(plan.lengths[j])

    def __getitem__(self, index: int) -> dict[str, Any]:
        """This process's records of global batch `index` (None = filler) and the batch length.
        Encoding happens in `EncodeBatch`, outside grain's reading threads: the tokenizer and
        the formatting cache are not shared between threads."""
        indices, length = self.batch(int(index))
        return {"records": [self.records[i] if i >= 0 else None for i in indices], "length": length}

    def __repr__(self) -> str:
        return self._repr


class EncodeBatch(gp.MapTransform):
    """grain MapTransform: a planned batch's records -> the training batch (`encode_batch`)."""

    def __init__(self, tokenizer: Any, config: BatchConfig):
        self.tokenizer, self.config = tokenizer, config

    def map(self, element):
        return encode_batch(element["records"], element["length"], self.tokenizer, self.config)


class _BatchIndexSampler:
    """Reads global batches ``start``, ``start + 1``, ... (up to ``num_batches`` when given)."""

    def __init__(self, num_batches: int | None, start: int = 0):
        self.num_batches, self.start = num_batches, start

    def __getitem__(self, index: int):
        key = self.start + index
        if self.num_batches is not None and key >= self.num_batches:
            raise IndexError(index)
        return gp.RecordMetadata(index=index, record_key=key)

    def __repr__(self) -> str:
        # start 0 keeps the repr grain recorded in earlier iterator states (set_state checks it)
        extra = f", start={self.start}" if self.start else ""
        return f"_BatchIndexSampler(num_batches={self.num_batches}{extra})"


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app (tests, notebooks) they are
    unparsed, so mark them parsed with their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither")
    if shard_index is None:
        import jax

        return jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} out of range for {shard_count} shards")
    return shard_index, shard_count


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
    record_lengths: np.ndarray | None = None,
    start_batch: int = 0,
):
    """A grain DataLoader of training batches (see the module docstring for the contract).

    records: a grain-style random-access source (e.g. `SyntheticMedVQA`) or a list of records.
    seed/shuffle: a different permutation each epoch, the same for the same seed.
    num_epochs: None repeats forever. drop_remainder=False keeps the last partial batch, filled up
      to batch_size with filler rows (key_mask False, labels -100, example_id "") - for evaluation.
    worker_count: grain worker processes (0: in this process); batches are the same for any count.
    shard_index/shard_count: this process's rows of each global batch; default
      jax.process_index()/process_count().
    Length bucketing: with `config.length_buckets`, each batch is padded to the smallest bucket
      (or max_length) holding its longest record and records of similar length are batched
      together (within windows of `config.bucket_window` batches), so few shapes are compiled and
      padding is low. Record lengths are computed once (`sequence_lengths`) unless given.

    `it = iter(loader)`; `next(it)`; `it.get_state()` -> bytes; a fresh `iter(loader)` with
    `set_state(state)` continues with exactly the same next batch.
    start_batch: begin at this global batch (counted over epochs). The plan does not depend on the
      process count, so `start_batch` (unlike `get_state()`, which names this process's shard)
      resumes a run on any number of processes.
    """
    source = as_source(records)
    index, count = _shard(shard_index, shard_count)
    if worker_count > 0:
        _ensure_absl_flags_parsed()
    if config.length_buckets and record_lengths is None:
        record_lengths = sequence_lengths(source, tokenizer, config, progress=len(source) >= 1000)
    if record_lengths is not None:
        record_lengths = np.asarray(record_lengths, np.int64).copy()
        if len(record_lengths) != len(source):
            raise ValueError(f"record_lengths has {len(record_lengths)} entries for {len(source)} records")
        over = record_lengths > config.max_length
        if config.too_long == "truncate":
            record_lengths = np.minimum(record_lengths, config.max_length)
        elif over.any():
            ids = [conv.sample_id_of(source[int(i)]) for i in np.flatnonzero(over)[:5]]
            if config.too_long == "raise":
                raise SampleTooLongError(ids[0], f"{int(record_lengths[over][0])} tokens exceed max_length "
                                         f"{config.max_length} ({int(over.sum())} such records, e.g. {ids})")
            log.warning("skipping %d records longer than max_length %d, e.g. %s", int(over.sum()),
                        config.max_length, ids)
            record_lengths[over] = -1
    batches = PlannedBatches(source, config, seed=seed, shuffle=shuffle, drop_remainder=drop_remainder,
                             shard_index=index, shard_count=count, record_lengths=record_lengths,
                             window=config.bucket_window, num_epochs=num_epochs)
    if batches.per_epoch == 0:
        raise ValueError(f"{len(source)} records (after skipping) make no batch of {batches.global_batch} rows "
                         f"({config.batch_size} per process x {count} processes) with drop_remainder=True")
    if record_lengths is not None:
        plan = batches._plan(0)
        fixed = plan_epoch(len(source), batches.global_batch, 0, seed=seed, shuffle=shuffle,
                           drop_remainder=drop_remainder, record_lengths=record_lengths,
                           buckets=(config.max_length,))
        log.info("length buckets %s: padding %.1f%% of tokens (%.1f%% at a fixed %d); batch lengths used: %s",
                 batches.buckets, 100 * padding_waste(plan, record_lengths),
                 100 * padding_waste(fixed, record_lengths), config.max_length,
                 dict(collections.Counter(int(x) for x in plan.lengths)))
    return gp.DataLoader(
        data_source=batches,
        sampler=_BatchIndexSampler(None if num_epochs is None else len(batches), start_batch),
        operations=[EncodeBatch(tokenizer, config)],
        worker_count=worker_count,
        shard_options=gp.NoSharding(),
        read_options=gp.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch or 2),
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
