"""The best-model registry: which trial is chosen, and what a logged model needs to be served."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import torch

import semiseg
from semiseg.models import build_model
from semiseg.tune.model_registry import SERVING_PACKAGES, best_rows_by_method, serving_requirements
from semiseg.tune.results import TrialRow


def _row(method: str, phase: str, val: float, status: str = "completed", checkpoint: str = "ckpt") -> TrialRow:
    return TrialRow(trial_id=f"{method}-{phase}-{val}", phase=phase, method=method, params={}, epochs=3,
                    best_val_dice=val, best_epoch=3, test_dice=val, status=status, checkpoint=checkpoint)


def test_serving_requirements_pin_installed_versions_without_local_labels_or_semiseg():
    pins = serving_requirements()
    names = [pin.split("==")[0] for pin in pins]
    assert names == [p for p in SERVING_PACKAGES if p in names]
    assert {"mlflow", "torch", "numpy"} <= set(names)
    assert "semiseg" not in names
    for pin in pins:
        name, version = pin.split("==")
        assert "+" not in version
        assert metadata.version(name).startswith(version)


def test_a_model_logged_with_the_explicit_requirements_serves_the_network(tmp_path: Path):
    import mlflow
    import mlflow.pytorch
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("registry", artifact_location=(tmp_path / "artifacts").as_uri())
    torch.manual_seed(0)
    network = build_model("unet", dims=2, in_channels=1, num_classes=2, depth=2, width=4,
                          dropout=0.0, norm="batch").eval()
    example = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pytorch.log_model(network, name="model", serialization_format="pickle",
                                        input_example=example[:1], pip_requirements=serving_requirements(),
                                        code_paths=[str(Path(semiseg.__file__).parent)])
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text()
    assert requirements.split() == serving_requirements()
    with torch.no_grad():
        expected = network(torch.from_numpy(example)).numpy()
    np.testing.assert_allclose(np.asarray(loaded.predict(example)), expected, rtol=1e-5, atol=1e-6)


def test_best_rows_prefer_final_phase_then_val_dice_and_skip_unusable_trials():
    rows = [_row("mean_teacher", "search", 0.9), _row("mean_teacher", "final", 0.7),
            _row("mean_teacher", "final", 0.8), _row("supervised", "final", 0.95, status="error"),
            _row("supervised", "search", 0.6), _row("supervised", "search", 0.99, checkpoint=""),
            _row("cps", "search", float("nan"))]
    best = best_rows_by_method(rows)
    assert sorted(best) == ["mean_teacher", "supervised"]
    assert best["mean_teacher"].trial_id == "mean_teacher-final-0.8"
    assert best["supervised"].trial_id == "supervised-search-0.6"
