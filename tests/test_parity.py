"""Logit parity with Hugging Face ``transformers`` (PyTorch, CPU) on small random checkpoints.

Runs when the ``parity`` extra (torch, transformers, safetensors) is installed.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lbw import models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def hf_qwen2(*, tie: bool):
    config = transformers.Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4 if tie else 8,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    return transformers.Qwen2ForCausalLM(config)


def hf_llama():
    config = transformers.LlamaConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
    )
    return transformers.LlamaForCausalLM(config)


BUILDERS = {
    "qwen2_tied": lambda: hf_qwen2(tie=True),
    "qwen2_untied": lambda: hf_qwen2(tie=False),
    "llama": hf_llama,
}


def make_hf_model(kind: str):
    """A random float32 model whose biases and norm scales are nonzero as well."""
    torch.manual_seed(0)
    model = BUILDERS[kind]().float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def hf_logits(model, tokens, attention_mask=None) -> np.ndarray:
    mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens)), attention_mask=mask).logits.numpy()


@nnx.jit
def forward(model, tokens, attention_mask=None):
    return model(tokens, attention_mask=attention_mask)


def random_tokens(vocab_size: int, seed: int = 0, shape=(2, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, shape)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def checkpoint(request, tmp_path_factory):
    """(kind, HF model, directory of its saved checkpoint)."""
    hf_model = make_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    return request.param, hf_model, directory


def test_logits_match_transformers(checkpoint):
    kind, hf_model, directory = checkpoint
    model = models.load_pretrained(directory)
    config = model.config
    assert config.arch == kind.split("_")[0]
    assert config.qkv_bias == (config.arch == "qwen2")
    assert config.tie_embeddings == (kind == "qwen2_tied")
    assert config.rope_theta == (1e6 if config.arch == "qwen2" else 1e4)
    tokens = random_tokens(config.vocab_size)
    np.testing.assert_allclose(forward(model, tokens), hf_logits(hf_model, tokens), atol=ATOL)


def test_logits_match_transformers_with_padding(checkpoint):
    _, hf_model, directory = checkpoint
    model = models.load_pretrained(directory)
    tokens = random_tokens(model.config.vocab_size, seed=1, shape=(3, 16))
    mask = np.ones((3, 16), np.int32)
    mask[0, 11:] = 0  # right padding
    mask[1, :5] = 0  # left padding
    mask[2, 3:6] = 0  # a hole
    ours = np.asarray(forward(model, tokens, mask))
    theirs = hf_logits(hf_model, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=ATOL)
    assert np.isfinite(ours).all()


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    hf_model = make_hf_model("qwen2_untied")
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    model = models.load_pretrained(tmp_path)
    tokens = random_tokens(model.config.vocab_size, seed=2)
    np.testing.assert_allclose(forward(model, tokens), hf_logits(hf_model, tokens), atol=ATOL)


@pytest.mark.parametrize("max_shard_size", ["5GB", 60_000])
def test_export_loads_back_into_transformers(checkpoint, tmp_path, max_shard_size):
    kind, hf_model, directory = checkpoint
    model = models.load_pretrained(directory)
    models.save_pretrained(model, tmp_path, max_shard_size=max_shard_size)
    sharded = (tmp_path / "model.safetensors.index.json").is_file()
    assert sharded == isinstance(max_shard_size, int)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
    reloaded = cls.from_pretrained(tmp_path).float().eval()
    tokens = random_tokens(model.config.vocab_size, seed=3)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens), atol=ATOL)
    assert reloaded.config.tie_word_embeddings == model.config.tie_embeddings


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_lora_fresh_equals_base_and_merge_matches_after_training(checkpoint, tmp_path):
    kind, hf_model, directory = checkpoint
    model = models.load_pretrained(directory)
    vocab = model.config.vocab_size
    tokens = random_tokens(vocab, seed=4)
    targets = models.ALL_TARGETS if kind == "llama" else models.ATTENTION_TARGETS
    models.add_lora(model, rank=4, alpha=8.0, targets=targets, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(forward(model, tokens), hf_logits(hf_model, tokens), atol=ATOL)

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=models.LORA_PARAMS)

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(model):
            return models.cross_entropy_loss(model(batch[:, :-1]), batch[:, 1:])

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, models.LORA_PARAMS))
        loss, grads = grad_fn(model)
        optimizer.update(model, grads, value=loss)
        return loss

    batch = jnp.asarray(random_tokens(vocab, seed=5, shape=(4, 17)))
    losses = [float(step(model, optimizer, batch)) for _ in range(4)]
    assert losses[-1] < losses[0]

    adapted = np.asarray(forward(model, tokens))
    assert np.abs(adapted - hf_logits(hf_model, tokens)).max() > 1e-2  # the adapters did move

    models.save_pretrained(model, tmp_path)  # merges a copy
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
    exported = cls.from_pretrained(tmp_path).float().eval()
    np.testing.assert_allclose(hf_logits(exported, tokens), adapted, atol=ATOL)

    merged = models.merge_lora(model)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    np.testing.assert_allclose(forward(merged, tokens), adapted, atol=ATOL)
