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

# A persistent compilation cache: a rerun of the suite (the edit-test loop) loads most XLA programs
# instead of compiling them again. MEDV_JAX_TEST_CACHE names its folder; "off" disables it.
_XLA_CACHE = os.environ.get(
    "MEDV_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "medv_jax", "test_xla_cache"))
if _XLA_CACHE != "off":
    jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", 2 * 1024**3)  # oldest entries go first


# Test tiers. `python -m pytest -q -m "not slow"` is the edit-test loop (1-3 minutes on 2 cores;
# the sampler, model and converter parity checks keep cases in it, adapters and quantization do not);
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
    # long compiles: adapters and quantized bases at several shapes, sampler schedules over blocks
    "tests/models/test_adapters.py::test_fresh_adapters_leave_the_model_exactly_unchanged",
    "tests/models/test_adapters.py::test_merged_and_unmerged_adapters_give_the_same_logits",
    "tests/models/test_adapters.py::test_weight_only_quantization_stays_close_to_the_float_model",
    "tests/models/test_adapters.py::test_adapters_on_a_quantized_base_merge_like_on_the_dequantized_one",
    "tests/sampling/test_sampler.py::test_matches_reference[sampled_two_blocks]",
    "tests/sampling/test_sampler.py::test_matches_reference[random_cfg_stop]",
    "tests/sampling/test_sampler.py::test_matches_reference[uneven_schedule]",
    "tests/sampling/test_sampler.py::test_matches_reference[image_prompt]",
    "tests/sampling/test_sampler.py::test_matches_reference[random_sampled_cfg]",
    "tests/sampling/test_sampler.py::test_matches_reference[early_stop]",
    "tests/sampling/test_sampler.py::test_matches_reference[empty_answer]",
    "tests/models/test_layers.py::test_flat_dense_equals_dense_general[16-2-True-x_shape2]",
    "tests/models/test_layers.py::test_flat_dense_equals_dense_general[7-1-True-x_shape3]",
    "tests/models/test_medv.py::test_multi_crop_layout_with_newlines_and_bilinear_taps",
    "tests/models/test_llada.py::test_load_pretrained_round_trip",
    "tests/sampling/test_quantized.py::test_generate_takes_the_quantization_flag",
    "tests/serve/test_engine.py::test_answer_is_the_samplers_and_padding_does_not_change_it",
    "tests/serve/test_engine.py::test_compiles_once_per_shape_not_per_value",
    "tests/serve/test_engine.py::test_missing_demo_model_says_how_to_train",
    # whole commands end to end, or worker processes
    "tests/data/test_tfds.py::test_infer_and_evaluate_with_tfds",
    "tests/data/test_pipeline.py::test_worker_processes_give_the_same_batches",
    "tests/evaluate/test_cli.py::test_python_dash_m_entry_point",
    "tests/tools/test_convert_weights.py::test_bfloat16_conversion_and_cli",
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
