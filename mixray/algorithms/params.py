"""Declarative parameter validation for the estimators (scikit-learn's ``_parameter_constraints`` idea).

An estimator lists its constraints once, ``{"k": Interval(int, 1, None), "optimizer":
Options(SELECT_OPTIMIZERS), ...}``, and ``validate(params, constraints, error)`` checks
them all and returns the values to use: ``fit`` works on that dict and never writes
to the constructor parameters. Messages say what was received and what is allowed;
the error class is the estimator's member of :mod:`mixray.errors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from mixray.errors import MixrayError


@dataclass(frozen=True)
class Interval:
    """A number of ``kind`` (``int`` or ``float``) in an interval; ``None`` = unbounded.

    ``closed``: which ends belong to it (``"both"``, ``"left"``, ``"right"``, ``"neither"``).
    ``none_ok``: ``None`` is allowed too (meaning "default").
    """

    kind: type
    low: float | None
    high: float | None
    closed: str = "both"
    none_ok: bool = False

    def describe(self) -> str:
        has_left, has_right = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.high is None:
            return f">= {self.low}" if has_left else f"> {self.low}"
        if self.low is None:
            return f"<= {self.high}" if has_right else f"< {self.high}"
        return f"in {'[' if has_left else '('}{self.low}, {self.high}{']' if has_right else ')'}"

    def inside(self, v: float) -> bool:
        has_left, has_right = self.closed in ("both", "left"), self.closed in ("both", "right")
        lo_ok = self.low is None or (v >= self.low if has_left else v > self.low)
        hi_ok = self.high is None or (v <= self.high if has_right else v < self.high)
        return lo_ok and hi_ok and not math.isnan(v)

    def check(self, name: str, value: Any, error: type[MixrayError]) -> Any:
        """``value`` as ``kind``, or ``error`` saying what is allowed."""
        if value is None and self.none_ok:
            return None
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise error(f"{name} must be an integer {self.describe()}, "
                            f"got {type(value).__name__} {value!r}")
            v = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, Real):
                raise error(f"{name} must be a number {self.describe()}, got {value!r}")
            v = float(value)
        if not self.inside(v):
            raise error(f"{name} must be {self.describe()}, got {name}={value}")
        return v


@dataclass(frozen=True)
class Options:
    """One of a closed set of values (a tuple from :mod:`mixray.choices`)."""

    values: tuple

    def check(self, name: str, value: Any, error: type[MixrayError]) -> Any:
        try:
            ok = bool(value in self.values)
        except (TypeError, ValueError):  # e.g. an array: not one of the choices
            ok = False
        if not ok:
            raise error(f"{name} must be one of {list(self.values)}, got {value!r}")
        return value


def validate(params: dict[str, Any], constraints: dict, error: type[MixrayError]) -> dict[str, Any]:
    """Check every constrained parameter; return all parameters with the coerced values (a new dict).

    Raises ``error`` at the first problem. Parameters without a constraint pass unchanged.
    """
    out = dict(params)
    for name, rule in constraints.items():
        out[name] = rule.check(name, params[name], error)
    return out
