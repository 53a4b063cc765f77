"""The shared harness every transformation in lbw_optax passes.

A transformation joins by adding a :class:`Case` to :data:`CASES`. ``make`` is called with a
``learning_rate=`` keyword (so ``optax.inject_hyperparams`` can drive it) and returns the
transformation. Tests live in ``tests/test_harness.py``.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.extend.core
import jax.numpy as jnp
import optax

import lbw_optax


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Callable[..., optax.GradientTransformation]
    learning_rate: float = 1e-2


def _guarded_sgd(learning_rate):
    return lbw_optax.guard(optax.sgd(learning_rate, momentum=0.9), policy="reference")


CASES: list[Case] = [
    Case("lbw_adamw-governor", functools.partial(lbw_optax.lbw_adamw, policy="governor")),
    Case("lbw_adamw-reference", functools.partial(lbw_optax.lbw_adamw, policy="reference")),
    Case("guard-sgd-reference", _guarded_sgd),
    # recluster_every=5: the 100-step tests re-cluster many times.
    Case("sgg_adamw", functools.partial(lbw_optax.sgg_adamw, recluster_every=5)),
    Case(
        "guard-sgg_adamw",
        lambda learning_rate: lbw_optax.guard(
            lbw_optax.sgg_adamw(learning_rate, recluster_every=5)
        ),
    ),
    # Peers. Paper defaults where 100 steps exercise them; AdaGC leaves warm-up at step 10 and
    # SPAM resets every 20 steps, so the 100-step tests cover the adaptive and reset paths.
    Case("zclip_adamw", lbw_optax.zclip_adamw),
    Case("skip_step_adamw", lbw_optax.skip_step_adamw),
    Case("adagc_adamw", functools.partial(lbw_optax.adagc_adamw, warmup_steps=10)),
    Case(
        "spam_adamw",
        functools.partial(lbw_optax.spam_adamw, reset_interval=20, warmup_steps=5),
    ),
    Case("stable_adamw", lbw_optax.stable_adamw),
]


def make_params(dtype=jnp.float32):
    """A small tree with a matrix, a vector and a scalar-like tensor."""
    return {
        "dense": {"kernel": jnp.linspace(-1.0, 1.0, 24, dtype=dtype).reshape(4, 6)},
        "bias": jnp.full((6,), 0.1, dtype),
        "gain": jnp.ones((1,), dtype),
    }


def make_grads(params, step: int, *, spike: float = 1.0):
    """Deterministic, step-dependent gradients (no RNG, so retracing would show)."""
    phase = jnp.float32(step)
    return jax.tree.map(
        lambda p: (
            spike * (jnp.sin(phase + jnp.arange(p.size, dtype=jnp.float32)) + 0.3).reshape(p.shape)
        ).astype(p.dtype),
        params,
    )


def loss_at(step: int, *, spike: float = 1.0):
    return jnp.float32(spike * (2.0 + 1.0 / (1.0 + step)))


_HOST_PRIMITIVES = ("callback", "debug_print", "debug_callback")


def host_callbacks(fn, *args, **kwargs) -> list[str]:
    """Names of host-callback primitives anywhere in the jaxpr of ``fn`` (sub-jaxprs included),
    plus ``"lowered"`` if the lowered module calls back to the host."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if any(name in eqn.primitive.name for name in _HOST_PRIMITIVES):
                found.append(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    bound = functools.partial(fn, **kwargs)
    walk(jax.make_jaxpr(bound)(*args).jaxpr)
    if "callback" in jax.jit(bound).lower(*args).as_text():
        found.append("lowered")
    return found
