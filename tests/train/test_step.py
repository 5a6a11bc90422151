"""Loss, optimizer and the sharded train step on 8 fake CPU devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medv_jax import sharding as shd
from medv_jax.models import llada, medv, siglip
from medv_jax.train import loss as loss_lib
from medv_jax.train import optimizer as opt_lib
from medv_jax.train import step as step_lib

B, T, V = 8, 16, 128
CFG = medv.MedVConfig(
    lm=llada.LLADA_PRESETS["llada_tiny"].replace(vocab_size=V, tokenizer_vocab_size=120, mask_token_id=127),
    vision=siglip.SIGLIP_PRESETS["siglip_tiny"].replace(image_size=28),
    image_aspect_ratio="square",
    mm_patch_merge_type="flat",
)
N_IMG = 4  # 28 px / 14 -> 2x2 patches


def make_batch(seed=0, batch=B):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 120, size=(batch, T)).astype(np.int32)
    labels = np.full((batch, T), -100, np.int32)
    index = np.zeros((batch, T, 4), np.int32)
    weight = np.zeros((batch, T, 4), np.float32)
    for b in range(batch):
        index[b, 1:1 + N_IMG, 0] = np.arange(N_IMG)
        weight[b, 1:1 + N_IMG, 0] = 1
        start = rng.randint(6, 12)
        labels[b, start:] = tokens[b, start:]
    return {
        "tokens": tokens,
        "labels": labels,
        "key_mask": np.ones((batch, T), bool),
        "pixels": rng.uniform(-1, 1, (batch, 1, 28, 28, 3)).astype(np.float32),
        "image_index": index,
        "image_weight": weight,
        "image_newline_mask": np.zeros((batch, T), bool),
    }


def test_loss_equals_numpy_formula():
    model = medv.MedV(CFG)
    params = medv.init_params(CFG, jax.random.key(0))
    batch = make_batch()
    answer = batch["labels"] != -100
    masked, p = loss_lib.draw_masks(jax.random.key(1), jnp.asarray(answer))
    masked, p = np.asarray(masked), np.asarray(p)
    assert not masked[~answer].any()  # prompt and image positions are never masked
    loss, _ = loss_lib.diffusion_loss(model, params, batch, masked, p, ce_chunk=5)
    # numpy: full logits of the noised input, CE at masked positions / p / N, mean over rows.
    embeds = np.asarray(model.apply({"params": params}, *[batch[k] for k in
                        ("tokens", "pixels", "image_index", "image_weight", "image_newline_mask")],
                        method=medv.MedV.embed_inputs))
    mask_vec = np.asarray(params["lm"]["embed_tokens"]["embedding"][CFG.lm.mask_token_id])
    embeds = np.where(masked[..., None], mask_vec, embeds)
    logits = np.asarray(model.apply({"params": params}, embeds, method=medv.MedV.forward_embeds), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected = []
    for b in range(B):
        ce = [-logp[b, i, batch["labels"][b, i]] for i in range(T) if masked[b, i]]
        expected.append(sum(ce) / p[b] / answer[b].sum())
    np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)


def test_stratified_times_cover_the_range_and_stay_uniform():
    """One t per row, spread evenly over [0, 1) (gaps of exactly 1/B), each marginally U(0, 1)."""
    batch = 8
    t = np.asarray(loss_lib.draw_times(jax.random.key(3), batch, "stratified"))
    gaps = np.diff(np.sort(t))
    np.testing.assert_allclose(gaps, 1.0 / batch, atol=1e-6)
    assert ((t >= 0) & (t < 1)).all()
    # the marginal of a row over many draws is uniform: its deciles are filled evenly
    draws = jax.vmap(lambda k: loss_lib.draw_times(k, batch, "stratified")[3])(
        jax.random.split(jax.random.key(4), 4000))
    counts = np.histogram(np.asarray(draws), bins=10, range=(0, 1))[0]
    assert counts.min() > 330 and counts.max() < 470, counts
    # independent draws do not spread evenly
    u = np.asarray(loss_lib.draw_times(jax.random.key(3), batch, "uniform"))
    assert np.abs(np.diff(np.sort(u)) - 1.0 / batch).max() > 1e-3
    masked, p = loss_lib.draw_masks(jax.random.key(5), jnp.ones((batch, 6), bool), times="stratified")
    np.testing.assert_allclose(np.sort(np.asarray(p)), np.sort((1 - loss_lib.MASK_EPS) * np.asarray(
        loss_lib.draw_times(jax.random.split(jax.random.key(5))[0], batch, "stratified")) + loss_lib.MASK_EPS),
        rtol=1e-6)
    with pytest.raises(ValueError, match="stratified"):
        loss_lib.draw_times(jax.random.key(0), batch, "sobol")


def test_mask_time_floor_masks_every_row_at_least_that_much():
    answer = jnp.ones((64, 40), bool)
    base_masked, base_p = loss_lib.draw_masks(jax.random.key(7), answer)
    zero_masked, zero_p = loss_lib.draw_masks(jax.random.key(7), answer, time_floor=0.0)
    np.testing.assert_array_equal(base_masked, zero_masked)  # floor 0 is the reference's draw
    np.testing.assert_array_equal(base_p, zero_p)
    masked, p = loss_lib.draw_masks(jax.random.key(7), answer, time_floor=0.6)
    # the same u, mapped onto [0.6, 1): t = 0.6 + 0.4 u, p = (1 - eps) t + eps
    t0 = (np.asarray(base_p) - loss_lib.MASK_EPS) / (1 - loss_lib.MASK_EPS)
    want = (1 - loss_lib.MASK_EPS) * (0.6 + 0.4 * t0) + loss_lib.MASK_EPS
    np.testing.assert_allclose(np.asarray(p), want, rtol=1e-5)
    assert np.asarray(p).min() >= 0.6 and np.asarray(masked).mean(axis=1).min() > 0.4
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="floor"):
            loss_lib.draw_masks(jax.random.key(7), answer, time_floor=bad)


def test_span_masks_are_one_run_of_the_answer_and_fraction_zero_is_the_reference():
    # Two answers per row (positions 5-11 and 14-17) around a user turn; the last row has none.
    answer = np.zeros((400, 20), bool)
    answer[:, 5:12] = answer[:, 14:18] = True
    answer[-1] = False
    answer = jnp.asarray(answer)
    masked, p = loss_lib.draw_span_masks(jax.random.key(4), answer)
    masked, p, answer_np = np.asarray(masked), np.asarray(p), np.asarray(answer)
    assert not (masked & ~answer_np).any()
    for row, share in zip(masked[:-1], p[:-1]):
        ranks = np.flatnonzero(row[answer_np[0]])  # the masked answer positions, counted over the answer
        assert len(ranks) >= 1 and (np.diff(ranks) == 1).all()  # one contiguous run
        assert share == pytest.approx(len(ranks) / 11)
    assert not masked[-1].any() and p[-1] == 1.0  # no answer: nothing masked, a harmless p
    starts = [np.flatnonzero(r[answer_np[0]])[0] for r in masked[:-1]]
    ends = [np.flatnonzero(r[answer_np[0]])[-1] for r in masked[:-1]]
    assert set(starts) == set(range(11)) and set(ends) == set(range(11))  # every start and end occurs
    assert any(s < 7 <= e for s, e in zip(starts, ends))  # runs across the user turn
    # As a share of draw_masks' rows: 0 is bit-identical to the reference's draw; 1 masks every row as a span.
    base_masked, base_p = loss_lib.draw_masks(jax.random.key(7), answer)
    zero_masked, zero_p = loss_lib.draw_masks(jax.random.key(7), answer, span_fraction=0.0)
    np.testing.assert_array_equal(base_masked, zero_masked)
    np.testing.assert_array_equal(base_p, zero_p)
    half_masked, half_p = loss_lib.draw_masks(jax.random.key(7), answer, span_fraction=0.5)
    runs = [(np.diff(np.flatnonzero(r[answer_np[0]])) == 1).all() and r.any() for r in np.asarray(half_masked)[:-1]]
    assert 0.35 < np.mean(runs) < 0.75  # about half the rows (i.i.d. rows are rarely one run)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="span"):
            loss_lib.draw_masks(jax.random.key(7), answer, span_fraction=bad)


def test_chunked_ce_matches_unchunked_with_gradients():
    h = jax.random.normal(jax.random.key(0), (2, 10, 8))
    w = jax.random.normal(jax.random.key(1), (8, 33))
    y = jax.random.randint(jax.random.key(2), (2, 10), 0, 33)

    def total(w, chunk):
        return loss_lib.chunked_token_ce(lambda x: x @ w, h, y, chunk).sum()

    full = total(w, 10)
    for chunk in (3, 4, 7):
        np.testing.assert_allclose(total(w, chunk), full, rtol=1e-6)
        np.testing.assert_allclose(jax.grad(total)(w, chunk), jax.grad(total)(w, 10), rtol=1e-5, atol=1e-6)
    ref = jax.nn.logsumexp(h @ w, -1) - jnp.take_along_axis(h @ w, y[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss_lib.chunked_token_ce(lambda x: x @ w, h, y, 4), ref, rtol=1e-6)


def test_chunked_ce_on_needed_positions_only():
    h = jax.random.normal(jax.random.key(0), (3, 12, 8))
    w = jax.random.normal(jax.random.key(1), (8, 33))
    y = jax.random.randint(jax.random.key(2), (3, 12), 0, 33)
    needed = np.zeros((3, 12), bool)
    needed[0, [1, 5, 11]] = True  # scattered: after the gather they fill the first chunk
    needed[1, [0, 2]] = True
    # row 2 needs nothing
    needed = jnp.asarray(needed)
    ref = jax.nn.logsumexp(h @ w, -1) - jnp.take_along_axis(h @ w, y[..., None], -1)[..., 0]

    calls = []

    def logits_fn(x, w):
        jax.debug.callback(lambda: calls.append(1))
        return x @ w

    def total(w, h, chunk, needed):
        ce = loss_lib.chunked_token_ce(lambda x: logits_fn(x, w), h, y, chunk, needed)
        return jnp.sum(jnp.where(needed, ce * jnp.arange(12), 0.0)), ce

    for chunk in (3, 4, 5, 12):
        calls.clear()
        (_, ce), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(w, h, chunk, needed)
        np.testing.assert_allclose(ce, jnp.where(needed, ref, 0.0), rtol=1e-6, atol=1e-6)
        ref_grads = jax.grad(lambda w, h: jnp.sum(jnp.where(
            needed, (jax.nn.logsumexp(h @ w, -1) - jnp.take_along_axis(h @ w, y[..., None], -1)[..., 0])
            * jnp.arange(12), 0.0)), argnums=(0, 1))(w, h)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
        # Only the chunks holding a needed position ran the LM head (at most 3 needed per row, so
        # ceil(3 / chunk) chunks), once forward and once recomputed for the backward pass.
        used_chunks = -(-3 // chunk)
        assert len(calls) == 2 * used_chunks, (chunk, len(calls))
    calls.clear()
    nothing = jnp.zeros((3, 12), bool)
    np.testing.assert_array_equal(loss_lib.chunked_token_ce(lambda x: logits_fn(x, w), h, y, 4, nothing), 0.0)
    assert not calls


GROUPS = [("^vision/", None), ("^projector/", 1e-2)]


def _run(mesh_shape, micro=1, steps=2, devices=None):
    mesh = shd.make_mesh(mesh_shape, devices)
    model = medv.MedV(CFG)
    boxed = medv.abstract_params(CFG)
    trainable_shape, _ = opt_lib.split_frozen(nn.unbox(boxed), GROUPS)
    # A large Adam eps: with the default 1e-8, a gradient that is rounding noise (~1e-9) becomes a
    # full-size step, so layouts that differ only in fp32 summation order would drift apart.
    tx = opt_lib.make_optimizer(trainable_shape, GROUPS, 1e-3, total_steps=10, max_grad_norm=1.0, eps=1e-3)
    state, shardings = step_lib.init_sharded_state(
        lambda r: medv.init_params(CFG, r, boxed=True), tx, GROUPS, mesh, seed=0)
    frozen_before = jax.tree_util.tree_map(np.asarray, state.frozen)
    step = step_lib.jit_train_step(step_lib.make_train_step(model, tx, step_lib.StepConfig(micro, 6)),
                                   shardings, mesh, make_batch())
    losses = []
    for i in range(steps):
        state, metrics = step(state, shd.global_batch(make_batch(i), mesh))
        losses.append(float(metrics["loss"]))
    return state, losses, frozen_before


def _assert_params_close(a, b):
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6), a, b)


def test_meshes_agree_with_one_device():
    base, base_losses, _ = _run((1, 1, 1), devices=jax.devices()[:1])
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
        state, losses, _ = _run(shape)
        np.testing.assert_allclose(losses, base_losses, rtol=1e-5, err_msg=str(shape))
        _assert_params_close(state.params, base.params)


def test_fsdp_shards_params_and_optimizer_state():
    state, _, _ = _run((1, 8, 1), steps=1)
    emb = state.params["lm"]["embed_tokens"]["embedding"]  # [V, D]: D over fsdp
    assert emb.addressable_shards[0].data.shape == (V, CFG.lm.hidden_size // 8)
    q = state.params["lm"]["layers"]["attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.size == q.size // 8
    mu = state.opt_state[1].inner_states["default"].inner_state[0].mu["lm"]["layers"]["attn"]["q_proj"]["kernel"]
    assert mu.addressable_shards[0].data.size == mu.size // 8


def test_frozen_params_bit_identical_and_have_no_optimizer_state():
    state, _, frozen_before = _run((2, 2, 2), steps=2)
    assert set(state.frozen) == {"vision"} and "vision" not in state.params
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.frozen, frozen_before)
    leaves = jax.tree_util.tree_leaves(state.opt_state)
    n_opt = sum(x.size for x in leaves)
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    assert n_opt < 2 * n_trainable + 100  # mu and nu of the trainable params only, plus counters


def test_gradient_accumulation_equals_large_batch():
    state1, losses1, _ = _run((2, 2, 2), micro=1)
    state4, losses4, _ = _run((2, 2, 2), micro=4)
    np.testing.assert_allclose(losses4, losses1, rtol=1e-5)
    _assert_params_close(state4.params, state1.params)


def test_schedule_warms_up_then_decays_to_its_floor():
    sched = opt_lib.learning_rate_schedule(1e-3, total_steps=100, warmup_ratio=0.1, final_lr_ratio=0.25)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(55)), 1e-3 * (0.25 + 0.75 * 0.5), rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose(float(sched(100)), 2.5e-4, rtol=1e-6)
    assert float(opt_lib.learning_rate_schedule(1e-3, 100, 0.1)(100)) == 0.0  # the recipe: to zero
    with pytest.raises(ValueError, match="final_lr_ratio"):
        opt_lib.learning_rate_schedule(1e-3, 100, 0.1, final_lr_ratio=1.5)
