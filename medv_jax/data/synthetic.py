"""An embedded synthetic medical-VQA set: procedurally drawn grayscale "scans", generated on the fly.

Nothing is downloaded or stored: record `i` of a split is drawn deterministically from
`(seed, split, i)` (a numpy SeedSequence), so train and test never share a random stream.

What a scan shows (all large and high-contrast, so a tiny tower sees it at 64 x 64 pixels):

* modality ("ct", "mri", "x-ray"), told apart by global appearance:
  CT: black background, smooth flat tissue (faint noise), very bright bone, sharp edges.
  MRI: black background, grainy tissue with a coarse blotchy texture and a left-to-right bias
  field, dark bone (skull), bright lesions.
  X-ray: grey background with a vertical gradient, blurred edges, vertical streaks, bright bone.
* body region ("brain", "chest", "abdomen"), as a shape: a tall oval head with a skull ring and
  ventricles; a wide chest with two large dark lungs, a heart and the spine; a wide abdomen with a big
  liver on the image's left, two kidneys and the spine.
* 0 to 3 lesions: bright discs (small or large), each in the left or the right half of the image
  (at most 2 per side); with `layout="slots"` each lesion fills one of its side's two quadrants.
  "left"/"right" are the IMAGE's left and right (not the patient's).

Questions (one question-answer pair per record):

* closed (yes/no), e.g. "Is this an MRI scan?", "Is there a lesion on the left side?". Records
  2k and 2k+1 ask the same question with opposite answers (the answer is fixed first and the scene
  drawn conditioned on it), so every question string is answered "yes" exactly half the time
  (over whole pairs) and the question alone predicts nothing.
* open, with short answers drawn uniformly over their answer set first, the same way: modality,
  region, lesion side ("left"/"right"/"both"), lesion count ("none".."three"), and a side's
  findings with sizes ("What is seen on the left side?" -> "one small and one large lesion"; its
  words are the reports', so the demo tokenizer leaves it out).
* captions for stage 1 ("MRI scan of the chest with one large lesion on the left side.").

Records are LLaVA records::

    {"id": "synth-train-17", "image": <PIL.Image mode "L">,
     "conversations": [{"from": "human", "value": "<image>\\nIs this an MRI scan?"},
                       {"from": "gpt", "value": "yes"}],
     "answer_type": "closed", "question_type": "modality", "template": "Is this an MRI scan?",
     "meta": {"modality": "mri", "region": "chest", "lesions": [...]}}

`vocabulary()` lists every word used (lowercase), so a tokenizer can give each one a single token.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

MODALITIES = ("ct", "mri", "x-ray")
REGIONS = ("brain", "chest", "abdomen")
SIDES = ("left", "right")
SIZES = ("small", "large")
MAX_LESIONS = 3
MAX_PER_SIDE = 2
COUNT_WORDS = ("none", "one", "two", "three")
# A side's lesions with their sizes (at most MAX_PER_SIDE), as the reports and the "findings"
# questions state them.
SIDE_FINDINGS = ("no lesions", "one small lesion", "one large lesion", "two small lesions",
                 "one small and one large lesion", "two large lesions")

_MODALITY_DISPLAY = {"ct": "CT", "mri": "MRI", "x-ray": "X-ray"}
_SPLIT_CODES = {"train": 0, "test": 1, "validation": 2, "val": 2}
_PAIR_STREAM = 7919  # 4th seed word: the per-pair stream never equals a per-record one

# Label map values used while drawing.
_BG, _BODY, _BONE, _AIR, _ORGAN, _LESION = range(6)

# Lesion geometry in unit coordinates (x right, y down); radii for 'small' / 'large'.
_LESION_RADIUS = {"small": (0.065, 0.075), "large": (0.105, 0.12)}
_LESION_X = {"left": (0.27, 0.40), "right": (0.60, 0.73)}
_LESION_Y = (0.30, 0.70)
# The "slots" layout: each side has an upper and a lower slot, one in each of its two quadrants
# (a 32 px patch at 64 px), and a lesion fills one slot. A lesion then lies in one patch of a tower
# with 32 px patches (or of 16 px patches: each slot is one cell of the 4 x 4 grid), so a side's
# count is the number of patches with a lesion. In the "free" layout lesions straddle patches and a
# tiny tower trained for minutes confuses two small lesions with one large one and one side with
# the other (docs/mini_recipe.md).
_SLOT_X = {"left": 0.375, "right": 0.625}
_SLOT_Y = (0.375, 0.625)
_SLOT_JITTER = 0.01
# Slot lesions' radii: the small ones smaller than in the free layout, so that a large lesion has
# at least three times a small one's area. With the free layout's radii (twice the area) the tiny
# tower's reading of sizes was a matter of seed: teacher-forced size words right in 99-100 % of
# held-out captions on two stage-1 seeds, 84 % on a third (docs/mini_recipe.md, "What the reading
# needed").
_SLOT_RADIUS = {"small": (0.05, 0.06), "large": (0.105, 0.12)}
LAYOUTS = ("free", "slots")


# ----------------------------------------------------------------------------------------------
# Scenes


@dataclasses.dataclass(frozen=True)
class Lesion:
    x: float  # centre, unit coordinates
    y: float
    radius: float
    side: str  # "left" | "right" (image side)
    size: str  # "small" | "large"


@dataclasses.dataclass(frozen=True)
class Scene:
    modality: str
    region: str
    lesions: tuple[Lesion, ...]

    @property
    def count(self) -> int:
        return len(self.lesions)

    def has_lesion_on(self, side: str) -> bool:
        return any(l.side == side for l in self.lesions)

    @property
    def lesion_side(self) -> str | None:
        """"left", "right", "both", or None without lesions."""
        sides = {l.side for l in self.lesions}
        if not sides:
            return None
        return sides.pop() if len(sides) == 1 else "both"

    def without_lesions(self) -> "Scene":
        return dataclasses.replace(self, lesions=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "region": self.region,
            "lesions": [dataclasses.asdict(l) for l in self.lesions],
        }


def _sample_outline(rng: np.random.Generator) -> Scene:
    """Modality, region, lesion count, sides and sizes from the prior; positions not yet drawn."""
    modality = MODALITIES[rng.integers(len(MODALITIES))]
    region = REGIONS[rng.integers(len(REGIONS))]
    count = int(rng.integers(MAX_LESIONS + 1))
    while True:
        sides = [SIDES[i] for i in rng.integers(2, size=count)]
        if all(sides.count(s) <= MAX_PER_SIDE for s in SIDES):
            break
    lesions = tuple(Lesion(float("nan"), float("nan"), 0.0, side, SIZES[rng.integers(2)]) for side in sides)
    return Scene(modality, region, lesions)


def _place_lesions(scene: Scene, rng: np.random.Generator, layout: str = "free") -> Scene:
    """Draws radius and a non-overlapping position for each lesion, in its side's half ("free"), or
    in a slot of its side ("slots": a side's one lesion takes the upper or the lower slot)."""
    if layout == "slots":
        return _place_in_slots(scene, rng)
    placed: list[Lesion] = []
    for l in scene.lesions:
        r = float(rng.uniform(*_LESION_RADIUS[l.size]))
        for _ in range(200):
            x = float(rng.uniform(*_LESION_X[l.side]))
            y = float(rng.uniform(*_LESION_Y))
            if all((x - o.x) ** 2 + (y - o.y) ** 2 >= (r + o.radius + 0.03) ** 2 for o in placed):
                break
        placed.append(Lesion(x, y, r, l.side, l.size))
    return dataclasses.replace(scene, lesions=tuple(placed))


def _place_in_slots(scene: Scene, rng: np.random.Generator) -> Scene:
    placed: list[Lesion] = []
    for side in SIDES:
        mine = [l for l in scene.lesions if l.side == side]
        slots = list(_SLOT_Y) if len(mine) == len(_SLOT_Y) else [_SLOT_Y[rng.integers(len(_SLOT_Y))]]
        for l, y in zip(mine, slots):
            r = float(rng.uniform(*_SLOT_RADIUS[l.size]))
            dx, dy = rng.uniform(-_SLOT_JITTER, _SLOT_JITTER, size=2)
            placed.append(Lesion(_SLOT_X[side] + float(dx), y + float(dy), r, side, l.size))
    return dataclasses.replace(scene, lesions=tuple(placed))


def scene_outlines() -> list[Scene]:
    """Every scene the prior can draw, up to lesion positions and radii (left NaN / 0): modality,
    region and each lesion's side and size, which is all that any record's text depends on."""
    per_side = [sizes for n in range(MAX_PER_SIDE + 1) for sizes in itertools.combinations_with_replacement(SIZES, n)]
    out = []
    for modality, region in itertools.product(MODALITIES, REGIONS):
        for sides in itertools.product(per_side, repeat=len(SIDES)):
            if sum(map(len, sides)) <= MAX_LESIONS:
                lesions = tuple(Lesion(float("nan"), float("nan"), 0.0, side, size)
                                for side, sizes in zip(SIDES, sides) for size in sizes)
                out.append(Scene(modality, region, lesions))
    return out


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"lesion layout must be one of {LAYOUTS}, got {layout!r}")


