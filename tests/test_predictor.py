"""Model bundles and prediction (semiseg.inference.bundle, semiseg.inference.predictor).

Tiny 2D and 3D U-Nets with random weights (fixed seeds) stand in for trained models; inputs are
real NIfTI files with an oblique, anisotropic affine in LPS orientation, in both namings
(``{case}_{channel:04d}.nii.gz`` and one file per case). The helpers here are shared with
tests/test_predict_cli.py.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semiseg.data.prediction_io import InputCase, find_input_cases
from semiseg.data.preprocess import PreprocessSettings
from semiseg.inference.bundle import (InferenceSettings, ModelBundle, build_network, ensemble_settings,
                                      load_bundle, save_bundle)
from semiseg.inference.predictor import (CasePredictionError, mirror_axes, network_probabilities,
                                         postprocessing_choice, predict_case_file, predict_folder,
                                         predict_probabilities)
from semiseg.models.evaluation import build_evaluation_network
from semiseg.postprocess import apply_postprocessing
from semiseg.train.sliding_window import sliding_window_inference

LABELS = {"background": 0, "a": 1, "b": 2, "c": 3}
CLASS_IDS = [0, 1, 2, 3]
INPUT_SHAPE = (20, 18, 6)
INPUT_SPACING = (0.8, 0.9, 2.5)
TARGET_SPACING = (1.0, 1.0, 2.5)
PATCH_3D = [8, 8, 4]


def tiny_spec(dims: int, in_channels: int = 1, **overrides: Any) -> dict[str, Any]:
    """The model spec of a tiny U-Net (depth 2, width 4) with 4 classes and a body-cropping, resampling
    preprocessing; 3D specs have a sliding-window patch unless ``patch_size=None`` is passed."""
    spec: dict[str, Any] = {
        "dims": dims, "in_channels": in_channels, "num_classes": 4,
        "model": {"name": "unet", "depth": 2, "width": 4, "dropout": 0.0, "norm": "batch"},
        "class_ids": list(CLASS_IDS), "labels": dict(LABELS),
        "preprocessing": PreprocessSettings(dims=dims, target_spacing=TARGET_SPACING, crop_to_body=True,
                                            normalisation="zscore_nonzero").to_dict(),
        "patch_size": list(PATCH_3D) if dims == 3 else None, "overlap": 0.5,
    }
    spec.update(overrides)
    return spec


def make_bundle(path: Path, dims: int, seed: int, in_channels: int = 1, info: dict[str, Any] | None = None,
                **overrides: Any) -> Path:
    """A bundle of a randomly initialised tiny U-Net (``torch.manual_seed(seed)``) saved at ``path``."""
    spec = tiny_spec(dims, in_channels, **overrides)
    torch.manual_seed(seed)
    network = build_evaluation_network(spec)
    _perturb_batch_norm(network, seed)
    details = {"method": "mean_teacher", "group": "g", "phase": "final", "seed": seed, "split": 0,
               "val_dice": 0.5, "trial_id": f"t{seed}"}
    details.update(info or {})
    return save_bundle(path, spec, network.state_dict(), details)


def _perturb_batch_norm(network: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics, so that eval-mode batch norm is not the identity."""
    generator = torch.Generator().manual_seed(seed + 1000)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(1.0 + 0.2 * torch.rand(module.running_var.shape, generator=generator))


def oblique_lps_affine(spacing: Sequence[float] = INPUT_SPACING) -> np.ndarray:
    """A voxel-to-world matrix in LPS orientation (x and y axes reversed), rotated by 0.3 rad about
    z and 0.1 rad about x, with anisotropic voxels and an offset."""
    cz, sz = np.cos(0.3), np.sin(0.3)
    cx, sx = np.cos(0.1), np.sin(0.1)
    rotation = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    affine[:3, 3] = [12.5, -40.0, 7.25]
    return affine


