"""Settings every test module shares: the Hypothesis profile, and one JAX compilation cache
per test session, shared by the xdist workers.

The Hypothesis profile is derandomized (the same examples every run, no flaky failures) with no
deadline (the first example of a test includes XLA's compilation) and 25 examples a test.

Many tests compile the same program (the same transformation on the same small tree); with a
persistent cache in a fresh session directory each is compiled once per session instead of
once per test and worker. The directory starts empty, so no result depends on an earlier
session, and is removed at the end. A ``JAX_COMPILATION_CACHE_DIR`` set by the user is left as
it is.
"""

import os
import shutil
import tempfile

import hypothesis

hypothesis.settings.register_profile("default", derandomize=True, deadline=None, max_examples=25)
hypothesis.settings.load_profile("default")

_OWNED = "LBW_TEST_JAX_CACHE_OWNER"


def pytest_configure(config):
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        # The controller (or a single process) makes the directory; xdist workers inherit it.
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lbw-jax-cache-")
        os.environ[_OWNED] = str(os.getpid())
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if os.environ.get(_OWNED) == str(os.getpid()):
        shutil.rmtree(os.environ.pop("JAX_COMPILATION_CACHE_DIR"), ignore_errors=True)
        del os.environ[_OWNED]
