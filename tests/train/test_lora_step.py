"""The train step with LoRA on a quantized (int8) base, on one device: only the adapters and the
projector train; the base (integer kernels, embedding, norms) and the tower stay bit-identical and
get neither gradients nor optimizer state."""
import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict

from medv_jax import sharding as shd
from medv_jax.models import adapters, medv
from medv_jax.train import optimizer as opt_lib
from medv_jax.train import step as step_lib
from medv_jax.train.presets import lora_groups
from tests.train.test_step import CFG, make_batch

QLORA = CFG.replace(lm=CFG.lm.replace(lora_rank=2, lora_alpha=4.0, lora_dropout=0.1, weight_quant="int8"))
GROUPS = lora_groups(1e-2)


def test_only_adapters_and_projector_train_on_a_quantized_base():
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    boxed = medv.abstract_params(QLORA)
    plain = medv.init_params(CFG, jax.random.key(0))
    params = adapters.conform_params(plain, nn.unbox(boxed), jax.random.key(1))
    trainable_shape, _ = opt_lib.split_frozen(nn.unbox(boxed), GROUPS)
    trained = sorted("/".join(k) for k in flatten_dict(trainable_shape))
    assert trained and all(p.startswith("projector/") or p.endswith(("/lora_a", "/lora_b")) for p in trained)
    tx = opt_lib.make_optimizer(trainable_shape, GROUPS, 1e-2, total_steps=10)
    state, shardings = step_lib.state_from_params(params, boxed, tx, GROUPS, mesh, seed=0)
    frozen_before = jax.tree_util.tree_map(np.asarray, state.frozen)
    assert state.frozen["lm"]["layers"]["mlp"]["up_proj"]["kernel"].dtype == np.int8
    step = step_lib.jit_train_step(step_lib.make_train_step(medv.MedV(QLORA), tx, step_lib.StepConfig(1, 6)),
                                   shardings, mesh, make_batch())
    for i in range(2):
        state, metrics = step(state, shd.global_batch(make_batch(i), mesh))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.frozen, frozen_before)
    assert np.abs(np.asarray(state.params["lm"]["layers"]["attn"]["q_proj"]["lora_b"])).max() > 0  # B moved from 0
    # Adam's two moments cover exactly the trained tensors (plus scalar counters).
    moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree_util.tree_leaves(state.params))