def sample_scene(rng: np.random.Generator, layout: str = "free") -> Scene:
    """A scene from the prior: modality, region uniform; 0..3 lesions uniform, sides uniform with at
    most 2 per side, sizes uniform, non-overlapping positions (`layout`: see `_place_lesions`)."""
    _check_layout(layout)
    return _place_lesions(_sample_outline(rng), rng, layout)


def sample_scene_where(rng: np.random.Generator, predicate, max_tries: int = 10_000,
                       layout: str = "free") -> Scene:
    """Rejection sampling from the prior: the first scene with `predicate(scene)` true. The
    predicate sees modality, region and each lesion's side and size (positions come after)."""
    _check_layout(layout)
    for _ in range(max_tries):
        scene = _sample_outline(rng)
        if predicate(scene):
            return _place_lesions(scene, rng, layout)
    raise RuntimeError("no scene satisfies the constraint")


# ----------------------------------------------------------------------------------------------
# Rendering


def _ellipse(xx, yy, cx, cy, rx, ry):
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each [size, size], in the unit square (read-only)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = np.meshgrid(c, c)
    xx.flags.writeable = yy.flags.writeable = False
    return xx, yy


def _label_map(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size] map of tissue classes; slight random jitter of the anatomy."""
    xx, yy = _grid(size)
    j = lambda s=0.02: float(rng.uniform(-s, s))  # noqa: E731
    lab = np.full((size, size), _BG, np.uint8)
    cx, cy = 0.5 + j(0.015), 0.5 + j(0.015)
    if scene.region == "brain":
        rx, ry = 0.40 + j(), 0.45 + j()
        outer = _ellipse(xx, yy, cx, cy, rx, ry)
        inner = _ellipse(xx, yy, cx, cy, rx - 0.06, ry - 0.06)
        lab[outer] = _BONE
        lab[inner] = _BODY
        for dx in (-0.07, 0.07):  # ventricles
            lab[_ellipse(xx, yy, cx + dx, cy - 0.02, 0.04, 0.12)] = _ORGAN
        interior = inner
    elif scene.region == "chest":
        rx, ry = 0.47 + j(), 0.36 + j()
        body = _ellipse(xx, yy, cx, cy, rx, ry)
        lab[body] = _BODY
        for dx in (-0.19, 0.19):  # lungs
            lab[_ellipse(xx, yy, cx + dx, cy - 0.02, 0.15 + j(0.01), 0.25 + j(0.01))] = _AIR
        lab[_ellipse(xx, yy, cx + 0.02, cy + 0.08, 0.09, 0.09)] = _ORGAN  # heart
        lab[_ellipse(xx, yy, cx, cy + 0.29, 0.09, 0.03)] = _BONE  # vertebra (flat, not a disc)
        interior = body
    else:  # abdomen
        rx, ry = 0.45 + j(), 0.40 + j()
        body = _ellipse(xx, yy, cx, cy, rx, ry)
        lab[body] = _BODY
        lab[_ellipse(xx, yy, cx - 0.15, cy - 0.1, 0.2 + j(0.01), 0.16 + j(0.01))] = _ORGAN  # liver
        for dx in (-0.2, 0.2):  # kidneys
            lab[_ellipse(xx, yy, cx + dx, cy + 0.18, 0.06, 0.09)] = _ORGAN
        lab[_ellipse(xx, yy, cx, cy + 0.3, 0.09, 0.03)] = _BONE  # vertebra (flat, not a disc)
        interior = body
    for l in scene.lesions:
        lab[_ellipse(xx, yy, l.x, l.y, l.radius, l.radius) & interior] = _LESION
    return lab


# Intensity of each tissue class per modality: bg, body, bone, air, organ, lesion.
_INTENSITY = {
    "ct": np.array([0.0, 0.42, 0.97, 0.06, 0.58, 0.9], np.float32),
    "mri": np.array([0.0, 0.5, 0.15, 0.06, 0.28, 1.0], np.float32),
    "x-ray": np.array([0.3, 0.5, 0.9, 0.22, 0.6, 0.95], np.float32),
}


def _upsampled_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise: a cells x cells grid of N(0,1) bilinearly upsampled to size x size."""
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(g, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, np.float32)


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size] grayscale scan of `scene`. Textures and anatomy jitter come from `rng`;
    the same rng state gives the same pixels (so a scene and its lesion-free twin can be compared)."""
    lab = _label_map(scene, size, rng)
    x = _INTENSITY[scene.modality][lab]
    fine = rng.standard_normal((size, size), dtype=np.float32)
    c = _grid(size)[0][0]
    if scene.modality == "ct":
        x = x + 0.012 * fine * (lab != _BG)
    elif scene.modality == "mri":
        inside = lab != _BG
        coarse = _upsampled_noise(rng, size, max(2, size // 8))
        bias = 0.8 + 0.4 * c[None, :]  # left-to-right bias field
        x = (x * (1.0 + 0.2 * coarse) * bias + 0.07 * fine) * inside
    else:  # x-ray: projection look
        x = x + 0.25 * (c[:, None] - 0.5)  # vertical gradient
        streaks = rng.standard_normal(size, dtype=np.float32)
        x = x + 0.06 * streaks[None, :] + 0.02 * fine
    x = np.clip(x, 0.0, 1.0)
    img = (x * 255.0 + 0.5).astype(np.uint8)
    if scene.modality == "x-ray":
        img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=size / 64.0)))
    return img


# ----------------------------------------------------------------------------------------------
# Questions


@dataclasses.dataclass(frozen=True)
class ClosedQuestion:
    """A yes/no question string and its truth function."""

    family: str
    text: str
    truth: Any  # Callable[[Scene], bool]


@dataclasses.dataclass(frozen=True)
class OpenQuestion:
    """A question string, its answer set and the answer function (None: not askable here)."""

    family: str
    text: str
    answers: tuple[str, ...]
    answer: Any  # Callable[[Scene], str | None]


def side_findings(scene: Scene, side: str) -> str:
    """What a side shows, in the reports' words: "no lesions", "one small lesion", ...,
    "one small and one large lesion" (one of `SIDE_FINDINGS`)."""
    sizes = [l.size for l in scene.lesions if l.side == side]
    return _sizes_phrase(sizes) if sizes else "no lesions"


def _closed_questions() -> tuple[ClosedQuestion, ...]:
    qs = [
        ClosedQuestion("modality", "Is this a CT scan?", lambda s: s.modality == "ct"),
        ClosedQuestion("modality", "Is this an MRI scan?", lambda s: s.modality == "mri"),
        ClosedQuestion("modality", "Is this an X-ray?", lambda s: s.modality == "x-ray"),
        ClosedQuestion("region", "Does this image show the brain?", lambda s: s.region == "brain"),
        ClosedQuestion("region", "Does this image show the chest?", lambda s: s.region == "chest"),
        ClosedQuestion("region", "Does this image show the abdomen?", lambda s: s.region == "abdomen"),
        ClosedQuestion("presence", "Is there a lesion?", lambda s: s.count > 0),
        ClosedQuestion("normal", "Is this scan normal?", lambda s: s.count == 0),
        ClosedQuestion("side", "Is there a lesion on the left side?", lambda s: s.has_lesion_on("left")),
        ClosedQuestion("side", "Is there a lesion on the right side?", lambda s: s.has_lesion_on("right")),
        ClosedQuestion("multiple", "Is there more than one lesion?", lambda s: s.count > 1),
    ]
    return tuple(qs)


def _open_questions() -> tuple[OpenQuestion, ...]:
    return (
        OpenQuestion("modality", "What modality is this?", MODALITIES, lambda s: s.modality),
        OpenQuestion("region", "Which part of the body is shown?", REGIONS, lambda s: s.region),
        OpenQuestion("side", "On which side is the lesion?", ("left", "right", "both"), lambda s: s.lesion_side),
        OpenQuestion("count", "How many lesions are there?", COUNT_WORDS, lambda s: COUNT_WORDS[s.count]),
        *(OpenQuestion("findings", f"What is seen on the {side} side?", SIDE_FINDINGS,
                       functools.partial(side_findings, side=side)) for side in SIDES),
    )


CLOSED_QUESTIONS = _closed_questions()
OPEN_QUESTIONS = _open_questions()
CLOSED_FAMILIES = tuple(dict.fromkeys(q.family for q in CLOSED_QUESTIONS))
OPEN_FAMILIES = tuple(dict.fromkeys(q.family for q in OPEN_QUESTIONS))


def caption(scene: Scene) -> str:
    """One sentence stating every attribute: modality, region, and each side's lesions with their
    sizes, e.g. "CT scan of the chest with one small lesion on the left side and two large lesions
    on the right side." (the stage-1 alignment captions)."""
    head = f"{_MODALITY_DISPLAY[scene.modality]} scan of the {scene.region}"
    parts = []
    for side in SIDES:
        sizes = [l.size for l in scene.lesions if l.side == side]
        if sizes:
            parts.append(f"{_sizes_phrase(sizes)} on the {side} side")
    return f"{head} with {' and '.join(parts) if parts else 'no lesions'}."


