"""The Markdown report of a benchmark run (``benchmarks/results/latest.md``)."""

from __future__ import annotations

import math
from typing import Any, Mapping

MACHINE_KEYS = ("cpu_model", "logical_cores", "usable_cores", "torch_threads_default", "torch_interop_threads",
                "parallel_backend", "cpu_capability", "mkldnn", "torch", "ray", "optuna", "python", "os", "cuda",
                "gpu")


def number(value: Any) -> str:
    """Three significant digits (integers above 1000 in full); ``-`` for missing or non-finite values."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    if not math.isfinite(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def verdict(check: Mapping[str, Any]) -> str:
    """PASS or MISS."""
    return "PASS" if check["passed"] else "MISS"


def render(run: Mapping[str, Any]) -> str:
    """The whole report: machine, summary of targets, then one part per section."""
    lines = [f"# semiseg benchmarks, {run['timestamp']} ({run['mode']})", ""]
    lines += _machine(run["machine"], run)
    lines += _summary(run["sections"])
    for name, section in run["sections"].items():
        lines += _section(name, section)
    for name, why in run.get("skipped", {}).items():
        lines += [f"## {name}: skipped", "", why, ""]
    return "\n".join(lines).rstrip() + "\n"


def _machine(machine: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    parts = [f"{key} {machine[key]}" for key in MACHINE_KEYS if key in machine]
    return ["**Machine:** " + "; ".join(parts) + ".", "",
            f"**Load average** (1/5/15 min) at start {machine.get('load_average')}, at end "
            f"{run.get('load_average_end')}; total {number(run.get('elapsed_s'))} s.", ""]


def _summary(sections: Mapping[str, Any]) -> list[str]:
    rows = [(name, check) for name, section in sections.items() for check in section.get("checks", [])]
    if not rows:
        return []
    lines = ["## Targets", "", "| section | check | measured | target | verdict |", "|---|---|---|---|---|"]
    for name, check in rows:
        lines.append(f"| {name} | {cell(check['name'])} | {number(check['measured'])} | {check['op']} "
                     f"{number(check['target'])} | {verdict(check)} |")
    return lines + [""]


def _section(name: str, section: Mapping[str, Any]) -> list[str]:
    lines = [f"## {name}: {section.get('title', '')}", ""]
    if "error" in section:
        return lines + [f"**Failed:** `{section['error']}`", ""]
    lines += [f"- {note}" for note in section.get("notes", [])]
    lines += [f"- section time {number(section.get('elapsed_s'))} s, load average after "
              f"{section.get('load_average_after')}", ""]
    lines += _figures(section.get("figures", {}))
    lines += _ratios(section.get("ratios", {}))
    lines += _checks(section.get("checks", []))
    lines += _extra(section.get("extra", {}))
    return lines


def _figures(figures: Mapping[str, Any]) -> list[str]:
    if not figures:
        return []
    lines = ["| figure | median | min–max | n | from CPU time | unit | what |", "|---|---|---|---|---|---|---|"]
    for name, fig in figures.items():
        lines.append(f"| {cell(name)} | {number(fig['median'])} | {number(fig['min'])}–{number(fig['max'])} | "
                     f"{fig['n']} | {number(fig.get('cpu_median'))} | {fig['unit']} | {cell(fig.get('help', ''))} |")
    return lines + [""]


def _ratios(ratios: Mapping[str, Any]) -> list[str]:
    if not ratios:
        return []
    lines = ["| ratio | value (of medians) | of best rounds | per round: median (min–max) | from CPU time | what |",
             "|---|---|---|---|---|---|"]
    for name, record in ratios.items():
        rounds = record["per_round"]
        lines.append(f"| {cell(name)} | {number(record['value'])} | {number(record.get('best_value'))} | "
                     f"{number(rounds['median'])} "
                     f"({number(rounds['min'])}–{number(rounds['max'])}) | {number(record.get('cpu_value'))} | "
                     f"{cell(record.get('help', ''))} |")
    return lines + [""]


def _checks(checks: list[Mapping[str, Any]]) -> list[str]:
    if not checks:
        return []
    lines = ["| check | measured | target | verdict | note |", "|---|---|---|---|---|"]
    for check in checks:
        lines.append(f"| {cell(check['name'])} | {number(check['measured'])} | {check['op']} "
                     f"{number(check['target'])} | {verdict(check)} | {cell(check.get('note', ''))} |")
    return lines + [""]


def _extra(extra: Mapping[str, Any]) -> list[str]:
    tables = {k: v for k, v in extra.items() if isinstance(v, dict) and "rows" in v and "columns" in v}
    scalars = {k: v for k, v in extra.items() if k not in tables and not isinstance(v, (dict, list))}
    lines: list[str] = []
    if scalars:
        lines += ["| other | value |", "|---|---|"]
        lines += [f"| {cell(key)} | {cell(number(value))} |" for key, value in scalars.items()]
        lines.append("")
    for title, table in tables.items():
        lines += [f"**{title}**", "", "| " + " | ".join(table["columns"]) + " |",
                  "|" + "---|" * len(table["columns"])]
        lines += ["| " + " | ".join(cell(number(value)) for value in row) + " |" for row in table["rows"]]
        lines.append("")
    return lines
