"""The Python examples of the README and of docs/ run as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# docs/testing.md's example is run by tests/test_harness.py.
PAGES = [README, *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "testing.md")]
BLOCKS = [
    (page, block)
    for page in PAGES
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
]
# Blocks that need files a user has (a downloaded checkpoint) are marked to be skipped.
RUNNABLE = [(page, b) for page, b in BLOCKS if "path/to/" not in b]


def test_readme_has_examples():
    assert any(page == README for page, _ in RUNNABLE)


@pytest.mark.parametrize(
    "page, block",
    RUNNABLE,
    ids=lambda x: x.name if isinstance(x, pathlib.Path) else x.strip().splitlines()[0][:40],
)
def test_readme_example_runs(page, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(page), "exec"), {"__name__": "readme_example"})
