"""Per-group learning rates: relative rates ("*<factor>") follow optim.lr; bad rates name their group."""
import numpy as np
import pytest

from medv_jax.train import optimizer as opt_lib


def test_relative_rates_are_multiples_of_the_default():
    groups = [("^vision/", "*0.1"), ("^lm/embed", None), ("^projector/", 5e-4), ("^lm/", "*2")]
    assert opt_lib.resolve_group_rates(groups, 2e-3) == [
        ("^vision/", 2e-3 * 0.1), ("^lm/embed", None), ("^projector/", 5e-4), ("^lm/", 4e-3)]
    assert opt_lib.resolve_group_rates(groups, 1e-2)[0] == ("^vision/", 1e-2 * 0.1)


@pytest.mark.parametrize("rate", ["0.1", "*", "*x", "*0", "*-1", True, [0.1]])
def test_a_bad_rate_names_its_group(rate):
    with pytest.raises(ValueError, match=r"'\^vision/'.*\*<factor>"):
        opt_lib.resolve_group_rates([("^vision/", rate)], 1e-3)


def test_a_relative_group_steps_as_its_absolute_rate():
    """The optimizer built from "*0.1" moves a group's parameters exactly as from lr / 10."""
    import jax.numpy as jnp

    params = {"vision": {"w": jnp.ones((3,))}, "lm": {"w": jnp.ones((3,))}}
    g = jnp.asarray([0.5, -1.0, 2.0])
    grads = {"vision": {"w": g}, "lm": {"w": g}}
    updates = []
    for groups in ([("^vision/", "*0.1")], [("^vision/", 2e-3 / 10)]):
        tx = opt_lib.make_optimizer(params, opt_lib.resolve_group_rates(groups, 2e-3), 2e-3, total_steps=10,
                                    warmup_ratio=0.0)
        state = tx.init(params)
        for _ in range(2):
            step, state = tx.update(grads, state, params)
        updates.append(step)
    np.testing.assert_array_equal(updates[0]["vision"]["w"], updates[1]["vision"]["w"])
    np.testing.assert_array_equal(updates[0]["lm"]["w"], updates[1]["lm"]["w"])
    # The same gradients: the vision group steps a tenth as far as the default group.
    np.testing.assert_allclose(updates[0]["vision"]["w"], 0.1 * updates[0]["lm"]["w"], rtol=1e-6)


def test_training_refuses_a_bad_rate_before_anything_starts():
    import importlib.util
    from pathlib import Path

    from medv_jax.train import trainer
    from medv_jax.user_errors import UserError

    path = Path(__file__).resolve().parents[2] / "configs" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.optim.param_groups = [("^vision/", "*tenth")]
    with pytest.raises(UserError, match=r"optim.param_groups: group '\^vision/'"):
        trainer.check_config(config)
