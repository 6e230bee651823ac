"""Post-processing chosen on validation, as nnU-Net does: per class, keep only the largest
connected component where that raises the validation Dice of that class.

* :func:`keep_largest_component` removes every component of one class but its largest
  (components by full connectivity: voxels touching by a face, an edge or a corner are one
  component); the removed voxels become background (0).
* :func:`class_dice_pairs` scores one validation case per class, raw and after
  :func:`keep_largest_component`; :func:`choice_from_dice_pairs` decides from the pairs of many
  cases (the pairs are small, so several workers can score their share of the cases and
  decide together from the gathered pairs); :func:`choose_postprocessing` does both.
* :func:`apply_postprocessing` applies a stored choice (``{class id: bool}``, the keys ints or
  their string form, as JSON gives them back).

The decision per foreground class ``c``: the mean over validation cases of the Dice of ``c``,
leaving out the cases where ``c`` is absent from both the prediction and the reference (their
Dice says nothing; nnU-Net's policy), with and without the largest-component filter. The filter
is chosen only when that mean strictly rises: a filter that changes nothing, or a class with no
case to judge it on, stays off. This is nnU-Net v2's per-class test (``Dice after > Dice
before``). nnU-Net v1 also required that no other class got worse; here classes are decided
independently, because the filter of class ``c`` only turns voxels of ``c`` into background and
so cannot change the Dice of another foreground class. nnU-Net's first step, the largest
component of the whole foreground treated as one class, is not done.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "apply_postprocessing",
    "choice_from_dice_pairs",
    "choose_postprocessing",
    "class_dice_pairs",
    "keep_largest_component",
    "postprocessing_summary",
]


def keep_largest_component(labels: np.ndarray, class_id: int) -> np.ndarray:
    """``labels`` with every connected component of ``class_id`` but the largest set to 0.

    Components are found by :func:`scipy.ndimage.label` with full connectivity
    (``generate_binary_structure(ndim, ndim)``: in 3D, 26 neighbours; voxels sharing only an
    edge or a corner belong to one component). When several components share the largest
    size, the first one (lowest label in scipy's raster-order numbering) is kept. Other
    classes are untouched; the input is not modified.

    Args:
        labels: integer label map, any number of dimensions.
        class_id: the class whose components are filtered.

    Returns:
        A copy of ``labels`` (same shape and dtype).
    """
    labels = np.asarray(labels)
    out = labels.copy()
    mask = labels == class_id
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    components, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return out
    sizes = np.bincount(components.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    out[mask & (components != largest)] = 0
    return out


def apply_postprocessing(labels: np.ndarray, choice: Mapping[int | str, bool]) -> np.ndarray:
    """``labels`` with :func:`keep_largest_component` applied to every class chosen in ``choice``.

    Args:
        labels: integer label map.
        choice: class id (int, or its string form as JSON object keys come back) -> whether to
            keep only the largest component of that class. Absent classes are left alone.

    Returns:
        A new label map (the input is not modified).

    Raises:
        ValueError: a key that is not a class id, or a value that is not a bool.
    """
    out = np.asarray(labels).copy()
    for class_id, keep in _parsed_choice(choice).items():
        if keep:
            out = keep_largest_component(out, class_id)
    return out


def class_dice_pairs(prediction: np.ndarray, reference: np.ndarray,
                     class_ids: Sequence[int]) -> dict[int, tuple[float, float]]:
    """Per foreground class of ``class_ids``, the Dice of one case raw and after
    :func:`keep_largest_component`.

    Dice = 2 |P ∩ R| / (|P| + |R|); NaN in both places when the class is absent from both the
    prediction and the reference (such a case is left out of the means). Background (0) is
    skipped.

    Raises:
        ValueError: the prediction and reference differ in shape.
    """
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} does not match reference shape {reference.shape}")
    pairs: dict[int, tuple[float, float]] = {}
    for class_id in _foreground(class_ids):
        target = reference == class_id
        raw = _dice(prediction == class_id, target)
        filtered = _dice(keep_largest_component(prediction, class_id) == class_id, target)
        pairs[class_id] = (raw, filtered)
    return pairs


def choice_from_dice_pairs(per_case: Sequence[Mapping[int, tuple[float, float]]],
                           class_ids: Sequence[int]) -> dict[int, bool]:
    """The choice per foreground class from the :func:`class_dice_pairs` of the validation cases:
    True only when the mean Dice after the filter is strictly higher than the raw mean (cases
    with NaN Dice left out; no case left: False)."""
    choice: dict[int, bool] = {}
    for class_id in _foreground(class_ids):
        pairs = [case[class_id] for case in per_case if class_id in case and not math.isnan(case[class_id][0])]
        if not pairs:
            choice[class_id] = False
            continue
        raw = sum(pair[0] for pair in pairs) / len(pairs)
        filtered = sum(pair[1] for pair in pairs) / len(pairs)
        choice[class_id] = bool(filtered > raw)
    return choice


def choose_postprocessing(predictions: Sequence[np.ndarray], references: Sequence[np.ndarray],
                          class_ids: Sequence[int]) -> dict[int, bool]:
    """Per foreground class, whether keeping only its largest component raises its mean Dice over
    the validation cases (``predictions[i]`` scored against ``references[i]``).

    Raises:
        ValueError: different numbers of predictions and references, or a shape mismatch.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    per_case = [class_dice_pairs(p, r, class_ids) for p, r in zip(predictions, references)]
    return choice_from_dice_pairs(per_case, class_ids)


def postprocessing_summary(choice: Mapping[int | str, bool], label_names: Mapping[int, str] | None = None) -> str:
    """One line: ``"largest component kept for: liver, tumour"``, or ``"none"`` when no class is
    filtered (a class without a name in ``label_names`` is named by its id)."""
    names = label_names or {}
    chosen = [names.get(class_id, str(class_id)) for class_id, keep in sorted(_parsed_choice(choice).items()) if keep]
    return f"largest component kept for: {', '.join(chosen)}" if chosen else "none"


def _parsed_choice(choice: Mapping[int | str, bool]) -> dict[int, bool]:
    """``choice`` with int keys, checked."""
    parsed: dict[int, bool] = {}
    for key, keep in choice.items():
        try:
            class_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"post-processing choice: key {key!r} is not a class id") from None
        if not isinstance(keep, (bool, np.bool_)):
            raise ValueError(f"post-processing choice: class {key!r} maps to {keep!r}, expected true or false")
        parsed[class_id] = bool(keep)
    return parsed


def _foreground(class_ids: Sequence[int]) -> list[int]:
    """The class ids without background (0)."""
    return [int(c) for c in class_ids if int(c) != 0]


def _dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    total = int(prediction.sum()) + int(target.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(prediction, target).sum()) / total
