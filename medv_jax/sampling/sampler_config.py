"""The sampler's settings: ``SamplerConfig`` and its fast-mode parts, validated on construction,
and the two views the compiled program takes of them (``Plan``: static, the compile cache key;
``Knobs``: traced scalars). The algorithm they configure is documented in
``medv_jax.sampling.diffusion``."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("prefix", "dual")


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value > 0


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """KV cache for the fast modes (approximate: attention is bidirectional, so cached keys/values
    go stale as the canvas changes).

    mode:          "prefix": keys/values of every position are stored at a refresh; between
                   refreshes each step recomputes the current block and everything after it,
                   reading the positions before the block (prompt and finished blocks) from the
                   cache. "dual": the positions after the block (the masked tail) are read from
                   the cache too, so each step recomputes the current block only.
    refresh_every: K: a refresh (a full forward, whose logits that step uses) runs at the first
                   step of every block and then every K steps of the block (steps i of the block
                   with i % K == 0). K = 1 refreshes at every step, which is the exact sampler.
    """

    mode: str = "prefix"
    refresh_every: int = 8

    def __post_init__(self):
        if self.mode not in CACHE_MODES:
            raise ValueError(f"cache mode={self.mode!r} is not one of {list(CACHE_MODES)}")
        if not _positive_int(self.refresh_every):
            raise ValueError(f"cache refresh_every={self.refresh_every!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class ThresholdSelection:
    """Confidence-threshold parallel decoding: besides the step's scheduled count (the most
    confident eligible positions, at least one), every eligible position whose confidence is
    strictly above ``threshold`` is committed, so a block ends as soon as it is filled and easy
    answers take far fewer steps. ``threshold = 1.0`` commits nothing extra (a softmax
    probability never exceeds 1): the exact sampler. Needs ``remasking="low_confidence"``."""

    threshold: float = 0.9

    def __post_init__(self):
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold={t!r} must be a number in [0, 1]")


@dataclasses.dataclass(frozen=True)
class AdaptiveStop:
    """Adaptive stopping, after transformers' DiffusionGemma ``StableAndConfidentStoppingCriteria``
    (stop when the argmax canvas is unchanged for ``stability_threshold`` steps and the mean token
    entropy is below ``confidence_threshold``), transposed to a masked model:

    * the row's *draft* of the current block is its committed tokens plus the argmax prediction at
      every still-masked position; only the part that can end up in the answer counts, i.e. the
      positions up to and including the draft's first end-of-turn;
    * stable: that draft is identical to the previous step's for ``patience`` consecutive steps
      (0: no stability condition); confident: the mean entropy (nats) of the predictive
      distributions (after the bans) over the draft's still-masked positions is below
      ``max_entropy``;
    * when both hold the row commits its whole draft at once (so a drafted end-of-turn stops it)
      and its block is finished.
    """

    patience: int = 1
    max_entropy: float = 0.1

    def __post_init__(self):
        p = self.patience
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0:
            raise ValueError(f"adaptive_stop patience={p!r} must be an integer >= 0")
        e = self.max_entropy
        if isinstance(e, bool) or not isinstance(e, (int, float, np.floating)) or not (np.isfinite(e) and e > 0):
            raise ValueError(f"adaptive_stop max_entropy={e!r} must be a finite number > 0")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Schedule and settings of one generation (validated on construction).

    Paper settings: VQA ``gen_length = block_length = steps = 128``; open conversation
    ``gen_length = 256, block_length = 64, steps = 256``.

    Fast modes (opt-in, each still one compiled program): ``cache`` (a ``CachePolicy``: prefix or
    dual KV cache), ``selection`` (a ``ThresholdSelection``: confidence-threshold parallel
    decoding), ``adaptive_stop`` (an ``AdaptiveStop``). With any of them the blocks advance when
    every row of the batch has filled the current one (or stopped), so ``steps`` is an upper bound
    and ``SampleOutput.steps_run`` the steps a row used.
    """

    gen_length: int = 128
    block_length: int = 128
    steps: int = 128
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    cache: CachePolicy | None = None
    selection: ThresholdSelection | None = None
    adaptive_stop: AdaptiveStop | None = None

    def __post_init__(self):
        for name in ("gen_length", "block_length", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}"
            )
        if self.steps % self.num_blocks:
            raise ValueError(
                f"steps={self.steps} is not a multiple of the number of blocks "
                f"(gen_length // block_length = {self.num_blocks})"
            )
        if self.steps > self.gen_length:
            raise ValueError(f"steps={self.steps} exceeds gen_length={self.gen_length}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r} is not one of {list(REMASKING)}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0")
        if not np.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"cfg_scale={self.cfg_scale!r} must be a finite number >= 0")
        for name, kind in (("cache", CachePolicy), ("selection", ThresholdSelection), ("adaptive_stop", AdaptiveStop)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"{name}: expected a {kind.__name__} or None, got {type(value).__name__}")
        if self.selection is not None and self.remasking != "low_confidence":
            raise ValueError(
                f"selection (threshold decoding) needs remasking='low_confidence', got remasking={self.remasking!r}"
            )

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def replace(self, **changes: Any) -> "SamplerConfig":
        return dataclasses.replace(self, **changes)

    def _plan(self) -> "Plan":
        return Plan(
            gen_length=self.gen_length,
            block_length=self.block_length,
            steps=self.steps,
            remasking=self.remasking,
            sample=self.temperature > 0,
            guidance=self.cfg_scale > 0,
            cache_mode=None if self.cache is None else self.cache.mode,
            threshold=self.selection is not None,
            adaptive=self.adaptive_stop is not None,
        )

    def _knobs(self) -> "Knobs":
        """The traced (recompile-free) values of the configuration."""
        return Knobs(
            temperature=jnp.float32(self.temperature),
            cfg_scale=jnp.float32(self.cfg_scale),
            refresh_every=jnp.int32(1 if self.cache is None else self.cache.refresh_every),
            threshold=jnp.float32(1.0 if self.selection is None else self.selection.threshold),
            patience=jnp.int32(0 if self.adaptive_stop is None else self.adaptive_stop.patience),
            max_entropy=jnp.float32(0.0 if self.adaptive_stop is None else self.adaptive_stop.max_entropy),
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static (shape- and branch-deciding) part of a SamplerConfig: the jit cache key.

    Temperature and CFG scale values are traced, so changing them does not recompile.
    """

    gen_length: int
    block_length: int
    steps: int
    remasking: str
    sample: bool
    guidance: bool
    cache_mode: str | None = None
    threshold: bool = False
    adaptive: bool = False

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def fast(self) -> bool:
        return self.cache_mode is not None or self.threshold or self.adaptive


@flax.struct.dataclass
class Knobs:
    """Traced scalars of a SamplerConfig (changing them does not recompile)."""

    temperature: Array  # [] f32
    cfg_scale: Array  # [] f32
    refresh_every: Array  # [] int32
    threshold: Array  # [] f32
    patience: Array  # [] int32
    max_entropy: Array  # [] f32
