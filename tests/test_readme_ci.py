"""The README opens with the two commands, and CI runs the second one verbatim."""

import subprocess
from pathlib import Path

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


def test_setup_installs_torch_first_and_builds_elasticdeform_from_source():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert setup.index("torch_spec") < setup.index('-e ".[dev]"')
    assert "--no-binary elasticdeform" in setup


def test_elasticdeform_imports_under_the_installed_numpy():
    import elasticdeform
    import elasticdeform.torch  # noqa: F401
    import numpy as np

    image = np.zeros((8, 8), dtype=np.float32)
    image[2:6, 2:6] = 1
    out = elasticdeform.deform_random_grid(image, sigma=0.0, points=3)
    np.testing.assert_allclose(out, image, atol=1e-5)
