"""The command line shared by every study script."""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from semiseg.config import ConfigError, TrainConfig, parse_override

if TYPE_CHECKING:
    from semiseg.tune.study import Study

HELP_WIDTH = 100
"""Columns of the study's description in ``--help``."""


@dataclass(frozen=True)
class StudyArgs:
    """Parsed command line of a study."""

    dataset: str
    num_samples: int | None
    max_epochs: int | None
    workers_per_trial: int
    gpus_per_worker: float
    cpus_per_worker: int
    max_concurrent: int | None
    tracking_uri: str | None
    storage_path: str
    state_dir: Path
    resume: bool
    smoke: bool
    seed: int
    address: str | None
    overrides: tuple[tuple[str, str], ...]
    skip_baselines: bool
    final_seeds: int | None = None
    methods: tuple[str, ...] = ()
    ranges: tuple[tuple[str, float, float], ...] = ()
    final_splits: int | None = None
    splits_file: str = ""
    verbose: bool = False


class StudyHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The study's description as written (its lines kept), and ``(default: X)`` after an option's help
    only when it has a default worth saying (not None, False, empty) that its help does not give already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default in ("", []) \
                or default is argparse.SUPPRESS:
            return text
        if action.option_strings and action.nargs != 0:
            return f"{text} (default: %(default)s)"
        return text


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The shared study CLI (``--dataset``, ``--num-samples``, ... ``--set key=value``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=StudyHelpFormatter)
    parser.add_argument("--dataset", default="phantom",
                        help="'phantom' (generated) or the path of a dataset in the nnU-Net raw layout")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="searched trials per search (default: the study's, see above)")
    parser.add_argument("--max-epochs", type=int, default=None, help="epochs per trial (default: the study's)")
    parser.add_argument("--workers-per-trial", type=int, default=1,
                        help="1: the loop runs inside the trial; >1: Ray Train DDP workers per trial")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="GPUs per worker; fractions share a GPU between trials (e.g. 0.25)")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPU threads per worker")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials at once (default: as many as the cluster's resources allow)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow URI (default: sqlite:///<storage-path>/mlflow.db); http:// servers work")
    parser.add_argument("--storage-path", default="runs",
                        help="folder, or a URI like s3://bucket/prefix shared by a cluster, for Ray's trial "
                             "results and checkpoints")
    parser.add_argument("--state-dir", default=None,
                        help="local folder for the study's Optuna database, results.json and default MLflow "
                             "store (default: the storage path when it is a folder, else ~/semiseg_runs)")
    parser.add_argument("--resume", action="store_true", help="continue the last run of this study")
    parser.add_argument("--smoke", action="store_true", help="a tiny version of the study (minutes on a laptop)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler, the split and the trials")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, as set by `ray job submit`, else local)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--range", dest="ranges", action="append", default=[], metavar="NAME=LOW:HIGH",
                        help="search NAME over LOW..HIGH instead of its declared range, e.g. --range "
                             "ema_decay=0.99:0.9995 for long schedules (repeatable)")
    parser.add_argument("--skip-baselines", action="store_true", help="run the search only")
    parser.add_argument("--final-seeds", type=int, default=None,
                        help="seeds of the final re-runs (default: the study's; 0: no re-runs of the searched best)")
    parser.add_argument("--final-splits", type=int, default=None, metavar="K",
                        help="run the final phase on K draws of which cases are labelled and validate (the same "
                             "test cases; each with the final seeds); paired tests pair by split and seed "
                             "(default 1, or every split of --splits)")
    parser.add_argument("--splits", dest="splits_file", default="", metavar="FILE",
                        help="nnU-Net splits_final.json: per split the labelled cases ('train') and validation "
                             "cases ('val'), optionally 'test' and 'unlabelled'; the search trains on the first")
    parser.add_argument("--methods", default=None, metavar="NAME[,NAME...]",
                        help="run only these of the study's methods (its baselines still run)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and Tune's output (status tables, worker logs) on the console; by default "
                             "it goes to <state-dir>/<study>/ray.log and the console shows each phase's progress")
    return parser


def study_description(study: "Study") -> str:
    """What ``--help`` says about a study: what it searches over which ranges, its budget and epochs,
    its final phase and what it writes."""
    epochs = int(study.base.get("train.max_epochs", TrainConfig().max_epochs))
    smoke_epochs = study.smoke.get("train.max_epochs", epochs)
    lines = [f"{study.name}: {study.description}", ""]
    searched = {method: names for method, names in study.methods.items() if names}
    if searched or study.search_space is not None:
        lines.append(f"Searches (Optuna TPE with ASHA on the epochs; {study.num_samples} trials per search, "
                     f"{epochs} epochs per trial, ASHA may stop a trial from epoch {study.grace_period}):")
        lines += [f"  {method}: {_ranges_text(method, names, study.ranges)}" for method, names in searched.items()]
        if study.search_space is not None:
            lines.append(f"  its own space over {', '.join(getattr(study.search_space, 'keys', [])) or 'its keys'}")
        lines.append("  (--range NAME=LOW:HIGH replaces a range; --num-samples and --max-epochs the budget)")
    best = "configuration" if study.final_top_k == 1 else f"{study.final_top_k} configurations"
    final = [f"the best {best} of each search"] if searched and study.final_seeds else []
    final += ["the baseline " + ", ".join(f"{k}={v}" for k, v in b.items()) for b in study.baselines]
    final += [f"{m} at its defaults" for m in (*[m for m, names in study.methods.items() if not names],
                                              *study.baseline_methods)]
    if final:
        lines.append(f"Final phase: {'; '.join(final)}, re-run with {max(1, study.final_seeds)} fresh seed(s); "
                     "each method is compared with supervised by a paired test.")
    smoke_trials = f"{study.smoke_num_samples} trial(s) per search, " if searched else ""
    lines.append(f"--smoke: {smoke_trials}{smoke_epochs} epochs, small data (minutes on a laptop).")
    lines.append(f"Writes: <state-dir>/{study.name}/ (results.json, study_state.json, optuna.db, models/, ray.log); "
                 "trial results and checkpoints under <storage-path>/ray/; MLflow runs in <state-dir>/mlflow.db "
                 "unless --tracking-uri.")
    return "\n".join(textwrap.fill(line, HELP_WIDTH, subsequent_indent="    ", break_on_hyphens=False) if line else line for line in lines)


