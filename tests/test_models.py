"""Fast CPU tests of the decoder, presets, LoRA, checkpoint I/O and tokenizers."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lbw import models

PUBLISHED_COUNTS = {
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_1_5b": 1_543_714_304,
    "qwen2_5_3b": 3_085_938_688,
    "qwen2_5_7b": 7_615_616_512,
    "qwen2_5_14b": 14_770_033_664,
    "tinyllama_1_1b": 1_100_048_384,
}


def small_config(**overrides) -> models.ModelConfig:
    defaults = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    return models.ModelConfig(**{**defaults, **overrides})


def random_tokens(seed: int, shape=(2, 12), vocab=64) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@nnx.jit
def forward(model, tokens, positions=None, attention_mask=None):
    return model(tokens, positions=positions, attention_mask=attention_mask)


def abstract_model(config: models.ModelConfig) -> models.Decoder:
    return nnx.eval_shape(lambda: models.Decoder(config, rngs=nnx.Rngs(0)))


def param_shapes(model) -> dict[str, tuple[int, ...]]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): var.shape for path, var in flat}


# --- presets -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_public_preset_matches_published_parameter_count(name):
    assert models.count_params(models.PRESETS[name]()) == PUBLISHED_COUNTS[name]


def test_small_125m_preset_is_gpt2_small_scale():
    config = models.small_125m()
    assert models.count_params(config) == 123_614_976  # GPT-2 small: 124,439,808.
    # Its parameter tree, without allocating it, holds that many values.
    leaves = jax.tree.leaves(nnx.state(abstract_model(config), nnx.Param))
    assert sum(x.size for x in leaves) == 123_614_976
    assert config.tie_embeddings and config.num_layers == 12 and config.hidden_size == 768


def test_count_params_counts_a_real_model():
    model = models.Decoder(small_config(), rngs=nnx.Rngs(0))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(x.size for x in leaves) == models.count_params(small_config()) == 19_744


@pytest.mark.parametrize(
    ("tiny", "full"),
    [
        ("tiny_qwen2_5_3b", "qwen2_5_3b"),
        ("tiny_qwen2_5_7b", "qwen2_5_7b"),
        ("tiny_qwen2_5_14b", "qwen2_5_14b"),
        ("tiny_tinyllama_1_1b", "tinyllama_1_1b"),
    ],
)
def test_tiny_preset_keeps_family_layout(tiny, full):
    small, big = models.PRESETS[tiny](), models.PRESETS[full]()
    assert small.arch == big.arch
    assert small.qkv_bias == big.qkv_bias
    assert small.tie_embeddings == big.tie_embeddings
    assert small.num_groups == big.num_groups
    assert small.rope_theta == big.rope_theta


def test_tiny_ladder_grows():
    counts = [models.count_params(models.PRESETS[n]()) for n in models.TINY_PRESETS[:3]]
    assert counts == sorted(counts) and counts[-1] > 3 * counts[0]


def test_get_config_overrides_and_rejects_unknown_names():
    config = models.get_config("tiny_qwen2_5_3b", dtype=jnp.bfloat16)
    assert config.dtype == jnp.bfloat16 and config.hidden_size == 128
    with pytest.raises(ValueError, match="no_such_model"):
        models.get_config("no_such_model")


@pytest.mark.parametrize(
    "overrides",
    [dict(num_heads=6, num_kv_heads=4), dict(head_dim=7), dict(arch="gpt2"), dict(num_layers=0)],
)
def test_invalid_config_raises(overrides):
    with pytest.raises(ValueError):
        small_config(**overrides)


# --- layouts: GQA, bias, tying, dtypes -----------------------------------------------------


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_parameter_shapes_follow_config(qkv_bias, tie):
    config = small_config(qkv_bias=qkv_bias, tie_embeddings=tie, num_heads=4, num_kv_heads=1)
    shapes = param_shapes(abstract_model(config))
    assert shapes["layers/0/self_attn/q_proj/kernel"] == (32, 4 * 8)
    assert shapes["layers/0/self_attn/k_proj/kernel"] == (32, 1 * 8)
    assert shapes["layers/0/self_attn/v_proj/kernel"] == (32, 1 * 8)
    assert shapes["layers/0/self_attn/o_proj/kernel"] == (4 * 8, 32)
    assert ("layers/0/self_attn/q_proj/bias" in shapes) == qkv_bias
    assert ("layers/0/self_attn/k_proj/bias" in shapes) == qkv_bias
    assert "layers/0/self_attn/o_proj/bias" not in shapes
    assert ("lm_head/kernel" in shapes) == (not tie)


def test_tied_head_uses_the_embedding_table():
    model = models.Decoder(small_config(tie_embeddings=True), rngs=nnx.Rngs(0))
    tokens = random_tokens(0)
    before = forward(model, tokens)
    model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...].at[5].set(0.0)
    after = forward(model, tokens)
    # Row 5 of the table is also the output weight of token 5: its logit becomes exactly 0.
    np.testing.assert_array_equal(after[..., 5], 0.0)
    assert not np.allclose(before[..., 5], 0.0)


def test_gqa_equals_attention_with_repeated_kv_heads():
    """A K-head GQA model computes what an N-head model with each k/v head repeated does."""
    gqa_config = small_config(num_heads=4, num_kv_heads=2)
    mha_config = dataclasses.replace(gqa_config, num_kv_heads=4)
    gqa = models.Decoder(gqa_config, rngs=nnx.Rngs(0))
    mha = models.Decoder(mha_config, rngs=nnx.Rngs(1))
    head_dim, groups = gqa_config.head_dim, gqa_config.num_groups

    def repeat_heads(x):  # [..., K*H] → [..., N*H], each head repeated G times
        heads = x.reshape(*x.shape[:-1], -1, head_dim)
        return jnp.repeat(heads, groups, axis=-2).reshape(*x.shape[:-1], -1)

    gqa_params = nnx.to_flat_state(nnx.state(gqa, nnx.Param))
    mha_params = dict(nnx.to_flat_state(nnx.state(mha, nnx.Param)))
    for path, var in gqa_params:
        value = var[...]
        if path[-2] in ("k_proj", "v_proj"):
            value = repeat_heads(value)
        mha_params[path][...] = value
    tokens = random_tokens(0)
    chex.assert_trees_all_close(forward(gqa, tokens), forward(mha, tokens), atol=1e-6)


def test_attention_is_causal():
    model = models.Decoder(small_config(), rngs=nnx.Rngs(0))
    tokens = random_tokens(0)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 64)
    a, b = forward(model, tokens), forward(model, changed)
    chex.assert_trees_all_close(a[:, :7], b[:, :7], atol=1e-6)
    assert not np.allclose(a[:, 7:], b[:, 7:], atol=1e-4)


def test_padded_tokens_do_not_reach_real_positions():
    model = models.Decoder(small_config(), rngs=nnx.Rngs(0))
    tokens = random_tokens(0, shape=(2, 12))
    mask = jnp.ones((2, 12), jnp.int32).at[0, :4].set(0).at[1, 5:8].set(0)  # left pad, hole
    other = jnp.where(mask == 1, tokens, (tokens + 17) % 64)  # new values under the padding
    a = forward(model, tokens, attention_mask=mask)
    b = forward(model, other, attention_mask=mask)
    real = np.asarray(mask, bool)
    np.testing.assert_array_equal(np.asarray(a)[real], np.asarray(b)[real])
    chex.assert_tree_all_finite(a)
    # Without the mask the padded tokens do reach the real ones.
    assert not np.allclose(np.asarray(forward(model, tokens))[real], np.asarray(a)[real])


def test_left_padding_with_shifted_positions_matches_unpadded():
    model = models.Decoder(small_config(), rngs=nnx.Rngs(0))
    tokens = random_tokens(0, shape=(1, 12))
    padded = jnp.concatenate([jnp.full((1, 3), 7, tokens.dtype), tokens], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, 3)), jnp.ones((1, 12))], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    out = forward(model, padded, positions=positions, attention_mask=mask)
    chex.assert_trees_all_close(out[:, 3:], forward(model, tokens), atol=1e-5)
    chex.assert_tree_all_finite(out)  # Fully masked (padding) rows stay finite.


def test_rms_norm_computes_in_float32():
    config = small_config(dtype=jnp.bfloat16)
    norm = models.RMSNorm(config, rngs=nnx.Rngs(0))
    x = (jax.random.normal(jax.random.key(0), (64, 32)) * 30.0).astype(jnp.bfloat16)
    x32 = x.astype(jnp.float32)
    expected = x32 / jnp.sqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + config.rms_norm_eps)
    out = norm(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, expected.astype(jnp.bfloat16))


def test_compute_and_parameter_dtypes_are_separate():
    def dtypes(config):
        model = abstract_model(config)
        logits = nnx.eval_shape(lambda m: m(jnp.zeros((2, 8), jnp.int32)), model)
        return {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}, logits.dtype

    assert dtypes(small_config(dtype=jnp.bfloat16)) == ({jnp.dtype("float32")}, jnp.bfloat16)
    assert dtypes(small_config(param_dtype=jnp.bfloat16)) == ({jnp.dtype("bfloat16")}, jnp.float32)


def test_rope_rotates_pairs_of_half_dimensions():
    x = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
    positions = jnp.array([[0, 1, 5]])
    out = models.apply_rope(x, positions, theta=10_000.0)
    chex.assert_trees_all_close(out[:, 0], x[:, 0])  # position 0 is the identity
    # A rotation keeps the norm of each (i, i + H/2) pair.
    pairs_in = x[..., :4] ** 2 + x[..., 4:] ** 2
    pairs_out = out[..., :4] ** 2 + out[..., 4:] ** 2
    chex.assert_trees_all_close(pairs_in, pairs_out, atol=1e-5)
    # Dimension 0 turns by exactly `position` radians (inverse frequency 1).
    angle = 5.0
    expected = x[0, 2, :, 0] * jnp.cos(angle) - x[0, 2, :, 4] * jnp.sin(angle)
    chex.assert_trees_all_close(out[0, 2, :, 0], expected, atol=1e-5)


# --- loss ----------------------------------------------------------------------------------


def test_cross_entropy_loss_values_and_mask():
    uniform = jnp.zeros((2, 3, 10), jnp.bfloat16)
    targets = jnp.zeros((2, 3), jnp.int32)
    loss = models.cross_entropy_loss(uniform, targets)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, np.log(10.0), rtol=1e-6)

    logits = np.random.default_rng(0).normal(size=(2, 3, 10)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    log_z = np.log(np.exp(logits).sum(-1))
    per_token = log_z - logits[..., 0]  # every target is token 0
    expected = (per_token[0, 0] + per_token[0, 1] + per_token[1, 0]) / 3
    np.testing.assert_allclose(models.cross_entropy_loss(logits, targets, mask), expected, 1e-6)
    assert models.cross_entropy_loss(logits, targets, jnp.zeros((2, 3))) == 0.0


# --- LoRA ----------------------------------------------------------------------------------


def lm_loss(model, tokens):
    return models.cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])


def train(model, wrt, steps=3, learning_rate=1e-2):
    optimizer = nnx.Optimizer(model, optax.adamw(learning_rate), wrt=wrt)

    @nnx.jit
    def step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, wrt))(model, tokens)
        optimizer.update(model, grads, value=loss)
        return loss

    losses = [float(step(model, optimizer, random_tokens(0, (4, 16)))) for _ in range(steps)]
    return losses


def test_fresh_adapters_give_the_base_logits():
    model = models.Decoder(small_config(), rngs=nnx.Rngs(0))
    tokens = random_tokens(1)
    base = forward(model, tokens)
    models.add_lora(model, rank=4, alpha=8.0, targets=models.ALL_TARGETS, rngs=nnx.Rngs(1))
    assert models.has_lora(model)
    np.testing.assert_array_equal(forward(model, tokens), base)


def test_adapters_sit_on_the_chosen_projections():
    model = models.Decoder(small_config(), rngs=nnx.Rngs(0))
    models.add_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    lora = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert len(lora) == 2 * 4 * 2  # layers × (q, k, v, o) × (A, B)
    assert "layers/1/self_attn/v_proj/lora_a" in lora
    assert not any("mlp" in p for p in lora)
    block = model.layers[0]
    assert block.self_attn.q_proj.lora_a.shape == (32, 2)
    assert block.self_attn.k_proj.lora_b.shape == (2, 16)
    assert block.self_attn.q_proj.scaling == 2.0

    models.add_lora(model, rank=2, targets=models.MLP_TARGETS, rngs=nnx.Rngs(2))
    assert model.layers[1].mlp.down_proj.lora_b.shape == (2, 32)
    with pytest.raises(ValueError, match="already carries"):
        models.add_lora(model, rank=2, targets=("q_proj",), rngs=nnx.Rngs(3))


@pytest.mark.parametrize(
    "kwargs", [dict(rank=0), dict(alpha=0.0), dict(targets=("qkv",)), dict(targets=())]
)
def test_add_lora_validates_arguments(kwargs):
    model = models.Decoder(small_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        models.add_lora(model, rngs=nnx.Rngs(1), **kwargs)


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_lora_training_changes_only_adapters_and_merge_agrees():
    config = small_config(num_layers=1)
    model = models.Decoder(config, rngs=nnx.Rngs(0))
    models.add_lora(model, rank=4, alpha=8.0, targets=models.ALL_TARGETS, rngs=nnx.Rngs(1))
    base_before = jax.tree.map(jnp.copy, nnx.state(model, models.BASE_PARAMS))
    lora_before = jax.tree.map(jnp.copy, nnx.state(model, models.LORA_PARAMS))

    losses = train(model, models.LORA_PARAMS)

    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(nnx.state(model, models.BASE_PARAMS), base_before)
    lora_after = nnx.state(model, models.LORA_PARAMS)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), lora_after, lora_before)
    assert all(jax.tree.leaves(changed))

    tokens = random_tokens(2)
    adapted = forward(model, tokens)
    models.merge_lora(model)
    assert not models.has_lora(model)
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    assert param_shapes(model) == param_shapes(abstract_model(config))
    chex.assert_trees_all_close(forward(model, tokens), adapted, atol=1e-5)
    base = models.Decoder(config, rngs=nnx.Rngs(0))
    assert not np.allclose(adapted, forward(base, tokens), atol=1e-3)


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_full_training_with_base_filter_leaves_adapters_alone():
    model = models.Decoder(small_config(num_layers=1), rngs=nnx.Rngs(0))
    models.add_lora(model, rank=2, rngs=nnx.Rngs(1))
    lora_before = jax.tree.map(jnp.copy, nnx.state(model, models.LORA_PARAMS))
    base_before = jax.tree.map(jnp.copy, nnx.state(model, models.BASE_PARAMS))
    losses = train(model, models.BASE_PARAMS)
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(nnx.state(model, models.LORA_PARAMS), lora_before)
    embedding_moved = model.embed_tokens.embedding[...] != base_before["embed_tokens"]["embedding"]
    assert bool(jnp.any(embedding_moved))


# --- checkpoints without torch -------------------------------------------------------------


@pytest.mark.parametrize("shard_size", ["5GB", 20_000])
def test_save_then_load_round_trip(tmp_path, shard_size):
    config = small_config(tie_embeddings=False)
    model = models.Decoder(config, rngs=nnx.Rngs(0))
    models.save_pretrained(model, tmp_path, max_shard_size=shard_size)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (shard_size == 20_000)
    assert sharded != (tmp_path / "model.safetensors").exists()
    loaded = models.load_pretrained(tmp_path)
    assert dataclasses.replace(loaded.config, name="x") == dataclasses.replace(config, name="x")
    tokens = random_tokens(0)
    np.testing.assert_array_equal(forward(loaded, tokens), forward(model, tokens))


def test_save_merges_adapters_into_a_copy(tmp_path):
    model = models.Decoder(small_config(), rngs=nnx.Rngs(0))
    models.add_lora(model, rank=2, rngs=nnx.Rngs(1))
    for path, var in nnx.to_flat_state(nnx.state(model, models.LORA_PARAMS)):
        if path[-1] == "lora_b":  # as if trained: B moves away from zero
            var[...] = 0.1 * jax.random.normal(jax.random.key(len(path)), var.shape)
    models.save_pretrained(model, tmp_path)
    assert models.has_lora(model)
    tokens = random_tokens(0)
    chex.assert_trees_all_close(
        forward(models.load_pretrained(tmp_path), tokens), forward(model, tokens), atol=1e-5
    )


def test_load_in_bfloat16(tmp_path):
    model = models.Decoder(small_config(arch="llama", qkv_bias=False), rngs=nnx.Rngs(0))
    models.save_pretrained(model, tmp_path, dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = models.load_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert loaded.config.arch == "llama" and not loaded.config.qkv_bias
    assert loaded.layers[0].self_attn.q_proj.kernel.dtype == jnp.float32
    logits = forward(loaded, random_tokens(0))
    assert logits.dtype == jnp.bfloat16
    chex.assert_trees_all_close(
        logits.astype(jnp.float32), forward(model, random_tokens(0)), atol=0.05
    )


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        models.load_pretrained(tmp_path)

    models.save_pretrained(models.Decoder(small_config(), rngs=nnx.Rngs(0)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="Unsupported architecture"):
        models.load_pretrained(tmp_path)

    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    with pytest.raises(ValueError, match="rope_type"):
        models.load_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"lacks .* tensors"):
        models.load_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="does not use"):
        models.load_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ValueError, match="shape"):
        models.load_pretrained(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        models.load_pretrained(tmp_path)


# The config.json files published with Qwen/Qwen2.5-0.5B and TinyLlama/TinyLlama-1.1B.
QWEN2_5_0_5B_CONFIG_JSON = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
TINYLLAMA_CONFIG_JSON = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 2048,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 22,
    "num_key_value_heads": 4,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 32000,
}


@pytest.mark.parametrize(
    ("hf_config", "preset"),
    [(QWEN2_5_0_5B_CONFIG_JSON, "qwen2_5_0_5b"), (TINYLLAMA_CONFIG_JSON, "tinyllama_1_1b")],
)
def test_published_config_json_gives_the_preset(hf_config, preset):
    config = models.config_from_hf(hf_config, name=preset)
    assert config == models.PRESETS[preset]()


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_config_to_hf_round_trips(name):
    config = models.PRESETS[name]()
    assert models.config_from_hf(models.config_to_hf(config), name=name) == config


def test_export_rejects_configs_hf_cannot_express():
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        models.config_to_hf(small_config(arch="qwen2", qkv_bias=False))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        models.config_to_hf(small_config(arch="llama", qkv_bias=True))


# --- tokenizers ----------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = models.load_tokenizer()
    assert isinstance(tok, models.ByteTokenizer)
    text = "Grüße, 世界! \n"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert max(ids) < tok.vocab_size <= models.tiny_qwen2_5_3b().vocab_size
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


def test_hf_tokenizer_from_local_directory(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(tmp_path)

    tok = models.load_tokenizer(tmp_path)
    assert tok.vocab_size == 5
    assert tok.pad_id == tok.eos_id == 2 and tok.bos_id == 1
    assert tok.encode("hello world", add_eos=True) == [3, 4, 2]
    assert tok.decode([3, 4, 2]) == "hello world"
    with pytest.raises(FileNotFoundError):
        models.load_tokenizer(tmp_path / "missing")
