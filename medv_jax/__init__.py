"""medv_jax: LLaDA-MedV (SigLIP2 -> GELU projector -> LLaDA-8B masked diffusion) in JAX/Flax."""

__version__ = "0.1.0"
