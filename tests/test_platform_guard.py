"""platform/ is a source folder, never a package: it would shadow the standard library."""

import importlib
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_platform_is_the_standard_library():
    import platform

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(platform.__file__).resolve().parent == stdlib
    assert callable(platform.system)


def test_platform_folder_has_no_init_and_no_modules():
    assert not (REPO / "platform" / "__init__.py").exists()
    assert list((REPO / "platform").glob("*.py")) == []


def test_platform_stays_stdlib_with_repo_root_first_on_path(monkeypatch):
    """Ray's working_dir puts the repo root first on sys.path on every worker."""
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.delitem(sys.modules, "platform")
    module = importlib.import_module("platform")
    assert hasattr(module, "python_version"), f"'platform' resolved to {module!r}"
    import semiseg

    assert Path(semiseg.__file__).resolve().is_relative_to(REPO / "platform" / "semiseg")
