"""Machine description printed at the top of every benchmark: command, CPU, flags, cores, versions, date."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """CPU model name and the SIMD flags relevant to inference speed, from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("unknown", "", "x86_64"):
                    model = value.strip()
                if key.strip() == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
    return model, [f for f in wanted if f in flags]


def header(title: str) -> str:
    """Markdown lines: title, exact command, machine, software versions and date."""
    import torch

    model, flags = cpu_model_and_flags()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        from dn2 import __version__ as dn2_version
    except ImportError:
        dn2_version = "?"
    try:
        import openvino

        ov_version = f", openvino {openvino.__version__.split('-')[0]}"
    except ImportError:
        ov_version = ""
    lines = [
        f"# {title}",
        "",
        f"- command: `{shlex.join([os.path.relpath(sys.executable), *sys.argv])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {model}; {cores} cores usable; flags: {' '.join(flags) or 'none of avx2/avx512/amx'}",
        f"- torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads), "
        f"python {platform.python_version()}, dn2 {dn2_version}{ov_version}",
    ]
    return "\n".join(lines)
