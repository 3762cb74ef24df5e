"""Fuzzing: hostile images, archives, special files and mutated model files never take the machine down.

Every case runs in a worker process capped in memory (address space) and time, and must end in a
correct result or the library's clean error for that input (see tests/fuzz_worker.py). CI runs a few
hundred cases; ``DN2_FUZZ_CASES=5000 python -m pytest tests/test_fuzz.py`` runs a longer campaign
(the number is per kind). A failing case is reproduced with
``python tests/fuzz_worker.py KIND SEED 1 400``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fuzz_worker.py")
CASES = int(os.environ.get("DN2_FUZZ_CASES", "0")) or None
DEFAULT_CASES = {"image": 160, "archive": 60, "special": 16, "model": 80}
MEMORY_CAP_MB = 400  # above the worker's own baseline, per case: the documented per-image budget plus slack
ADDRESS_SPACE = 8 * 2**30  # hard limit of the worker process: a runaway allocation fails instead of swapping
CASE_SECONDS = 60  # no single case may take longer (a FIFO that blocks would hang forever)


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _run(kind: str, count: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(WORKER), kind, "0", str(count), str(MEMORY_CAP_MB)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_limit)
    records: list[dict] = []
    started: dict | None = None
    timer = threading.Timer(CASE_SECONDS, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            record = json.loads(line)
            if record["event"] == "start":
                started = record
                timer.cancel()
                timer = threading.Timer(CASE_SECONDS, proc.kill)
                timer.start()
            else:
                records.append(record)
                started = None
    finally:
        timer.cancel()
        code = proc.wait()
    if started is not None or code != 0:
        stderr = proc.stderr.read()[-2000:] if proc.stderr else ""  # type: ignore[union-attr]
        seed = started["seed"] if started else "?"
        pytest.fail(f"the {kind} worker died or hung at seed {seed} (exit {code}); reproduce with "
                    f"`python tests/fuzz_worker.py {kind} {seed} 1 {MEMORY_CAP_MB}`\n{stderr}")
    return records


@pytest.mark.parametrize("kind", list(DEFAULT_CASES))
def test_every_hostile_input_ends_in_a_result_or_a_clean_error(kind: str) -> None:
    count = CASES or DEFAULT_CASES[kind]
    records = _run(kind, count)
    assert len(records) == count
    bugs = [r for r in records if r["outcome"] == "bug"]
    assert not bugs, "\n".join(f"{kind} seed {r['seed']}: {r['detail']}" for r in bugs[:10])
    outcomes = {r["outcome"] for r in records}
    if kind in ("image", "archive", "model"):
        assert outcomes == {"ok", "refused"}, f"the {kind} cases should include both kinds of outcome: {outcomes}"
    print(f"{kind}: {count} cases, peak {max(r['peak_mb'] for r in records)} MB above baseline, "
          f"slowest {max(r['seconds'] for r in records):.2f} s")
