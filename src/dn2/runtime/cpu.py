"""What this CPU can run natively: the instruction-set features that decide the default precision.

Read once per process from ``/proc/cpuinfo`` (Linux, any architecture). Elsewhere, or when the file
cannot be read, every feature is reported absent: dn2 then picks fp32, which runs everywhere.

Example:
    >>> from dn2.runtime.cpu import BF16_NATIVE_FEATURES, cpu_supports_bf16, parse_cpuinfo
    >>> features = parse_cpuinfo("flags\\t\\t: fpu avx2 avx512f avx512_vnni\\n")
    >>> features.avx2, features.avx512_vnni, features.has_any(BF16_NATIVE_FEATURES)
    (True, True, False)
    >>> cpu_supports_bf16() in (True, False)
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

__all__ = [
    "BF16_NATIVE_FEATURES", "INT8_NATIVE_FEATURES", "CpuFeatures", "cpu_features", "cpu_supports_bf16", "parse_cpuinfo",
]


@dataclass(frozen=True)
class CpuFeatures:
    """The x86 features dn2 cares about, named as in ``/proc/cpuinfo``'s flags (all False if unknown).

    bf16 matrix instructions: ``avx512_bf16`` (Cooper Lake, Zen 4 and later), ``amx_bf16`` (Sapphire
    Rapids and later); int8 dot products: ``avx512_vnni``, ``avx_vnni`` (AVX2-class CPUs), ``amx_int8``.
    """

    avx2: bool = False
    avx512f: bool = False
    avx512_bf16: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False
    avx512_vnni: bool = False
    avx_vnni: bool = False

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every feature this class knows."""
        return tuple(f.name for f in fields(cls))

    def has_any(self, names: Iterable[str]) -> bool:
        """True when at least one of the named features is present (unknown names raise ``AttributeError``)."""
        return any(getattr(self, name) for name in names)


# Any of these makes bf16 matrix arithmetic native; without them oneDNN emulates bf16, many times
# slower than fp32 (BENCHMARKS.md), so "auto" must not pick it.
BF16_NATIVE_FEATURES: tuple[str, ...] = ("avx512_bf16", "amx_bf16")

# Any of these gives int8 dot products (u8 x s8 summed into int32 in one instruction). Without them
# (AVX2, AVX-512 without VNNI) oneDNN multiplies through int16 pairs, which saturate: dn2's int8
# networks use 7-bit weights so that they compute the same there, only slower (runtime/int8.py).
INT8_NATIVE_FEATURES: tuple[str, ...] = ("avx512_vnni", "avx_vnni", "amx_int8")


def parse_cpuinfo(text: str) -> CpuFeatures:
    """The features listed on the first ``flags`` line of a ``/proc/cpuinfo`` text (all cores share them)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            present = set(value.split())
            return CpuFeatures(**{name: name in present for name in CpuFeatures.names()})
    return CpuFeatures()


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's :class:`CpuFeatures`, read once (none present where /proc/cpuinfo is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return CpuFeatures()
    return parse_cpuinfo(text)


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    return cpu_features().has_any(BF16_NATIVE_FEATURES)
