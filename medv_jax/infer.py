"""``python -m medv_jax.infer``: resumable batch inference over a question file (see
medv_jax/sampling/infer.py)."""
import sys

from medv_jax.sampling.infer import main

if __name__ == "__main__":
    sys.exit(main())
