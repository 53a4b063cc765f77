"""The scanned layer layout (every block parameter stacked on a leading axis, run by nnx.scan)
computes what the unrolled one does, and the guard limits each stacked layer as a tensor."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lbw_optax
from lbw import models
from lbw_optax._sense import num_sensed_tensors, tensor_sizes

CONFIG = dataclasses.replace(models.tiny_qwen2_5_3b(), num_layers=3)


def _pair():
    unrolled = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
    return unrolled, models.scan_layers(unrolled)


def _tokens(seed=1, shape=(2, 12)):
    return jax.random.randint(jax.random.key(seed), shape, 0, CONFIG.vocab_size)


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_scanned_model_has_the_unrolled_logits_and_parameter_count():
    unrolled, scanned = _pair()
    tokens = _tokens()
    np.testing.assert_allclose(scanned(tokens), unrolled(tokens), atol=1e-5, rtol=1e-5)
    scanned_config = dataclasses.replace(CONFIG, scan_layers=True)
    assert models.count_params(scanned_config) == models.count_params(CONFIG)
    layers = nnx.state(scanned, nnx.Param)["layers"]
    assert all(x.shape[0] == CONFIG.num_layers for x in jax.tree.leaves(layers))
    np.testing.assert_array_equal(models.unscan_layers(scanned)(tokens), unrolled(tokens))


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_remat_changes_neither_logits_nor_gradients():
    _, scanned = _pair()  # Remat inside the scan: the layout where it matters most.
    tokens = _tokens(shape=(2, 8))
    remat = dataclasses.replace(scanned.config, remat=True)
    twin = nnx.merge(nnx.graphdef(models.Decoder(remat, rngs=nnx.Rngs(0))), nnx.state(scanned))

    def loss(m):
        return models.cross_entropy_loss(m(tokens[:, :-1]), tokens[:, 1:])

    grads, twin_grads = nnx.grad(loss)(scanned), nnx.grad(loss)(twin)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(twin_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_hugging_face_weights_load_into_both_layouts(tmp_path):
    unrolled, _ = _pair()
    models.save_pretrained(unrolled, tmp_path)
    scanned = models.load_pretrained(tmp_path, scan_layers=True)
    assert scanned.config.scan_layers
    tokens = _tokens()
    np.testing.assert_allclose(scanned(tokens), unrolled(tokens), atol=1e-5, rtol=1e-5)
    models.save_pretrained(scanned, tmp_path / "again")  # Written unrolled, HF names.
    reloaded = models.load_pretrained(tmp_path / "again")
    np.testing.assert_allclose(reloaded(tokens), unrolled(tokens), atol=1e-5, rtol=1e-5)


def test_layout_conversions_and_lora_refuse_the_wrong_layout():
    unrolled, scanned = _pair()
    with pytest.raises(ValueError, match="already unrolled"):
        models.unscan_layers(unrolled)
    with pytest.raises(ValueError, match="already scanned"):
        models.scan_layers(scanned)
    with pytest.raises(ValueError, match="unrolled layout"):
        models.add_lora(scanned, rngs=nnx.Rngs(1))


def _unrolled_run(model, tx, steps):
    """Steps of ``tx`` on the model's own loss, with a 10⁴× gradient burst at step 3 (which the
    limit cuts); each step's gradients, loss and updates, and the final state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = tx.init(params)

    @jax.jit
    def step(params, state, tokens):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            return models.cross_entropy_loss(m(tokens[:, :-1]), tokens[:, 1:])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        grads = jax.tree.map(lambda g: g * jnp.where(state.step == 3, 1e4, 1.0), grads)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, grads, loss, updates

    history = []
    for i in range(steps):
        params, state, grads, loss, updates = step(params, state, _tokens(10 + i, (4, 16)))
        history.append((grads, loss, updates))
    return history, state


