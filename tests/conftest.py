"""Test setup shared by every test: 8 fake CPU devices, set before jax is imported.

Sharding code is exercised for real on these devices; nothing here allocates an 8B model.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never reach a hub: everything they load they build themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# Test tiers. `python -m pytest -q -m "not slow"` is the edit-test loop (a few minutes on 2 cores);
# the plain command (README, CI) runs everything. Slow: tests that start processes, drive a
# browser or a server, train to a learning threshold, compile 8B shapes, or run the sampler and
# train step at length against references. Whole files by path, single tests by node id prefix.
SLOW_FILES = (
    "tests/multihost/",
    "tests/serve/test_browser.py",
    "tests/serve/test_openai_server.py",
    "tests/benchmarks/",
    "tests/train/test_chain.py",
    "tests/train/test_trainer.py",
    "tests/train/test_lora_training.py",
    "tests/train/test_lora_step.py",
    "tests/train/test_memory.py",
    "tests/train/test_activation_sharding.py",
    "tests/sampling/test_commands.py",
    "tests/sampling/test_fast_modes.py",
    "tests/sampling/test_api.py",
    "tests/evaluate/test_run_commands.py",
    "tests/tools/test_export_adapters.py",
)
SLOW_TESTS = (
    "tests/train/test_step.py::test_meshes_agree_with_one_device",
    "tests/train/test_step.py::test_gradient_accumulation_equals_large_batch",
    "tests/train/test_step.py::test_loss_equals_numpy_formula",
    "tests/train/test_step.py::test_frozen_params_bit_identical_and_have_no_optimizer_state",
    "tests/train/test_step.py::test_fsdp_shards_params_and_optimizer_state",
    "tests/train/test_step.py::test_chunked_ce",
    "tests/models/test_llada.py::test_bf16_compute_with_fp32_params_and_remat",
    "tests/models/test_layers.py::test_per_head_attention_equals_jax_attention",
    "tests/sampling/test_sampler.py::test_batched_equals_each_row_alone",
    "tests/sampling/test_quantized.py::test_int8_answers_agree_with_float_on_the_trained_demo",
    "tests/test_user_mistakes.py::test_a_real_process",
    "tests/test_user_mistakes.py::test_train_in_a_real_process",
    "tests/test_user_mistakes.py::test_no_pytorch_advice",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slow test (processes, browser, learning, long compiles); "
                            "deselect with -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        node = item.nodeid
        if node.startswith(SLOW_FILES) or node.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
