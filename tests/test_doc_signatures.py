"""The signatures docs/guard.md shows in its reference table are the code's.

Each row of the table that starts with a call, ``name(a, b=1, *, c=None)``, is parsed and
compared with ``inspect.signature`` of ``lbw_optax.name``: the same parameters in the same order,
the same keyword-only ones, the same defaults. A row that ends with ``...`` shows the first
parameters only.
"""

import ast
import inspect
import pathlib
import re

import pytest

import lbw_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUARD = ROOT / "docs" / "guard.md"
CALL = re.compile(r"`(\w+)\(([^`()]*)\)")
METHODS = {"decide": lbw_optax.Policy.decide}


def documented_calls(page: pathlib.Path) -> list[tuple[str, str]]:
    """``(name, arguments)`` of each call shown in the first column of the reference table
    (the table before the first heading) for a name the package defines, and anywhere in it
    for a method of ``METHODS``."""
    table = page.read_text().split("\n## ", 1)[0]
    calls = []
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        first_column = row.split(" | ")[0]
        for name, args in CALL.findall(row):
            if name in METHODS or (hasattr(lbw_optax, name) and f"`{name}(" in first_column):
                calls.append((name, args))
    return calls


def parse(args: str) -> tuple[list[tuple[str, str, object]], bool]:
    """The documented parameters as ``(name, kind, default)`` and whether the list is cut
    short (``...``); ``kind`` is ``"positional"`` or ``"keyword"``, ``default`` is
    ``inspect.Parameter.empty`` when none is shown."""
    parts = [p.strip() for p in args.split(",") if p.strip()]
    partial = bool(parts) and parts[-1] == "..."
    if partial:
        parts = parts[:-1]
    params, kind = [], "positional"
    for part in parts:
        if part == "*":
            kind = "keyword"
            continue
        name, _, default = part.partition("=")
        value = ast.literal_eval(default) if default else inspect.Parameter.empty
        params.append((name.strip(), kind, value))
    return params, partial


def actual(function) -> list[tuple[str, str, object]]:
    out = []
    for p in inspect.signature(function).parameters.values():
        if p.name == "self" or p.kind is p.VAR_KEYWORD:
            continue
        kind = "keyword" if p.kind is p.KEYWORD_ONLY else "positional"
        out.append((p.name, kind, p.default))
    return out


CALLS = documented_calls(GUARD)


def test_the_table_shows_the_public_calls():
    names = {name for name, _ in CALLS}
    assert {"guard", "lbw_adamw", "governor_policy", "reference_policy", "telemetry"} <= names


@pytest.mark.parametrize(("name", "args"), CALLS, ids=[name for name, _ in CALLS])
def test_documented_signature_matches_the_code(name, args):
    documented, partial = parse(args)
    code = actual(METHODS.get(name) or getattr(lbw_optax, name))
    if partial:
        code = code[: len(documented)]
    assert documented == code, f"docs/guard.md shows {name}({args}); the code has {code}"
