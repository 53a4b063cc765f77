"""``benchmarks.limiter_tensors``: its restatement of the per-tensor limit counts the same cuts
as the governor, and names the tensors in the order the guard senses them."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lbw_optax
from benchmarks.limiter_tensors import cuts, tensor_names
from lbw import models


def _json(value):
    return value.tolist() if hasattr(value, "tolist") else value


def test_cuts_count_what_the_governor_cut():
    params = {
        "big": jnp.ones((64,)),
        "small": jnp.full((16,), 0.05),
        "zero": jnp.zeros((8,)),  # The norm floor's case.
    }
    tx = lbw_optax.guard(optax.adam(0.01), policy=lbw_optax.governor_policy())
    state = tx.init(params)
    records, limited = [], 0
    for step in range(30):
        grads = jax.tree.map(lambda p, t=step: jnp.sin(p + t) + 0.1 * (t % 3), params)
        updates, state = tx.update(grads, state, params, value=jnp.float32(2.0 - 0.01 * step))
        params = optax.apply_updates(params, updates)
        tel = {k: _json(v) for k, v in lbw_optax.telemetry(state).items()}
        records.append({"kind": "train", "step": step + 1, "telemetry": tel})
        limited += tel["limited_tensors"]
    binds, peak, steps = cuts(records, limit=0.035, anneal=0.5)
    assert steps == 30
    assert limited > 0  # The case exercises the limiter.
    assert sum(binds.values()) == limited
    assert peak[1] > peak[0]  # The small tensor moves most relative to its norm.


def test_tensor_names_follow_the_sensed_order():
    names = tensor_names("tiny_qwen2_5_3b", {"num_layers": 1})
    decoder = models.Decoder(models.get_config("tiny_qwen2_5_3b", num_layers=1), rngs=nnx.Rngs(0))
    leaves = [x for x in jax.tree.leaves(nnx.state(decoder, nnx.Param)) if x.size]
    assert len(names) == len(leaves)
    assert names[0] == "embed_tokens/embedding"
    assert "layers/0/self_attn/k_proj/kernel" in names
