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

import dataclasses
import os
import sys
import threading
import typing
from typing import Any, Mapping, Sequence

import numpy as np

from medv_jax import user_errors
from medv_jax.data import dicom
from medv_jax.data.image import PreprocessedImage
from medv_jax.data.image_io import ImageReadError
from medv_jax.sampling import api
from medv_jax.sampling import multimodal as mm
from medv_jax.sampling.diffusion import SamplerConfig, replay

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


# The loaded model is the Python API's (``medv_jax.sampling.api``): the page loads with ``api.load``.
Model = api.Model
max_crops_for = api.max_crops_for


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
    except UserError:
        raise
    except ImportError as e:  # DICOM without pydicom
        raise UserError(f"{name}: {e}") from e
    except (ImageReadError, OSError, ValueError) as e:
        raise UserError(f"cannot read {name!r} as an image (PNG, JPEG, ... or DICOM): {e}") from e
    return rgb, model.image(rgb, name=repr(name))


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
    """docs/algorithm.md §3 prompt of a chat (``Model.prompt``): earlier (question, answer)
    turns, then the new question and the assistant header."""
    if not (question or "").strip():
        raise UserError("type a question first")
    return model.prompt(question, image, history, sample_id="chat")


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

    Programs are the model's (``api.Model.run`` compiles each once), keyed here by the
    sampler's static plan and the padded prompt length (seeds, temperature and CFG values are
    traced and never recompile). ``answer`` holds a lock: one generation at a time on the device (the page's queue already does this; the lock
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
        key = (sampler_config._plan(), prompt_length)
        with self._lock:
            out = m.run([row], [api.row_key(seed)], sampler_config, prompt_width=prompt_length)[0]
            self.compiled.add(key)
        return Answer(
            text=out.text,
            token_ids=out.token_ids,
            frames=replay(out.tokens, out.commit_step, out.steps, m.lm.eot_token_id),
            steps_used=out.steps,
            steps_scheduled=sampler_config.steps,
            prompt_tokens=n,
            prompt_length=prompt_length,
            sample_s=out.seconds,
            compile_s=out.compile_seconds,
        )


def render_frame(model: Model, frame: Sequence[int | None], placeholder: str = MASK_GLYPH) -> str:
    """A replayed canvas as text, masked positions as ``placeholder``."""
    return api.render_frame(model.tokenizer, frame, placeholder)