# ----------------------------------------------------------------------------------------------
# Findings reports: varied wording, every attribute checkable by `parse_report`

REPORT_REQUESTS = (
    "Describe the findings in this image.",
    "Write a short report of this scan.",
    "What are the findings?",
)
_STUDY_FORMS = (
    "{m} scan of the {r}.",
    "This is {a} {m} image of the {r}.",
    "The study is {a} {m} of the {r}.",
)
_ARTICLE = {"ct": "a", "mri": "an", "x-ray": "an"}
_ANATOMY = {
    "brain": "The skull and the ventricles are visible.",
    "chest": "Both lungs and the heart are visible.",
    "abdomen": "The liver and both kidneys are visible.",
}
# Each side's findings are stated once, in a sentence that does not agree in number with them
# ("The left side shows two small lesions.", "Right side: no lesions."), and nothing else in the
# report restates a lesion fact: no count sentence, no normal/abnormal impression. A finding then
# cannot be filled in from the report's other words and has to be read off the scan (reports that
# restated the findings trained models to write a likely report instead; docs/mini_recipe.md).
_SIDE_FORMS = ("The {side} side shows {what}.", "{Side} side: {what}.")
REPORT_FIELDS = ("modality", "region", "count", "left", "right")
# How a report's sentence forms are chosen: "varied", a coin flip per sentence; "house", fixed by
# the exam type (modality and region), as a department's report templates are. A house-style report
# is a function of the scan, so a model has no near-equal choices of wording to make and samplers
# can be compared word for word (docs/mini_recipe.md); the scans and the words are the same.
# "templated": the exam type's forms as "house", with the modality first in its sentence ("MRI image
# of the chest."): no article that has to agree with a modality not yet written.
REPORT_WORDINGS = ("varied", "house", "templated")
_TEMPLATED_STUDY_FORMS = ("{m} scan of the {r}.", "{m} image of the {r}.", "{m} study of the {r}.")


