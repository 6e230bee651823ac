"""The configurations a study trains: its base, each method's, the baselines and the searches.

Configurations are flat dicts of dotted keys (see :class:`semiseg.config.ExperimentConfig`);
keys starting with ``_`` are the trial contract's private keys (:mod:`semiseg.train.contract`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from semiseg.data.source import PHANTOM
from semiseg.methods.registry import experiment_config
from semiseg.tune.cli import StudyArgs
from semiseg.tune.space import SearchSpace, method_space
from semiseg.tune.study import Study


class Search(NamedTuple):
    """One search of a study: its phase name, its space and the base of its trials."""

    phase: str
    space: SearchSpace
    base: dict[str, Any]


def resolve_base_config(study: Study, args: StudyArgs) -> dict[str, Any]:
    """Defaults < study base < smoke overrides < CLI flags < ``--set`` overrides, as a flat dict.

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    flat: dict[str, Any] = dict(study.base)
    if args.smoke:
        flat.update(study.smoke)
    flat["data.dataset"] = args.dataset if args.dataset == PHANTOM else str(Path(args.dataset).expanduser().resolve())
    flat["train.seed"] = args.seed
    flat["data.split_seed"] = args.seed
    if args.splits_file:
        flat["data.splits_file"] = args.splits_file
    flat["train.threads"] = args.cpus_per_worker
    flat["train.amp"] = flat.get("train.amp", args.gpus_per_worker > 0)
    if args.max_epochs is not None:
        flat["train.max_epochs"] = args.max_epochs
    flat.update(dict(args.overrides))
    return experiment_config(flat).to_flat()


def budget(study: Study, args: StudyArgs) -> tuple[int, int]:
    """Trials per search and seeds of the final phase: the study's, ``--smoke``'s or the command line's."""
    num_samples = args.num_samples or (study.smoke_num_samples if args.smoke else study.num_samples)
    final_seeds = study.smoke_final_seeds if args.smoke and study.final_seeds else study.final_seeds
    if args.final_seeds is not None:
        final_seeds = args.final_seeds
    return num_samples, final_seeds


def study_baselines(study: Study, args: StudyArgs) -> tuple[dict[str, Any], ...]:
    """The study's baselines (its smoke baselines with ``--smoke``, when it has them), then its grid:
    each of ``baseline_methods`` with each of ``baseline_variants``, variant by variant."""
    smoke = args.smoke
    fixed = study.smoke_baselines if smoke and study.smoke_baselines is not None else study.baselines
    methods = study.smoke_baseline_methods if smoke and study.smoke_baseline_methods is not None \
        else study.baseline_methods
    variants = study.smoke_baseline_variants if smoke and study.smoke_baseline_variants is not None \
        else study.baseline_variants
    grid = [{"method.name": method, **variant} for variant in (variants or ({},)) for method in methods]
    return tuple(dict(b) for b in fixed) + tuple(grid)


def baseline_config(base: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The public configuration of ``baseline``: ``base`` switched to its method, its overrides on top."""
    method = str(baseline.get("method.name", base["method.name"]))
    return {**public(config_for_method(base, method)), **baseline}


def study_methods(study: Study, base: dict[str, Any]) -> list[str]:
    """The methods a study trains (for the MLflow tags): its searched ones, else the base's, and its baselines'."""
    methods = list(study.methods) or [str(base["method.name"])]
    return (methods + [str(b.get("method.name", base["method.name"])) for b in study.baselines]
            + list(study.baseline_methods))


def searches(study: Study, base: dict[str, Any], ranges: dict[str, tuple[float, float]] | None = None
             ) -> list[Search]:
    """Each search of the study (``ranges``: replaced ranges, see :func:`semiseg.tune.checks.search_ranges`)."""
    found = []
    if study.search_space is not None:
        space_base = base
        if study.search_space.chooses_method:
            space_base = {k: v for k, v in base.items() if not k.startswith("method.")}
        found.append(Search("search", study.search_space, space_base))
    for method, keys in study.methods.items():
        if keys:
            found.append(Search(f"search-{method}", method_space(method, keys, ranges),
                                config_for_method(base, method)))
    return found


def config_for_method(base: dict[str, Any], method: str) -> dict[str, Any]:
    """``base`` with its method switched to ``method`` (its own defaults, the others' keys dropped)."""
    private = {k: v for k, v in base.items() if k.startswith("_")}
    public_keys = without_method_params(public(base), {"method.name": method})
    return {**experiment_config({**public_keys, "method.name": method}).to_flat(), **private}


def without_method_params(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Drop ``method.*`` keys of ``config`` when ``overrides`` switch to another method."""
    if "method.name" not in overrides or overrides["method.name"] == config.get("method.name"):
        return config
    return {k: v for k, v in config.items() if not k.startswith("method.")}


def public(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the trial contract's private keys."""
    return {k: v for k, v in config.items() if not k.startswith("_")}
