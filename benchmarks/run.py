"""Run the performance benchmarks and write ``results/<timestamp>.json`` and ``results/latest.md``.

    python benchmarks/run.py                 # everything, under 15 minutes on 2 cores
    python benchmarks/run.py --quick         # 1 to 3 minutes (skips the search section)
    python benchmarks/run.py --only data     # one section (repeatable)

Sections: step (training-step throughput), trials (study and trial overhead on Ray),
data (loader and preprocessing), ema (EMA update and elastic deformation), flops
(achieved FLOP/s against the machine's convolution peak), search (TPE + ASHA against
random search and a grid). Figures are printed and written, never asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Section, load_average, machine_info  # noqa: E402
from benchmarks.report import render  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class SectionSpec:
    """A section: its module (imported when it runs) and its settings at both scales."""

    module: str
    settings: Callable[[bool], Any]
    in_quick: bool = True


def _step_settings(quick: bool) -> Any:
    from benchmarks.step import StepSettings

    if quick:
        return StepSettings(steps=1, min_repeats=2, max_repeats=3, budget_s=25.0)
    return StepSettings()


def _trials_settings(quick: bool) -> Any:
    from benchmarks.trials import TrialSettings

    return TrialSettings.quick() if quick else TrialSettings()


def _data_settings(quick: bool) -> Any:
    from benchmarks.data import DataSettings

    if quick:
        return DataSettings(loader_batches=100, steps=1, min_repeats=2, max_repeats=3, budget_s=10.0,
                            phantom_cases=8, cache_repeats=2)
    return DataSettings()


def _ema_settings(quick: bool) -> Any:
    from benchmarks.ema_elastic import EmaElasticSettings

    return EmaElasticSettings.quick() if quick else EmaElasticSettings()


def _flops_settings(quick: bool) -> Any:
    from benchmarks.flops import FlopSettings

    return FlopSettings.quick() if quick else FlopSettings()


def _search_settings(quick: bool) -> Any:
    from benchmarks.search import SearchSettings

    return SearchSettings.quick() if quick else SearchSettings()


def _predict_settings(quick: bool) -> Any:
    from benchmarks.predict_throughput import PredictSettings

    return PredictSettings.quick() if quick else PredictSettings()


SECTIONS: dict[str, SectionSpec] = {
    "step": SectionSpec("benchmarks.step", _step_settings),
    "trials": SectionSpec("benchmarks.trials", _trials_settings),
    "data": SectionSpec("benchmarks.data", _data_settings),
    "ema": SectionSpec("benchmarks.ema_elastic", _ema_settings),
    "flops": SectionSpec("benchmarks.flops", _flops_settings),
    "search": SectionSpec("benchmarks.search", _search_settings, in_quick=False),
    "predict": SectionSpec("benchmarks.predict_throughput", _predict_settings),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds, smaller studies, 1 to 3 minutes; skips 'search' unless named in --only")
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS), default=None,
                        help="run only this section (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <timestamp>.json and latest.md")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder (phantoms, caches, Ray storage); a temporary one when unset")
    return parser.parse_args(argv)


def selected(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Sections to run, and the skipped ones with the reason."""
    if args.only:
        return [name for name in SECTIONS if name in args.only], {}
    names = [name for name, spec in SECTIONS.items() if spec.in_quick or not args.quick]
    skipped = {name: "skipped by --quick (run it with `--only search`, about 3 minutes)"
               for name in SECTIONS if name not in names}
    return names, skipped


def run_section(name: str, quick: bool, workdir: Path) -> dict[str, Any]:
    """Run one section, returning its record (an ``error`` entry instead when it fails)."""
    import importlib

    spec = SECTIONS[name]
    started = time.perf_counter()
    try:
        settings = spec.settings(quick)
        section: Section = importlib.import_module(spec.module).run(settings, workdir / name)
        record = section.to_dict()
    except Exception as error:  # a failed section must not lose the others' figures
        traceback.print_exc()
        record = {"title": name, "error": f"{type(error).__name__}: {error}"}
    record["elapsed_s"] = time.perf_counter() - started
    record["load_average_after"] = load_average()
    return record


def print_section(name: str, record: dict[str, Any]) -> None:
    """A few lines on the console per finished section."""
    print(f"\n== {name}: {record.get('title')} ({record['elapsed_s']:.0f} s)", flush=True)
    if "error" in record:
        print(f"   FAILED: {record['error']}", flush=True)
    for key, ratio in record.get("ratios", {}).items():
        print(f"   {key}: {ratio['value']:.3g}", flush=True)
    for check in record.get("checks", []):
        mark = "PASS" if check["passed"] else "MISS"
        print(f"   [{mark}] {check['name']}: {check['measured']:.3g} (target {check['op']} {check['target']:.3g})",
              flush=True)


def write_results(run: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write the JSON record and the Markdown table; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = run["timestamp"].replace(":", "-")
    json_path = out / f"{stamp}.json"
    json_path.write_text(json.dumps(run, indent=1, default=str) + "\n")
    markdown = out / "latest.md"
    markdown.write_text(render(run))
    return json_path, markdown


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected sections; exit status 1 when a section failed (targets are never asserted)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names, skipped = selected(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="semiseg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["SEMISEG_CACHE"] = str(workdir / "cache")
    started = time.perf_counter()
    run: dict[str, Any] = {"timestamp": datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
                           "mode": "quick" if args.quick else "default", "argv": list(argv or sys.argv[1:]),
                           "machine": machine_info(), "sections": {}, "skipped": skipped}
    try:
        for name in names:
            run["sections"][name] = run_section(name, args.quick, workdir)
            print_section(name, run["sections"][name])
    finally:
        _shutdown_ray()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    run["elapsed_s"] = time.perf_counter() - started
    run["load_average_end"] = load_average()
    json_path, markdown = write_results(run, args.out)
    print(f"\nresults: {json_path}\ntable:   {markdown}", flush=True)
    return 1 if any("error" in record for record in run["sections"].values()) else 0


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
