"""Prometheus metrics of the service, in the text exposition format (version 0.0.4), without a client library.

What an operator watches: requests by endpoint and status, errors, request latency, images scored
and refused, and the batches the network ran (their size shows the micro-batching at work).
Endpoints are the route templates (``/v1/thumbnails/{model}/{index}``), never raw paths, so a
client cannot grow the label set; unknown paths count as ``other``.

Example:
    >>> m = Metrics(["m"])
    >>> m.begin(); m.request("/v1/score", 200, 0.02)
    >>> m.images("m", scored=3, refused=1)
    >>> text = m.render()
    >>> 'dn2_requests_total{endpoint="/v1/score",status="200"} 1' in text
    True
    >>> 'dn2_images_scored_total{model="m"} 3' in text, 'dn2_request_duration_seconds_bucket{endpoint="/v1/score",le="0.025"} 1' in text
    (True, True)
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from typing import Iterable

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Metrics"]

#: upper bounds (seconds) of the latency histogram's buckets
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: upper bounds (images) of the batch size histogram's buckets
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Histogram:
    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}')
        total = running + self.counts[-1]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {total}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}" if labels else f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {total}" if labels else f"{name}_count {total}")
        return out


class Metrics:
    """Counters and histograms, updated from the event loop and the inference thread (one lock)."""

    def __init__(self, models: Iterable[str]):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.scored: dict[str, int] = {m: 0 for m in models}
        self.refused: dict[str, int] = {m: 0 for m in self.scored}
        self.batches: dict[str, _Histogram] = {m: _Histogram(BATCH_BUCKETS) for m in self.scored}
        self.inference_seconds: dict[str, float] = {m: 0.0 for m in self.scored}
        self.in_flight = 0

    def begin(self) -> None:
        """A request arrived (the in-flight gauge; :meth:`request` ends it)."""
        with self._lock:
            self.in_flight += 1

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered request; 4xx count as ``rejected`` errors, 5xx as ``server`` errors."""
        with self._lock:
            self.in_flight -= 1
            self.requests[(endpoint, status)] += 1
            if status >= 400:
                self.errors["server" if status >= 500 else "rejected"] += 1
            self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def images(self, model: str, *, scored: int, refused: int) -> None:
        """Images of one request: scored, and refused one by one (unreadable, too large)."""
        with self._lock:
            self.scored[model] += scored
            self.refused[model] += refused
            if refused:
                self.errors["bad_image"] += refused

    def batch(self, model: str, n_images: int, seconds: float) -> None:
        """One network run of the inference thread."""
        with self._lock:
            self.batches[model].observe(n_images)
            self.inference_seconds[model] += seconds

    def render(self) -> str:
        """Everything in Prometheus' text format."""
        with self._lock:
            out = ["# HELP dn2_requests_total HTTP requests answered, by endpoint (route template) and status.",
                   "# TYPE dn2_requests_total counter"]
            out += [f'dn2_requests_total{{endpoint="{_label(e)}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP dn2_requests_in_flight HTTP requests being handled now (this one included).",
                    "# TYPE dn2_requests_in_flight gauge", f"dn2_requests_in_flight {self.in_flight}"]
            out += ["# HELP dn2_errors_total Errors: rejected requests (4xx), server errors (5xx), bad images in uploads.",
                    "# TYPE dn2_errors_total counter"]
            out += [f'dn2_errors_total{{kind="{k}"}} {self.errors.get(k, 0)}' for k in ("rejected", "server", "bad_image")]
            out += ["# HELP dn2_request_duration_seconds Time from request to response, by endpoint.",
                    "# TYPE dn2_request_duration_seconds histogram"]
            for endpoint, hist in sorted(self.latency.items()):
                out += hist.lines("dn2_request_duration_seconds", f'endpoint="{_label(endpoint)}"')
            out += ["# HELP dn2_images_scored_total Images scored, by model.", "# TYPE dn2_images_scored_total counter"]
            out += [f'dn2_images_scored_total{{model="{_label(m)}"}} {n}' for m, n in sorted(self.scored.items())]
            out += ["# HELP dn2_images_refused_total Uploaded images that could not be scored, by model.",
                    "# TYPE dn2_images_refused_total counter"]
            out += [f'dn2_images_refused_total{{model="{_label(m)}"}} {n}' for m, n in sorted(self.refused.items())]
            out += ["# HELP dn2_batch_images Images per network run (micro-batches of concurrent requests), by model.",
                    "# TYPE dn2_batch_images histogram"]
            for model, hist in sorted(self.batches.items()):
                out += hist.lines("dn2_batch_images", f'model="{_label(model)}"')
            out += ["# HELP dn2_inference_seconds_total Time the network and search took, by model.",
                    "# TYPE dn2_inference_seconds_total counter"]
            out += [f'dn2_inference_seconds_total{{model="{_label(m)}"}} {s:.6f}' for m, s in sorted(self.inference_seconds.items())]
        return "\n".join(out) + "\n"
