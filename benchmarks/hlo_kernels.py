"""The kernels of a compiled XLA program, read from its optimized HLO text.

Each instruction of the entry computation other than parameters, tuples, tuple elements,
bitcasts and constants is one kernel launch. A ``while`` loop launches its body's kernels once
per iteration (its ``known_trip_count``) and its condition's once more; a ``call`` (e.g. a GPU
command buffer) launches what it calls; a ``conditional`` is counted by its cheapest branch
(SGG's re-clustering runs once in ``recluster_every`` steps: its ordinary step is counted).

Per kernel: the bytes it moves (its operands plus its outputs, as XLA's own cost model counts a
memory-bound kernel), the flops of its matrix products (``dot`` instructions inside a fusion,
cuBLAS ``gemm`` custom calls), whether it reduces (a ``reduce`` inside), and whether it is
scalar-only (every output a single element: all launch and no work).

Only text is read, so the same code counts a CPU program and a GPU program compiled without a
GPU (``benchmarks/gpu_compile.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

SCALAR_ELEMENTS = 1
_FREE = frozenset(
    {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all", "partition-id"}
)
_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str
    opcode: str
    rest: str  # operands and attributes
    root: bool = False

    def operands(self) -> list[str]:
        # The operand list ends at the first ")" that closes the opcode's "(".
        depth, end = 1, len(self.rest)
        for i, char in enumerate(self.rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                end = i
                break
        return _OPERAND.findall(self.rest[:end])

    def attribute(self, key: str) -> str | None:
        match = re.search(rf"\b{key}=%?([\w.\-]+)", self.rest)
        return match.group(1) if match else None


@dataclasses.dataclass
class Counts:
    """What a program launches (sums over kernels, loops unrolled by their trip counts)."""

    kernels: int = 0
    reduction_kernels: int = 0
    scalar_kernels: int = 0
    # Kernels that only copy a buffer (e.g. the state that passes through a conditional).
    copy_kernels: int = 0
    bytes: float = 0.0
    flops: float = 0.0
    # Σ over kernels of max(bytes / bandwidth, flops / peak): the roofline time without launches.
    roofline_s: float = 0.0

    def add(self, other: Counts, times: int = 1) -> None:
        for field in dataclasses.fields(self):
            name = field.name
            setattr(self, name, getattr(self, name) + times * getattr(other, name))

    def estimated_s(self, kernel_s: float) -> float:
        """The roofline time plus a fixed cost per kernel launch."""
        return self.roofline_s + self.kernels * kernel_s


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (dtype, dims) of every array in an HLO shape (a tuple shape has several)."""
    found = _ARRAY.findall(shape)
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in found]


def shape_bytes(shape: str) -> int:
    return sum(_BYTES[dtype] * math.prod(dims) for dtype, dims in arrays(shape))


