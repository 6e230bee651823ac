"""Deterministic case-level splits for label-efficiency studies.

The labelled cases are shuffled once with the seed; test and validation cases
are carved from the front, then the labelled training cases. So for a given
seed the test and validation sets do not depend on the labelled budget, and
a larger budget's labelled set contains every smaller budget's one. Labelled
cases left over join the unlabelled pool, with their labels hidden.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from semiseg.data.errors import DatasetError

ROLES = ("labelled", "unlabelled", "validation", "test")


@dataclass(frozen=True)
class Split:
    """Which case ids play which role; every case has at most one role.

    Attributes:
        labelled: Training cases whose labels are used.
        unlabelled: Training cases used without labels.
        validation: Labelled cases for model selection.
        test: Labelled cases for the final evaluation.
    """

    labelled: tuple[str, ...]
    unlabelled: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]

    def roles(self) -> dict[str, tuple[str, ...]]:
        """Return the case ids of each role.

        Returns:
            ``{"labelled": ..., "unlabelled": ..., "validation": ..., "test": ...}``.
        """
        return {role: getattr(self, role) for role in ROLES}

    def role_of(self, case_id: str) -> str:
        """Return the role of a case.

        Args:
            case_id: The case identifier.

        Returns:
            One of ``"labelled"``, ``"unlabelled"``, ``"validation"``, ``"test"``.

        Raises:
            KeyError: If the case is in no role.
        """
        for role, ids in self.roles().items():
            if case_id in ids:
                return role
        raise KeyError(f"case {case_id!r} is not part of this split")


def make_split(
    labelled_ids: Iterable[str],
    unlabelled_ids: Iterable[str] = (),
    *,
    num_labelled: int,
    num_validation: int,
    num_test: int,
    seed: int,
) -> Split:
    """Split cases into labelled, unlabelled, validation and test sets.

    The result depends only on the *sets* of ids (not their order), the
    counts and the seed.

    Args:
        labelled_ids: Ids of cases that have labels.
        unlabelled_ids: Ids of cases without labels (always unlabelled).
        num_labelled: Labelled training cases to keep labelled (>= 1).
        num_validation: Validation cases (>= 0), taken from the labelled ones.
        num_test: Test cases (>= 0), taken from the labelled ones.
        seed: Seed of the shuffle.

    Returns:
        The split; each tuple sorted by case id.

    Raises:
        DatasetError: With path ``"split"``, when a count is negative,
            ``num_labelled < 1``, the counts exceed the labelled cases
            available, or ids repeat or appear as both labelled and unlabelled.
    """
    labelled = sorted(labelled_ids)
    unlabelled = sorted(unlabelled_ids)
    _check_request(labelled, unlabelled, num_labelled, num_validation, num_test)
    order = [labelled[i] for i in np.random.default_rng(seed).permutation(len(labelled))]
    test = order[:num_test]
    validation = order[num_test : num_test + num_validation]
    rest = order[num_test + num_validation :]
    return Split(
        labelled=tuple(sorted(rest[:num_labelled])),
        unlabelled=tuple(sorted(rest[num_labelled:] + unlabelled)),
        validation=tuple(sorted(validation)),
        test=tuple(sorted(test)),
    )


def _check_request(
    labelled: list[str],
    unlabelled: list[str],
    num_labelled: int,
    num_validation: int,
    num_test: int,
) -> None:
    problems = _count_problems(num_labelled, num_validation, num_test)
    asked = num_labelled + num_validation + num_test
    if not problems and asked > len(labelled):
        problems.append(
            f"asked for {asked} labelled cases ({num_labelled} labelled training + "
            f"{num_validation} validation + {num_test} test) but only {len(labelled)} "
            "labelled cases are available"
        )
    problems.extend(_id_problems(labelled, unlabelled))
    if problems:
        raise DatasetError([("split", p) for p in problems])


def _count_problems(num_labelled: int, num_validation: int, num_test: int) -> list[str]:
    problems = [
        f"{name} must not be negative, got {value}"
        for name, value in (("num_validation", num_validation), ("num_test", num_test))
        if value < 0
    ]
    if num_labelled < 1:
        problems.append(f"num_labelled must be at least 1, got {num_labelled}")
    return problems


def _id_problems(labelled: list[str], unlabelled: list[str]) -> list[str]:
    problems = []
    for name, ids in (("labelled", labelled), ("unlabelled", unlabelled)):
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        if repeated:
            problems.append(f"{name} case ids repeat: {repeated}")
    both = sorted(set(labelled) & set(unlabelled))
    if both:
        problems.append(f"case ids given as both labelled and unlabelled: {both}")
    return problems
