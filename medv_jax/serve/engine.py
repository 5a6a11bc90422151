"""The model side of the web demo, free of any UI: load once, build chat prompts, run the sampler
as one compiled program per (settings, prompt shape), and replay the answer as unmasking frames.

Shapes are kept few so that start-up compilation covers ordinary use: prompts are left padded to a
multiple of ``prompt_bucket`` tokens (clamped to what the model's positions allow) and images
always get ``max_crops`` crop slots, so one program serves every question of a given length
bucket. A new bucket or a new schedule (gen_length / block_length / steps / remasking, ...)
compiles once on first use; seeds and the values of temperature / CFG scale never recompile (only
switching between zero and non-zero does).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time
import typing
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from medv_jax import user_errors
from medv_jax.data import conversation as conv
from medv_jax.data import dicom
from medv_jax.data import image as image_lib
from medv_jax.data.anyres import ImageConfig
from medv_jax.data.image import PreprocessedImage
from medv_jax.data.image_io import ImageReadError
from medv_jax.models.medv import MedVConfig
from medv_jax.sampling import cli
from medv_jax.sampling import multimodal as mm
from medv_jax.sampling.diffusion import SampleOutput, SamplerConfig, generate_text, replay

# Shown for a still-masked position in the chat (an underscore would turn markdown italic).
MASK_GLYPH = "\u2591"  # ░

# Paper settings (docs/algorithm.md §5): one click away in the page.
PRESETS: dict[str, dict[str, int]] = {
    "VQA (paper): 128 / 128 / 128": dict(gen_length=128, block_length=128, steps=128),
    "Conversation (paper): 256 / 64 / 256": dict(gen_length=256, block_length=64, steps=256),
}

DICOM_WINDOWS = dicom.WINDOW_CHOICES
# A problem with what the user gave (file, question, settings): shown in the page.
UserError = user_errors.UserError
parse_window = dicom.parse_window


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded checkpoint with everything needed to answer.

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

    @property
    def lm(self):
        return self.config.lm if isinstance(self.config, MedVConfig) else self.config

    @property
    def takes_images(self) -> bool:
        return self.image_config is not None


def max_crops_for(image_config: ImageConfig) -> int:
    """Crop slots the largest image can need: 1 (square/pad) or base crop + the biggest grid."""
    if not image_config.is_anyres:
        return 1
    crop = image_config.crop_size
    return 1 + max((w // crop) * (h // crop) for w, h in image_config.grid_pinpoints)


def load_model(
    checkpoint: str,
    tokenizer: str,
    *,
    system_prompt: str | None = "medical",
    question_suffix: str = "",
    param_dtype: str | None = None,
    dtype: str | None = None,
    attention_impl: str | None = None,
    allow_tokenizer_mismatch: bool = False,
    weight_quant: str | None = None,
    merge_adapters: bool = False,
) -> Model:
    """Load a converted checkpoint and its tokenizer (``medv_jax.sampling.cli.load_model``).

    ``weight_quant``: "int8" / "int4" quantizes the LM's dense kernels (weight-only, per output
    channel), "none" keeps them float, None as stored. ``merge_adapters``: an adapters checkpoint
    is merged into its base's kernels instead of computed beside them."""
    args = argparse.Namespace(
        checkpoint=checkpoint,
        tokenizer=tokenizer,
        param_dtype=param_dtype,
        dtype=dtype,
        attention_impl=attention_impl,
        allow_tokenizer_mismatch=allow_tokenizer_mismatch,
        weight_quant=weight_quant,
        merge_adapters=merge_adapters,
    )
    config, params, tok = cli.load_model(args)
    image_config = mm.image_config_for(config) if isinstance(config, MedVConfig) else None
    return Model(
        config=config,
        params=params,
        tokenizer=tok,
        system_prompt=mm.system_prompt_for(system_prompt),
        question_suffix=question_suffix,
        image_config=image_config,
        max_crops=max_crops_for(image_config) if image_config is not None else 0,
        name=os.path.normpath(checkpoint),
    )


# ----------------------------------------------------------------------------------------------
# Inputs


def load_image(model: Model, path: str, window: str = "auto") -> tuple[Any, PreprocessedImage]:
    """An uploaded file -> (the 8-bit RGB image the model sees, its preprocessed form).

    window: DICOM display window, one of DICOM_WINDOWS or "center,width" (ignored for other
    formats). Raises UserError naming the file.
    """
    from medv_jax.data import image_io

    name = os.path.basename(path)
    if not model.takes_images:
        raise UserError(f"{name}: this checkpoint is a text-only LLaDA model; ask without an image")
    try:
        rgb = image_io.load_image(path, dicom_window=parse_window(window))
        return rgb, image_lib.preprocess_pil(rgb, model.image_config)
    except UserError:
        raise
    except ImportError as e:  # DICOM without pydicom
        raise UserError(f"{name}: {e}") from e
    except (ImageReadError, OSError, ValueError) as e:
        raise UserError(f"cannot read {name!r} as an image (PNG, JPEG, ... or DICOM): {e}") from e


