"""Web demo: chat with a medical image and watch the answer unmask (gradio).

    python -m medv_jax.serve [--checkpoint DIR --tokenizer DIR] [--host 127.0.0.1 --port 7860]

Without ``--checkpoint`` it serves what ``python -m medv_jax.train --config=configs/demo.py``
wrote (``workdir/demo/model`` and ``workdir/demo/tokenizer``). ``engine`` is the model side (no
UI), ``app`` the page, ``examples`` the offline example inputs, ``cli`` the command.

``python -m medv_jax.serve.api`` serves the same models through an OpenAI-compatible API
(``openai_compat``: the app and the request batching; ``api``: the command).
"""
