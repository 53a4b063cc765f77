"""Bad input to ``lbw-train`` and ``lbw-stress``, run in process: each ends in one line
``prog: error: ...`` naming the thing, a non-zero exit status, no traceback, and nothing of the
user's changed or left behind."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest

from lbw.train import stress
from lbw.train.checkpoint import Checkpointer
from lbw.train.cli import main
from lbw.train.data import DataStream
from tests.train_helpers import TINY_FLAGS, read_jsonl

FLAGS = [
    "--seq-len=32",
    "--batch-size=4",
    "--eval-batches=2",
    "--log-every=1",
    "--quiet",
    *TINY_FLAGS,
]


def _run(capsys, entry, args) -> tuple[int, list[str]]:
    """The exit status and the stderr lines of ``entry(args)``."""
    try:
        status = entry(args)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err.splitlines()


def _error(lines: list[str], prog: str = "lbw-train") -> str:
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A completed 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*FLAGS, "--steps=4", "--checkpoint-every=2", f"--out-dir={out}"]) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--steps=abc"], "--steps"),
        (["--model-override=num_layerz=2"], "num_layerz"),
        (["--optimizer=nope"], "nope"),
        (["--model=nope"], "nope"),
        (["--resume", "--overwrite"], "overwrite"),
        (["--resume-step=3"], "resume"),
        (["--steps=0"], "steps"),
    ],
)
def test_bad_flags(capsys, tmp_path, flags, named):
    out = tmp_path / "out"
    status, lines = _run(capsys, main, [*FLAGS, f"--out-dir={out}", *flags])
    assert status == 2
    assert named in _error(lines)
    assert not out.exists()


def _data_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.txt"
    content = {
        "empty": b"",
        "blank": b"\n \n",
        "binary": bytes(range(256)) * 4,
        "latin1": "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 100,
    }
    if kind != "missing":
        path.write_bytes(content[kind])
    return path


@pytest.mark.parametrize("kind", ["empty", "blank", "binary", "latin1", "missing"])
@pytest.mark.parametrize("which", ["--train-files", "--eval-files"])
def test_bad_data_files(capsys, tmp_path, kind, which):
    good = tmp_path / "good.txt"
    good.write_text("Some text that is long enough.\n" * 100)
    bad = _data_file(tmp_path, kind)
    files = {"--train-files": good, "--eval-files": good, which: bad}
    out = tmp_path / "out"
    args = ["--data=files", *(f"{k}={v}" for k, v in files.items())]
    before = _hashes(tmp_path)
    status, lines = _run(capsys, main, [*FLAGS, "--steps=2", f"--out-dir={out}", *args])
    assert status == 1
    assert str(bad) in _error(lines)
    assert not out.exists()  # No empty output folder left behind.
    assert _hashes(tmp_path) == before


def test_out_dir_that_is_a_file_or_under_one(capsys, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    for out in (file, file / "run"):
        status, lines = _run(capsys, main, [*FLAGS, "--steps=2", f"--out-dir={out}"])
        assert status == 1
        assert str(out) in _error(lines)
        assert file.read_text() == "mine\n"


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_resume_without_checkpoint_creates_nothing(capsys, tmp_path, folder):
    out = tmp_path / "run"
    if folder == "empty":
        out.mkdir()
    status, lines = _run(capsys, main, [*FLAGS, "--steps=2", f"--out-dir={out}", "--resume"])
    assert status == 1
    assert "no checkpoint" in _error(lines)
    assert not (out / "checkpoints").exists()
    assert out.exists() == (folder == "empty")


def test_checkpointer_leaves_no_background_work(tmp_path):
    """Orbax cleans up unfinished checkpoints in a thread that ``close`` does not wait for; one
    still running at interpreter exit printed a traceback after a refused resume."""
    (tmp_path / "3.orbax-checkpoint-tmp-1").mkdir()
    checkpointer = Checkpointer(tmp_path, keep=1, every=1)
    try:
        assert getattr(checkpointer.manager, "_cleanup_tmp_directory_future", None) is None
        assert not (tmp_path / "3.orbax-checkpoint-tmp-1").exists()
    finally:
        checkpointer.close()


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_resume_of_a_finished_run_changes_nothing(capsys, run_copy):
    before = _hashes(run_copy)
    args = [*FLAGS, "--steps=4", "--checkpoint-every=2", f"--out-dir={run_copy}", "--resume"]
    args.remove("--quiet")
    for extra in ([], ["--log-every=2"]):
        status, lines = _run(capsys, main, [*args, *extra])
        assert status == 0
        assert len(lines) == 1 and f"{run_copy} already finished" in lines[0], lines
        assert _hashes(run_copy) == before
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["loss"] is not None and summary["eval_perplexity"] is not None
    # A changed flag that a resume may not change is still refused.
    status, lines = _run(capsys, main, [*args, "--lr=0.1"])
    assert status == 1 and "learning_rate" in _error(lines)
    assert _hashes(run_copy) == before


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_fresh_run_into_a_folder_with_results_needs_overwrite(capsys, run_copy):
    shutil.rmtree(run_copy / "checkpoints")  # Results without checkpoints are refused too.
    before = _hashes(run_copy)
    args = [*FLAGS, "--steps=2", f"--out-dir={run_copy}"]
    status, lines = _run(capsys, main, args)
    assert status == 1
    line = _error(lines)
    assert str(run_copy) in line and "--overwrite" in line and "--resume" in line
    assert _hashes(run_copy) == before
    assert _run(capsys, main, [*args, "--overwrite"])[0] == 0
    assert [r["step"] for r in read_jsonl(run_copy / "metrics.jsonl") if r["kind"] == "train"] == [
        1,
        2,
    ]
    assert json.loads((run_copy / "summary.json").read_text())["step"] == 2


def _interrupt_at(monkeypatch, at_step: int) -> None:
    """Ctrl-C (a real SIGINT to this process) while the batch of ``at_step`` is drawn."""
    batch = DataStream.batch

    def interrupted(self, step):
        if step == at_step:
            signal.raise_signal(signal.SIGINT)
        return batch(self, step)

    monkeypatch.setattr(DataStream, "batch", interrupted)


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = [*FLAGS, "--steps=6", "--checkpoint-every=4", f"--out-dir={out}"]
    _interrupt_at(monkeypatch, 3)
    status, lines = _run(capsys, main, args)
    assert status == 130
    assert len(lines) == 1 and lines[0].startswith("lbw-train: interrupted after step 3"), lines
    assert lines[0].endswith(" --resume") and f"--out-dir={out}" in lines[0]
    assert (out / "checkpoints" / "3").is_dir()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    assert _run(capsys, main, [*args, "--resume"])[0] == 0
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_without_checkpoints_says_so(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 2)
    status, lines = _run(capsys, main, [*FLAGS, "--steps=4", f"--out-dir={out}"])
    assert status == 130
    assert len(lines) == 1 and "no checkpoint" in lines[0] and "--resume" not in lines[0]
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_stress_report_needs_a_suite_folder(capsys, tmp_path, folder):
    directory = tmp_path / "suite"
    if folder == "empty":
        directory.mkdir()
    status, lines = _run(capsys, stress.main, ["report", str(directory)])
    assert status == 2
    assert str(directory) in _error(lines, "lbw-stress report")
    assert not (directory / "summary.md").exists()


def test_stress_out_under_a_file(capsys, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    status, lines = _run(capsys, stress.main, ["quick", "--out", str(file / "x"), "--quiet"])
    assert status == 2
    assert str(file) in _error(lines, "lbw-stress")
    assert file.read_text() == "mine\n"