@dataclasses.dataclass(frozen=True)
class RejectedImage:
    """The page's image after an upload that could not be read: questions are refused until
    another image is loaded or the file removed, never answered without the image."""

    name: str
    reason: str


def is_dicom(path: str) -> bool:
    """Whether ``path`` is read as DICOM (by extension or the DICM magic), as image_io decides."""
    from medv_jax.data import image_io

    return image_io._is_dicom_path(path)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One sampler setting of the page, read off ``SamplerConfig`` by introspection so that options
    added to the sampler later (e.g. the fast modes) appear without changes here.

    name: "gen_length", or "cache" (an optional sub-config: the on/off switch) and "cache.mode"
    (one of its fields). default: the value the page opens with; choices: allowed strings (a
    tuple constant of the sampler module that holds the default, e.g. REMASKING), else None.
    """

    name: str
    default: Any
    choices: tuple[str, ...] | None = None
    help: str = ""

    @property
    def parent(self) -> str | None:
        return self.name.split(".")[0] if "." in self.name else None


def _choices_for(cls: type, value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, str):
        return None
    module = sys.modules[cls.__module__]
    for const in vars(module).values():
        if isinstance(const, tuple) and const and all(isinstance(c, str) for c in const) and value in const:
            return const
    return None


def _optional_dataclass(cls: type, name: str) -> type | None:
    """The dataclass X of a field annotated ``X | None`` (None for any other field)."""
    hint = typing.get_type_hints(cls).get(name)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def settings_of(defaults: SamplerConfig = SamplerConfig()) -> list[Setting]:
    """Every setting of SamplerConfig, flattened (sub-config fields after their switch)."""
    out = []
    for field in dataclasses.fields(SamplerConfig):
        value = getattr(defaults, field.name)
        sub = _optional_dataclass(SamplerConfig, field.name)
        if sub is None:
            out.append(Setting(field.name, value, _choices_for(SamplerConfig, value)))
            continue
        out.append(Setting(field.name, value is not None, help=sub.__name__))
        sub_defaults = value if value is not None else sub()
        for sf in dataclasses.fields(sub):
            sv = getattr(sub_defaults, sf.name)
            out.append(Setting(f"{field.name}.{sf.name}", sv, _choices_for(sub, sv)))
    return out


def sampler_config_from(settings: Mapping[str, Any]) -> SamplerConfig:
    """Page settings (flat names as in ``settings_of``) -> SamplerConfig. Numbers coming from the
    page as floats become ints where the field is an int. Raises UserError naming the setting."""
    values = {}
    for field in dataclasses.fields(SamplerConfig):
        sub = _optional_dataclass(SamplerConfig, field.name)
        if sub is None:
            if field.name in settings:
                if settings[field.name] is None or settings[field.name] == "":
                    raise UserError(f"sampler setting {field.name} is empty: give a value")
                values[field.name] = coerce(field.name, settings[field.name], field.default)
            continue
        if not settings.get(field.name):
            values[field.name] = None
            continue
        sub_values = {}
        for sf in dataclasses.fields(sub):
            key = f"{field.name}.{sf.name}"
            if key in settings:
                if settings[key] is None or settings[key] == "":
                    raise UserError(f"sampler setting {key} is empty: give a value")
                sub_values[sf.name] = coerce(key, settings[key], sf.default)
        try:
            values[field.name] = sub(**sub_values)
        except (ValueError, TypeError) as e:
            raise UserError(f"sampler setting {field.name}: {e}") from e
    try:
        return SamplerConfig(**values)
    except (ValueError, TypeError) as e:
        raise UserError(f"sampler settings: {e}") from e


def coerce(name: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the field's ``default`` (bool, int, float or str)."""
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name}={value!r} must be a whole number") from None
        if not np.isfinite(as_float) or as_float != int(as_float):
            raise UserError(f"{name}={value!r} must be a whole number")
        return int(as_float)
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name}={value!r} must be a number") from None
    return value


def build_prompt(
    model: Model,
    history: Sequence[tuple[str, str]],
    question: str,
    image: PreprocessedImage | None,
) -> mm.PromptRow:
    """docs/algorithm.md §3 prompt of a chat: earlier (question, answer) turns, then the new question and the
    assistant header. The image (if any) sits at the start of the first user turn."""
    question = (question or "").strip()
    if not question:
        raise UserError("type a question first")
    questions = [q.replace(conv.IMAGE_PLACEHOLDER, "").strip() + model.question_suffix
                 for q in [q for q, _ in history] + [question]]
    record = conv.chat_record(questions, [a for _, a in history], has_image=image is not None, sample_id="chat")
    return mm.prompt_row(model.tokenizer, record, image, model.system_prompt)