def write_case(folder: Path, case_id: str, channels: int, seed: int, per_file: bool = False,
               shape: Sequence[int] = INPUT_SHAPE) -> list[Path]:
    """Write one case: a noisy block of "body" on a zero background, sform code 2 and qform code 1.

    Returns:
        Its files, ``{case}_{channel:04d}.nii.gz`` (or ``{case}.nii.gz`` when ``per_file``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = oblique_lps_affine()
    paths = []
    for channel in range(channels):
        data = np.zeros(tuple(shape), dtype=np.float32)
        body = (slice(3, shape[0] - 2), slice(2, shape[1] - 3), slice(1, shape[2]))
        data[body] = rng.normal(100.0 + 20 * channel, 15.0, data[body].shape)
        data[body][rng.random(data[body].shape) < 0.2] += 60.0
        image = nib.Nifti1Image(data, affine)
        image.set_sform(affine, code=2)
        image.set_qform(affine, code=1)
        name = f"{case_id}.nii.gz" if per_file else f"{case_id}_{channel:04d}.nii.gz"
        nib.save(image, folder / name)
        paths.append(folder / name)
    return paths


def load_networks(*paths: Path) -> tuple[list[torch.nn.Module], InferenceSettings]:
    """The networks of bundle files and their ensemble settings."""
    bundles = [load_bundle(path) for path in paths]
    return [build_network(bundle) for bundle in bundles], ensemble_settings(bundles)


# ---------------------------------------------------------------- bundles


def test_save_bundle_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = make_bundle(tmp_path / "deep" / "model.pt", dims=3, seed=3, in_channels=2,
                       postprocessing={"1": True, "2": False})
    bundle = load_bundle(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]
    assert bundle.source == str(path)
    assert bundle.spec == tiny_spec(3, 2, postprocessing={"1": True, "2": False})
    assert bundle.info["seed"] == 3 and bundle.info["trial_id"] == "t3"
    torch.manual_seed(3)
    reference = build_evaluation_network(tiny_spec(3, 2))
    _perturb_batch_norm(reference, 3)
    network = build_network(bundle)
    assert not network.training
    for name, value in reference.state_dict().items():
        assert torch.equal(network.state_dict()[name], value), name
    assert bundle.describe() == "mean_teacher (seed 3, split 0)"


def test_load_bundle_names_the_file_and_the_missing_key(tmp_path):
    partial = tmp_path / "partial.pt"
    torch.save({"model_spec": tiny_spec(2), "state": {}}, partial)
    with pytest.raises(ValueError, match=rf"{partial}.*not a model bundle.*'info' is missing"):
        load_bundle(partial)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model_spec": tiny_spec(2), "best_eval_state": {}}, checkpoint)
    with pytest.raises(ValueError, match=r"training checkpoint.*'state', 'info' is missing"):
        load_bundle(checkpoint)
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a torch file")
    with pytest.raises(ValueError, match=rf"{garbage} is not a readable model bundle"):
        load_bundle(garbage)
    old = tmp_path / "old.pt"
    spec = tiny_spec(2)
    del spec["preprocessing"]
    torch.save({"model_spec": spec, "state": {}, "info": {}}, old)
    with pytest.raises(ValueError, match=rf"{old}: the model spec lacks 'preprocessing'"):
        load_bundle(old)
    with pytest.raises(ValueError, match="does not exist"):
        load_bundle(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="lacks preprocessing"):
        save_bundle(tmp_path / "x.pt", spec, {}, {})
    assert not (tmp_path / "x.pt").exists()


def test_build_network_names_the_bundle_whose_weights_do_not_fit(tmp_path):
    bundle = load_bundle(make_bundle(tmp_path / "model.pt", dims=2, seed=0))
    wrong = ModelBundle(spec={**bundle.spec, "model": {**bundle.spec["model"], "width": 8}}, state=bundle.state,
                        info=bundle.info, source="wrong.pt")
    with pytest.raises(ValueError, match="wrong.pt: its weights do not fit"):
        build_network(wrong)


def test_inference_settings_read_the_spec():
    settings = InferenceSettings.from_spec(tiny_spec(3, 2, postprocessing={"1": True, "3": False}))
    assert settings.dims == 3 and settings.in_channels == 2 and settings.num_classes == 4
    assert settings.class_ids == (0, 1, 2, 3) and settings.foreground_ids == (1, 2, 3)
    assert settings.label_names == {0: "background", 1: "a", 2: "b", 3: "c"}
    assert settings.preprocessing == PreprocessSettings(dims=3, target_spacing=TARGET_SPACING, crop_to_body=True,
                                                        normalisation="zscore_nonzero")
    assert settings.patch_size == (8, 8, 4) and settings.overlap == 0.5 and settings.min_size == 4
    assert settings.postprocessing == {1: True, 3: False}
    bare = InferenceSettings.from_spec({**tiny_spec(2), "labels": {}, "overlap": None})
    assert bare.label_names == {0: "background", 1: "class_1", 2: "class_2", 3: "class_3"}
    assert bare.overlap == 0.5 and bare.patch_size is None and bare.postprocessing == {}
    with pytest.raises(ValueError, match="m.pt: the model stores no preprocessing settings"):
        InferenceSettings.from_spec({**tiny_spec(2), "preprocessing": None}, "m.pt")
    with pytest.raises(ValueError, match="m.pt: invalid preprocessing settings: .*normalisation"):
        InferenceSettings.from_spec({**tiny_spec(2), "preprocessing": {"normalisation": "minmax"}}, "m.pt")
    with pytest.raises(ValueError, match="m.pt: class_ids"):
        InferenceSettings.from_spec({**tiny_spec(2), "num_classes": 3}, "m.pt")


def test_ensemble_models_must_agree_and_vote_on_postprocessing(tmp_path):
    def bundle(name: str, **overrides: Any) -> ModelBundle:
        return ModelBundle(spec=tiny_spec(3, 2, **overrides), state={}, info={}, source=name)

    other = PreprocessSettings(dims=3, target_spacing=(2.0, 2.0, 2.5), crop_to_body=True).to_dict()
    with pytest.raises(ValueError, match=r"agree on preprocessing \(one.pt: .*; two.pt: .*2\.0, 2\.0, 2\.5"):
        ensemble_settings([bundle("one.pt"), bundle("two.pt", preprocessing=other)])
    with pytest.raises(ValueError, match=r"agree on in_channels \(one.pt: 2; three.pt: 1\)"):
        ensemble_settings([bundle("one.pt"), bundle("two.pt"), ModelBundle(tiny_spec(3, 1), {}, {}, "three.pt")])
    with pytest.raises(ValueError, match=r"dims .*class_ids|class_ids"):
        ensemble_settings([bundle("one.pt"), bundle("two.pt", class_ids=[0, 1, 2, 4])])
    with pytest.raises(ValueError, match="no models"):
        ensemble_settings([])
    settings = ensemble_settings([bundle("1", postprocessing={"1": True}),
                                  bundle("2", postprocessing={"1": True, "2": True}),
                                  bundle("3", postprocessing={"2": False}),
                                  bundle("4", postprocessing={"3": True})])
    assert settings.postprocessing == {1: False, 2: False, 3: False}
    settings = ensemble_settings([bundle("1", postprocessing={"1": True}),
                                  bundle("2", postprocessing={"1": True, "2": True}),
                                  bundle("3", postprocessing={"2": False})])
    assert settings.postprocessing == {1: True, 2: False, 3: False}


# ---------------------------------------------------------------- probabilities


def test_mirror_axes_are_every_subset_of_the_spatial_axes():
    assert mirror_axes(2) == [(), (1,), (2,), (1, 2)]
    assert mirror_axes(3) == [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]


def test_ensemble_probabilities_are_the_mean_of_the_models(tmp_path):
    networks, settings = load_networks(make_bundle(tmp_path / "1.pt", 3, seed=1, in_channels=2),
                                       make_bundle(tmp_path / "2.pt", 3, seed=2, in_channels=2))
    image = torch.randn(2, 13, 11, 6, generator=torch.Generator().manual_seed(0))
    ensemble = predict_probabilities(networks, image, settings, batch_size=3)
    single = [predict_probabilities([network], image, settings, batch_size=3) for network in networks]
    assert ensemble.shape == (4, 13, 11, 6) and ensemble.dtype == torch.float32
    assert torch.allclose(ensemble, (single[0] + single[1]) / 2, atol=1e-6)
    assert not torch.allclose(single[0], single[1], atol=1e-3)
    assert torch.allclose(ensemble.sum(0), torch.ones(13, 11, 6), atol=1e-5)
    expected = sliding_window_inference(networks[0], image, PATCH_3D, overlap=0.5, batch_size=3)
    assert torch.allclose(single[0], expected, atol=1e-6)


def test_mirror_tta_3d_is_the_mean_of_the_flipped_back_sliding_window_predictions(tmp_path):
    networks, settings = load_networks(make_bundle(tmp_path / "m.pt", 3, seed=4, in_channels=2))
    image = torch.randn(2, 12, 10, 7, generator=torch.Generator().manual_seed(1))
    with_tta = predict_probabilities(networks, image, settings, tta_mirror=True, batch_size=4)
    manual = torch.zeros(4, 12, 10, 7)
    for axes in itertools.chain.from_iterable(itertools.combinations((1, 2, 3), n) for n in range(4)):
        flipped = image.flip(axes) if axes else image
        probabilities = sliding_window_inference(networks[0], flipped, PATCH_3D, overlap=0.5)
        manual += probabilities.flip(axes) if axes else probabilities
    assert torch.allclose(with_tta, manual / 8, atol=1e-6)
    assert not torch.allclose(with_tta, predict_probabilities(networks, image, settings), atol=1e-3)


def test_mirror_tta_2d_flips_the_slices_in_plane(tmp_path):
    networks, settings = load_networks(make_bundle(tmp_path / "m.pt", 2, seed=5))
    image = torch.randn(1, 9, 11, 5, generator=torch.Generator().manual_seed(2))
    with_tta = predict_probabilities(networks, image, settings, tta_mirror=True, batch_size=2)
    manual = torch.zeros(4, 9, 11, 5)
    for axes in [(), (1,), (2,), (1, 2)]:
        flipped = image.flip(axes) if axes else image
        for z in range(5):
            slice_probabilities = F.softmax(networks[0](flipped[None, :, :, :, z]), dim=1)[0]
            manual[..., z] += slice_probabilities.flip(axes) if axes else slice_probabilities
    assert torch.allclose(with_tta, manual / 4, atol=1e-6)
    plain = predict_probabilities(networks, image, settings, batch_size=3)
    assert not torch.allclose(with_tta, plain, atol=1e-3)
    per_slice = torch.stack([F.softmax(networks[0](image[None, :, :, :, z]), dim=1)[0] for z in range(5)], -1)
    assert torch.allclose(plain, per_slice, atol=1e-6)


def test_inputs_smaller_than_the_network_accepts_are_padded(tmp_path):
    networks_2d, settings_2d = load_networks(make_bundle(tmp_path / "2d.pt", 2, seed=6))
    probabilities = predict_probabilities(networks_2d, torch.randn(1, 3, 2, 4), settings_2d)
    assert probabilities.shape == (4, 3, 2, 4)
    assert torch.allclose(probabilities.sum(0), torch.ones(3, 2, 4), atol=1e-5)
    networks_3d, settings_3d = load_networks(make_bundle(tmp_path / "3d.pt", 3, seed=6, patch_size=None))
    assert settings_3d.patch_size is None
    image = torch.randn(1, 3, 6, 2)
    whole = network_probabilities(networks_3d[0], image, settings_3d, torch.device("cpu"), 1)
    assert whole.shape == (4, 3, 6, 2)
    padded = F.pad(image, [1, 1, 0, 0, 0, 1])
    expected = F.softmax(networks_3d[0](padded[None])[0], dim=0)[:, 0:3, :, 1:3]
    assert torch.allclose(whole, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[C=1, x, y, z\], got shape \(2, 4, 4, 4\)"):
        predict_probabilities(networks_3d, torch.zeros(2, 4, 4, 4), settings_3d)


# ---------------------------------------------------------------- files


def _check_outputs_match_inputs(output: Path, inputs: dict[str, Path]) -> None:
    assert sorted(p.name for p in output.glob("*.nii.gz")) == sorted(f"{case}.nii.gz" for case in inputs)
    for case, source in inputs.items():
        written, reference = nib.load(output / f"{case}.nii.gz"), nib.load(source)
        labels = np.asarray(written.dataobj)
        assert labels.shape == reference.shape
        assert np.array_equal(written.affine, reference.affine)
        assert np.array_equal(written.get_sform(), reference.get_sform())
        assert np.array_equal(written.get_qform(), reference.get_qform())
        assert int(written.header["sform_code"]) == int(reference.header["sform_code"]) == 2
        assert int(written.header["qform_code"]) == int(reference.header["qform_code"]) == 1
        assert np.issubdtype(labels.dtype, np.integer)
        assert set(np.unique(labels)) <= set(CLASS_IDS)


def test_predict_folder_3d_writes_labels_and_probabilities_in_the_input_geometry(tmp_path):
    inputs = tmp_path / "in"
    first = {case: write_case(inputs, case, channels=2, seed=n)[0] for n, case in enumerate(["liver_1", "liver_2"])}
    networks, settings = load_networks(make_bundle(tmp_path / "m.pt", 3, seed=7, in_channels=2))
    cases = find_input_cases(inputs, 2)
    written = predict_folder(cases, networks, settings, tmp_path / "out", batch_size=4, save_probabilities=True,
                             progress=True, stream=io.StringIO())
    assert [item.case_id for item in written] == ["liver_1", "liver_2"]
    _check_outputs_match_inputs(tmp_path / "out", first)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "liver_1.nii.gz", "liver_1.npz", "liver_2.nii.gz", "liver_2.npz"]
    saved = np.load(tmp_path / "out" / "liver_1.npz")
    probabilities = saved["probabilities"]
    assert probabilities.shape == (4, *INPUT_SHAPE)
    assert list(saved["class_ids"]) == CLASS_IDS
    assert np.allclose(probabilities.sum(0), 1.0, atol=1e-5)
    labels = np.asarray(nib.load(tmp_path / "out" / "liver_1.nii.gz").dataobj)
    assert np.array_equal(labels, np.asarray(CLASS_IDS)[probabilities.argmax(0)])
    assert len(np.unique(labels)) >= 2
    assert np.all(labels[:3] == 0), "outside the body crop the label is background"


def test_predict_folder_2d_with_one_file_per_case(tmp_path):
    inputs = tmp_path / "in"
    files = {case: write_case(inputs, case, channels=1, seed=10 + n, per_file=True)[0]
             for n, case in enumerate(["a", "b", "c"])}
    networks, settings = load_networks(make_bundle(tmp_path / "m.pt", 2, seed=8))
    cases = find_input_cases(inputs, 1)
    assert [case.files for case in cases] == [(files["a"],), (files["b"],), (files["c"],)]
    stream = io.StringIO()
    predict_folder(cases, networks, settings, tmp_path / "out", progress=True, stream=stream)
    _check_outputs_match_inputs(tmp_path / "out", files)
    assert stream.getvalue().splitlines() == ["predicting [1/3] a", "predicting [2/3] b", "predicting [3/3] c"]


class IntensityClasses(torch.nn.Module):
    """A stand-in network whose classes follow the (normalised) intensity: class k where the voxel is
    nearest to ``k - 1`` (a noisy image gives many small islands of each class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centres = torch.arange(4, dtype=x.dtype).reshape(1, 4, *([1] * (x.ndim - 2))) - 1.0
        return -10.0 * (x[:, :1] - centres) ** 2


def test_largest_component_filter_only_removes_islands(tmp_path):
    inputs = tmp_path / "in"
    write_case(inputs, "case", channels=1, seed=20, per_file=True, shape=(28, 26, 6))
    settings = InferenceSettings.from_spec(tiny_spec(2, postprocessing={"2": True}))
    networks = [IntensityClasses()]
    case = find_input_cases(inputs, 1)[0]
    outputs = {}
    for mode in ("none", "lcc", "auto"):
        choice = postprocessing_choice(mode, settings)
        result = predict_case_file(case, networks, settings, _folder(tmp_path / mode), postprocess=choice)
        outputs[mode] = (np.asarray(nib.load(result.label_path).dataobj), result.removed_voxels)
    raw, _ = outputs["none"]
    lcc, removed = outputs["lcc"]
    changed = raw != lcc
    assert set(np.unique(raw)) == set(CLASS_IDS)
    assert changed.any(), "the noisy map has islands to remove"
    assert np.all(lcc[changed] == 0) and np.all(raw[changed] != 0)
    assert removed == int(changed.sum())
    assert np.array_equal(lcc, apply_postprocessing(raw, {1: True, 2: True, 3: True}))
    auto, _ = outputs["auto"]
    assert np.array_equal(auto, apply_postprocessing(raw, {2: True}))
    assert postprocessing_choice("auto", settings) == {1: False, 2: True, 3: False}
    assert postprocessing_choice("none", settings) == {1: False, 2: False, 3: False}
    with pytest.raises(ValueError, match="--postprocess must be one of auto, none, lcc"):
        postprocessing_choice("largest", settings)


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_a_failing_case_is_named_after_the_earlier_cases_are_written(tmp_path):
    inputs = tmp_path / "in"
    write_case(inputs, "a_good", channels=1, seed=0, per_file=True)
    (inputs / "b_broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    write_case(inputs, "c_never", channels=1, seed=1, per_file=True)
    networks, settings = load_networks(make_bundle(tmp_path / "m.pt", 2, seed=0))
    with pytest.raises(CasePredictionError, match=r"^case b_broken: .*b_broken.nii.gz") as caught:
        predict_folder(find_input_cases(inputs, 1), networks, settings, tmp_path / "out", progress=False)
    assert caught.value.case_id == "b_broken" and caught.value.completed == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_good.nii.gz"]


def test_a_case_with_the_wrong_number_of_channels_is_named(tmp_path):
    file = write_case(tmp_path / "in", "single", channels=1, seed=0)[0]
    networks, settings = load_networks(make_bundle(tmp_path / "m.pt", 3, seed=0, in_channels=2))
    with pytest.raises(ValueError, match=rf"1 channel\(s\) \({file}\) but the model takes 2"):
        predict_case_file(InputCase("single", (file,)), networks, settings, _folder(tmp_path / "out"))
    assert not any((tmp_path / "out").iterdir())
