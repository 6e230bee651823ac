"""Best configurations at the edge of a searched range, and the ``--range`` that widens it.

A search can only find an optimum inside its range. When the best trial's value of a
numeric hyperparameter lies within :data:`EDGE_FRACTION` of the range's width from one of
its ends, the optimum may lie beyond that end: the study says so and suggests a wider range.

Distances are measured on the scale the search samples on: linear, ``log(value)`` for a
log-scaled hyperparameter, ``-log(1 - value)`` for one searched as ``1 - value`` on a log
scale (an EMA decay; increasing in the value, so "lower edge" means a low decay). The
suggested range extends the edge's side by the range's own width on that scale (a log
range 1e-4..1e-2 at its lower edge becomes 1e-6..1e-2; a decay range 0.99..0.999 at its
lower edge becomes 0.9..0.999), kept inside the values the hyperparameter may take at all
(its declared bounds): up to a closed bound, halfway to an open one. A value at an end that
is already such a bound gives no warning (no range can widen there). Categorical
hyperparameters have no edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from semiseg.config import ConfigError
from semiseg.methods.base import HParam
from semiseg.tune.space import SearchSpace, resolve, with_range

EDGE_FRACTION = 0.05
METHOD_PREFIX = "method."
LOWER, UPPER = "lower", "upper"
_FORMAT_TOLERANCE = 1e-4
"""Largest error of a printed bound, as a fraction of the range's width on the search scale."""


