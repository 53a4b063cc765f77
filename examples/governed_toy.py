"""Train a toy regression model under the guard, inject a fault, and print the telemetry."""

import jax
import jax.numpy as jnp
import optax

import lbw_optax


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def main() -> None:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": 0.5 * jax.random.normal(k1, (8, 32)),
        "b1": jnp.zeros(32),
        "w2": 0.5 * jax.random.normal(k2, (32, 1)),
    }
    x = jax.random.normal(k3, (256, 8))
    y = jnp.sin(x.sum(axis=1, keepdims=True))

    tx = lbw_optax.lbw_adamw(3e-2)  # AdamW governed by our governor policy
    state = tx.init(params)

    @jax.jit
    def step(params, state, fault):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        grads = jax.tree.map(lambda g: g * fault, grads)  # fault injection: ×fault
        updates, state = tx.update(grads, state, params, value=loss * fault)
        return optax.apply_updates(params, updates), state, loss

    for i in range(1, 301):
        fault = {100: 1e4, 200: jnp.nan}.get(i, 1.0)  # a 10⁴× spike, then a NaN step
        params, state, loss = step(params, state, jnp.float32(fault))
        if i % 50 == 0 or i in (100, 101, 200):
            t = lbw_optax.telemetry(state)
            print(
                f"step {i:3d}  loss {float(loss):.4f}  "
                f"regime {lbw_optax.Regime(int(t['regime'])).name:<11} "
                f"scale {float(t['scale']):.3f}  held {bool(t['held'])}"
            )
    t = lbw_optax.telemetry(state)
    print(
        {
            k: round(float(t[k]), 4)
            for k in (
                "step",
                "control_active_steps",
                "regime_switches",
                "control_energy",
                "skipped_steps",
                "nonfinite_steps",
            )
        }
    )


if __name__ == "__main__":
    main()
