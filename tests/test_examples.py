"""The example the quickstart runs works and shows what it claims."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_governed_toy_example_reports_spike_hold_and_nonfinite_step():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "governed_toy.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert "step 100" in out and "SPIKE" in out and "held True" in out
    assert "NONFINITE" in out
    assert "'nonfinite_steps': 1.0" in out
