"""Every ``>>>`` example in the docstrings of ``lbw_optax`` and ``lbw.models`` runs and prints
what it shows (one test per module, so a failure names the module and the example)."""

import doctest
import importlib
import pkgutil

import pytest

import lbw.models
import lbw_optax


def _modules(package) -> list[str]:
    names = [package.__name__]
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
        names.append(info.name)
    return sorted(names)


MODULES = _modules(lbw_optax) + _modules(lbw.models)


def test_the_examples_are_found():
    tests = [t for name in MODULES for t in _examples(name)]
    # Each public transformation documents an example; a finder that silently found none
    # would let every test below pass.
    assert len(tests) >= 20, len(tests)


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    # Only what the module defines: a re-export is tested where it is defined.
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in _examples(name):
        runner.run(test, out=report.append)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} examples failed in {name}:\n" + "".join(report)