def _house_forms(scene: Scene) -> tuple[int, int]:
    """(study form, side form) of `scene`'s exam type: every form is some exam type's style."""
    k = MODALITIES.index(scene.modality) + REGIONS.index(scene.region)
    return k % len(_STUDY_FORMS), k % len(_SIDE_FORMS)


def _sizes_phrase(sizes: Sequence[str]) -> str:
    """"one small and one large lesion" | "two large lesions" | ... for a side's lesion sizes."""
    sizes = sorted(sizes, key=SIZES.index)
    n = len(sizes)
    if n == 1:
        return f"one {sizes[0]} lesion"
    if len(set(sizes)) == 1:
        return f"{COUNT_WORDS[n]} {sizes[0]} lesions"
    parts = [f"{COUNT_WORDS[sizes.count(z)]} {z}" for z in SIZES if z in sizes]
    return " and ".join(parts) + " lesion" + ("s" if n > 2 else "")


def report(scene: Scene, rng: np.random.Generator, wording: str = "varied") -> str:
    """A findings report of `scene` (26-38 tokens with the demo tokenizer, 26-35 templated): the
    study (modality, region), the anatomy seen, and each side's lesions with their sizes ("no
    lesions" included), every lesion fact stated once; `parse_report` reads it back. `wording`
    (REPORT_WORDINGS): "varied" draws each sentence's form from `rng`, "house" takes the exam
    type's forms, "templated" the same with the modality first. All draw the same numbers from
    `rng`, so what is drawn after the report does not depend on it."""
    if wording not in REPORT_WORDINGS:
        raise ValueError(f"report wording must be one of {REPORT_WORDINGS}, got {wording!r}")
    drawn = (int(rng.integers(len(_STUDY_FORMS))), *(int(rng.integers(len(_SIDE_FORMS))) for _ in SIDES))
    return _report_text(scene, drawn, wording)


