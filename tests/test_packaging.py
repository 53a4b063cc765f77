"""What an install gives: the console scripts on a base install, and what the wheel carries."""

import email.parser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# Runs a console script's entry point the way its generated wrapper does, with ``blocked``
# not importable (as on a base install, `pip install lbw-optax`, without the [train] extra).
ENTRY = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # "import name" raises ModuleNotFoundError
sys.argv = [{prog!r}, "--help"]
from {module} import {entry} as main
sys.exit(main())
"""


@pytest.mark.parametrize(
    ("prog", "module"),
    [("lbw-train", "lbw.train.cli:main"), ("lbw-stress", "lbw.train.cli:stress_main")],
)
@pytest.mark.parametrize("blocked", [("orbax",), ("flax",), ("orbax", "flax")])
def test_console_scripts_without_the_train_extra_say_which_extra_to_install(prog, module, blocked):
    module, entry = module.split(":")
    code = ENTRY.format(blocked=blocked, prog=prog, module=module, entry=entry)
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


# What a wheel is built from (the rest of the repository is not packaged).
PACKAGED = ["pyproject.toml", "README.md", "LICENSE", "lbw_optax", "models", "train"]


def _setuptools_version() -> tuple[int, ...]:
    try:
        from importlib.metadata import version

        return tuple(int(part) for part in version("setuptools").split(".")[:2])
    except Exception:  # Not installed, or an unusual version string.
        return (0,)


@pytest.mark.slow
@pytest.mark.skipif(
    _setuptools_version() < (77,),
    reason="building without network needs setuptools>=77 here (pyproject's build-system)",
)
def test_the_wheel_carries_the_license_the_type_marker_and_the_metadata(tmp_path):
    # Built from a copy, so that the build leaves nothing in the repository.
    source = tmp_path / "source"
    source.mkdir()
    for name in PACKAGED:
        if (ROOT / name).is_dir():
            skip = shutil.ignore_patterns("__pycache__")
            shutil.copytree(ROOT / name, source / name, ignore=skip)
        else:
            shutil.copy(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q"]
    command += ["--no-build-isolation", "--wheel-dir", str(tmp_path / "dist")]
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("lbw_optax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(archive.read(metadata).decode())
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        license_text = archive.read(license_file).decode()
    assert "lbw_optax/py.typed" in names
    # Nothing generic in site-packages: our models and training tools live under `lbw`.
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"lbw_optax", "lbw"}, top
    assert "lbw/train/cli.py" in names and "lbw/models/decoder.py" in names
    assert any(n.startswith("lbw/train/data/wikitext-2/") and n.endswith(".gz") for n in names)
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert meta["License-Expression"] == "Apache-2.0"
    assert "Typing :: Typed" in meta.get_all("Classifier")
    urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL"))
    assert {"Homepage", "Source", "Issues", "Documentation"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())


SHADOWING = """
import train, models  # the user's own modules, beside the script
from lbw import models as lbw_models
from lbw.train import TrainConfig
assert train.MINE == "train" and models.MINE == "models"
assert lbw_models.Decoder is not None and TrainConfig().steps > 0
print("ok")
"""


def test_a_users_own_train_and_models_modules_shadow_nothing_of_ours(tmp_path):
    for name in ("train", "models"):
        (tmp_path / f"{name}.py").write_text(f"MINE = {name!r}\n")
    done = subprocess.run(
        [sys.executable, "-c", SHADOWING], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_declared_floors_are_the_tested_ones():
    # .ci/run tests the library at .ci/floors.txt's versions: pyproject.toml declares those.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (ROOT / ".ci" / "floors.txt").read_text().splitlines()
    tested = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    for requirement in project["dependencies"]:  # Every dependency, tested at its floor.
        name, floor = requirement.split(">=")
        assert Version(tested.get(name, "0")) == Version(floor), requirement
    for requirement in project["optional-dependencies"]["test"]:  # The test tools pinned there.
        name, _, floor = requirement.partition(">=")
        if name in tested:
            assert Version(tested[name]) == Version(floor), requirement
