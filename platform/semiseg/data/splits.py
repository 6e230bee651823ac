"""Deterministic case-level splits for label-efficiency studies.

The labelled cases are shuffled once with the seed; test and validation cases
are carved from the front, then the labelled training cases. So for a given
seed the test and validation sets do not depend on the labelled budget, and
a larger budget's labelled set contains every smaller budget's one. Labelled
cases left over join the unlabelled pool, with their labels hidden.

A study's final phase can repeat its comparison over several draws of which cases are
labelled (:func:`draw_splits`, one fixed test set); the draws are written, and can be
given, as nnU-Net's ``splits_final.json`` (:func:`write_splits`, :func:`read_splits`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

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


SPLITS_FILE = "splits_final.json"
"""The name a study gives the splits it trained on, in its folder (nnU-Net's name)."""


def draw_splits(
    labelled_ids: Iterable[str],
    unlabelled_ids: Iterable[str] = (),
    *,
    count: int,
    num_labelled: int,
    num_validation: int,
    num_test: int,
    seed: int,
) -> list[Split]:
    """``count`` draws of which cases are labelled and which validate, around one fixed test set.

    Draw 0 is :func:`make_split` with ``seed``: the split a study searches on. Every later draw
    keeps its test cases and shuffles the other labelled cases again (with ``(seed, draw)``)
    before taking the validation cases and the labelled training cases from the front, so the
    methods are compared on the same test cases whichever cases were labelled.

    Args:
        labelled_ids, unlabelled_ids, num_labelled, num_validation, num_test, seed: as for
            :func:`make_split`.
        count: Number of draws (>= 1).

    Returns:
        ``count`` splits sharing their test cases.

    Raises:
        DatasetError: as :func:`make_split`, or ``count < 1``.
    """
    if count < 1:
        raise DatasetError([("split", f"the number of splits must be at least 1, got {count}")])
    first = make_split(labelled_ids, unlabelled_ids, num_labelled=num_labelled, num_validation=num_validation,
                       num_test=num_test, seed=seed)
    labelled = sorted(set(labelled_ids) - set(first.test))
    unlabelled = sorted(unlabelled_ids)
    splits = [first]
    for draw in range(1, count):
        order = [labelled[i] for i in np.random.default_rng([seed, draw]).permutation(len(labelled))]
        validation = order[:num_validation]
        rest = order[num_validation:]
        splits.append(Split(labelled=tuple(sorted(rest[:num_labelled])),
                            unlabelled=tuple(sorted(rest[num_labelled:] + unlabelled)),
                            validation=tuple(sorted(validation)), test=first.test))
    return splits


def select_split(
    labelled_ids: Iterable[str],
    unlabelled_ids: Iterable[str] = (),
    *,
    num_labelled: int,
    num_validation: int,
    num_test: int,
    seed: int,
    index: int = 0,
    splits_file: str | os.PathLike[str] = "",
) -> Split:
    """The split a trial trains on: entry ``index`` of ``splits_file``, or draw ``index`` of :func:`draw_splits`.

    Draw 0 is :func:`make_split`'s split, so a study without several splits is unchanged. The
    draws do not depend on how many are made: draw ``i`` is the same whether a study makes 2
    or 5, and, for one draw, a larger labelled budget contains a smaller one's cases.

    Args:
        labelled_ids, unlabelled_ids, num_labelled, num_validation, num_test, seed: as for
            :func:`make_split` (the budgets are unused with a splits file, except ``num_test``
            and ``seed`` for entries without a ``test`` list).
        index: Which split (>= 0).
        splits_file: A ``splits_final.json`` (:func:`read_splits`), or "" to draw.

    Returns:
        The split.

    Raises:
        DatasetError: see :func:`make_split` and :func:`read_splits`; an index beyond the file's entries.
    """
    labelled, unlabelled = sorted(labelled_ids), sorted(unlabelled_ids)
    if index < 0:
        raise DatasetError([("data.split", f"must be >= 0, got {index}")])
    if not splits_file:
        return draw_splits(labelled, unlabelled, count=index + 1, num_labelled=num_labelled,
                           num_validation=num_validation, num_test=num_test, seed=seed)[index]
    default_test = configured_test_cases(labelled, num_test, seed)
    splits = read_splits(splits_file, labelled, unlabelled, default_test=default_test)
    if index >= len(splits):
        raise DatasetError([(str(splits_file), f"has {len(splits)} split(s); split {index} was asked for "
                                               "(data.split counts from 0)")])
    return splits[index]


def configured_test_cases(labelled_ids: Iterable[str], num_test: int, seed: int) -> tuple[str, ...]:
    """The test cases :func:`make_split` draws with ``seed`` (the first ``num_test`` of its shuffle).

    Returns:
        Sorted case ids; empty when ``num_test`` is 0.
    """
    if num_test <= 0:
        return ()
    labelled = sorted(labelled_ids)
    order = [labelled[i] for i in np.random.default_rng(seed).permutation(len(labelled))]
    return tuple(sorted(order[:num_test]))


def splits_to_json(splits: Iterable[Split]) -> list[dict[str, list[str]]]:
    """Splits in nnU-Net's ``splits_final.json`` form, extended with the roles nnU-Net has no key for.

    Returns:
        One ``{"train": labelled, "val": validation, "test": test, "unlabelled": unlabelled}``
        per split: nnU-Net reads ``train`` and ``val``; semiseg reads all four.
    """
    return [{"train": list(s.labelled), "val": list(s.validation), "test": list(s.test),
             "unlabelled": list(s.unlabelled)} for s in splits]


def read_splits(
    path: str | os.PathLike[str],
    labelled_ids: Iterable[str],
    unlabelled_ids: Iterable[str] = (),
    *,
    default_test: Iterable[str] = (),
) -> list[Split]:
    """The splits of a ``splits_final.json`` file, checked against a dataset's cases.

    Each entry names its labelled training cases (``train``) and validation cases (``val``),
    as nnU-Net's do; ``test`` and ``unlabelled`` are optional. Without ``test`` an entry
    tests on ``default_test`` (the study's configured test cases); without ``unlabelled``
    every other case of the dataset is unlabelled (a labelled one with its label hidden).

    Args:
        path: The JSON file.
        labelled_ids: The dataset's cases with labels.
        unlabelled_ids: Its cases without labels.
        default_test: Test cases of entries without ``test``.

    Returns:
        One split per entry, in the file's order.

    Raises:
        DatasetError: naming the file, the entry and the problem, one line each: not a JSON
            list of objects, an unknown case id, a case without a label in ``train``,
            ``val`` or ``test``, a case in two roles, an entry without labelled cases.
    """
    where = str(path)
    try:
        entries = json.loads(Path(path).read_text())
    except OSError as error:
        raise DatasetError([(where, f"cannot read the splits file: {error.strerror or error}")]) from None
    except json.JSONDecodeError as error:
        raise DatasetError([(where, f"not valid JSON: {error}")]) from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise DatasetError([(where, 'expected a non-empty JSON list of {"train": [...], "val": [...]} objects')])
    labelled, unlabelled = set(labelled_ids), set(unlabelled_ids)
    problems: list[tuple[str, str]] = []
    splits = []
    for index, entry in enumerate(entries):
        split = _split_from_entry(entry, labelled, unlabelled, tuple(sorted(default_test)),
                                  lambda message, i=index: problems.append((where, f"split {i}: {message}")))
        if split is not None:
            splits.append(split)
    if problems:
        raise DatasetError(problems)
    return splits


def _split_from_entry(entry: dict, labelled: set[str], unlabelled: set[str], default_test: tuple[str, ...],
                      problem) -> Split | None:
    roles: dict[str, tuple[str, ...]] = {}
    for key in ("train", "val", "test", "unlabelled"):
        value = entry.get(key, default_test if key == "test" else None)
        if value is None:
            if key in ("train", "val"):
                problem(f'has no "{key}" list')
            continue
        if not isinstance(value, (list, tuple)) or not all(isinstance(i, str) for i in value):
            problem(f'"{key}" must be a list of case ids')
            continue
        unknown = sorted(set(value) - labelled - unlabelled)
        if unknown:
            problem(f'"{key}" names cases the dataset does not have: {unknown}')
        if key != "unlabelled" and set(value) & unlabelled:
            problem(f'"{key}" names cases without a label: {sorted(set(value) & unlabelled)}')
        roles[key] = tuple(sorted(value))
    if "train" in roles and not roles["train"]:
        problem('"train" is empty: a split needs at least one labelled training case')
    named = [case for ids in roles.values() for case in ids]
    repeated = sorted(case for case, n in Counter(named).items() if n > 1)
    if repeated:
        problem(f"cases in more than one role: {repeated}")
    if "train" not in roles or "val" not in roles or repeated:
        return None
    rest = sorted((labelled | unlabelled) - set(named))
    return Split(labelled=roles["train"], validation=roles["val"], test=roles.get("test", ()),
                 unlabelled=roles.get("unlabelled", tuple(rest)))


def write_splits(path: str | os.PathLike[str], splits: Iterable[Split]) -> Path:
    """Write ``splits`` as ``splits_final.json`` (:func:`splits_to_json`), atomically.

    Returns:
        The path written.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(splits_to_json(splits), indent=2))
    os.replace(tmp, target)
    return target
