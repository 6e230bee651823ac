"""The model bundle: one trained evaluation network with everything prediction needs, in one file.

A bundle (``model.pt``) is ``torch.save({"model_spec": spec, "state": state_dict, "info": info})``:

- ``model_spec``: what :func:`semiseg.models.evaluation.build_evaluation_network` rebuilds the
  network from (``dims``, ``in_channels``, ``num_classes``, ``model``, ``class_ids``, method keys
  such as ``ensemble_views``) and how its inputs were prepared and its outputs are read
  (``preprocessing``: :meth:`PreprocessSettings.to_dict`, ``labels``: name → value, ``patch_size``,
  ``overlap``, ``postprocessing``: class id → keep the largest component).
- ``state``: the evaluation network's weights (the best validation epoch's).
- ``info``: where it came from (``method``, ``group``, ``phase``, ``seed``, ``split``, ``val_dice``,
  ``trial_id``).

It holds tensors and plain Python values only, so ``torch.load(weights_only=True)`` reads it.
:func:`save_bundle` is the one writer of the format; :func:`load_bundle` its reader.
:class:`InferenceSettings` is what prediction reads from one bundle's spec, or from the agreeing
specs of an ensemble (:func:`ensemble_settings`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from semiseg.data.preprocess import PreprocessSettings
from semiseg.models.evaluation import build_evaluation_network

BUNDLE_KEYS = ("model_spec", "state", "info")
"""The top-level keys of a bundle file."""

REQUIRED_SPEC_KEYS = ("dims", "in_channels", "num_classes", "model", "class_ids", "preprocessing")
"""Spec keys without which a bundle cannot be used for prediction."""

ENSEMBLE_KEYS = ("dims", "in_channels", "num_classes", "class_ids", "preprocessing", "patch_size", "overlap")
"""Spec keys that every model of an ensemble must share (their probabilities are averaged voxel for voxel)."""

DEFAULT_OVERLAP = 0.5
"""Sliding-window overlap when a spec does not state one (nnU-Net's)."""


@dataclass(frozen=True)
class ModelBundle:
    """One trained model as read from a bundle file.

    Attributes:
        spec: The ``model_spec`` (see the module docstring).
        state: The evaluation network's state dict.
        info: Provenance: ``method``, ``group``, ``phase``, ``seed``, ``split``, ``val_dice``, ``trial_id``.
        source: Where it was read from (a path, or the ``runs:/``/``models:/`` URI it was downloaded from).
    """

    spec: dict[str, Any]
    state: dict[str, Any]
    info: dict[str, Any]
    source: str

    def describe(self) -> str:
        """``method (seed S, split P)`` with what ``info`` states, e.g. ``mean_teacher (seed 1, split 0)``."""
        method = self.info.get("method") or "model"
        details = [f"{key} {self.info[key]}" for key in ("seed", "split") if self.info.get(key) is not None]
        return f"{method} ({', '.join(details)})" if details else str(method)


def save_bundle(path: str | os.PathLike, spec: Mapping[str, Any], state: Mapping[str, Any],
                info: Mapping[str, Any]) -> Path:
    """Write a bundle file atomically (a temporary file in the same folder, then renamed over ``path``).

    Args:
        path: Destination, conventionally ``.../model.pt``; its folder is created.
        spec: The model spec (must hold :data:`REQUIRED_SPEC_KEYS`).
        state: The evaluation network's state dict (tensors are stored on the CPU).
        info: Provenance (``method``, ``group``, ``phase``, ``seed``, ``split``, ``val_dice``, ``trial_id``).

    Returns:
        The path written.

    Raises:
        ValueError: ``spec`` lacks a required key.
    """
    missing = [key for key in REQUIRED_SPEC_KEYS if key not in spec]
    if missing:
        raise ValueError(f"cannot write model bundle {path}: its model spec lacks {', '.join(missing)}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model_spec": dict(spec),
               "state": {name: value.detach().cpu() if torch.is_tensor(value) else value
                         for name, value in state.items()},
               "info": dict(info)}
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def load_bundle(path: str | os.PathLike, source: str | None = None) -> ModelBundle:
    """Read a bundle file (``torch.load(weights_only=True)``, tensors on the CPU).

    Args:
        path: The ``model.pt`` file.
        source: What to call it in messages (default: the path).

    Returns:
        The bundle.

    Raises:
        ValueError: The file is missing, unreadable, not a bundle (the message names the file and the
            missing key), or its spec lacks a key prediction needs.
    """
    file = Path(path)
    name = source or str(file)
    if not file.is_file():
        raise ValueError(f"model file {name} does not exist")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise ValueError(f"{name} is not a readable model bundle ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no details'})") from error
    if not isinstance(payload, Mapping):
        raise ValueError(f"{name} is not a model bundle: it holds a {type(payload).__name__}, "
                         f"not a dict with keys {', '.join(BUNDLE_KEYS)}")
    missing = [key for key in BUNDLE_KEYS if key not in payload]
    if missing:
        hint = (" (a training checkpoint, not an exported model)" if "best_eval_state" in payload else "")
        raise ValueError(f"{name} is not a model bundle{hint}: key {', '.join(repr(k) for k in missing)} is missing")
    spec = dict(payload["model_spec"])
    missing_spec = [key for key in REQUIRED_SPEC_KEYS if key not in spec]
    if missing_spec:
        raise ValueError(f"{name}: the model spec lacks {', '.join(repr(k) for k in missing_spec)}; "
                         "prediction needs it to reproduce the training preprocessing and labels")
    return ModelBundle(spec=spec, state=dict(payload["state"]), info=dict(payload["info"] or {}), source=name)


def build_network(bundle: ModelBundle, device: torch.device | str = "cpu") -> nn.Module:
    """The bundle's evaluation network with its weights, in eval mode, on ``device``.

    Raises:
        ValueError: The weights do not fit the network the spec describes (the message names the bundle).
    """
    network = build_evaluation_network(bundle.spec)
    try:
        network.load_state_dict(bundle.state)
    except RuntimeError as error:
        raise ValueError(f"{bundle.source}: its weights do not fit the network its spec describes: "
                         f"{str(error).splitlines()[0]}") from error
    return network.to(device).eval()


@dataclass(frozen=True)
class InferenceSettings:
    """What prediction needs to know of a model (or an ensemble of agreeing models).

    Attributes:
        dims: 2 (slice by slice along Z) or 3 (volumes).
        in_channels: Image channels the network takes.
        num_classes: Output channels (classes, background included).
        class_ids: Label value of each output channel.
        label_names: Label value → name (background included).
        preprocessing: The training preprocessing, applied to every input.
        patch_size: 3D sliding-window patch ``(X, Y, Z)``, or None for whole volumes (or slices).
        overlap: Fraction shared by neighbouring windows.
        min_size: Smallest spatial size every network accepts (``2 ** depth``); smaller inputs are padded.
        postprocessing: Label value → keep only its largest connected component (the stored choice).
    """

    dims: int
    in_channels: int
    num_classes: int
    class_ids: tuple[int, ...]
    label_names: dict[int, str]
    preprocessing: PreprocessSettings
    patch_size: tuple[int, int, int] | None
    overlap: float
    min_size: int
    postprocessing: dict[int, bool]

    @property
    def foreground_ids(self) -> tuple[int, ...]:
        """The class ids other than background (0)."""
        return tuple(c for c in self.class_ids if c != 0)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], source: str = "model") -> InferenceSettings:
        """Settings of one model from its spec.

        Raises:
            ValueError: Inconsistent values (the message names ``source`` and the key).
        """
        if not spec.get("preprocessing"):
            raise ValueError(f"{source}: the model stores no preprocessing settings, so new scans cannot be "
                             "prepared as its training cases were (export it from a study that read NIfTI data)")
        try:
            preprocessing = PreprocessSettings.from_dict(dict(spec["preprocessing"]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: invalid preprocessing settings: {error}") from error
        class_ids = tuple(int(c) for c in spec["class_ids"])
        if len(class_ids) != int(spec["num_classes"]):
            raise ValueError(f"{source}: class_ids {list(class_ids)} do not match num_classes {spec['num_classes']}")
        names = {int(value): str(name) for name, value in dict(spec.get("labels") or {}).items()}
        label_names = {c: names.get(c, "background" if c == 0 else f"class_{c}") for c in class_ids}
        patch = spec.get("patch_size")
        patch_size = tuple(int(p) for p in patch) if patch else None
        if patch_size is not None and (int(spec["dims"]) != 3 or len(patch_size) != 3):
            raise ValueError(f"{source}: patch_size {list(patch_size)} needs dims 3 and three sizes")
        choice = {int(c): bool(keep) for c, keep in dict(spec.get("postprocessing") or {}).items()}
        return cls(dims=int(spec["dims"]), in_channels=int(spec["in_channels"]), num_classes=len(class_ids),
                   class_ids=class_ids, label_names=label_names, preprocessing=preprocessing,
                   patch_size=patch_size,  # type: ignore[arg-type]
                   overlap=DEFAULT_OVERLAP if spec.get("overlap") is None else float(spec["overlap"]),
                   min_size=2 ** int(spec["model"].get("depth", 0)), postprocessing=choice)


def ensemble_settings(bundles: Sequence[ModelBundle]) -> InferenceSettings:
    """The settings of one model, or of an ensemble whose models agree on :data:`ENSEMBLE_KEYS`.

    The ensemble's input must fit its deepest network (the largest ``min_size``), and its stored
    post-processing keeps a class's largest component where more than half of the models chose it
    (each model chose on its own validation cases).

    Raises:
        ValueError: No bundles, or models that differ in a shared key (the message lists each differing
            key with its values and the sources).
    """
    if not bundles:
        raise ValueError("no models to predict with")
    settings = [InferenceSettings.from_spec(bundle.spec, bundle.source) for bundle in bundles]
    first = bundles[0]
    differences = []
    for key in ENSEMBLE_KEYS:
        values = [_comparable(bundle.spec.get(key)) for bundle in bundles]
        if any(value != values[0] for value in values[1:]):
            other = next(b for b, v in zip(bundles, values) if v != values[0])
            differences.append(f"{key} ({first.source}: {first.spec.get(key)!r}; "
                               f"{other.source}: {other.spec.get(key)!r})")
    if differences:
        raise ValueError("the models of the ensemble must agree on " + "; ".join(differences))
    votes = {c: sum(s.postprocessing.get(c, False) for s in settings) for c in settings[0].foreground_ids}
    choice = {c: 2 * count > len(settings) for c, count in votes.items()}
    base = settings[0]
    return InferenceSettings(dims=base.dims, in_channels=base.in_channels, num_classes=base.num_classes,
                             class_ids=base.class_ids, label_names=base.label_names,
                             preprocessing=base.preprocessing, patch_size=base.patch_size, overlap=base.overlap,
                             min_size=max(s.min_size for s in settings), postprocessing=choice)


def _comparable(value: Any) -> Any:
    """``value`` with tuples as lists and mapping keys as strings, so saved and reloaded specs compare equal."""
    if isinstance(value, Mapping):
        return {str(k): _comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return value
