"""Ctrl-C at any moment of ``lbw-train``'s start-up ends it with status 130 and one line, and a
Ctrl-C whose ``KeyboardInterrupt`` a library swallows still ends it.

Each test runs ``lbw-train`` in a subprocess through a small driver that pauses at one point of
start-up (while ``import jax`` runs, while the model is built, while the train step is traced
for compilation), says so on stderr, and sleeps; the test waits for that line and only then
sends SIGINT, so the signal always lands in that phase. With ``swallow``, the pause catches the
``KeyboardInterrupt`` and goes on, as a careless library would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap

import pytest

from tests.train_helpers import PYTHON, TINY_FLAGS, cli_env

DRIVER = textwrap.dedent(
    """
    import importlib.abc, sys, time

    prog, phase, swallow, argv = sys.argv[1], sys.argv[2], sys.argv[3] == "swallow", sys.argv[4:]

    def pause():
        print(f"paused: {phase}", file=sys.stderr, flush=True)
        try:
            time.sleep(120)
        except KeyboardInterrupt:
            if not swallow:
                raise

    class PauseOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "jax._src.xla_bridge":  # Deep inside `import jax`.
                sys.meta_path.remove(self)
                pause()
            return None

    if phase == "import":
        sys.meta_path.insert(0, PauseOnImport())
    else:
        from lbw import models
        if phase == "build":
            init = models.Decoder.__init__
            def paused_init(self, *args, **kwargs):
                pause()
                init(self, *args, **kwargs)
            models.Decoder.__init__ = paused_init
        else:  # "compile": the loss is called while the train step is traced.
            loss = models.cross_entropy_loss
            def paused_loss(*args, **kwargs):
                if not getattr(paused_loss, "done", False):
                    paused_loss.done = True
                    pause()
                return loss(*args, **kwargs)
            models.cross_entropy_loss = paused_loss

    from lbw.train import cli
    sys.exit((cli.main if prog == "lbw-train" else cli.stress_main)(argv))
    """
)

FLAGS = ["--seq-len=32", "--batch-size=4", "--eval-batches=2", "--log-every=1", "--quiet"]


def _interrupt(
    tmp_path, phase: str, swallow: bool = False, prog: str = "lbw-train"
) -> tuple[int, list[str]]:
    """Runs ``prog`` through the driver paused at ``phase``, sends SIGINT there; returns the
    exit status and the stderr lines after the pause's line."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = [*FLAGS, *TINY_FLAGS, "--steps=50", f"--out-dir={tmp_path / 'run'}"]
    if prog == "lbw-stress":
        args = ["quick", f"--out={tmp_path / 'suite'}", "--quiet"]
    command = [PYTHON, str(driver), prog, phase, "swallow" if swallow else "raise", *args]
    env = cli_env(tmp_path / "jax-cache")
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            before = []
            while (line := process.stderr.readline()) and not line.startswith("paused:"):
                before.append(line)
            assert line.startswith(f"paused: {phase}"), "".join(before)
            process.send_signal(signal.SIGINT)
            after = process.stderr.read().splitlines()
            status = process.wait(timeout=300)
        finally:
            process.kill()
    return status, after


@pytest.mark.parametrize(
    "phase", ["import", *(pytest.param(p, marks=pytest.mark.slow) for p in ("build", "compile"))]
)
def test_ctrl_c_during_start_up_exits_130_with_one_line(tmp_path, phase):
    status, lines = _interrupt(tmp_path, phase)
    assert status == 130, lines
    assert lines == ["lbw-train: interrupted"], lines


def test_ctrl_c_while_lbw_stress_imports_exits_130_with_one_line(tmp_path):
    status, lines = _interrupt(tmp_path, "import", prog="lbw-stress")
    assert status == 130, lines
    assert lines == ["lbw-stress: interrupted"], lines


@pytest.mark.parametrize(
    "phase", ["import", *(pytest.param(p, marks=pytest.mark.slow) for p in ("build", "compile"))]
)
def test_a_swallowed_ctrl_c_still_stops_the_run(tmp_path, phase):
    status, lines = _interrupt(tmp_path, phase, swallow=True)
    assert status == 130, lines
    assert lines == ["lbw-train: interrupted"], lines
    metrics = tmp_path / "run" / "metrics.jsonl"  # At most the first (compiling) step ran.
    steps = (
        [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
        if metrics.exists()
        else []
    )
    assert steps in ([], [1]), steps
    assert not (tmp_path / "run" / "summary.json").exists()
