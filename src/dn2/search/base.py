"""What every index kind shares: the :class:`Index` protocol, declarative parameter checks, leave-one-out.

An index is fitted on a float32 matrix and answers ``search(Q, k) -> (dist, idx)``: Euclidean
distances (never squared) ascending and int64 row numbers, both (n_queries, k). ``search_self(k)``
is the leave-one-out search of the fitted rows (row i never returns index i). For model files,
``state()`` gives the arrays that rebuild the fitted index beyond the data itself, and
``restore(X, state)`` rebuilds it from the data and those arrays without recomputing them.

Example:
    >>> spec = {"nprobe": Param(int, low=1, doc="cells visited per query")}
    >>> check_params("ivf", spec, {"nprobe": 8})
    {'nprobe': 8}
    >>> check_params("ivf", spec, {"nprobe": 0})
    Traceback (most recent call last):
    ...
    dn2.search.base.ParameterError: index 'ivf': nprobe must be an int in [1, inf), got 0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from ..params import Constraint, InstanceOf, Interval, Options, validate
from .kernels import check_k

__all__ = ["Index", "Param", "ParameterError", "RebuiltByFitting", "check_params", "leave_one_out"]


@runtime_checkable
class Index(Protocol):
    """A kNN index of one kind; every kind of :data:`dn2.search.INDEX_KINDS` satisfies it.

    State for model files: ``state()`` returns named float32/int64 arrays (empty for kinds that
    rebuild from the data alone, such as "exact" and the FAISS kinds: FAISS' own index files are
    never read, as a hostile file could exploit the reader). ``restore(X, state)`` on an unfitted
    index made with the same ``params`` rebuilds the fitted index; it validates the arrays.
    """

    kind: str

    @property
    def ntotal(self) -> int:
        """Number of indexed rows (0 before fit)."""
        ...

    @property
    def params(self) -> dict[str, Any]:
        """The parameters given at construction (as passed to :func:`dn2.search.make_index`)."""
        ...

    def fit(self, X: np.ndarray) -> Index:
        """Index the rows of X (n, d) float32; returns self."""
        ...

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(dist (nq, k) float32 ascending, idx (nq, k) int64) of the k nearest indexed rows of each query."""
        ...

    def search_self(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out search of the indexed rows: row i never returns index i."""
        ...

    def state(self) -> dict[str, np.ndarray]:
        """Arrays, beyond the data, that rebuild the fitted index without recomputing them."""
        ...

    def restore(self, X: np.ndarray, state: Mapping[str, np.ndarray]) -> Index:
        """Rebuild the fitted index from the data it was fitted on and its :meth:`state`; returns self."""
        ...


class RebuiltByFitting:
    """``state``/``restore`` of an index kind with no state beyond the data ("exact", the FAISS kinds):
    restoring fits again. Mixed into those classes."""

    def state(self) -> dict[str, np.ndarray]:
        """Nothing beyond the data."""
        return {}

    def restore(self, X: np.ndarray, state: Mapping[str, np.ndarray]) -> Any:
        """Rebuild from the data by fitting again (``state`` must be empty)."""
        if state:
            raise ValueError(f"a {self.kind!r} index has no state, got arrays {sorted(state)}")  # type: ignore[attr-defined]
        return self.fit(X)  # type: ignore[attr-defined]


class ParameterError(ValueError, TypeError):
    """An index parameter that is unknown, of the wrong type or out of range (a ValueError and a TypeError)."""


@dataclass(frozen=True)
class Param:
    """One index parameter: its type, range or options, whether None is allowed, and what it does.

    `kind` is int, float or str; for int and float, `low` / `high` bound the value (inclusive).
    `allow_none` allows None (meaning "a default that depends on the data"). The check itself is
    dn2's one declarative validator (:mod:`dn2.params`); this class adds the documentation.
    """

    kind: type = int
    low: float | None = None
    high: float | None = None
    options: tuple[Any, ...] | None = None
    allow_none: bool = False
    doc: str = ""

    def constraints(self) -> list[Constraint | None]:
        """The :mod:`dn2.params` constraints of this parameter."""
        if self.options is not None:
            rule: Constraint = Options(self.options)
        elif self.kind in (int, float):
            rule = Interval(self.kind, self.low, self.high)
        else:
            rule = InstanceOf(self.kind)
        return [rule, None] if self.allow_none else [rule]

    def describe(self) -> str:
        """The constraint in words, e.g. 'an int in [1, inf)'."""
        rules = self.constraints()
        return rules[0].describe() + (" or None" if self.allow_none else "")  # type: ignore[union-attr]


def check_params(index_kind: str, spec: Mapping[str, Param], params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate `params` against `spec` (unknown names, types, ranges, options); returns them with numpy
    scalars made plain Python numbers (they end up in model files' JSON).

    Raises :class:`ParameterError` naming the index kind, the parameter and what is allowed.
    """
    try:
        validate(f"index {index_kind!r}", params, {name: p.constraints() for name, p in spec.items()})
    except ValueError as e:
        raise ParameterError(str(e)) from None
    return {name: value.item() if isinstance(value, np.generic) else value for name, value in params.items()}


def leave_one_out(index: Index, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """search_self of an approximate index: search X for k+1 and drop each row's own index (or, where the
    row itself was not found, the last column)."""
    check_k(k, len(X) - 1, "leave-one-out needs k <= ntotal - 1")
    dist, idx = index.search(X, k + 1)
    drop = idx == np.arange(len(idx))[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    return dist[keep].reshape(-1, k), idx[keep].reshape(-1, k)
