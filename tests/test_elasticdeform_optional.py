"""``elasticdeform`` is an optional extra: the library imports and deforms without it.

Only :mod:`semiseg.components.elasticdeform_reference` (the reference the tests and benchmarks
compare the library with) uses it, and only when it deforms.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "platform" / "semiseg"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_module_of_the_library_imports_elasticdeform():
    importing = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                       if any(name.split(".")[0] == "elasticdeform" for name in _imported_modules(path)))
    assert importing == []


def test_no_module_of_the_library_imports_the_reference():
    importing = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                       if "semiseg.components.elasticdeform_reference" in _imported_modules(path))
    assert importing == []


def test_the_library_deforms_without_elasticdeform_and_the_reference_says_how_to_install_it():
    probe = textwrap.dedent("""
        import sys
        sys.modules["elasticdeform"] = None  # as if it were not installed
        import torch
        import semiseg.methods.transform_consistency as method
        from semiseg.components import elasticdeform_reference

        image = torch.rand(2, 1, 12, 12)
        deformed = method.elastic_deform(image, torch.zeros(2, 2, 3, 3))
        print("identity", bool((deformed - image).abs().max() < 1e-5))
        try:
            elasticdeform_reference.elastic_deform(image, torch.zeros(2, 2, 3, 3))
        except ModuleNotFoundError as error:
            print("missing", error.name, "|", error)
    """)
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "identity True"
    assert lines[1].startswith("missing elasticdeform | ") and "scripts/setup.sh --test" in lines[1]
    assert "--no-binary elasticdeform" in lines[1]
