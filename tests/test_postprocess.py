"""Largest-component post-processing: the filter, its connectivity, and the choice made on validation."""

import math

import numpy as np
import pytest

from semiseg.postprocess import (apply_postprocessing, choice_from_dice_pairs, choose_postprocessing,
                                 class_dice_pairs, keep_largest_component, postprocessing_summary)


def _three_class_map() -> np.ndarray:
    """Background 0; class 1 a block; class 2 a block touching it and a distant 2x2x2 island."""
    labels = np.zeros((12, 10, 8), dtype=np.int64)
    labels[1:5, 1:5, 1:4] = 1
    labels[5:9, 1:5, 1:4] = 2
    labels[10:12, 8:10, 6:8] = 2
    return labels


def test_a_distant_island_of_one_class_is_removed_and_nothing_else_changes():
    labels = _three_class_map()
    filtered = keep_largest_component(labels, 2)
    assert (filtered[10:12, 8:10, 6:8] == 0).all()
    island = np.zeros(labels.shape, dtype=bool)
    island[10:12, 8:10, 6:8] = True
    np.testing.assert_array_equal(filtered[~island], labels[~island])
    assert int((filtered == 2).sum()) == 4 * 4 * 3
    assert int((filtered == 1).sum()) == int((labels == 1).sum()) == 4 * 4 * 3
    assert filtered.dtype == labels.dtype and filtered.shape == labels.shape
    assert int((labels == 2).sum()) == 4 * 4 * 3 + 8, "the input is not modified"


def test_filtering_a_class_with_one_component_changes_nothing():
    labels = _three_class_map()
    np.testing.assert_array_equal(keep_largest_component(labels, 1), labels)
    np.testing.assert_array_equal(keep_largest_component(labels, 5), labels)


def test_diagonal_neighbours_are_one_component_in_3d_and_2d():
    corner_chain = np.zeros((6, 6, 6), dtype=np.int64)
    corner_chain[0, 0, 0] = corner_chain[1, 1, 1] = corner_chain[2, 2, 2] = 1  # touching by corners only
    corner_chain[5, 5, 0] = 1  # a separate voxel, not touching
    filtered = keep_largest_component(corner_chain, 1)
    assert filtered[0, 0, 0] == filtered[1, 1, 1] == filtered[2, 2, 2] == 1
    assert filtered[5, 5, 0] == 0

    edge_pair = np.zeros((4, 4), dtype=np.int64)
    edge_pair[0, 0] = edge_pair[1, 1] = 3  # diagonal in 2D: one component of 2
    edge_pair[3, 3] = 3
    filtered = keep_largest_component(edge_pair, 3)
    assert filtered[0, 0] == filtered[1, 1] == 3 and filtered[3, 3] == 0


def test_of_equal_components_the_first_in_raster_order_is_kept():
    labels = np.zeros((8, 3, 3), dtype=np.int64)
    labels[0:2, 0, 0] = 1
    labels[6:8, 2, 2] = 1
    filtered = keep_largest_component(labels, 1)
    assert (filtered[0:2, 0, 0] == 1).all() and (filtered[6:8, 2, 2] == 0).all()


def _reference() -> np.ndarray:
    """Class 1: one block. Class 2: two true, separate blocks of different size."""
    reference = np.zeros((16, 16, 6), dtype=np.int64)
    reference[1:7, 1:7, 1:5] = 1
    reference[9:15, 1:7, 1:5] = 2
    reference[10:13, 10:13, 1:4] = 2
    return reference


def _validation_cases() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two cases, predictions exact but for a distant false island of class 1 (2x2x2 voxels);
    class 2's two components are both real."""
    predictions, references = [], []
    for shift in (0, 1):
        reference = np.roll(_reference(), shift, axis=2)
        prediction = reference.copy()
        prediction[14:16, 14:16, 4:6] = 1
        predictions.append(prediction)
        references.append(reference)
    return predictions, references


def test_the_choice_keeps_the_largest_component_only_where_the_validation_dice_rises():
    predictions, references = _validation_cases()
    pairs = [class_dice_pairs(p, r, [0, 1, 2]) for p, r in zip(predictions, references)]
    raw_1, filtered_1 = pairs[0][1]
    assert raw_1 == pytest.approx(2 * 144 / (152 + 144)) and filtered_1 == 1.0, "class 1's island is false"
    raw_2, filtered_2 = pairs[0][2]
    assert raw_2 == 1.0 and filtered_2 == pytest.approx(2 * 144 / (144 + 171)), "class 2's second block is real"
    assert choose_postprocessing(predictions, references, [0, 1, 2]) == {1: True, 2: False}


def test_a_filter_that_changes_nothing_is_not_chosen_and_absent_classes_are_left_out():
    reference = _reference()
    assert choose_postprocessing([reference], [reference], [0, 1, 2]) == {1: False, 2: False}
    no_class_3 = class_dice_pairs(reference, reference, [1, 3])
    assert math.isnan(no_class_3[3][0]) and math.isnan(no_class_3[3][1])
    # class 1: one case where filtering helps (0.5 -> 1.0) and one where class 1 is absent from both;
    # the absent case is left out, so the mean rises rather than being diluted by NaN or a Dice of 1.
    assert choice_from_dice_pairs([{1: (0.5, 1.0)}, {1: (math.nan, math.nan)}], [1]) == {1: True}
    assert choice_from_dice_pairs([{1: (math.nan, math.nan)}], [1]) == {1: False}
    assert choice_from_dice_pairs([{1: (0.8, 0.9)}, {1: (0.9, 0.7)}], [0, 1]) == {1: False}, "mean falls"


def test_apply_postprocessing_accepts_json_string_keys_and_filters_only_chosen_classes():
    labels = _three_class_map()
    labels[0, 9, 7] = 1  # an island of class 1 too
    by_string = apply_postprocessing(labels, {"1": False, "2": True})
    by_int = apply_postprocessing(labels, {1: False, 2: True})
    np.testing.assert_array_equal(by_string, by_int)
    assert by_string[0, 9, 7] == 1 and (by_string[10:12, 8:10, 6:8] == 0).all()
    both = apply_postprocessing(labels, {"1": True, "2": True})
    assert both[0, 9, 7] == 0
    np.testing.assert_array_equal(apply_postprocessing(labels, {}), labels)


def test_a_malformed_choice_is_one_clear_error():
    with pytest.raises(ValueError, match="key 'liver' is not a class id"):
        apply_postprocessing(_three_class_map(), {"liver": True})
    with pytest.raises(ValueError, match="class '2' maps to 'yes', expected true or false"):
        apply_postprocessing(_three_class_map(), {"2": "yes"})
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        choose_postprocessing([_reference(), _reference()], [_reference()], [1])


def test_summary_names_the_filtered_classes():
    names = {0: "background", 1: "liver", 2: "tumour"}
    assert postprocessing_summary({"1": True, "2": True}, names) == "largest component kept for: liver, tumour"
    assert postprocessing_summary({2: True, 1: False}, names) == "largest component kept for: tumour"
    assert postprocessing_summary({1: False}, names) == "none"
    assert postprocessing_summary({}, names) == "none"
    assert postprocessing_summary({3: True}) == "largest component kept for: 3"