@dataclass(frozen=True)
class RangeEdge:
    """A searched hyperparameter whose best value lies at an edge of its range.

    Attributes:
        name: the name ``--range`` takes (``ema_decay``, ``optim.lr``).
        key: the dotted config key (``method.ema_decay``).
        value: the best configuration's value.
        low, high: the searched range.
        side: :data:`LOWER` or :data:`UPPER`.
        suggestion: the widened range (low, high) as printed, or None when the study's
            command line cannot widen this search (a space that chooses the method).
    """

    name: str
    key: str
    value: float
    low: float
    high: float
    side: str
    suggestion: tuple[str, str] | None = None

    @property
    def range_option(self) -> str:
        """``--range NAME=LOW:HIGH`` of the widened range ("" without a suggestion)."""
        return f"--range {self.name}={self.suggestion[0]}:{self.suggestion[1]}" if self.suggestion else ""

    def message(self) -> str:
        """One line: where the value lies and what to pass to widen the range."""
        where = (f"{self.name} = {self.value:.4g} lies at the {self.side} edge of the searched range "
                 f"{self.low:g}–{self.high:g}")
        if self.suggestion:
            return f"{where}; widen it, e.g. {self.range_option}"
        return f"{where}; widen it in the study's search space"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``results.json``."""
        return {"name": self.name, "key": self.key, "value": self.value, "low": self.low, "high": self.high,
                "side": self.side, "range_option": self.range_option, "message": self.message()}


def searched_hparams(space: SearchSpace, best_params: Mapping[str, Any]) -> dict[str, tuple[str, HParam]]:
    """``config key -> (--range name, declaration with the searched range)`` of the best trial's method.

    A space that chooses the method searches the keys of the method the best trial chose.
    Spaces that are neither kind (no ``methods``) give {}.
    """
    methods = dict(getattr(space, "methods", {}) or {})
    if space.chooses_method:
        method = best_params.get("method.name")
        names = methods.get(method, [])
    elif len(methods) == 1:
        method, names = next(iter(methods.items()))
    else:
        return {}
    if not names:
        return {}
    ranges = dict(getattr(space, "ranges", {}) or {})
    resolved = resolve(str(method), names, {n: r for n, r in ranges.items() if n in names})
    return {key: (_cli_name(key), hparam) for key, hparam in resolved.items()}


def range_edges(space: SearchSpace, best_params: Mapping[str, Any], fraction: float = EDGE_FRACTION
                ) -> list[RangeEdge]:
    """The numeric hyperparameters of ``best_params`` within ``fraction`` of an end of their range.

    Args:
        space: the search's space.
        best_params: the best trial's searched values by config key (``method.ema_decay``).
        fraction: the edge zone, as a fraction of the range's width on the search scale.

    Returns:
        One :class:`RangeEdge` per such hyperparameter, in the space's key order.
    """
    edges = []
    for key, (name, hparam) in searched_hparams(space, best_params).items():
        value = _number(best_params.get(key))
        if value is None or hparam.choices is not None or hparam.low is None or hparam.high is None:
            continue
        low, high = float(hparam.low), float(hparam.high)
        position = (_scale(value, hparam) - _scale(low, hparam)) / (_scale(high, hparam) - _scale(low, hparam))
        side = LOWER if position <= fraction else UPPER if position >= 1.0 - fraction else None
        if side is None:
            continue
        widened = widen(hparam, side)
        if widened is None:
            continue
        suggestion = None if space.chooses_method else _checked(name, hparam, widened)
        edges.append(RangeEdge(name, key, value, low, high, side, suggestion))
    return edges


def edge_warnings(search_space: SearchSpace, best_params: Mapping[str, Any]) -> list[str]:
    """One line per hyperparameter whose best value lies at an edge of its searched range (see :func:`range_edges`)."""
    return [edge.message() for edge in range_edges(search_space, best_params)]


def widen(hparam: HParam, side: str) -> tuple[float, float] | None:
    """The range of ``hparam`` extended on ``side`` by its width on the search scale, kept inside its bounds.

    Returns:
        (low, high), or None when that end is already a bound of the values it may take.
    """
    low, high = float(hparam.low), float(hparam.high)
    width = _scale(high, hparam) - _scale(low, hparam)
    old = low if side == LOWER else high
    step = -width if side == LOWER else width
    candidate = _unscale(_scale(old, hparam) + step, hparam)
    if candidate is None or not _allowed(candidate, hparam):
        candidate = _towards_bound(old, side, hparam)
        if candidate is None:
            return None
    if _is_integer(hparam):
        candidate = float(math.floor(candidate) if side == LOWER else math.ceil(candidate))
        if not _allowed(candidate, hparam) or candidate == old:
            return None
    return (candidate, high) if side == LOWER else (low, candidate)


def _towards_bound(old: float, side: str, hparam: HParam) -> float | None:
    """The hard bound beyond ``old`` on ``side`` when allowed, else halfway to it; None when ``old`` is it."""
    limits = _implicit_limits(hparam, side)
    if hparam.bounds is not None:
        limits.append(hparam.bounds.low if side == LOWER else hparam.bounds.high)
    limits = [limit for limit in limits if limit is not None]
    if not limits:
        return None
    limit = max(limits) if side == LOWER else min(limits)
    if _allowed(limit, hparam) and limit != old:
        return limit
    halfway = (old + limit) / 2.0
    return halfway if halfway != old and _allowed(halfway, hparam) else None


def _implicit_limits(hparam: HParam, side: str) -> list[float]:
    """Limits of the search scale itself: 0 below a log scale, 0 and 1 around a complement one."""
    if hparam.complement:
        return [0.0 if side == LOWER else 1.0]
    if hparam.log and side == LOWER:
        return [0.0]
    return []


def _allowed(value: float, hparam: HParam) -> bool:
    if not math.isfinite(value):
        return False
    if hparam.complement and not 0.0 < value < 1.0:
        return False
    if hparam.log and value <= 0.0:
        return False
    return hparam.bounds is None or hparam.bounds.contains(value)


def _scale(value: float, hparam: HParam) -> float:
    """The search scale, increasing in ``value``."""
    if hparam.complement:
        return -math.log(1.0 - value)
    if hparam.log:
        return math.log(value)
    return value


def _unscale(position: float, hparam: HParam) -> float | None:
    try:
        if hparam.complement:
            return 1.0 - math.exp(-position)
        if hparam.log:
            return math.exp(position)
    except OverflowError:
        return None
    return position


def _checked(name: str, hparam: HParam, widened: tuple[float, float]) -> tuple[str, str] | None:
    """The widened range as printed, if the study's ``--range`` accepts it (see :func:`with_range`)."""
    width = _scale(float(hparam.high), hparam) - _scale(float(hparam.low), hparam)
    printed = tuple(_shortest(bound, hparam, width) for bound in widened)
    try:
        with_range(name, hparam, (float(printed[0]), float(printed[1])))
    except ConfigError:
        return None
    return printed[0], printed[1]


def _shortest(value: float, hparam: HParam, width: float) -> str:
    """The shortest ``%g`` text of ``value`` within :data:`_FORMAT_TOLERANCE` of the width on the search scale."""
    if _is_integer(hparam):
        return str(int(value))
    for digits in range(1, 17):
        text = f"{value:.{digits}g}"
        shown = float(text)
        if _allowed(shown, hparam) and abs(_scale(shown, hparam) - _scale(value, hparam)) <= _FORMAT_TOLERANCE * width:
            return f"{shown:f}".rstrip("0").rstrip(".") if "e+" in text else text
    return repr(value)


def _is_integer(hparam: HParam) -> bool:
    return isinstance(hparam.default, int) and not isinstance(hparam.default, bool)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _cli_name(key: str) -> str:
    """The name ``--range`` and a study's ``methods`` use: ``ema_decay`` for ``method.ema_decay``."""
    return key[len(METHOD_PREFIX):] if key.startswith(METHOD_PREFIX) else key
