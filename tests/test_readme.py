"""The README's Python examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
# Blocks that need files a user has (a downloaded checkpoint) are marked to be skipped.
RUNNABLE = [b for b in BLOCKS if "path/to/" not in b]


def test_readme_has_examples():
    assert RUNNABLE


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.strip().splitlines()[0][:40])
def test_readme_example_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
