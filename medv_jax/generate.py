"""``python -m medv_jax.generate``: one image + question -> answer (see medv_jax/sampling/generate.py)."""
import sys

from medv_jax.sampling.generate import main

if __name__ == "__main__":
    sys.exit(main())
