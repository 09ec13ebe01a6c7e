"""Every library module's doctests run in the suite, one test per module, under conftest's settings."""
import contextlib
import doctest
import importlib
import io
import pkgutil

import pytest

import lwcompile
import lwcompile.passes
import lwcompile.runtime
from conftest import SEED, TORCH_THREADS

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# module name -> why its doctests cannot run here. Keep it empty: a single example that needs something
# unavailable is marked "# doctest: +SKIP" in the module itself.
SKIP: dict[str, str] = {}

_PACKAGES = (lwcompile, lwcompile.passes, lwcompile.runtime)  # passes/ and runtime/ live outside lwcompile/


def _modules() -> list[str]:
    broken: list[str] = []
    names = {p.__name__ for p in _PACKAGES}
    for pkg in _PACKAGES:
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".", onerror=broken.append):
            names.add(info.name)
    return sorted(names | set(broken))  # a subpackage that does not import still gets its (failing) test


MODULES = _modules()


def run_doctests(module) -> tuple[doctest.TestResults, str]:
    """doctest.testmod on one module; returns the results and the failure report."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = doctest.testmod(module, optionflags=FLAGS, report=False)
    return result, out.getvalue()


def test_every_library_directory_is_discovered():
    assert {"lwcompile.api", "lwcompile.program", "lwcompile.passes.inner", "lwcompile.passes.local_losses",
            "lwcompile.runtime.local", "lwcompile.runtime.placement"} <= set(MODULES)
    assert set(SKIP) <= set(MODULES), "SKIP names a module that no longer exists"


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name, tmp_path, monkeypatch):
    if name in SKIP:
        pytest.skip(SKIP[name])
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)  # an example that writes a relative path writes it here
    result, report = run_doctests(module)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest example(s) failed in {name}:\n{report}"


def test_doctests_run_under_the_suite_settings():
    """The examples see conftest's thread count and seed, as every other test does."""
    import types

    probe = types.ModuleType("lw_doctest_probe")
    probe.__doc__ = f"""
    >>> import torch
    >>> torch.get_num_threads(), torch.initial_seed()
    ({TORCH_THREADS}, {SEED})
    """
    result, report = run_doctests(probe)
    assert result.attempted == 2 and result.failed == 0, report