def _stacked(tree):
    """An unrolled tree (``layers/i/...``) in the scanned layout (``layers/...`` stacked)."""
    tree = dict(nnx.to_pure_dict(tree)) if isinstance(tree, nnx.State) else dict(tree)
    layers = tree.pop("layers")
    tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in sorted(layers)])
    return tree


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_governor_on_stacked_layers_gives_the_unrolled_updates():
    # The same gradients and losses, in the two layouts: a learning rate at which the
    # per-tensor limit binds on some layers but not all.
    unrolled, _ = _pair()
    history, plain_state = _unrolled_run(unrolled, lbw_optax.lbw_adamw(3e-2), steps=5)
    limited = int(lbw_optax.telemetry(plain_state)["limited_tensors"])
    assert 0 < limited < num_sensed_tensors(nnx.state(unrolled, nnx.Param))
    tx = lbw_optax.lbw_adamw(3e-2, stacked=models.stacked_layers)
    params = _stacked(nnx.state(unrolled, nnx.Param))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads, loss, want in history:
        got, state = update(_stacked(grads), state, params, value=loss)
        for a, b in zip(jax.tree.leaves(_stacked(want)), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)
        params = optax.apply_updates(params, got)
    record, stacked_record = lbw_optax.telemetry(plain_state), lbw_optax.telemetry(state)
    for name in ("scale", "regime", "held", "limited_tensors", "skipped_steps"):
        np.testing.assert_allclose(stacked_record[name], record[name], rtol=1e-5)
    # The same per-layer norms, in another order (leaf-major against layer-major).
    np.testing.assert_allclose(
        np.sort(stacked_record["tensor_update_norms"]),
        np.sort(record["tensor_update_norms"]),
        rtol=1e-5,
    )


def test_stacked_leaves_are_one_tensor_per_layer_and_bad_masks_are_refused():
    params = {"layers": {"w": jnp.ones((4, 3, 2))}, "head": jnp.ones((3,)), "empty": jnp.ones(0)}
    mask = {"layers": True, "head": False, "empty": False}
    assert num_sensed_tensors(params) == 2
    assert num_sensed_tensors(params, mask) == 5
    assert tensor_sizes(params, lambda p: mask) == [3, 6, 6, 6, 6]
    names = lbw_optax.tensor_names(params, mask)
    assert names == ["head", "layers/w/0", "layers/w/1", "layers/w/2", "layers/w/3"]
    with pytest.raises(ValueError, match="stacked must be a tree of bools"):
        num_sensed_tensors(params, {"other": True})
    with pytest.raises(ValueError, match="leading layer axis"):
        num_sensed_tensors({"s": jnp.ones(())}, {"s": True})


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_stacked_limit_acts_per_layer():
    # Layer 0 moves 10x more than the others relative to its norm: only it is limited.
    params = {"w": jnp.ones((4, 8))}
    grads = {"w": jnp.ones((4, 8)).at[0].mul(10.0)}
    inner = optax.sgd(1e-2)
    policy = lbw_optax.governor_policy(max_update_ratio=0.05, limit_anneal=0.0)
    whole = lbw_optax.guard(inner, policy=policy)
    per_layer = lbw_optax.guard(inner, policy=policy, stacked={"w": True})
    updates = {}
    for name, tx in (("whole", whole), ("per_layer", per_layer)):
        state = tx.init(params)
        updates[name], state = tx.update(grads, state, params, value=jnp.float32(1.0))
        updates[name + "_limited"] = int(lbw_optax.telemetry(state)["limited_tensors"])
    norms = np.linalg.norm(params["w"], axis=1)
    ratio = np.linalg.norm(updates["per_layer"]["w"], axis=1) / norms
    np.testing.assert_allclose(ratio[0], 0.05, rtol=1e-5)  # The stressed layer, at the limit.
    np.testing.assert_allclose(ratio[1:], 1e-2 * np.sqrt(8) / np.sqrt(8), rtol=1e-5)  # Untouched.
    assert updates["per_layer_limited"] == 1
    assert updates["whole_limited"] == 1  # One tensor: the calm layers are cut with layer 0.
    whole_ratio = np.linalg.norm(updates["whole"]["w"], axis=1) / np.linalg.norm(
        params["w"], axis=1
    )
    assert whole_ratio[1] < 1e-2
