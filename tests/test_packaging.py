"""What an install gives: the console scripts on a base install, and what the wheel carries."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs a console script's entry point the way its generated wrapper does, with ``blocked``
# not importable (as on a base install, `pip install lbw-optax`, without the [train] extra).
ENTRY = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # "import name" raises ModuleNotFoundError
sys.argv = [{prog!r}, "--help"]
from {module} import main
sys.exit(main())
"""


@pytest.mark.parametrize(
    ("prog", "module"), [("lbw-train", "train.cli"), ("lbw-stress", "train.stress")]
)
@pytest.mark.parametrize("blocked", [("orbax",), ("flax",), ("orbax", "flax")])
def test_console_scripts_without_the_train_extra_say_which_extra_to_install(prog, module, blocked):
    code = ENTRY.format(blocked=blocked, prog=prog, module=module)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{prog}: error: ")
    assert 'pip install "lbw-optax[train]"' in lines[0]
    assert all(repr(name) in lines[0] for name in blocked)
