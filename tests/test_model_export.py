"""A finished study keeps its models: one bundle per final-phase trial, an index, the best per method."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from semiseg.data.preprocess import PreprocessSettings
from semiseg.inference.bundle import build_network, load_bundle
from semiseg.models.evaluation import build_evaluation_network
from semiseg.train.contract import CHECKPOINT_FILE
from semiseg.tune.model_export import MODELS_FOLDER, exported_rows, export_models
from semiseg.tune.results import TrialRow

SPEC = {"dims": 2, "in_channels": 1, "num_classes": 3, "class_ids": [0, 1, 2],
        "model": {"name": "unet", "depth": 2, "width": 4, "dropout": 0.0, "norm": "batch"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "preprocessing": PreprocessSettings(dims=2).to_dict(), "patch_size": None, "overlap": 0.5,
        "postprocessing": {"1": True, "2": False}}


def _checkpoint(folder: Path, seed: int) -> tuple[str, dict]:
    torch.manual_seed(seed)
    state = build_evaluation_network(SPEC).state_dict()
    folder.mkdir(parents=True)
    torch.save({"model_spec": SPEC, "best_eval_state": state}, folder / CHECKPOINT_FILE)
    return str(folder), state


def _row(trial: str, method: str, phase: str, val: float, checkpoint: str, split: int = 0, seed: int = 1,
         status: str = "completed") -> TrialRow:
    return TrialRow(trial_id=trial, phase=phase, method=method, params={}, epochs=2, best_val_dice=val,
                    best_epoch=2, test_dice=val, status=status, checkpoint=checkpoint,
                    config={"train.seed": seed, "data.split": split})


def test_final_trials_are_kept_and_the_best_of_each_method_is_named(tmp_path):
    ckpt = {name: _checkpoint(tmp_path / "ray" / name, seed) for seed, name in enumerate("abcde")}
    rows = [_row("a", "mean_teacher", "final", 0.7, ckpt["a"][0], split=0),
            _row("b", "mean_teacher", "final", 0.8, ckpt["b"][0], split=1),
            _row("c", "supervised", "final", 0.6, ckpt["c"][0], split=0),
            _row("d", "mean_teacher", "search", 0.95, ckpt["d"][0]),
            _row("e", "supervised", "final", 0.9, ckpt["e"][0], status="error")]
    index_path = export_models(rows, tmp_path / "study", "ema_sweep")
    index = json.loads(index_path.read_text())
    assert index_path == tmp_path / "study" / MODELS_FOLDER / "index.json"
    assert sorted((m["trial_id"], m["method"], m["split"]) for m in index["models"]) == [
        ("a", "mean_teacher", 0), ("b", "mean_teacher", 1), ("c", "supervised", 0)]
    assert index["best"] == {"mean_teacher": next(m["path"] for m in index["models"] if m["trial_id"] == "b"),
                             "supervised": next(m["path"] for m in index["models"] if m["trial_id"] == "c")}
    bundle = load_bundle(tmp_path / "study" / index["best"]["mean_teacher"])
    assert bundle.info["split"] == 1 and bundle.info["method"] == "mean_teacher"
    assert bundle.spec["postprocessing"] == {"1": True, "2": False}
    network = build_network(bundle)
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, ckpt["b"][1][name]), name


def test_without_a_final_phase_the_best_searched_trial_of_each_method_is_kept(tmp_path):
    rows = [_row("a", "mean_teacher", "search", 0.7, "x"), _row("b", "mean_teacher", "search", 0.8, "y"),
            _row("c", "supervised", "search", 0.6, "z"), _row("d", "supervised", "search", 0.9, "")]
    assert [r.trial_id for r in exported_rows(rows)] == ["b", "c"]


def test_an_unreadable_checkpoint_is_left_out_with_a_warning(tmp_path, caplog):
    good, _ = _checkpoint(tmp_path / "ray" / "good", 0)
    rows = [_row("good", "supervised", "final", 0.5, good),
            _row("gone", "supervised", "final", 0.6, str(tmp_path / "missing"))]
    index = json.loads(export_models(rows, tmp_path / "study", "s").read_text())
    assert [m["trial_id"] for m in index["models"]] == ["good"]
    assert "could not keep the model of trial gone" in caplog.text
