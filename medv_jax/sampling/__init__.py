"""Reverse-diffusion sampling (docs/algorithm.md §5): one jitted program per configuration."""
from medv_jax.sampling.diffusion import (
    REMASKING,
    SampleOutput,
    SamplerConfig,
    banned_ids,
    embed_prompt,
    generate_text,
    left_pad,
    replay,
    row_keys_for,
    sample,
    sample_loop,
    transfer_counts,
    validate_prompt,
)

__all__ = [
    "REMASKING",
    "SampleOutput",
    "SamplerConfig",
    "banned_ids",
    "embed_prompt",
    "generate_text",
    "left_pad",
    "replay",
    "row_keys_for",
    "sample",
    "sample_loop",
    "transfer_counts",
    "validate_prompt",
]