def _ranges_text(method: str, names: Sequence[str], ranges: Any) -> str:
    """``ema_decay 0.5 … 0.995 (log scale of 1 − value)`` for each searched name (declared or replaced range)."""
    try:
        from semiseg.tune.space import resolve

        resolved = resolve(method, names, ranges)
    except (KeyError, ConfigError, ImportError):  # the study's checks report these before Ray starts
        return ", ".join(names)
    parts = []
    for key, hparam in resolved.items():
        name = key.removeprefix("method.")
        if hparam.choices:
            parts.append(f"{name} one of {', '.join(map(str, hparam.choices))}")
            continue
        scale = " (log scale of 1 − value)" if hparam.complement else " (log scale)" if hparam.log else ""
        parts.append(f"{name} {hparam.low:g} … {hparam.high:g}{scale}")
    return "; ".join(parts)


def is_uri(path: str) -> bool:
    """Whether ``path`` is a URI (``s3://…``, ``gs://…``) rather than a local folder."""
    return "://" in path


def parse_args(prog: str, description: str, argv: Sequence[str] | None) -> StudyArgs:
    """Parse ``argv``; exits with status 2 and a usage line on bad arguments."""
    parser = build_parser(prog, description)
    ns = parser.parse_args(argv)
    try:
        overrides = tuple(parse_override(text) for text in ns.overrides)
    except ConfigError as error:
        parser.error(str(error))
    try:
        ranges = tuple(parse_range(text) for text in ns.ranges)
    except ConfigError as error:
        parser.error(str(error))
    for flag, value in (("--num-samples", ns.num_samples), ("--max-epochs", ns.max_epochs),
                        ("--max-concurrent", ns.max_concurrent)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1")
    if ns.final_seeds is not None and ns.final_seeds < 0:
        parser.error("--final-seeds must be >= 0")
    if ns.final_splits is not None and ns.final_splits < 1:
        parser.error("--final-splits must be >= 1")
    if ns.workers_per_trial < 1 or ns.cpus_per_worker < 1 or ns.gpus_per_worker < 0:
        parser.error("--workers-per-trial and --cpus-per-worker must be >= 1, --gpus-per-worker >= 0")
    storage = ns.storage_path if is_uri(ns.storage_path) else str(Path(ns.storage_path).expanduser().resolve())
    if ns.state_dir:
        state_dir = Path(ns.state_dir).expanduser().resolve()
    else:
        state_dir = Path.home() / "semiseg_runs" if is_uri(storage) else Path(storage)
    return StudyArgs(dataset=ns.dataset, num_samples=ns.num_samples, max_epochs=ns.max_epochs,
                     workers_per_trial=ns.workers_per_trial, gpus_per_worker=ns.gpus_per_worker,
                     cpus_per_worker=ns.cpus_per_worker, max_concurrent=ns.max_concurrent,
                     tracking_uri=ns.tracking_uri, storage_path=storage, state_dir=state_dir,
                     resume=ns.resume, smoke=ns.smoke, seed=ns.seed, address=ns.address,
                     overrides=overrides, skip_baselines=ns.skip_baselines, final_seeds=ns.final_seeds,
                     methods=tuple(name.strip() for name in (ns.methods or "").split(",") if name.strip()),
                     ranges=ranges, final_splits=ns.final_splits, verbose=ns.verbose,
                     splits_file=str(Path(ns.splits_file).expanduser().resolve()) if ns.splits_file else "")


def check_paths(args: StudyArgs) -> None:
    """``--storage-path`` (a local one) and ``--state-dir`` must be folders or creatable as folders.

    Raises:
        ConfigError: naming the flag and the path that is a file (the path itself, or a
            parent of it).
    """
    paths = [] if is_uri(args.storage_path) else [("--storage-path", Path(args.storage_path))]
    paths.append(("--state-dir", args.state_dir))
    for flag, path in paths:
        for folder in (path, *path.parents):
            if folder.exists() and not folder.is_dir():
                where = "is a file" if folder == path else f"is under {folder}, which is a file"
                raise ConfigError(f"{flag} {path}: {where}, not a folder; give a folder (it is created if missing)")
            if folder.exists():
                break


def parse_range(text: str) -> tuple[str, float, float]:
    """``NAME=LOW:HIGH`` → (name, low, high).

    Raises:
        ConfigError: not of that form, or bounds that are not numbers.
    """
    name, sep, bounds = text.partition("=")
    low, colon, high = bounds.partition(":")
    if not sep or not colon or not name.strip():
        raise ConfigError(f"--range {text!r}: expected NAME=LOW:HIGH, e.g. ema_decay=0.9:0.995")
    try:
        return name.strip(), float(low), float(high)
    except ValueError:
        raise ConfigError(f"--range {text!r}: LOW and HIGH must be numbers") from None