def parse_computations(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """The computations of an HLO module by name, and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and not line.startswith((" ", "HloModule")):
                current = header.group(2)
                computations[current] = []
                if header.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            root, *fields = match.groups()
            computations[current].append(Instruction(*fields, root=bool(root)))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _dot_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    out = arrays(instruction.shape)
    operands = instruction.operands()
    if not out or not operands or operands[0] not in shapes:
        return 0.0
    lhs = arrays(shapes[operands[0]])[0][1]
    if instruction.opcode == "dot":
        match = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.rest)
        contracting = [int(d) for d in match.group(1).split(",") if d] if match else []
    else:  # A cuBLAS gemm custom call: the dimension numbers are in its backend config.
        match = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instruction.rest)
        contracting = [int(d) for d in json.loads(f"[{match.group(1)}]")] if match else []
    k = math.prod(lhs[d] for d in contracting)
    return 2.0 * math.prod(out[0][1]) * k


_SLICING = frozenset({"dynamic-slice", "slice", "gather"})


def _fusion_bytes(fused: list[Instruction], operand_shapes: list[str]) -> float:
    """Bytes a fusion moves: each operand read whole, except one that is only sliced (the
    slices' bytes) or only updated in place (nothing); each output written whole, except one
    made by an in-place dynamic-update-slice (the update's bytes). This is how a scanned
    layer reads its slice of a stacked parameter."""
    by_name = {i.name: i for i in fused}
    users: dict[str, list[Instruction]] = {}
    for i in fused:
        for o in i.operands():
            users.setdefault(o, []).append(i)

    def uses(name: str) -> list[tuple[str, Instruction]]:
        # (the name it is used by, the user), looking through free bitcasts.
        found = []
        for u in users.get(name, []):
            found += uses(u.name) if u.opcode == "bitcast" else [(name, u)]
        return found

    moved = 0.0
    for i in fused:
        if i.opcode != "parameter":
            continue
        index = int(re.match(r"\s*(\d+)", i.rest).group(1))
        full = shape_bytes(operand_shapes[index]) if index < len(operand_shapes) else 0
        found = uses(i.name)
        if found and all(u.opcode in _SLICING and u.operands()[0] == n for n, u in found):
            moved += sum(shape_bytes(u.shape) for _, u in found)
        elif found and all(
            u.opcode == "dynamic-update-slice" and u.operands()[0] == n for n, u in found
        ):
            continue
        else:
            moved += full
    root = next((i for i in fused if i.root), fused[-1])
    outputs = [by_name.get(o) for o in root.operands()] if root.opcode == "tuple" else [root]
    for out in outputs:
        if out is not None and out.opcode == "dynamic-update-slice":
            update = by_name.get(out.operands()[1])
            moved += shape_bytes(update.shape) if update is not None else 0
        elif out is not None:
            moved += shape_bytes(out.shape)
    return moved


def _is_gemm(instruction: Instruction) -> bool:
    return instruction.opcode == "custom-call" and "gemm" in instruction.rest.split("\n")[0]


def _called(instruction: Instruction) -> list[str]:
    keys = ("calls", "to_apply", "body", "condition", "true_computation", "false_computation")
    names = [instruction.attribute(k) for k in keys]
    branches = re.search(r"branch_computations=\{([^}]*)\}", instruction.rest)
    if branches:
        names += _OPERAND.findall(branches.group(1))
    return [n for n in names if n]


def count(text: str, *, bandwidth: float, peak_flops: float) -> Counts:
    """Counts the kernels of an optimized HLO module.

    Args:
      text: ``compiled.as_text()``.
      bandwidth: the device's memory bandwidth, bytes/s (for the roofline time).
      peak_flops: the device's peak matrix throughput, flops/s.
    """
    computations, entry = parse_computations(text)

    def flops_inside(name: str) -> float:
        body = computations.get(name, [])
        shapes = {i.name: i.shape for i in body}
        total = sum(_dot_flops(i, shapes) for i in body if i.opcode == "dot")
        return total + sum(flops_inside(c) for i in body for c in _called(i) if c != name)

    def reduces(name: str) -> bool:
        body = computations.get(name, [])
        return any(i.opcode == "reduce" for i in body) or any(
            reduces(c) for i in body for c in _called(i) if c != name
        )

    def walk(name: str) -> Counts:
        counts = Counts()
        body = computations[name]
        shapes = {i.name: i.shape for i in body}
        for instruction in body:
            opcode = instruction.opcode
            if opcode in _FREE:
                continue
            if opcode == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instruction.rest)
                n = int(trips.group(1)) if trips else 1
                counts.add(walk(instruction.attribute("body")), n)
                counts.add(walk(instruction.attribute("condition")), n + 1)
                continue
            if opcode == "call":
                counts.add(walk(instruction.attribute("to_apply")))
                continue
            if opcode == "conditional":
                branches = [walk(b) for b in _called(instruction)]
                counts.add(min(branches, key=lambda c: c.estimated_s(0.0) + c.kernels))
                continue
            outputs = arrays(instruction.shape)
            if _is_gemm(instruction):
                # The workspace output is scratch, not traffic.
                outputs = [(d, s) for d, s in outputs if d not in ("s8", "u8")]
                flops = _dot_flops(instruction, shapes)
            else:
                flops = sum(flops_inside(c) for c in _called(instruction))
            operand_shapes = [shapes.get(o, "") for o in instruction.operands()]
            fused = computations.get(instruction.attribute("calls") or "", [])
            if opcode == "fusion" and fused:
                moved = _fusion_bytes(fused, operand_shapes)
            elif opcode in _SLICING:
                moved = 2 * shape_bytes(instruction.shape)
            elif opcode == "dynamic-update-slice":
                moved = 2 * shape_bytes(operand_shapes[1])
            else:
                moved = sum(_BYTES[d] * math.prod(s) for d, s in outputs)
                moved += sum(shape_bytes(shape) for shape in operand_shapes)
            counts.kernels += 1
            counts.reduction_kernels += opcode == "reduce" or any(
                reduces(c) for c in _called(instruction)
            )
            counts.scalar_kernels += all(math.prod(s) <= SCALAR_ELEMENTS for _, s in outputs)
            counts.copy_kernels += opcode == "copy"
            counts.bytes += moved
            counts.flops += flops
            counts.roofline_s += max(moved / bandwidth, flops / peak_flops)
        return counts

    return walk(entry)
