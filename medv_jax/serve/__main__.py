"""``python -m medv_jax.serve``: the web demo (see medv_jax/serve/__init__.py)."""
import sys

from medv_jax.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
