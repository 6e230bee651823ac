"""The README opens with the two commands, and CI runs the second one verbatim."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fenced_commands() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    commands, inside = [], False
    for line in lines:
        if line.startswith("```"):
            inside = not inside
            continue
        if inside:
            commands.append(line)
    return commands


def test_readme_opens_with_setup_plus_main_job_then_setup_plus_tests():
    first, second = _fenced_commands()[:2]
    assert first.startswith("bash scripts/setup.sh") and "studies/ema_sweep.py" in first
    assert second.startswith("bash scripts/setup.sh --test") and "pytest" in second


def test_ci_extracts_the_readme_test_command():
    script = (REPO / ".ci" / "run").read_text()
    extract = script.split("test_command=$(", 1)[1].split(")\n", 1)[0]
    found = subprocess.run(["bash", "-c", extract], cwd=REPO, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == _fenced_commands()[1]


def test_setup_installs_torch_first_and_builds_elasticdeform_from_source_only_for_the_tests():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert setup.index("torch_spec") < setup.index('-e ".[dev]"')
    reference_lines = [line for line in setup.splitlines() if ".[reference" in line and "pip" in line]
    assert len(reference_lines) == 1 and "--no-binary elasticdeform" in reference_lines[0], reference_lines
    test_block = setup.split("if (( with_test_tools )); then", 1)[1].split("\nfi\n", 1)[0]
    assert reference_lines[0] in test_block, "elasticdeform is installed by `setup.sh --test` only"
    assert "--no-binary" not in setup.split(reference_lines[0], 1)[0], "the main install needs no source build"


def test_elasticdeform_is_an_extra_not_a_dependency():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(spec.startswith("elasticdeform") for spec in project["dependencies"])
    assert any(spec.startswith("elasticdeform") for spec in project["optional-dependencies"]["reference"])


def test_elasticdeform_imports_under_the_installed_numpy():
    elasticdeform = pytest.importorskip("elasticdeform")  # absent: skipped; present but broken: fails
    import elasticdeform.torch  # noqa: F401
    import numpy as np

    image = np.zeros((8, 8), dtype=np.float32)
    image[2:6, 2:6] = 1
    out = elasticdeform.deform_random_grid(image, sigma=0.0, points=3)
    np.testing.assert_allclose(out, image, atol=1e-5)
