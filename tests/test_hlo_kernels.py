"""benchmarks.hlo_kernels counts what a compiled program launches, from its optimized HLO."""

import jax
import jax.numpy as jnp

from benchmarks import hlo_kernels

BANDWIDTH, PEAK = 1e12, 1e14


def _count(fn, *args):
    text = jax.jit(fn).lower(*args).compile().as_text()
    return hlo_kernels.count(text, bandwidth=BANDWIDTH, peak_flops=PEAK)


def test_a_loop_launches_its_body_once_per_iteration_and_reads_only_its_slice():
    stacked = jnp.ones((8, 256, 256), jnp.float32)

    def scan(n):
        def body(x, w):
            return jnp.tanh(x @ w), None

        return lambda w: jax.lax.scan(body, jnp.ones((4, 256)), w[:n])[0]

    four, eight = _count(scan(4), stacked), _count(scan(8), stacked)
    # Twice the iterations: twice the body's kernels and bytes (the loop's fixed cost aside).
    assert eight.kernels > four.kernels
    body_kernels = eight.kernels - four.kernels
    assert body_kernels >= 4  # At least a matmul and an activation per iteration, for 4 more.
    # Each iteration reads one 256×256 slice of the stack, not the whole stack.
    per_iteration = (eight.bytes - four.bytes) / 4
    assert 256 * 256 * 4 <= per_iteration < 8 * 256 * 256 * 4
    assert abs(eight.flops - 2 * four.flops) < 1e-6 * eight.flops


def test_bytes_flops_and_the_estimate_of_one_kernel():
    a, b = jnp.ones((128, 64), jnp.float32), jnp.ones((64, 32), jnp.float32)
    counts = _count(lambda a, b: a @ b, a, b)
    assert counts.flops == 2 * 128 * 64 * 32
    assert counts.bytes >= (128 * 64 + 64 * 32 + 128 * 32) * 4
    roofline = counts.roofline_s
    assert counts.estimated_s(1e-5) == roofline + counts.kernels * 1e-5


def test_reductions_are_counted_as_such():
    x = jnp.ones((1000,), jnp.float32)
    counts = _count(lambda x: (jnp.sum(x), x * 2.0), x)
    assert counts.reduction_kernels >= 1
    assert counts.kernels >= counts.reduction_kernels


def test_shapes_and_the_entry_are_read():
    assert hlo_kernels.shape_bytes("(f32[2,3]{1,0}, bf16[4]{0}, pred[])") == 24 + 8 + 1
    computations, entry = hlo_kernels.parse_computations(
        "HloModule m\n\nENTRY %main (p: f32[4]) -> f32[4] {\n"
        "  %p = f32[4]{0} parameter(0)\n"
        "  ROOT %n = f32[4]{0} negate(%p)\n}\n"
    )
    assert entry == "main" and [i.opcode for i in computations[entry]] == ["parameter", "negate"]
    counts = hlo_kernels.count(
        "HloModule m\n\nENTRY %main (p: f32[4]) -> f32[4] {\n"
        "  %p = f32[4]{0} parameter(0)\n"
        "  ROOT %n = f32[4]{0} negate(%p)\n}\n",
        bandwidth=BANDWIDTH,
        peak_flops=PEAK,
    )
    assert (counts.kernels, counts.bytes) == (1, 32)


def test_copies_are_counted_as_such():
    text = (
        "HloModule m\n\nENTRY %main (p: f32[4]) -> (f32[4], f32[4]) {\n"
        "  %p = f32[4]{0} parameter(0)\n"
        "  %c = f32[4]{0} copy(%p)\n"
        "  %n = f32[4]{0} negate(%p)\n"
        "  ROOT %t = (f32[4]{0}, f32[4]{0}) tuple(%c, %n)\n}\n"
    )
    counts = hlo_kernels.count(text, bandwidth=BANDWIDTH, peak_flops=PEAK)
    assert (counts.kernels, counts.copy_kernels) == (2, 1)
