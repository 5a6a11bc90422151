"""benchmarks/serve_load.py end to end with tiny settings on the tests' tiny random checkpoint:
every (mode, clients) level is measured, nothing is dropped and every answer equals the one
``model.answer`` gives alone. The timings themselves are never asserted."""
import contextlib
import io
import json

import pytest

from benchmarks import serve_load
from tests.serve.conftest import build_tiny_checkpoint


def test_serve_load_runs_and_answers_as_the_model_alone(tmp_path):
    tiny = build_tiny_checkpoint(tmp_path)
    out = tmp_path / "serve_load.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert serve_load.main(["--checkpoint", tiny["checkpoint"], "--tokenizer", tiny["tokenizer"],
                                "--clients", "1,3", "--requests", "6", "--batch_sizes", "1,4",
                                "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    levels = [(r["mode"], r["clients"]) for r in report["results"]]
    assert levels == [("batched", 1), ("batched", 3), ("one_at_a_time", 1), ("one_at_a_time", 3)]
    for row in report["results"]:
        assert row["requests"] == 6 and row["answers_differing"] == 0
        cpu = row["cpu_ms_per_request"]
        assert set(cpu) == {"xla", "python", "load_generator"} and cpu["load_generator"] > 0
        assert row["requests_per_s"] > 0 and 0 < row["p50_s"] <= row["p99_s"]
    assert all(r["mean_batch"] == 1 for r in report["results"] if r["mode"] == "one_at_a_time")
    alone = report["sampler_alone"]  # the ceiling: model.run alone at each batch size
    assert [r["batch"] for r in alone] == [1, 4] and alone[0]["speedup_per_row"] == 1.0
    assert all(r["ms_per_row"] > 0 and 1 <= r["steps_per_batch"] <= 4 for r in alone)
    floor = report["floor"]
    assert floor["matmul_gflops"] > 0 and floor["floor_ms_per_answer"] == pytest.approx(
        floor["gflop_per_answer"] / floor["matmul_gflops"] * 1e3)
    table = printed.getvalue()
    assert "| 3 | batched |" in table and "x |" in table  # the speedup column is filled
    assert "the compute floor:" in table and "| 3 | one_at_a_time |" in table.split("CPU milliseconds")[1]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_lm_forward_flops_counts_what_xla_counts(kv_heads):
    """The compute floor's FLOP count is XLA's own count of the forward pass (layers unrolled, so
    none hides in a loop body counted once) less the elementwise work: within 5 %."""
    import jax
    import jax.numpy as jnp

    from medv_jax.models.llada import LLaDA, LLaDAConfig

    cfg = LLaDAConfig(vocab_size=640, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=kv_heads,
                      head_dim=32, mlp_hidden_size=384, max_position_embeddings=256, unroll_layers=True)
    model = LLaDA(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    forward = jax.jit(lambda p, e: model.apply(p, e, None, None, 64, 4, method=LLaDA.forward_embeds))
    cost = forward.lower(params, jnp.zeros((1, 68, 128))).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = serve_load.lm_forward_flops(cfg, 68, 4)
    assert ours <= xla <= 1.05 * ours
    assert serve_load.lm_forward_flops(cfg, 68, 8) - ours == 2 * 4 * 128 * 640  # the head, per logit position
