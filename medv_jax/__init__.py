"""medv_jax: LLaDA-MedV (SigLIP2 -> GELU projector -> LLaDA-8B masked diffusion) in JAX/Flax.

``medv_jax.load(checkpoint, tokenizer)`` returns a model that answers questions about images
(``medv_jax.sampling.api``)."""

__version__ = "0.1.0"


def load(checkpoint: str, tokenizer: str, **options):
    """``medv_jax.sampling.api.load``: a converted checkpoint and its tokenizer, ready to answer."""
    from medv_jax.sampling.api import load as load_model  # jax is imported on first use only

    return load_model(checkpoint, tokenizer, **options)
