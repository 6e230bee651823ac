"""Tests of deterministic case-level splits."""

from __future__ import annotations

import pytest

from semiseg.data import DatasetError, Split, make_split

LABELLED = tuple(f"case_{k:03d}" for k in range(20))
UNLABELLED = tuple(f"extra_{k:02d}" for k in range(5))


def _split(num_labelled: int, seed: int = 0, num_validation: int = 3, num_test: int = 4) -> Split:
    return make_split(LABELLED, UNLABELLED, num_labelled=num_labelled,
                      num_validation=num_validation, num_test=num_test, seed=seed)


def test_every_case_has_exactly_one_role() -> None:
    for seed in range(25):
        for num_validation, num_test in ((0, 0), (3, 4), (5, 1)):
            for num_labelled in range(1, len(LABELLED) - num_validation - num_test + 1):
                split = _split(num_labelled, seed, num_validation, num_test)
                ids = [i for role in split.roles().values() for i in role]
                assert len(ids) == len(set(ids)), f"a case has two roles: seed {seed}"
                assert set(ids) == set(LABELLED) | set(UNLABELLED)
                assert (len(split.labelled), len(split.validation), len(split.test)) == (
                    num_labelled, num_validation, num_test)


def test_same_seed_same_split_regardless_of_input_order() -> None:
    split = _split(5, seed=7)
    assert _split(5, seed=7) == split
    reordered = make_split(tuple(reversed(LABELLED)), tuple(reversed(UNLABELLED)), num_labelled=5,
                           num_validation=3, num_test=4, seed=7)
    assert reordered == split


def test_seed_changes_the_split() -> None:
    tests = {_split(5, seed=s).test for s in range(10)}
    assert len(tests) > 5


def test_test_and_validation_do_not_depend_on_labelled_budget() -> None:
    for seed in range(10):
        splits = [_split(n, seed) for n in range(1, 14)]
        assert len({s.test for s in splits}) == 1
        assert len({s.validation for s in splits}) == 1
        for smaller, larger in zip(splits, splits[1:]):
            assert set(smaller.labelled) < set(larger.labelled)


def test_unlabelled_pool_holds_remainder_and_given_ids() -> None:
    split = _split(4, seed=3)
    remainder = set(LABELLED) - set(split.labelled) - set(split.validation) - set(split.test)
    assert len(remainder) == 20 - 4 - 3 - 4
    assert set(split.unlabelled) == remainder | set(UNLABELLED)
    assert split.unlabelled == tuple(sorted(split.unlabelled))


def test_all_labelled_used_leaves_only_given_unlabelled() -> None:
    split = _split(13, seed=1)
    assert split.unlabelled == UNLABELLED


def test_roles_and_role_of() -> None:
    split = _split(2, seed=0)
    assert list(split.roles()) == ["labelled", "unlabelled", "validation", "test"]
    assert split.role_of(split.test[0]) == "test"
    assert split.role_of(split.validation[0]) == "validation"
    assert split.role_of(split.labelled[0]) == "labelled"
    assert split.role_of("extra_00") == "unlabelled"
    with pytest.raises(KeyError, match="not part of this split"):
        split.role_of("nobody")


def test_over_budget_names_available_and_asked_counts() -> None:
    with pytest.raises(DatasetError) as err:
        _split(14, seed=0)
    assert str(err.value) == (
        "split: asked for 21 labelled cases (14 labelled training + 3 validation + 4 test) "
        "but only 20 labelled cases are available"
    )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"num_labelled": 0}, "num_labelled must be at least 1, got 0"),
        ({"num_labelled": 2, "num_validation": -1}, "num_validation must not be negative, got -1"),
        ({"num_labelled": 2, "num_test": -2}, "num_test must not be negative, got -2"),
    ],
)
def test_invalid_counts(kwargs: dict[str, int], expected: str) -> None:
    args = {"num_validation": 3, "num_test": 4, "seed": 0} | kwargs
    with pytest.raises(DatasetError) as err:
        make_split(LABELLED, **args)
    assert err.value.problems == [("split", expected)]


def test_overlapping_or_repeated_ids_rejected() -> None:
    with pytest.raises(DatasetError, match=r"both labelled and unlabelled: \['case_000'\]"):
        make_split(LABELLED, ("case_000",), num_labelled=1, num_validation=0, num_test=0, seed=0)
    with pytest.raises(DatasetError, match=r"labelled case ids repeat: \['case_001'\]"):
        make_split(LABELLED + ("case_001",), num_labelled=1, num_validation=0, num_test=0, seed=0)