def prompt_length_for(model: Model, n_tokens: int, gen_length: int, bucket: int) -> int:
    """The padded prompt length: ``n_tokens`` rounded up to ``bucket``, at most what fits in front
    of ``gen_length`` answer positions. Raises UserError if the prompt itself does not fit."""
    room = model.lm.max_position_embeddings - gen_length
    if n_tokens > room:
        raise UserError(
            f"the prompt ({n_tokens} tokens, chat history included) + gen_length {gen_length} exceed "
            f"the model's {model.lm.max_position_embeddings} positions: lower gen_length or clear the chat"
        )
    return min(mm.round_up(n_tokens, bucket), room)


# ----------------------------------------------------------------------------------------------
# Generation


@dataclasses.dataclass
class Answer:
    """One generated answer and how it came about.

    frames: the answer canvas after each step the sampler ran (token ids, None = still masked).
    """

    text: str
    token_ids: list[int]
    frames: list[list[int | None]]
    steps_used: int
    steps_scheduled: int
    prompt_tokens: int
    prompt_length: int
    sample_s: float
    compile_s: float  # 0 when an already compiled program ran

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / max(self.sample_s, 1e-9)


class Engine:
    """A loaded model plus the set of (sampler plan, prompt length) programs already compiled.

    Programs come from the sampler's own jit caches (``sample_medv`` / ``generate_text``), keyed
    here by the sampler's static plan and the padded prompt length (seeds, temperature and CFG
    values are traced and never recompile). ``answer`` holds a
    lock: one generation at a time on the device (the page's queue already does this; the lock
    keeps direct callers safe too)."""

    def __init__(self, model: Model, prompt_bucket: int = 128):
        if prompt_bucket <= 0:
            raise ValueError(f"prompt_bucket={prompt_bucket} must be positive")
        self.model = model
        self.prompt_bucket = prompt_bucket
        self.compiled: set[tuple] = set()
        self._lock = threading.Lock()

    def batch_for(self, row: mm.PromptRow, prompt_length: int) -> mm.PromptBatch:
        m = self.model
        return mm.collate_prompts(
            [row],
            pad_id=m.lm.eos_token_id,
            crop_size=m.config.vision.image_size,
            prompt_length=prompt_length,
            max_crops=m.max_crops,
        )

    def _sample(self, row: mm.PromptRow, prompt_length: int, sc: SamplerConfig, rng) -> SampleOutput:
        m = self.model
        if m.takes_images:
            out = mm.sample_medv(m.config, m.params, self.batch_for(row, prompt_length), rng, sc)
        else:
            out = generate_text(m.lm, m.params, [row.tokens], rng, sc, length=prompt_length)
        return jax.block_until_ready(out)

    def answer(
        self,
        history: Sequence[tuple[str, str]],
        question: str,
        image: PreprocessedImage | RejectedImage | None,
        sampler_config: SamplerConfig,
        seed: int = 0,
    ) -> Answer:
        """Answer ``question`` (after the ``history`` turns) about ``image``. Raises UserError for
        a question / settings the sampler cannot take, or an image that could not be read."""
        m = self.model
        if isinstance(image, RejectedImage):
            raise UserError(
                f"the uploaded file {image.name!r} could not be read ({image.reason}): "
                "upload another image, or remove it to ask without one"
            )
        if image is not None and not m.takes_images:
            raise UserError("this checkpoint is a text-only LLaDA model; remove the image")
        row = build_prompt(m, history, question, image)
        n = len(row.tokens)
        prompt_length = prompt_length_for(m, n, sampler_config.gen_length, self.prompt_bucket)
        rng = jax.random.key(int(seed))
        key = (sampler_config._plan(), prompt_length)
        with self._lock:
            compile_s = 0.0
            if key not in self.compiled:
                # First use of this shape: this run compiles (timed as compile + one generation);
                # the timed run below then measures sampling alone.
                t0 = time.perf_counter()
                self._sample(row, prompt_length, sampler_config, rng)
                compile_s = time.perf_counter() - t0
                self.compiled.add(key)
            t0 = time.perf_counter()
            out = self._sample(row, prompt_length, sampler_config, rng)
            sample_s = time.perf_counter() - t0
        compile_s = max(compile_s - sample_s, 0.0) if compile_s else 0.0
        tokens = np.asarray(out.tokens[0])
        length = int(out.answer_length[0])
        steps_run = int(out.steps_run[0])
        ids = [int(i) for i in tokens[:length]]
        return Answer(
            text=cli.decode(m.tokenizer, ids),
            token_ids=ids,
            frames=replay(tokens, np.asarray(out.commit_step[0]), steps_run, m.lm.eot_token_id),
            steps_used=steps_run,
            steps_scheduled=sampler_config.steps,
            prompt_tokens=n,
            prompt_length=prompt_length,
            sample_s=sample_s,
            compile_s=compile_s,
        )


def render_frame(model: Model, frame: Sequence[int | None], placeholder: str = MASK_GLYPH) -> str:
    """A replayed canvas as text, masked positions as ``placeholder``."""
    return cli.render_frame(model.tokenizer, frame, placeholder)
