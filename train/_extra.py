"""The training loop needs the ``[train]`` extra; a base install says so in one line.

Importing this module checks (``train/__init__.py`` imports it first).
"""

import importlib.util
import os
import sys

# The [train] extra's modules that importing the train package needs.
IMPORTED = ("flax", "orbax")
INSTALL = 'pip install "lbw-optax[train]"'


def missing_modules() -> list[str]:
    """The modules of :data:`IMPORTED` that cannot be imported here."""
    return [name for name in IMPORTED if importlib.util.find_spec(name) is None]


def require_train_extra() -> None:
    """Exits with one line naming the extra to install when a module of it is missing (a
    base install, ``pip install lbw-optax``, has the console scripts but not the extra)."""
    missing = missing_modules()
    if missing:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        prog = prog if prog.startswith("lbw-") else "lbw-optax"
        names = ", ".join(repr(name) for name in missing)
        raise SystemExit(
            f"{prog}: error: the training loop needs the [train] extra, which is not installed "
            f"(no module named {names}): {INSTALL}"
        )


require_train_extra()
