"""Global settings of dn2, in the manner of scikit-learn's ``set_config`` / ``config_context``.

One place for the limits that are about the machine rather than the method: how much memory the
temporaries of a computation may take (``working_memory``, as scikit-learn's setting of that name).
Every setting can also be given by an environment variable (``DN2_<NAME>`` in upper case), read
when dn2 is imported; ``set_config`` and ``config_context`` override it at run time.

Example:
    >>> import dn2.config
    >>> dn2.config.get_config()["working_memory"] >= 1
    True
    >>> with dn2.config.config_context(working_memory=64):
    ...     dn2.config.get_config()["working_memory"]
    64
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterator

__all__ = ["Settings", "config_context", "get_config", "set_config", "working_memory_bytes"]


@dataclass(frozen=True)
class Settings:
    """The settings and their defaults (each documented where it is used).

    working_memory: MiB that the temporaries of one search, distance block or coreset step may
        take, whatever the size of the data (the exact kNN, the IVF search, the benchmark
        protocols' distance blocks). Larger is not always faster: the tiles are sized for the caches.
    """

    working_memory: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"dn2 setting {f.name} must be a positive integer, got {value!r}")


def _from_environment() -> Settings:
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = os.environ.get(f"DN2_{f.name.upper()}")
        if raw is not None:
            try:
                values[f.name] = int(raw)
            except ValueError:
                raise ValueError(f"environment variable DN2_{f.name.upper()} must be an integer, got {raw!r}") from None
    return Settings(**values)


_settings = _from_environment()


def get_config() -> dict[str, Any]:
    """The current settings as a dict."""
    return asdict(_settings)


def set_config(**changes: Any) -> None:
    """Change settings for the rest of the process (unknown names raise ``TypeError``)."""
    global _settings
    _settings = replace(_settings, **changes)


@contextlib.contextmanager
def config_context(**changes: Any) -> Iterator[None]:
    """Change settings inside a ``with`` block only."""
    global _settings
    old = _settings
    set_config(**changes)
    try:
        yield
    finally:
        _settings = old


def working_memory_bytes() -> int:
    """``working_memory`` in bytes."""
    return _settings.working_memory * 2**20
