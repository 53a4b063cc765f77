"""What governance costs: XLA cost analysis, wall clock and state size, side by side with AdamW.

Prints ratios against plain ``optax.adamw`` for each method:

1. the compiled optimizer step (update + apply) on a ~10M-parameter tree: bytes accessed and
   flops from XLA's cost analysis (deterministic);
2. the same for a whole train step where activations dominate (a 4-layer, 512-wide MLP on a
   batch of 8192: forward, backward and optimizer);
3. interleaved wall-clock medians (min–max) of both, on this machine's CPU (noisy: A/A runs
   differ by up to 10 %);
4. optimizer-state bytes per parameter beyond AdamW's.

SGG re-clusters once every ``SGG_INTERVAL`` steps: its ordinary step and its re-clustering step
are compiled apart for the cost analysis (XLA's analysis of a ``lax.cond`` cannot tell them
apart, and counts a loop body once, so the re-clustering loops are unrolled there), timed
through the public ``sgg_adamw`` at step 2 and at step ``SGG_INTERVAL``, and averaged over one
interval: ``((T − 1) · ordinary + re-clustering) / T``.

Run: ``python -m benchmarks.overhead`` (``--repeats N`` for the wall clock, ``--quick`` for a
smaller run).
"""

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lbw_optax
from benchmarks.branches import one_branch

LEARNING_RATE = 1e-3
SGG_INTERVAL = 500  # sgg_adamw's default recluster_every


@dataclasses.dataclass(frozen=True)
class Method:
    """A transformation to compare. ``warm_steps`` updates run before measuring, so that a
    method whose work depends on its step (e.g. periodic re-clustering) is measured at a chosen
    point; ``variants`` name further states to measure (name → steps to run first)."""

    name: str
    make: Callable[[], optax.GradientTransformation]
    warm_steps: int = 1
    variants: tuple[tuple[str, int], ...] = ()
    cost_analysis: bool = True


METHODS: list[Method] = [
    Method("adamw", lambda: optax.adamw(LEARNING_RATE)),
    Method(
        "clip(1.0)+adamw",
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LEARNING_RATE)),
    ),
    Method("lbw(reference)", lambda: lbw_optax.lbw_adamw(LEARNING_RATE, policy="reference")),
    Method("lbw(governor)", lambda: lbw_optax.lbw_adamw(LEARNING_RATE, policy="governor")),
    Method(
        "lbw(governor-no-limiter)",
        lambda: lbw_optax.lbw_adamw(
            LEARNING_RATE, policy=lbw_optax.governor_policy(max_update_ratio=None)
        ),
    ),
    Method(
        "lbw(reference+update-check)",
        lambda: lbw_optax.guard(optax.adamw(LEARNING_RATE), policy="reference", check_updates=True),
    ),
    Method("sgg_adamw ordinary step", lambda: sgg_adamw_fixed("never")),
    Method("sgg_adamw re-clustering step", lambda: sgg_adamw_fixed("always")),
    Method(
        "sgg_adamw",
        lambda: lbw_optax.sgg_adamw(LEARNING_RATE, recluster_every=SGG_INTERVAL),
        variants=(("at re-clustering", SGG_INTERVAL - 1),),  # Step T re-clusters.
        cost_analysis=False,
    ),
]


def sgg_adamw_fixed(when: str) -> optax.GradientTransformation:
    """``sgg_adamw`` compiled as one kind of step only (see the module docstring): its update
    traced with every ``lax.cond`` taking the re-clustering branch (``"always"``) or never
    (``"never"``), and its loops unrolled (:func:`benchmarks.branches.one_branch`)."""
    tx = lbw_optax.sgg_adamw(LEARNING_RATE, recluster_every=SGG_INTERVAL)
    update = one_branch(tx.update, 1 if when == "always" else 0)
    return optax.GradientTransformationExtraArgs(tx.init, update)


def add_sgg_interval_mean(rows: dict, ordinary: str, reclustering: str) -> None:
    """Adds the mean over one re-clustering interval of two rows (dicts or time tuples)."""
    if ordinary not in rows or reclustering not in rows:
        return
    t = SGG_INTERVAL
    mean = lambda a, b: ((t - 1) * a + b) / t
    a, b = rows[ordinary], rows[reclustering]
    if isinstance(a, dict):
        rows[f"sgg_adamw mean over {t} steps"] = {k: mean(a[k], b[k]) for k in a}
    else:
        rows[f"sgg_adamw mean over {t} steps"] = tuple(map(mean, a, b))


# --- workloads --------------------------------------------------------------------------------


def big_tree(n_matrices: int = 10, width: int = 1024):
    """~10.5M parameters: ``n_matrices`` square matrices and their biases."""
    keys = jax.random.split(jax.random.key(0), n_matrices)
    return {
        f"layer{i}": {
            "kernel": 0.02 * jax.random.normal(k, (width, width), jnp.float32),
            "bias": jnp.zeros((width,), jnp.float32),
        }
        for i, k in enumerate(keys)
    }


