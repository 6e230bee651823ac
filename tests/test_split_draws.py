"""Several labelled splits: draws around one test set, nnU-Net's splits_final.json, the final phase's variants."""

from __future__ import annotations

import json

import pytest

from semiseg.data.errors import DatasetError
from semiseg.data.splits import (configured_test_cases, draw_splits, make_split, read_splits, select_split,
                                 write_splits)

LABELLED = [f"case_{i:02d}" for i in range(20)]
UNLABELLED = [f"extra_{i}" for i in range(3)]
BUDGET = dict(num_labelled=2, num_validation=3, num_test=4, seed=5)


def test_draw_zero_is_the_seeds_split_and_every_draw_keeps_its_test_cases():
    draws = draw_splits(LABELLED, UNLABELLED, count=4, **BUDGET)
    assert draws[0] == make_split(LABELLED, UNLABELLED, **BUDGET)
    assert {d.test for d in draws} == {draws[0].test}
    assert len({d.labelled for d in draws}) == 4
    for draw in draws:
        named = [*draw.labelled, *draw.validation, *draw.test, *draw.unlabelled]
        assert sorted(named) == sorted(LABELLED + UNLABELLED)
        assert (len(draw.labelled), len(draw.validation), len(draw.test)) == (2, 3, 4)
        assert set(UNLABELLED) <= set(draw.unlabelled)


def test_a_draw_does_not_depend_on_how_many_are_drawn_and_budgets_nest():
    assert draw_splits(LABELLED, count=2, **BUDGET)[1] == draw_splits(LABELLED, count=5, **BUDGET)[1]
    small = select_split(LABELLED, index=2, **BUDGET)
    large = select_split(LABELLED, index=2, **{**BUDGET, "num_labelled": 5})
    assert set(small.labelled) < set(large.labelled)
    assert small.validation == large.validation


def test_written_splits_read_back_the_same(tmp_path):
    draws = draw_splits(LABELLED, UNLABELLED, count=3, **BUDGET)
    path = write_splits(tmp_path / "splits_final.json", draws)
    entries = json.loads(path.read_text())
    assert entries[1]["train"] == list(draws[1].labelled) and entries[1]["val"] == list(draws[1].validation)
    assert read_splits(path, LABELLED, UNLABELLED) == draws
    assert select_split(LABELLED, UNLABELLED, index=2, splits_file=path, **BUDGET) == draws[2]


def test_an_nnunet_file_without_test_tests_on_the_configured_cases(tmp_path):
    test = configured_test_cases(LABELLED, 4, seed=5)
    rest = [c for c in LABELLED if c not in test]
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps([{"train": rest[:2], "val": rest[2:5]}]))
    split = select_split(LABELLED, UNLABELLED, splits_file=path, **BUDGET)
    assert split.test == test == make_split(LABELLED, UNLABELLED, **BUDGET).test
    assert split.labelled == tuple(rest[:2]) and split.validation == tuple(rest[2:5])
    assert set(split.unlabelled) == set(rest[5:]) | set(UNLABELLED)


@pytest.mark.parametrize("entries, expected", [
    ([{"train": ["case_00"]}], 'split 0: has no "val" list'),
    ([{"train": ["case_00"], "val": ["nope"]}], "names cases the dataset does not have: ['nope']"),
    ([{"train": ["extra_0"], "val": ["case_01"]}], "names cases without a label: ['extra_0']"),
    ([{"train": ["case_00"], "val": ["case_00"], "test": []}], "cases in more than one role: ['case_00']"),
    ([{"train": [], "val": ["case_01"], "test": []}], '"train" is empty'),
    ({"train": []}, "expected a non-empty JSON list"),
])
def test_a_bad_splits_file_names_the_file_and_the_problem(tmp_path, entries, expected):
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(DatasetError) as error:
        read_splits(path, LABELLED, UNLABELLED)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_asking_for_a_split_the_file_does_not_have_is_one_clear_error(tmp_path):
    path = write_splits(tmp_path / "splits_final.json", draw_splits(LABELLED, count=2, **BUDGET))
    with pytest.raises(DatasetError, match="has 2 split\\(s\\); split 3 was asked for"):
        select_split(LABELLED, index=3, splits_file=path, **BUDGET)