def _report_forms(scene: Scene, wording: str) -> list[tuple[int, ...]]:
    """Every (study form, left side form, right side form) a report of `scene` can take."""
    if wording != "varied":
        study, side_form = _house_forms(scene)
        return [(study, *(side_form for _ in SIDES))]
    return list(itertools.product(range(len(_STUDY_FORMS)), *(range(len(_SIDE_FORMS)) for _ in SIDES)))


def _report_text(scene: Scene, drawn: tuple[int, ...], wording: str) -> str:
    """The report of `scene` in the forms `drawn` (what "varied" draws; the others fix them)."""
    if wording != "varied":
        drawn = _report_forms(scene, wording)[0]
    forms = _TEMPLATED_STUDY_FORMS if wording == "templated" else _STUDY_FORMS
    out = [forms[drawn[0]].format(a=_ARTICLE[scene.modality], m=_MODALITY_DISPLAY[scene.modality], r=scene.region),
           _ANATOMY[scene.region]]
    for side, form in zip(SIDES, drawn[1:]):
        out.append(_SIDE_FORMS[form].format(side=side, Side=side.capitalize(), what=side_findings(scene, side)))
    return " ".join(out)


_WORD_NUMBERS = {w: i for i, w in enumerate(COUNT_WORDS)}
_SIDE_SENTENCE = re.compile(r"(?:the (left|right) side shows|(left|right) side:) (.*)")
_SIZED = re.compile(r"\b(one|two|three) (small|large)\b")


def _side_finding(what: str) -> tuple[int, tuple[str, ...]] | None:
    """(count, sorted sizes) of a side's finding in the reports' words; None if it is not one."""
    if what == "no lesions":
        return 0, ()
    if what not in SIDE_FINDINGS:
        return None
    sizes = [(z, _WORD_NUMBERS[w]) for w, z in _SIZED.findall(what)]
    return sum(k for _, k in sizes), tuple(sorted(z for z, k in sizes for _ in range(k)))


def parse_report(text: str) -> dict[str, Any]:
    """The attributes a report states: modality and region (the first stated; None when absent),
    left / right ((count, sorted sizes) of that side's lesions; None when the side is not stated, is
    stated in words that are not a finding, or is stated twice with different findings), and count
    (the two sides' counts added; None unless both sides are known). Reads the forms `report`
    writes, in any case; anything else is ignored, so a garbled report scores as missing fields."""
    low = text.lower()
    sentences = [x.strip() for x in re.split(r"[.!?]", low) if x.strip()]
    modality = region = None
    stated: dict[str, list] = {side: [] for side in SIDES}
    for sent in sentences:
        if modality is None:
            found = re.search(r"\b(ct|mri|x-ray)\b", sent)
            modality = found.group(1) if found else None
        if region is None:
            found = re.search(r"\b(brain|chest|abdomen)\b", sent)
            region = found.group(1) if found else None
        side = _SIDE_SENTENCE.fullmatch(sent)
        if side:
            stated[side.group(1) or side.group(2)].append(_side_finding(side.group(3)))
    # A side stated twice in contradiction is not known (a report that says both is wrong).
    sides = {name: (found[0] if found and all(f == found[0] for f in found) else None)
             for name, found in stated.items()}
    count = None if None in sides.values() else sum(k for k, _ in sides.values())
    return {"modality": modality, "region": region, "count": count, **sides}


def report_fields(scene: Scene) -> dict[str, Any]:
    """The attributes of `scene` in `parse_report`'s form: what a correct report states."""
    sides = {}
    for side in SIDES:
        sizes = tuple(sorted(l.size for l in scene.lesions if l.side == side))
        sides[side] = (len(sizes), sizes)
    return {"modality": scene.modality, "region": scene.region, "count": scene.count, **sides}


def fields_correct(text: str, scene: Scene) -> dict[str, bool]:
    """For each of `REPORT_FIELDS`, whether a generated report states it correctly: a missing field
    is wrong, and so is a side with findings the scan does not have (a hallucinated lesion)."""
    got, want = parse_report(text), report_fields(scene)
    return {f: got[f] == want[f] for f in REPORT_FIELDS}


def field_accuracy(text: str, scene: Scene) -> float:
    """Share of `REPORT_FIELDS` a generated report states correctly (see `fields_correct`)."""
    return sum(fields_correct(text, scene).values()) / len(REPORT_FIELDS)


