"""The signatures docs/guard.md (and docs/peers.md) show in their reference tables are the code's.

Each row of the table that starts with a call, ``name(a, b=1, *, c=None)``, is parsed and
compared with ``inspect.signature`` of ``lbw_optax.name`` (``lbw_optax.peers.name`` for the
peers' page): the same parameters in the same order, the same keyword-only ones, the same
defaults. A call that ends with ``...`` shows its first parameters only.
"""

import ast
import inspect
import pathlib
import re

import pytest

import lbw_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = {"guard.md": lbw_optax, "peers.md": lbw_optax.peers}
CALL = re.compile(r"`(\w+)\(([^`()]*)\)")
METHODS = {"decide": lbw_optax.Policy.decide}


def documented_calls(page: str) -> list[tuple[str, str, str]]:
    """``(name, arguments)`` of each call shown in the first column of the reference table
    (the table before the first heading) for a name the package defines, and anywhere in it
    for a method of ``METHODS``: ``(page, name, arguments)``."""
    namespace = PAGES[page]
    table = (ROOT / "docs" / page).read_text().split("\n## ", 1)[0]
    calls = []
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        first_column = row.split(" | ")[0]
        for name, args in CALL.findall(row):
            if name in METHODS or (hasattr(namespace, name) and f"`{name}(" in first_column):
                calls.append((page, name, args))
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


CALLS = [call for page in PAGES for call in documented_calls(page)]


def test_the_tables_show_the_public_calls():
    names = {name for _, name, _ in CALLS}
    assert {"guard", "lbw_adamw", "governor_policy", "reference_policy", "telemetry"} <= names
    assert {"zclip", "adagc", "skip_step", "scale_by_spam", "stable_adamw"} <= names


@pytest.mark.parametrize(
    ("page", "name", "args"), CALLS, ids=[f"{page}:{name}" for page, name, _ in CALLS]
)
def test_documented_signature_matches_the_code(page, name, args):
    documented, partial = parse(args)
    code = actual(METHODS.get(name) or getattr(PAGES[page], name))
    if partial:
        code = code[: len(documented)]
    assert documented == code, f"docs/{page} shows {name}({args}); the code has {code}"
