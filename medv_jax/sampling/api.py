"""The Python API: load a checkpoint once, then ask questions about images.

    import medv_jax
    model = medv_jax.load("~/ckpt/llada-medv", "~/hf/LLaDA-MedV")
    answer = model.answer("scan.png", "Is there a pneumothorax?", gen_length=128, steps=128)
    print(answer.text, answer.token_ids, answer.steps, answer.seconds)
    answers = model.answer_batch(["a.png", "b.png"], ["Which organ?", "Which modality?"])

``load`` is the one place a checkpoint becomes a usable model (the commands, the evaluation runs,
the web page and the API server all load through it); ``Model`` owns the prompt builder
(docs/algorithm.md §3), the image preprocessing the checkpoint implies and the sampler
(docs/algorithm.md §5).

Random draws: a question asked with ``seed=s`` draws from ``fold_in(key(s), 0)``, so
``model.answer(..., seed=s)`` equals ``python -m medv_jax.generate ... --seed s``; row ``i`` of
``answer_batch(..., seed=s)`` draws from ``fold_in(key(s), i)`` (as ``medv_jax.infer`` numbers
its rows). A row's answer never depends on the rows batched with it under the exact schedule
(the fast modes advance blocks batch-wide, see ``medv_jax.sampling.diffusion``).

Prompts are left padded to a multiple of ``prompt_bucket`` tokens and images always get the same
number of crop slots, so a few programs serve every question. A batch is padded to its widest
row; padding is masked out, so it changes a row's logits by floating-point rounding at most
(tests/sampling/test_api.py finds the tokens equal alone and batched).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import numpy as np

from medv_jax.data.anyres import ImageConfig
from medv_jax.data.image import PreprocessedImage
from medv_jax.models.layers import WEIGHT_QUANT
from medv_jax.models.llada import LLaDAConfig
from medv_jax.models.medv import MedVConfig
from medv_jax.sampling import multimodal as mm
from medv_jax.sampling.diffusion import (
    AdaptiveStop,
    BlockCallback,
    CachePolicy,
    SampleOutput,
    SamplerConfig,
    ThresholdSelection,
)
from medv_jax.user_errors import UserError

PROMPT_BUCKET = 64
MASK_PLACEHOLDER = "_"
MODEL_SYSTEM_PROMPT = object()  # Model.prompt's default: the model's own system prompt

# Keyword settings of answer() / answer_batch() / sampler_config(), as the commands' flags name them.
SAMPLER_SETTINGS = (
    "gen_length", "block_length", "steps", "temperature", "remasking", "cfg_scale",
    "cache", "cache_refresh", "threshold", "adaptive_stop", "stop_patience", "stop_entropy",
)
IMAGE_SETTINGS = ("dicom_window", "dicom_frame", "dicom_force")


def open_checkpoint(
    checkpoint: str,
    tokenizer: str,
    *,
    param_dtype: str | None = None,
    dtype: str | None = None,
    allow_tokenizer_mismatch: bool = False,
    names: tuple[str, str] = ("checkpoint", "tokenizer"),
) -> tuple[Any, Any]:
    """(checkpoint config, tokenizer) with every check that needs no weights: the checkpoint is a
    converted one, the tokenizer loads, its special ids are the checkpoint's (unless
    ``allow_tokenizer_mismatch``) and the dtypes exist. UserErrors name the item as ``names``
    spell it (the commands pass their flags)."""
    import jax.numpy as jnp

    from medv_jax import checkpoint as checkpoint_lib
    from medv_jax.data import tokenizer as tok_lib

    ckpt_name, tok_name = names
    config = checkpoint_lib.check_converted(checkpoint, ckpt_name)
    if not isinstance(config, (MedVConfig, LLaDAConfig)):
        raise UserError(f"{ckpt_name} {checkpoint!r} holds a {type(config).__name__}, not a MedV or LLaDA model")
    for name, value in (("param_dtype", param_dtype), ("dtype", dtype)):
        if value is not None:
            try:
                jnp.dtype(value)
            except TypeError:
                shown = f"--{name}" if ckpt_name.startswith("--") else name
                raise UserError(f"{shown} {value!r} is not a dtype: use e.g. float32 or bfloat16") from None
    tok = tok_lib.open_tokenizer(tokenizer, tok_name)
    mismatches = mm.tokenizer_id_mismatches(config, tok)
    if mismatches and not allow_tokenizer_mismatch:
        listed = ", ".join(f"{name} {t} vs {c}" for name, t, c in mismatches)
        flag = "--allow_tokenizer_mismatch" if ckpt_name.startswith("--") else "allow_tokenizer_mismatch=True"
        raise UserError(
            f"{tok_name} {tokenizer!r} does not belong to {ckpt_name} {checkpoint!r}: special ids "
            f"(tokenizer vs checkpoint config.json) {listed}; give the checkpoint's tokenizer, or pass "
            f"{flag} to use this one anyway"
        )
    return config, tok


def max_crops_for(image_config: ImageConfig) -> int:
    """Crop slots the largest image can need: 1 (square/pad) or base crop + the biggest grid."""
    if not image_config.is_anyres:
        return 1
    crop = image_config.crop_size
    return 1 + max((w // crop) * (h // crop) for w, h in image_config.grid_pinpoints)


def load(
    checkpoint: str,
    tokenizer: str,
    *,
    system_prompt: str | None = "medical",
    question_suffix: str = "",
    param_dtype: str | None = None,
    dtype: str | None = None,
    attention_impl: str | None = None,
    allow_tokenizer_mismatch: bool = False,
    prompt_bucket: int = PROMPT_BUCKET,
    opened: tuple[Any, Any] | None = None,
    weight_quant: str | None = None,
    merge_adapters: bool = False,
) -> "Model":
    """Load a converted checkpoint (``python -m tools.convert_weights``) and its tokenizer.

    system_prompt: "medical" (default, docs/algorithm.md §3), "general", "none" or any text;
    question_suffix: appended to every question; param_dtype: cast the weights on load; dtype /
    attention_impl: compute dtype and attention kernel (default: the checkpoint's / the
    platform's). ``opened``: ``open_checkpoint``'s result when the caller has it already.
    weight_quant: "int8" / "int4" quantizes the LM's weight matrices on load (weight-only, per
    output channel; the embedding per row), "none" keeps them float, None as stored.
    merge_adapters: an adapters checkpoint (a LoRA run's) is merged into its base's kernels
    instead of computed beside them."""
    from medv_jax import checkpoint as checkpoint_lib

    if prompt_bucket <= 0:
        raise UserError(f"prompt_bucket={prompt_bucket} must be positive")
    _, tok = opened or open_checkpoint(
        checkpoint, tokenizer, param_dtype=param_dtype, dtype=dtype,
        allow_tokenizer_mismatch=allow_tokenizer_mismatch,
    )
    if weight_quant is not None and weight_quant not in WEIGHT_QUANT:
        raise UserError(f"weight_quant={weight_quant!r} is not one of {list(WEIGHT_QUANT)}")
    config, params = checkpoint_lib.load_pretrained(os.path.expanduser(checkpoint), dtype=param_dtype,
                                                    merge_adapters=merge_adapters, weight_quant=weight_quant)
    changes = {}
    if dtype is not None:
        changes["dtype"] = dtype
    if attention_impl is not None:
        changes["attention_impl"] = attention_impl
    if changes:
        if isinstance(config, MedVConfig):
            config = config.replace(lm=config.lm.replace(**changes), vision=config.vision.replace(**changes))
        else:
            config = config.replace(**changes)
    config = mm.with_tokenizer_ids(config, tok)
    image_config = mm.image_config_for(config) if isinstance(config, MedVConfig) else None
    return Model(
        config=config,
        params=params,
        tokenizer=tok,
        system_prompt=mm.system_prompt_for(system_prompt),
        question_suffix=question_suffix,
        image_config=image_config,
        max_crops=max_crops_for(image_config) if image_config is not None else 0,
        name=os.path.basename(os.path.normpath(checkpoint)),
        prompt_bucket=prompt_bucket,
    )


def sampler_config(base: SamplerConfig = SamplerConfig(), **settings: Any) -> SamplerConfig:
    """``base`` with the named settings changed (``SAMPLER_SETTINGS``: the commands' flag names;
    ``cache`` is "none", "prefix" or "dual", ``threshold`` None for off, ``adaptive_stop`` a bool).
    Raises UserError naming the setting."""
    unknown = sorted(set(settings) - set(SAMPLER_SETTINGS))
    if unknown:
        raise UserError(f"unknown sampler setting(s) {unknown}: use {list(SAMPLER_SETTINGS)}")
    plain = {k: settings[k] for k in SAMPLER_SETTINGS[:6] if k in settings and settings[k] is not None}
    cache = base.cache
    if "cache" in settings or "cache_refresh" in settings:
        mode = settings.get("cache", "none" if cache is None else cache.mode)
        refresh = settings.get("cache_refresh")
        if mode in (None, "none"):
            if refresh is not None and refresh != CachePolicy().refresh_every:
                raise UserError("cache_refresh needs cache='prefix' or cache='dual'")
            cache = None
        else:
            try:
                cache = CachePolicy(mode, CachePolicy().refresh_every if refresh is None else refresh)
            except (ValueError, TypeError) as e:
                raise UserError(f"cache: {e}") from None
    selection = base.selection
    if "threshold" in settings:
        try:
            selection = None if settings["threshold"] is None else ThresholdSelection(settings["threshold"])
        except (ValueError, TypeError) as e:
            raise UserError(f"threshold: {e}") from None
    adaptive = base.adaptive_stop
    if any(k in settings for k in ("adaptive_stop", "stop_patience", "stop_entropy")):
        on = settings.get("adaptive_stop", adaptive is not None)
        tuned = {k: settings[k] for k in ("stop_patience", "stop_entropy") if settings.get(k) is not None}
        if not on:
            defaults = {"stop_patience": AdaptiveStop().patience, "stop_entropy": AdaptiveStop().max_entropy}
            if any(v != defaults[k] for k, v in tuned.items()):
                raise UserError("stop_patience / stop_entropy need adaptive_stop=True")
            adaptive = None
        else:
            current = adaptive or AdaptiveStop()
            try:
                adaptive = AdaptiveStop(
                    tuned.get("stop_patience", current.patience), tuned.get("stop_entropy", current.max_entropy)
                )
            except (ValueError, TypeError) as e:
                raise UserError(f"adaptive_stop: {e}") from None
    try:
        return base.replace(**plain, cache=cache, selection=selection, adaptive_stop=adaptive)
    except (ValueError, TypeError) as e:
        raise UserError(f"sampler settings: {e}") from None


def row_key(seed: int, row: int = 0) -> Any:
    """The PRNG key of row ``row`` of a batch asked with ``seed``: ``fold_in(key(seed), row)``."""
    import jax

    return jax.random.fold_in(jax.random.key(int(seed)), row)


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Answer text as LLaVA-Med writes it: special tokens skipped, outer whitespace stripped."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()


def render_frame(tokenizer: Any, frame: Sequence[int | None], placeholder: str = MASK_PLACEHOLDER) -> str:
    """One replayed canvas (token ids, None = masked; ``diffusion.replay``) as text: runs of
    committed tokens decoded, each masked position shown as ``placeholder``."""
    parts, run = [], []
    for tok in frame:
        if tok is None:
            if run:
                parts.append(tokenizer.decode(run, skip_special_tokens=False))
                run = []
            parts.append(placeholder)
        else:
            run.append(tok)
    if run:
        parts.append(tokenizer.decode(run, skip_special_tokens=False))
    return "".join(parts)


@dataclasses.dataclass(frozen=True)
class Answer:
    """One answer: its text, the generated ids up to the stop, how many denoising steps the row
    ran, and how it came about.

    stopped: the answer ended with an end-of-turn token (False: it filled gen_length).
    seconds: the sampler's wall time for the batch the answer was in (batch_size answers);
    compile_seconds: the time its program took to compile (0 when it was compiled before). commit_step: the global step
    each generated position was committed at (-1: never), for ``diffusion.replay``.
    """

    text: str
    token_ids: list[int]
    steps: int
    prompt_tokens: int
    stopped: bool
    seconds: float
    batch_size: int
    compile_seconds: float
    cache_refreshes: int
    tokens: np.ndarray
    commit_step: np.ndarray

    def to_json(self) -> dict[str, Any]:
        """The JSON-able fields (what ``generate --json`` reports per answer)."""
        return {
            "answer": self.text,
            "token_ids": self.token_ids,
            "answer_length": len(self.token_ids),
            "stopped": self.stopped,
            "steps_used": self.steps,
            "prompt_tokens": self.prompt_tokens,
            "cache_refreshes": self.cache_refreshes,
            "seconds": self.seconds,
            "compile_seconds": self.compile_seconds,
        }


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded checkpoint with everything needed to answer (made by ``load``).

    image_config is None for a text-only (LLaDA) checkpoint; max_crops is the crop slots every
    image batch gets (1 for square/pad, the largest grid + 1 for anyres).
    """

    config: Any
    params: Any
    tokenizer: Any
    system_prompt: str | None
    question_suffix: str
    image_config: ImageConfig | None
    max_crops: int
    name: str
    prompt_bucket: int = PROMPT_BUCKET
    # Compiled programs by (sampler plan, batch size, prompt width, block callback); the traced
    # settings (temperature, CFG scale, ...) are inputs of a program.
    _programs: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def unloaded(
        cls,
        opened: tuple[Any, Any],
        *,
        system_prompt: str | None = "medical",
        question_suffix: str = "",
        prompt_bucket: int = PROMPT_BUCKET,
        **ignored: Any,
    ) -> "Model":
        """A model without weights from ``open_checkpoint``'s result: enough to read images and
        build prompts (to check a request before the weights load), not to answer."""
        config, tok = opened
        config = mm.with_tokenizer_ids(config, tok)
        image_config = mm.image_config_for(config) if isinstance(config, MedVConfig) else None
        return cls(
            config=config, params=None, tokenizer=tok, system_prompt=mm.system_prompt_for(system_prompt),
            question_suffix=question_suffix, image_config=image_config,
            max_crops=max_crops_for(image_config) if image_config is not None else 0,
            name="", prompt_bucket=prompt_bucket,
        )

    @property
    def lm(self) -> LLaDAConfig:
        return self.config.lm if isinstance(self.config, MedVConfig) else self.config

    @property
    def takes_images(self) -> bool:
        return self.image_config is not None

    # ------------------------------------------------------------------------------------------
    # Inputs

    def image(
        self,
        source: Any,
        *,
        dicom_window: Any = "auto",
        dicom_frame: int | None = None,
        dicom_force: bool = False,
        name: str | None = None,
    ) -> PreprocessedImage:
        """A path (PNG/JPEG/... or DICOM), PIL image, uint8 array or the bytes of a PNG/JPEG/... ->
        the preprocessed image.
        dicom_window: "auto" (the file's), "full", a named window, "center,width" or a pair.
        Raises UserError naming the image."""
        from medv_jax.data import dicom
        from medv_jax.data import image as image_lib
        from medv_jax.data.image_io import ImageReadError

        if isinstance(source, PreprocessedImage):
            return source
        shown = name or (repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "the image")
        if not self.takes_images:
            raise UserError(f"{shown}: this checkpoint is a text-only LLaDA model; ask without an image")
        window = dicom.parse_window(dicom_window) if isinstance(dicom_window, str) or dicom_window is None else dicom_window
        if isinstance(source, (str, os.PathLike)):
            source = os.path.expanduser(os.fspath(source))
        try:
            return image_lib.preprocess_image(
                source, self.image_config, dicom_window=window, dicom_frame=dicom_frame, dicom_force=dicom_force
            )
        except UserError:
            raise
        except ImportError as e:  # DICOM without pydicom
            raise UserError(f"{shown}: {e}") from None
        except (ImageReadError, OSError, ValueError) as e:
            raise UserError(f"{shown}: cannot read it as an image (PNG, JPEG, ... or DICOM): {e}") from None

    def prompt(
        self,
        question: str,
        image: PreprocessedImage | None = None,
        history: Sequence[tuple[str, str]] = (),
        sample_id: str = "prompt",
        system_prompt: Any = MODEL_SYSTEM_PROMPT,
    ) -> mm.PromptRow:
        """The docs/algorithm.md §3 prompt of a chat: earlier (question, answer) turns, then the new
        question and the assistant header; the image (if any) at the start of the first user turn.
        ``<image>`` written in a question is removed; ``system_prompt``: this prompt's system
        turn (text or None for none), default the model's. Raises UserError for an empty question."""
        from medv_jax.data import conversation as conv

        if not isinstance(question, str):
            raise UserError(f"question: expected text, got {type(question).__name__}")
        if not question.replace(conv.IMAGE_PLACEHOLDER, "").strip():
            raise UserError("the question is empty: write the question")
        if image is not None and not self.takes_images:
            raise UserError("this checkpoint is a text-only LLaDA model; ask without an image")
        questions = [q.replace(conv.IMAGE_PLACEHOLDER, "").strip() + self.question_suffix
                     for q in [q for q, _ in history] + [question]]
        record = conv.chat_record(questions, [a for _, a in history], has_image=image is not None,
                                  sample_id=sample_id)
        system = self.system_prompt if system_prompt is MODEL_SYSTEM_PROMPT else system_prompt
        return mm.prompt_row(self.tokenizer, record, image, system)

    def prompt_width(self, prompt_tokens: int, gen_length: int) -> int:
        """The padded prompt width of a prompt of ``prompt_tokens`` tokens: rounded up to
        ``prompt_bucket``, at most what fits in front of ``gen_length`` answer positions.
        Raises UserError when the prompt itself does not fit."""
        room = self.lm.max_position_embeddings - gen_length
        if prompt_tokens > room:
            raise UserError(
                f"the prompt ({prompt_tokens} tokens) and gen_length {gen_length} exceed the model's "
                f"{self.lm.max_position_embeddings} positions: shorten the question or lower gen_length"
            )
        return min(mm.round_up(prompt_tokens, self.prompt_bucket), room)

    # ------------------------------------------------------------------------------------------
    # Answering

    def answer(
        self,
        image: Any,
        question: str,
        *,
        history: Sequence[tuple[str, str]] = (),
        seed: int = 0,
        sampler: SamplerConfig | None = None,
        system_prompt: Any = MODEL_SYSTEM_PROMPT,
        **settings: Any,
    ) -> Answer:
        """Answer ``question`` about ``image`` (a path, PIL image, array, or None for no image),
        after the ``history`` turns (``system_prompt``: text or None instead of the model's).
        Settings: the sampler's (``SAMPLER_SETTINGS``, on top of
        ``sampler``, default the paper's VQA 128/128/128) and the DICOM window
        (``IMAGE_SETTINGS``)."""
        return self.answer_batch([image], [question], histories=[history], seed=seed, sampler=sampler,
                                 system_prompt=system_prompt, **settings)[0]

    def answer_batch(
        self,
        images: Sequence[Any],
        questions: Sequence[str],
        *,
        histories: Sequence[Sequence[tuple[str, str]]] | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        sampler: SamplerConfig | None = None,
        system_prompt: Any = MODEL_SYSTEM_PROMPT,
        **settings: Any,
    ) -> list[Answer]:
        """Answer ``questions[i]`` about ``images[i]``, ``batch_size`` rows per compiled batch
        (default: all at once). Row i draws from ``fold_in(key(seed), i)``."""
        if len(images) != len(questions):
            raise UserError(f"{len(images)} images for {len(questions)} questions: give one image (or None) per question")
        histories = [()] * len(questions) if histories is None else histories
        image_opts = {k: settings.pop(k) for k in IMAGE_SETTINGS if k in settings}
        config = sampler_config(sampler or SamplerConfig(), **settings)
        rows = []
        for i, (image, question, history) in enumerate(zip(images, questions, histories)):
            pre = None if image is None else self.image(image, **image_opts)
            rows.append(self.prompt(question, pre, history, system_prompt=system_prompt))
        keys = [row_key(seed, i) for i in range(len(rows))]
        size = batch_size or len(rows)
        out = []
        for start in range(0, len(rows), size):
            out += self.run(rows[start:start + size], keys[start:start + size], config)
        return out

    def run(
        self,
        rows: Sequence[mm.PromptRow],
        keys: Sequence[Any],
        config: SamplerConfig,
        *,
        batch_size: int | None = None,
        prompt_width: int | None = None,
        on_block: BlockCallback | None = None,
    ) -> list[Answer]:
        """Sample one compiled batch: ``rows`` (prompts) with their PRNG keys, padded with inert
        rows to ``batch_size`` and to ``prompt_width`` tokens (default: the widest row's
        bucket). ``on_block`` is called on the host as each block is finished."""
        import jax
        import jax.numpy as jnp

        if not rows:
            raise ValueError("rows: nothing to answer")
        if len(keys) != len(rows):
            raise ValueError(f"{len(keys)} keys for {len(rows)} rows")
        size = batch_size or len(rows)
        if size < len(rows):
            raise ValueError(f"batch_size={size} is smaller than the {len(rows)} rows")
        width = prompt_width or max(self.prompt_width(len(r.tokens), config.gen_length) for r in rows)
        # Inert filler rows draw from a key no question uses.
        filler = jax.random.key(0xFFFFFFFF)
        row_keys = jnp.stack(list(keys) + [filler] * (size - len(rows)))
        program = (config._plan(), size, width, on_block)
        compile_seconds = 0.0
        try:
            if self.takes_images:
                batch = mm.collate_prompts(
                    rows, pad_id=self.lm.eos_token_id, crop_size=self.config.vision.image_size,
                    batch_size=size, prompt_length=width, max_crops=self.max_crops,
                )
                if program not in self._programs:
                    t0 = time.perf_counter()
                    self._programs[program] = mm.compile_medv(
                        self.config, self.params, batch, row_keys, config, on_block=on_block)
                    compile_seconds = time.perf_counter() - t0
                inputs = batch
            else:
                from medv_jax.sampling.diffusion import compile_generate_text

                if any(r.image is not None for r in rows):
                    raise UserError("this checkpoint is a text-only LLaDA model; ask without an image")
                inputs = [r.tokens for r in rows] + [[]] * (size - len(rows))
                if program not in self._programs:
                    t0 = time.perf_counter()
                    self._programs[program] = compile_generate_text(
                        self.lm, self.params, inputs, row_keys, config, length=width, on_block=on_block)
                    compile_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            out: SampleOutput = jax.block_until_ready(self._programs[program](inputs, row_keys, config))
            seconds = time.perf_counter() - t0
        except UserError:
            raise
        except ValueError as e:  # a prompt the sampler cannot place
            raise UserError(str(e)) from None
        tokens = np.asarray(out.tokens)
        lengths = np.asarray(out.answer_length)
        steps = np.asarray(out.steps_run)
        commit = np.asarray(out.commit_step)
        refreshed = np.asarray(out.refreshed)
        answers = []
        for i, row in enumerate(rows):
            ids = [int(t) for t in tokens[i, : lengths[i]]]
            answers.append(Answer(
                text=decode(self.tokenizer, ids),
                token_ids=ids,
                steps=int(steps[i]),
                prompt_tokens=int(len(row.tokens)),
                stopped=bool(lengths[i] < config.gen_length),
                seconds=seconds,
                batch_size=len(rows),
                compile_seconds=compile_seconds,
                cache_refreshes=int(np.sum(refreshed[i])),
                tokens=tokens[i],
                commit_step=commit[i],
            ))
        return answers