# ----------------------------------------------------------------------------------------------
# The data source


TASKS = ("vqa", "caption", "report", "text")


def _answer(question: Any, scene: Scene) -> str | None:
    """A question's answer on `scene`: "yes" / "no" for a closed one; None if an open one has none."""
    if isinstance(question, ClosedQuestion):
        return "yes" if question.truth(scene) else "no"
    return question.answer(scene)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """How records are drawn.

    task: "vqa" (question-answer records), "caption" (stage-1 caption records), "report" (a
      findings report, see `report`, scored by `field_accuracy`; with several turns asked at a
      random one of them, follow-up questions around it) or
      "text" (no image: the scan's caption is given in words, then the report request and the
      follow-up turns; text-only data for pretraining the language model).
    image_size: side of the drawn scan in pixels (draw at the tower's resolution, e.g. 64).
    closed_fraction: probability that a vqa record asks a closed question.
    closed_families / open_families: which question families to ask (see CLOSED_FAMILIES,
      OPEN_FAMILIES); a family is drawn uniformly, then a question of it uniformly.
    layout: where lesions lie: "free" (anywhere in their side's half, the demo's scans) or "slots"
      (one of two fixed slots per side, each inside one quadrant, a 32 px patch at 64 px; the miniature
      recipe's scans, see `_place_lesions`).
    report_wording: how the reports' sentence forms are chosen (REPORT_WORDINGS, see `report`):
      "varied" (a coin flip per sentence), "house" (the exam type's forms) or "templated" (the same,
      the modality first).
    report_alone: with `turns` > 1, the share of report records whose report is asked alone, in
      one turn followed by nothing, as a report is asked at inference; the others are dialogues.
    turns: question-answer turns per vqa record, all about the same image (a multi-turn dialogue
      as in LLaVA-Med's instruction data). The first turn is drawn exactly as a single-turn record
      (balanced answers); later turns ask further, distinct questions (closed or open as above)
      answered from the scene, so they carry the scene's prior. More turns give more supervised
      answers per image for little extra compute.
    """

    task: str = "vqa"
    image_size: int = 64
    closed_fraction: float = 0.5
    closed_families: tuple[str, ...] = CLOSED_FAMILIES
    open_families: tuple[str, ...] = OPEN_FAMILIES
    turns: int = 1
    layout: str = "free"
    report_wording: str = "varied"
    report_alone: float = 0.0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        _check_layout(self.layout)
        if self.report_wording not in REPORT_WORDINGS:
            raise ValueError(f"report_wording must be one of {REPORT_WORDINGS}, got {self.report_wording!r}")
        for f in self.closed_families:
            if f not in CLOSED_FAMILIES:
                raise ValueError(f"unknown closed family {f!r}; known: {CLOSED_FAMILIES}")
        for f in self.open_families:
            if f not in OPEN_FAMILIES:
                raise ValueError(f"unknown open family {f!r}; known: {OPEN_FAMILIES}")
        if not 0.0 <= self.closed_fraction <= 1.0:
            raise ValueError("closed_fraction must be in [0, 1]")
        if self.closed_fraction > 0 and not self.closed_families:
            raise ValueError("closed questions requested but no closed family given")
        if self.closed_fraction < 1 and not self.open_families:
            raise ValueError("open questions requested but no open family given")
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        if not 0.0 <= self.report_alone <= 1.0:
            raise ValueError(f"report_alone must be in [0, 1], got {self.report_alone}")


@dataclasses.dataclass(frozen=True)
class _Asked:
    text: str  # a question already asked in the dialogue (not asked again by `_more_turns`)


