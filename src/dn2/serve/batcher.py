"""Micro-batching: the images of concurrent requests go through the network together, in one thread.

A CPU runs a convolutional network several times faster per image in batches of 8-32 than one
image at a time, and two networks running at once on a small machine only fight over its cores. So
requests never run the network themselves: they decode their images (in their own threads) and
hand them to one inference thread, which waits up to ``batch_wait_ms`` for more images from other
requests (or until it has ``max_batch``), embeds them with one ``Embedder`` run per model, scores
them with one search, makes the anomaly maps where the model has them, and gives each request its
share. Under load the network therefore runs at its batch throughput; alone, a request waits only
a few ms more.

Example:
    >>> from concurrent.futures import Future
    >>> fake = Job("m", images=[], explain=0, future=Future())
    >>> fake.n
    0
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..review import Verdicts, anomaly_maps, judge
from .models import ServedModel

__all__ = ["Busy", "Job", "MicroBatcher", "Scored"]

logger = logging.getLogger(__name__)


class Busy(RuntimeError):
    """More images are waiting for the network than the service allows: try again later (503)."""


@dataclass
class Scored:
    """What the network and the search found for one request's images."""

    verdicts: Verdicts
    maps: list[np.ndarray] | None


@dataclass
class Job:
    """One request's decoded images for one model, and the future its answer goes to."""

    model: str
    images: Sequence[Image.Image]
    explain: int
    future: Future = field(default_factory=Future)

    @property
    def n(self) -> int:
        return len(self.images)


def _share(verdicts: Verdicts, start: int, stop: int, explain: int) -> Verdicts:
    return Verdicts(verdicts.scores[start:stop], verdicts.distances[start:stop, :explain],
                    verdicts.rows[start:stop, :explain], verdicts.threshold)


class MicroBatcher:
    """One inference thread for all models; :meth:`score` is what a request awaits.

    ``on_batch(model, n_images, seconds)`` is called after each network run (for metrics).
    """

    def __init__(self, models: dict[str, ServedModel], *, batch_wait_ms: float = 5.0, max_batch: int | None = None,
                 max_pending_images: int = 512, on_batch: Callable[[str, int, float], None] | None = None):
        self.models = models
        self.wait = batch_wait_ms / 1000.0
        self.max_batch = max_batch or min(m.batch_size for m in models.values())
        self.max_pending = max_pending_images
        self.on_batch = on_batch
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the inference thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dn2-inference", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the jobs already queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def warm_up(self) -> None:
        """Run each model once on a small image, so the first request does not pay for compiling the network."""
        for served in self.models.values():
            job = Job(served.name, [Image.new("RGB", (64, 64), (128, 128, 128))], explain=1)
            self._run_group(served, [job], count=False)
            job.future.result()

    # -- requests -----------------------------------------------------------------------------
    def submit(self, model: str, images: Sequence[Image.Image], explain: int) -> Future:
        """Queue one request's images; raises :class:`Busy` if too many images are already waiting."""
        if self._thread is None:
            raise RuntimeError("the inference thread is not running (start() the batcher)")
        job = Job(model, list(images), explain)
        with self._lock:
            if self._pending + job.n > self.max_pending:
                raise Busy(f"{self._pending} images are waiting for the network; the limit is {self.max_pending}")
            self._pending += job.n
        self._queue.put(job)
        return job.future

    async def score(self, model: str, images: Sequence[Image.Image], explain: int) -> Scored:
        """Await the scores of ``images``; cancelling (a timeout) leaves the batch to the others."""
        future = self.submit(model, images, explain)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # not yet running: skipped; running: its result is dropped
            raise

    # -- the inference thread -----------------------------------------------------------------
    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        """``first`` and the jobs that arrive within the wait, up to ``max_batch`` images; and whether to stop."""
        jobs, n = [first], first.n
        deadline = time.monotonic() + self.wait
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            n += job.n
        return jobs, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._collect(first)
            with self._lock:
                self._pending -= sum(job.n for job in jobs)
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]  # drops timed-out requests
            for name in dict.fromkeys(job.model for job in live):  # one run per model, in arrival order
                self._run_group(self.models[name], [job for job in live if job.model == name])
        while not self._queue.empty():  # stop() came before some jobs: none is left waiting
            job = self._queue.get_nowait()
            if job is not None and job.future.set_running_or_notify_cancel():
                self._run_group(self.models[job.model], [job])

    def _run_group(self, served: ServedModel, jobs: list[Job], count: bool = True) -> None:
        """Embed, score and map the images of ``jobs`` together; each future gets its share (or the error)."""
        started = time.perf_counter()
        try:
            images = [image for job in jobs for image in job.images]
            embeddings = served.model.embed(images)
            verdicts = judge(served.model.detector, embeddings.vectors, max(job.explain for job in jobs))
            maps = anomaly_maps(served.model, images, embeddings)
            if maps is not None:  # a model whose image score is its own ("combined", "map") judges by it
                verdicts = maps.apply(verdicts)
        except Exception as e:  # noqa: BLE001 - every waiting request must hear of it
            logger.exception("inference failed for model %s", served.name)
            for job in jobs:
                job.future.set_exception(e)
            return
        if self.on_batch is not None and count:
            self.on_batch(served.name, len(images), time.perf_counter() - started)
        start = 0
        for job in jobs:
            stop = start + job.n
            job.future.set_result(Scored(_share(verdicts, start, stop, job.explain), maps.maps[start:stop] if maps else None))
            start = stop
