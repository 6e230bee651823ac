"""Checks of a study on the driver, before Ray starts: its searches, every configuration it
will train and its dataset. Each raises :class:`ConfigError` or :class:`DatasetError` with
one clear message (the runner prints it and exits with status 2).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from semiseg.config import ConfigError
from semiseg.data.cache import CachedDataset, absent_label_problem
from semiseg.data.errors import DatasetError
from semiseg.data.source import PHANTOM, dataset_handover, prepare_cache, resolve_dataset
from semiseg.data.splits import Split, configured_test_cases, draw_splits, make_split, read_splits
from semiseg.data.validation import validate_layout
from semiseg.methods.registry import experiment_config
from semiseg.train.checks import check_config
from semiseg.tune.cli import StudyArgs
from semiseg.tune.configs import baseline_config, config_for_method, public, study_baselines
from semiseg.tune.space import SearchSpace, method_space
from semiseg.tune.study import Study

log = logging.getLogger("semiseg.study")


def check_searches(study: Study, args: StudyArgs) -> None:
    """Check the study's search space and build every method's once, so that a plain function,
    a bad name, range or seed point fails before Ray starts.

    Raises:
        ConfigError: a ``search_space`` that is no :class:`SearchSpace`, a name a method does
            not declare, and see :func:`search_ranges` and :meth:`MethodSpace.default_point`.
    """
    if study.search_space is not None and not isinstance(study.search_space, SearchSpace):
        space = study.search_space
        raise ConfigError(f"study {study.name}: search_space must be a semiseg.tune.space.SearchSpace (with keys, "
                          f"chooses_method, methods and default_point(), e.g. a MethodSpace or MethodChoiceSpace), "
                          f"got {type(space).__name__} {getattr(space, '__name__', space)!r}")
    ranges = search_ranges(study, args)
    for method, names in study.methods.items():
        if not names:
            continue
        try:
            space = method_space(method, names, ranges)
        except KeyError as error:
            raise ConfigError(f"study {study.name}: {error.args[0]}") from None
        if study.seed_with_defaults:
            space.default_point()


def search_ranges(study: Study, args: StudyArgs) -> dict[str, tuple[float, float]]:
    """The study's replaced search ranges with the command line's ``--range`` over them.

    Raises:
        ConfigError: a range for a name that none of the study's searches searches.
    """
    ranges = {**{name: (float(low), float(high)) for name, (low, high) in study.ranges.items()},
              **{name: (low, high) for name, low, high in args.ranges}}
    searched = {name for names in study.methods.values() for name in names}
    unknown = sorted(set(ranges) - searched)
    if unknown:
        raise ConfigError(f"study {study.name}: a range for {', '.join(unknown)}, which no search of it searches; "
                          f"it searches {sorted(searched) or 'nothing by name'}")
    return ranges


def check_trained_configs(study: Study, args: StudyArgs, base: dict[str, Any]) -> None:
    """Check every configuration the study will train before Ray starts: the base, each
    searched method's and each baseline's (see :func:`semiseg.train.checks.check_config`).

    Searched values come from declared choices and ranges, which are checked where they are
    declared (:class:`semiseg.methods.base.HParam`) or replaced (:func:`semiseg.tune.space.with_range`).
    A configuration whose pretraining fills the whole trial is allowed (a smoke run of a
    pretraining method) but warned about once per method: its segmenter never trains on labels.

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    methods = list(study.methods)
    if study.search_space is not None and study.search_space.chooses_method:
        methods += list(study.search_space.methods)
    configs = [base] + [config_for_method(base, method) for method in methods]
    configs += [baseline_config(base, baseline) for baseline in study_baselines(study, args)]
    warned: set[str] = set()
    for config in configs:
        cfg = experiment_config(public(config))
        check_config(cfg)
        name, pretrain_epochs = cfg.method["name"], cfg.method["pretrain_epochs"]
        if pretrain_epochs >= cfg.train.max_epochs and name not in warned:
            warned.add(name)
            log.warning("%s: method.pretrain_epochs = %d fills all train.max_epochs = %d epochs, so its segmenter "
                        "never trains on labels; lower method.pretrain_epochs or raise --max-epochs",
                        name, pretrain_epochs, cfg.train.max_epochs)