class SyntheticMedVQA:
    """Random-access source of synthetic LLaVA records (grain's RandomAccessDataSource protocol).

    `SyntheticMedVQA("train", 20000, seed=0)[i]` is the same record every time, on every host.
    Splits draw from disjoint random streams (`(seed, split code, i)`).
    """

    def __init__(self, split: str = "train", size: int = 10_000, *, seed: int = 0,
                 config: SyntheticConfig | None = None, **config_kwargs: Any):
        if split not in _SPLIT_CODES:
            raise ValueError(f"unknown split {split!r}; known: {tuple(_SPLIT_CODES)}")
        if config is not None and config_kwargs:
            raise ValueError("pass either config or config keywords")
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self.config = config or SyntheticConfig(**config_kwargs)
        fams = self.config.closed_families
        self._closed = {f: [q for q in CLOSED_QUESTIONS if q.family == f] for f in fams}
        self._open = {f: [q for q in OPEN_QUESTIONS if q.family == f] for f in self.config.open_families}

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"SyntheticMedVQA(split={self.split!r}, size={self.size}, seed={self.seed}, config={self.config})"

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODES[self.split], int(index)])

    def describe(self, index: int) -> dict[str, Any]:
        """Record `index` without its image: the scene and the question-answer fields (cheap; the
        image is `render_scene(describe(i)["scene"], image_size, <the rng left after this>)`)."""
        return self._describe(int(index), self.rng(int(index)))

    def _describe(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} records")
        if self.config.task == "caption":
            scene = sample_scene(rng, self.config.layout)
            return dict(scene=scene, question="Describe the image briefly.", answer=caption(scene),
                        answer_type="caption", question_type="caption")
        if self.config.task in ("report", "text"):
            scene = sample_scene(rng, self.config.layout)
            request = REPORT_REQUESTS[rng.integers(len(REPORT_REQUESTS))]
            question = f"{caption(scene)}\n{request}" if self.config.task == "text" else request
            out = dict(scene=scene, question=question, answer=report(scene, rng, self.config.report_wording),
                       answer_type="report",
                       question_type="report")
            # (drawn only for dialogues that ask for it: other records, test splits included, stay
            # as they were)
            alone = self.config.turns > 1 and self.config.report_alone > 0 and rng.uniform() < self.config.report_alone
            if self.config.turns > 1 and not alone:
                # The report is asked at a uniformly drawn turn, the follow-ups around it: a report
                # that ends a dialogue is followed by the end-of-text padding, as at inference when
                # it is asked first and answered on an open canvas; one that does not is followed by
                # more questions (a report asked first every time never learns where to stop).
                others = self._more_turns(scene, _Asked(request), rng)
                at = int(rng.integers(self.config.turns))
                out["dialogue"] = others[:at] + [(question, out["answer"])] + others[at:]
            return out
        # Records 2k and 2k+1 form a pair: same question, opposite closed answers (drawn from a
        # pair stream), so every closed question is answered yes exactly as often as no.
        pair = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index // 2, _PAIR_STREAM])
        if pair.uniform() < self.config.closed_fraction:
            fams = list(self._closed)
            qs = self._closed[fams[pair.integers(len(fams))]]
            q = qs[pair.integers(len(qs))]
            want = bool(pair.integers(2) ^ (index % 2))
            scene = sample_scene_where(rng, lambda s: q.truth(s) == want, layout=self.config.layout)
            answer, answer_type = ("yes" if want else "no"), "closed"
        else:
            fams = list(self._open)
            qs = self._open[fams[pair.integers(len(fams))]]
            q = qs[pair.integers(len(qs))]
            answer = q.answers[rng.integers(len(q.answers))]
            scene = sample_scene_where(rng, lambda s: q.answer(s) == answer, layout=self.config.layout)
            answer_type = "open"
        out = dict(scene=scene, question=q.text, answer=answer, answer_type=answer_type, question_type=q.family)
        if self.config.turns > 1:
            out["more_turns"] = self._more_turns(scene, q, rng)
        return out

    def _more_turns(self, scene: Scene, first: Any, rng: np.random.Generator) -> list[tuple[str, str]]:
        """(question, answer) of turns 2.., distinct questions answerable on `scene`."""
        asked, turns = {first.text}, []
        candidates = self._questions()
        for _ in range(self.config.turns - 1):
            closed = rng.uniform() < self.config.closed_fraction
            pool = [q for q in candidates if q.text not in asked and isinstance(q, ClosedQuestion) == closed
                    and (closed or q.answer(scene) is not None)]
            if not pool:  # that kind is used up: take any unasked answerable question
                pool = [q for q in candidates if q.text not in asked
                        and (isinstance(q, ClosedQuestion) or q.answer(scene) is not None)]
            if not pool:
                break
            q = pool[rng.integers(len(pool))]
            asked.add(q.text)
            turns.append((q.text, _answer(q, scene)))
        return turns

    def _questions(self) -> list[Any]:
        """The configured families' questions, closed first (the order `_more_turns` draws from)."""
        return [q for f in self._closed.values() for q in f] + [q for f in self._open.values() for q in f]

    def _conversations(self, dialogue: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
        conversations = []
        for question, answer in dialogue:
            if not conversations and self.config.task != "text":
                question = f"<image>\n{question}"  # the image comes with the first message
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return conversations

    def _first_turns(self, scene: Scene) -> list[tuple[str, str]]:
        """Every (question, answer) a record of `scene` can open with."""
        task, wording = self.config.task, self.config.report_wording
        if task == "caption":
            return [("Describe the image briefly.", caption(scene))]
        if task in ("report", "text"):
            head = f"{caption(scene)}\n" if task == "text" else ""
            return [(head + request, _report_text(scene, forms, wording))
                    for request in REPORT_REQUESTS for forms in _report_forms(scene, wording)]
        return self._follow_ups(scene)

    def _follow_ups(self, scene: Scene) -> list[tuple[str, str]]:
        """Every (question, answer) of the configured families that `scene` answers."""
        return [(q.text, a) for q in self._questions() if (a := _answer(q, scene)) is not None]

    def longest_record(self, length: Any) -> dict[str, Any]:
        """A record at least as long as any this source can draw, by `length` (a record's formatted
        length in tokens, e.g. `pipeline.record_length` with the training tokenizer and format):
        over every scene outline (`scene_outlines`), the longest first turn, then the `turns` - 1
        distinct follow-ups that add the most to it. Exact when a dialogue's length is the sum of
        its turns' (the chat format formats turns one by one); an upper bound in any case, as
        follow-ups are drawn from these. Its words are a record's; its image is blank."""
        blank = Image.new("L", (self.config.image_size,) * 2)
        more = self.config.turns - 1 if self.config.task != "caption" else 0

        def record(dialogue):
            out = {"id": f"synth-{self.split}-longest", "conversations": self._conversations(dialogue)}
            if self.config.task != "text":
                out["image"] = blank
            return out

        best, best_length = None, -1
        for scene in scene_outlines():
            first = max(self._first_turns(scene), key=lambda turn: length(record([turn])))
            base = length(record([first]))
            extra = sorted(((length(record([first, t])) - base, t) for t in self._follow_ups(scene)
                            if t[0] != first[0]), reverse=True)[:more] if more else []
            total = base + sum(n for n, _ in extra)
            if total > best_length:
                best, best_length = record([first, *(t for _, t in extra)]), total
        return best

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        rng = self.rng(index)
        d = self._describe(index, rng)
        text_only = self.config.task == "text"
        dialogue = d.get("dialogue") or [(d["question"], d["answer"]), *d.get("more_turns", ())]
        conversations = self._conversations(dialogue)
        record = {
            "id": f"synth-{self.split}-{index}",
            "conversations": conversations,
            "answer_type": d["answer_type"],
            "question_type": d["question_type"],
            "template": d["question"],
            "meta": d["scene"].to_dict(),
        }
        if not text_only:
            record["image"] = Image.fromarray(render_scene(d["scene"], self.config.image_size, rng), mode="L")
        return record


def make_splits(train_size: int = 20_000, test_size: int = 500, *, seed: int = 0,
                **config_kwargs: Any) -> tuple[SyntheticMedVQA, SyntheticMedVQA]:
    """(train, test) sources with the same config and disjoint random streams."""
    return (SyntheticMedVQA("train", train_size, seed=seed, **config_kwargs),
            SyntheticMedVQA("test", test_size, seed=seed, **config_kwargs))


def vocabulary(include_chat_roles: bool = True, reports: bool = False) -> list[str]:
    """Every word (lowercase, letters only) of the questions, answers, captions and prompts, and
    with `reports` of the findings reports and their requests.

    Texts split at non-letters ("X-ray" -> "x", "ray"); `include_chat_roles` adds the chat
    template's role words (system, user, assistant). Sorted, no duplicates.
    """
    texts: list[str] = ["Describe the image briefly.", "yes no"]
    if reports:
        texts += list(REPORT_REQUESTS) + list(_STUDY_FORMS) + list(_ANATOMY.values()) + list(_SIDE_FORMS)
        texts += list(_TEMPLATED_STUDY_FORMS)
        # Words of an earlier report wording, kept so that the reports tokenizer's ids stay those
        # the miniature recipe's results were measured with (ids change what a tiny model learns).
        texts += ["impression abnormal"]
        texts += ["is are lesion lesions and a an", " ".join(REGIONS)]
    # The "findings" questions bring words of the reports ("seen", "and"): they join with those,
    # so that the demo tokenizer's ids stay as they are (see the caption words below).
    asked = [q for q in OPEN_QUESTIONS if reports or q.family != "findings"]
    texts += [q.text for q in CLOSED_QUESTIONS] + [q.text for q in asked]
    texts += [" ".join(q.answers) for q in asked]
    texts += list(_MODALITY_DISPLAY.values()) + list(SIZES) + list(COUNT_WORDS)
    # Caption words; their "and" comes with the report words: one more word here would shift the
    # demo tokenizer's ids, and the demo's trained result depends on that layout
    # (benchmarks/RESULTS.md, "Training demo").
    texts += ["scan of the with no lesions lesion one on the both sides side"]
    if include_chat_roles:
        texts += ["system user assistant"]
    words = set()
    for t in texts:
        t = re.sub(r"\{\w+\}", " ", t)  # report templates' placeholders
        words.update(w.lower() for w in re.findall(r"[A-Za-z]+", t))
    return sorted(words)


def load_demo_tokenizer(out_dir: str, reports: bool = False) -> Any:
    """The compact tokenizer for the CPU demo: bytes + `vocabulary(reports=reports)` (each word one
    token) + the named LLaDA special tokens right after them (582 ids without the report words, 684 with them;
    read ids with special_token_ids)."""
    from medv_jax.data import testing

    return testing.load_test_tokenizer(out_dir, words=vocabulary(reports=reports), special_ids_base=0)


def demo_image_config(image_size: int = 64, patch_size: int = 8) -> Any:
    """Square-mode preprocessing at the demo tower's resolution ((64 / 8)^2 = 64 tokens)."""
    from medv_jax.data.anyres import ImageConfig

    if image_size % patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    return ImageConfig(crop_size=image_size, patches_per_side=image_size // patch_size)


def all_answers() -> dict[str, tuple[str, ...]]:
    """Answer set of each open family, plus ("yes", "no") for "closed"."""
    out = {q.family: q.answers for q in OPEN_QUESTIONS}
    out["closed"] = ("yes", "no")
    return out


__all__: Sequence[str] = (
    "SyntheticMedVQA", "SyntheticConfig", "Scene", "Lesion", "make_splits", "vocabulary", "caption",
    "render_scene", "sample_scene", "sample_scene_where", "CLOSED_QUESTIONS", "OPEN_QUESTIONS",
    "CLOSED_FAMILIES", "OPEN_FAMILIES", "MODALITIES", "REGIONS", "all_answers", "load_demo_tokenizer",
    "demo_image_config", "report", "parse_report", "report_fields", "field_accuracy", "fields_correct", "REPORT_FIELDS",
    "REPORT_REQUESTS", "TASKS", "scene_outlines",
)