def mlp_params(depth: int = 4, width: int = 512, d_in: int = 512):
    keys = jax.random.split(jax.random.key(1), depth)
    dims = [d_in] + [width] * depth
    return [
        {
            "kernel": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a),
            "bias": jnp.zeros((b,), jnp.float32),
        }
        for k, a, b in zip(keys, dims[:-1], dims[1:], strict=True)
    ]


def mlp_loss(params, x, y):
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["kernel"] + layer["bias"]
        if i < len(params) - 1:
            h = jax.nn.gelu(h)
    return jnp.mean(jnp.square(h - y))


def optimizer_step(tx):
    def step(grads, state, params, loss):
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    return step


def train_step(tx):
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, loss

    return step


# --- measurements -----------------------------------------------------------------------------


def cost(fn, *args) -> dict[str, float]:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return {"bytes": float(analysis["bytes accessed"]), "flops": float(analysis["flops"])}


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def advance(tx, params, steps: int):
    """Runs ``steps`` updates on fixed gradients; returns the state."""
    state = tx.init(params)
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    update = jax.jit(optimizer_step(tx))
    for _ in range(steps):
        _, state = update(grads, state, params, jnp.float32(1.0))
    return state


def states_to_measure(method: Method, params):
    """(label, tx, state) for the method's default point and its variants."""
    tx = method.make()
    out = [(method.name, tx, advance(tx, params, method.warm_steps))]
    for label, steps in method.variants:
        out.append((f"{method.name} {label}", tx, advance(tx, params, steps)))
    return out


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple]:
    """Times each thunk ``repeats`` times, interleaved, after one warm call; seconds."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        jax.block_until_ready(fn())
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {n: (statistics.median(t), min(t), max(t)) for n, t in times.items()}


def report(title: str, rows: dict[str, dict[str, float]], base: str = "adamw") -> None:
    print(f"\n## {title}")
    print("| method | bytes accessed | × adamw | flops | × adamw |")
    print("|---|---|---|---|---|")
    for name, c in rows.items():
        b, f = c["bytes"], c["flops"]
        print(
            f"| {name} | {b / 1e6:.1f} MB | {b / rows[base]['bytes']:.3f} | "
            f"{f / 1e6:.1f} M | {f / rows[base]['flops']:.3f} |"
        )


def report_times(title: str, medians: dict[str, tuple], base: str = "adamw") -> None:
    print(f"\n## {title}")
    print("| method | median ms (min–max) | × adamw |")
    print("|---|---|---|")
    for name, (med, lo, hi) in medians.items():
        ratio = med / medians[base][0]
        print(f"| {name} | {1e3 * med:.2f} ({1e3 * lo:.2f}–{1e3 * hi:.2f}) | {ratio:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="wall-clock repeats per method")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (for a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated method names (adamw kept)")
    args = parser.parse_args()
    methods = METHODS
    if args.only:
        keep = {"adamw", *args.only.split(",")}
        methods = [m for m in METHODS if m.name in keep]

    params = big_tree(n_matrices=2 if args.quick else 10)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    print(f"# Overhead against optax.adamw ({jax.devices()[0].platform}, {n_params:,} parameters)")

    opt_costs, opt_timers, state_bytes = {}, {}, {}
    for method in methods:
        for label, tx, state in states_to_measure(method, params):
            step = optimizer_step(tx)
            if method.cost_analysis:
                opt_costs[label] = cost(step, grads, state, params, jnp.float32(1.0))
            jitted = jax.jit(step)
            opt_timers[label] = lambda j=jitted, s=state: j(grads, s, params, jnp.float32(1.0))
            state_bytes[label] = tree_bytes(state)
    add_sgg_interval_mean(opt_costs, "sgg_adamw ordinary step", "sgg_adamw re-clustering step")
    report("Optimizer step (update + apply), XLA cost analysis", opt_costs)

    batch = 1024 if args.quick else 8192
    mparams = mlp_params()
    x = jax.random.normal(jax.random.key(2), (batch, 512), jnp.float32)
    y = jax.random.normal(jax.random.key(3), (batch, 512), jnp.float32)
    train_costs, train_timers = {}, {}
    for method in methods:
        for label, tx, state in states_to_measure(method, mparams):
            step = train_step(tx)
            if method.cost_analysis:
                train_costs[label] = cost(step, mparams, state, x, y)
            jitted = jax.jit(step)
            train_timers[label] = lambda j=jitted, s=state: j(mparams, s, x, y)
    add_sgg_interval_mean(train_costs, "sgg_adamw ordinary step", "sgg_adamw re-clustering step")
    report(f"Whole train step (4×512 MLP, batch {batch}), XLA cost analysis", train_costs)

    for title, timers in (("Optimizer step", opt_timers), ("Whole train step", train_timers)):
        medians = interleaved_medians(timers, args.repeats)
        add_sgg_interval_mean(medians, "sgg_adamw", "sgg_adamw at re-clustering")
        report_times(f"{title}, wall clock", medians)

    print("\n## Optimizer state")
    print("| method | state bytes / parameter | beyond adamw (bytes / parameter) |")
    print("|---|---|---|")
    for name, b in state_bytes.items():
        extra = (b - state_bytes["adamw"]) / n_params
        print(f"| {name} | {b / n_params:.4f} | {extra:.6f} |")


if __name__ == "__main__":
    main()
