"""Inside the compiled train step the models' activations are laid out by the same logical-axis
rules as the parameters (docs/architecture.md, "Sharding"), read from the lowered program on a
(data, fsdp, tensor) = (2, 2, 2) mesh of the 8 fake devices."""
import re

import flax.linen as nn
import jax
import pytest

from medv_jax import sharding as shd
from medv_jax.models import layers, medv
from medv_jax.train import optimizer as opt_lib
from medv_jax.train import step as step_lib
from tests.train.test_step import CFG, make_batch

GROUPS = [("^vision/", None)]
# One sdy.sharding_constraint: its per-dimension mesh axes (as written, without the brackets) and
# the tensor's shape.
CONSTRAINT = re.compile(r"sdy\.sharding_constraint %\S+ <@mesh, \[(.*?)\]> : tensor<([0-9x]+)x\w+>")


def lowered_step(rules=shd.LOGICAL_AXIS_RULES) -> str:
    mesh = shd.make_mesh((2, 2, 2))
    boxed = medv.abstract_params(CFG)
    trainable_shape, _ = opt_lib.split_frozen(nn.unbox(boxed), GROUPS)
    tx = opt_lib.make_optimizer(trainable_shape, GROUPS, 1e-3, total_steps=10)
    state, shardings = step_lib.init_sharded_state(
        lambda r: medv.init_params(CFG, r, boxed=True), tx, GROUPS, mesh, seed=0, rules=rules)
    batch = make_batch()
    step = step_lib.jit_train_step(step_lib.make_train_step(medv.MedV(CFG), tx, step_lib.StepConfig(1, 6)),
                                   shardings, mesh, batch, rules)
    return step.lower(state, batch).as_text()


def constraints(text: str) -> set[tuple[str, tuple[int, ...]]]:
    """(axes per dimension, shape) of every sharding constraint in a lowered program."""
    return {(re.sub(r"\s+", "", axes), tuple(int(d) for d in shape.split("x")))
            for axes, shape in CONSTRAINT.findall(text)}


@pytest.fixture(scope="module")
def step_constraints():
    return constraints(lowered_step())


def test_lm_activations_follow_the_rules(step_constraints):
    lm = CFG.lm
    b, t = make_batch()["tokens"].shape
    batch = '{"data","fsdp"}'
    # queries [batch, length, heads, head_dim]: batch over data x fsdp, heads over tensor
    assert (f'{batch},{{}},{{"tensor"}},{{}}', (b, t, lm.num_heads, lm.head_dim)) in step_constraints
    # MLP hidden [batch, length, mlp]: mlp over tensor
    assert (f'{batch},{{}},{{"tensor"}}', (b, t, lm.mlp_hidden_size)) in step_constraints
    # residual stream [batch, length, embed]: embed would take fsdp, which the batch already uses
    assert (f'{batch},{{}},{{}}', (b, t, lm.hidden_size)) in step_constraints


def test_vision_activations_follow_the_rules(step_constraints):
    vision = CFG.vision
    patches = (vision.image_size // vision.patch_size) ** 2
    assert ('{"data","fsdp"},{},{}', (make_batch()["tokens"].shape[0], patches, vision.hidden_size)) \
        in step_constraints


def test_the_rules_come_from_the_caller():
    """Other rules give other layouts: the MLP hidden split over fsdp instead of tensor, and the
    batch over data alone."""
    rules = tuple((name, {"batch": "data", "mlp": "fsdp"}.get(name, axes)) for name, axes in shd.LOGICAL_AXIS_RULES)
    got = constraints(lowered_step(rules))
    b, t = make_batch()["tokens"].shape
    assert ('{"data"},{},{"fsdp"}', (b, t, CFG.lm.mlp_hidden_size)) in got
    # with the batch off fsdp, the residual stream's embed axis takes it
    assert ('{"data"},{},{"fsdp"}', (b, t, CFG.lm.hidden_size)) in got


def test_outside_a_layout_context_constrain_does_nothing():
    x = jax.numpy.ones((4, 3))
    assert layers.constrain(x, ("batch", "embed")) is x
    text = jax.jit(lambda v: layers.constrain(v, ("batch", "embed")) * 2).lower(x).as_text()
    assert "sharding_constraint" not in text
