"""Declarative parameter checks, in the spirit of scikit-learn's ``_parameter_constraints``.

An estimator (or a settings dataclass, or an index kind) lists, once, what each parameter may be;
:func:`validate` checks a dict of values against that table and raises one clear ``ValueError``
(or ``TypeError``) naming the owner, the parameter, what it got and what is allowed. The same
tables check values read from model files, so a file cannot smuggle in what the constructor
would refuse.

Example:
    >>> from dn2.params import Interval, Options, validate
    >>> rules = {"k": [Interval(int, 1, None)], "normalize": [Options({"none", "l2"})]}
    >>> validate("KNNDetector", {"k": 2, "normalize": "l2"}, rules)
    >>> validate("KNNDetector", {"k": 0, "normalize": "l2"}, rules)
    Traceback (most recent call last):
    ...
    ValueError: KNNDetector: k must be an int in [1, inf), got 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = ["Constraint", "Interval", "Options", "InstanceOf", "Predicate", "TupleOf", "validate"]


class Constraint:
    """One allowed form of a value: ``accepts(value)`` and a description for error messages."""

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Interval(Constraint):
    """A number of ``kind`` (``int`` or ``float``; an int is a valid float) between ``low`` and ``high``.

    ``closed`` says which ends belong to the interval: "both", "left", "right" or "neither"; ``None``
    is an open end. NaN is never inside.
    """

    kind: type
    low: float | None
    high: float | None
    closed: str = "both"

    def accepts(self, value: Any) -> bool:
        if not (_is_int(value) if self.kind is int else _is_real(value)):
            return False
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and self.closed in ("right", "neither"))):
            return False
        if self.high is not None and (value > self.high or (value == self.high and self.closed in ("left", "neither"))):
            return False
        return True

    def describe(self) -> str:
        left = "[" if self.closed in ("both", "left") and self.low is not None else "("
        right = "]" if self.closed in ("both", "right") and self.high is not None else ")"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'an int' if self.kind is int else 'a number'} in {left}{low}, {high}{right}"


@dataclass(frozen=True)
class Options(Constraint):
    """One of a fixed set of values (strings, usually)."""

    values: frozenset

    def __init__(self, values: Iterable[Any]) -> None:
        object.__setattr__(self, "values", frozenset(values))

    def accepts(self, value: Any) -> bool:
        try:
            return value in self.values
        except TypeError:  # unhashable
            return False

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in sorted(self.values, key=str))


@dataclass(frozen=True)
class InstanceOf(Constraint):
    """An instance of ``kind`` (``bool`` is not accepted as an ``int``)."""

    kind: type | tuple[type, ...]
    what: str = ""

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) and not (self.kind is bool or (isinstance(self.kind, tuple) and bool in self.kind)):
            return False
        return isinstance(value, self.kind)

    def describe(self) -> str:
        if self.what:
            return self.what
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        return "a " + " or ".join(k.__name__ for k in kinds)


@dataclass(frozen=True)
class Predicate(Constraint):
    """Any value for which ``test(value)`` is true; ``what`` describes it."""

    test: Callable[[Any], bool]
    what: str

    def accepts(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False

    def describe(self) -> str:
        return self.what


@dataclass(frozen=True)
class TupleOf(Constraint):
    """A tuple or list whose items each satisfy ``item`` (possibly empty)."""

    item: Constraint

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (tuple, list)) and all(self.item.accepts(v) for v in value)

    def describe(self) -> str:
        return f"a sequence of {self.item.describe()}"


def _describe(options: Sequence[Constraint | None]) -> str:
    parts = ["None" if c is None else c.describe() for c in options]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def validate(owner: str, values: Mapping[str, Any], constraints: Mapping[str, Sequence[Constraint | None]], *,
             unknown: str = "error") -> None:
    """Check every value against its constraints (``None`` in a list allows ``None``).

    ``unknown="error"`` refuses names that have no constraints (``unknown="ignore"`` skips them).
    Raises ``ValueError`` naming ``owner``, the parameter, the value and what is allowed.
    """
    if unknown == "error":
        extra = sorted(set(values) - set(constraints))
        if extra:
            raise ValueError(f"{owner}: unknown parameter(s) {extra}; known: {sorted(constraints)}")
    for name, value in values.items():
        options = constraints.get(name)
        if options is None:
            continue
        if any((c is None and value is None) or (c is not None and c.accepts(value)) for c in options):
            continue
        raise ValueError(f"{owner}: {name} must be {_describe(options)}, got {value!r}")