def check_dataset(base: dict[str, Any], baselines: Sequence[dict[str, Any]] = ()) -> tuple[str, dict[str, str]]:
    """Read, validate, fingerprint and preprocess the dataset once on the driver, and check every split budget.

    Returns:
        The dataset's name (for tags), and its handover to the trials (their config's
        :data:`~semiseg.train.contract.DATASET_KEY`): the cache built here, which a trial opens
        instead of scanning and fingerprinting the dataset again.

    Raises:
        DatasetError: naming the file and the problem; also for labels declared in
            ``dataset.json`` that no label file holds, unless ``data.allow_absent_labels``.
    """
    cfg = experiment_config(base)
    layout = resolve_dataset(cfg.data)
    if cfg.data.dataset != PHANTOM:
        log.info("validating %d training cases of %s ...", len(layout.training), layout.root)
        validate_layout(layout)
    info = prepare_cache(cfg.data, layout)
    log.info("preprocessed cache %s (%s)", info.path, "reused" if info.reused else "built")
    for budget in sorted({cfg.data.num_labelled} | {int(b["data.num_labelled"]) for b in baselines
                                                      if "data.num_labelled" in b}):
        make_split(layout.labelled_ids, layout.unlabelled_ids, num_labelled=budget,
                   num_validation=cfg.data.num_validation, num_test=cfg.data.num_test, seed=cfg.data.split_seed)
    absent = absent_label_problem(CachedDataset(info.path).manifest) if cfg.data.dataset != PHANTOM else None
    if absent is not None and not cfg.data.allow_absent_labels:
        raise DatasetError([(absent[0], f"{absent[1]}; fix the label files or dataset.json, or train anyway "
                                        "with --set data.allow_absent_labels=true")])
    if absent is not None:
        log.warning("warning: %s: %s (accepted: data.allow_absent_labels)", *absent)
    return layout.name, dataset_handover(cfg.data, info)


def check_splits(base: dict[str, Any], handover: dict[str, str], baselines: Sequence[dict[str, Any]] = (),
                 final_splits: int | None = None) -> list[Split]:
    """The splits of the final phase, checked against the prepared dataset's cases before Ray starts.

    With ``data.splits_file`` (``--splits``), its entries (the first ``final_splits`` of them);
    otherwise ``final_splits`` draws (:func:`semiseg.data.splits.draw_splits`, default 1),
    each checked for every labelled budget the study trains (a baseline may train on another
    budget than the base).

    Returns:
        The splits of the base configuration's budget (what the study writes as ``splits_final.json``).

    Raises:
        DatasetError: naming the splits file, the split and the problem; or asking for more
            splits than the file holds.
    """
    cfg = experiment_config(base)
    dataset = CachedDataset(handover["cache"])
    labelled, unlabelled = dataset.labelled_ids, dataset.unlabelled_ids
    if cfg.data.splits_file:
        default_test = configured_test_cases(labelled, cfg.data.num_test, cfg.data.split_seed)
        available = read_splits(cfg.data.splits_file, labelled, unlabelled, default_test=default_test)
        count = len(available) if final_splits is None else final_splits
        if count > len(available):
            raise DatasetError([(cfg.data.splits_file, f"has {len(available)} split(s); --final-splits asked for "
                                                       f"{count}")])
        return available[:count]
    count = 1 if final_splits is None else final_splits
    budgets = sorted({cfg.data.num_labelled} | {int(b["data.num_labelled"]) for b in baselines
                                                 if "data.num_labelled" in b})
    drawn = {budget: draw_splits(labelled, unlabelled, count=count, num_labelled=budget,
                                 num_validation=cfg.data.num_validation, num_test=cfg.data.num_test,
                                 seed=cfg.data.split_seed) for budget in budgets}
    return drawn[cfg.data.num_labelled]
