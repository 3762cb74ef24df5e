"""Verdicts as records: the one shape in which dn2 shows results to people and programs.

``dn2 serve`` answers with these records (as JSON) and ``dn2 score --report`` embeds them in its
page; both are drawn by the same script (``static/render.js``). A record is a plain dict::

    {"name", "anomaly_score", "verdict": "normal" | "anomaly", "threshold",
     "nearest": [{"name", "distance", "thumbnail": url or None}, ...],
     "heatmap": PNG data URL or None, "error": None}

and an image that could not be scored is ``{"name", "error": message}`` with the other fields
``None`` / empty. Scores and neighbours come from the detector (:func:`judge`); the maps, where a
model has them, from ``model.anomaly_map`` (:func:`anomaly_maps`, the network's work) drawn over
the image (:func:`overlay_url`, which a server can run outside its inference thread).

Example:
    >>> import numpy as np
    >>> from dn2 import KNNDetector
    >>> det = KNNDetector(k=1).fit(np.array([[0.0], [1.0], [2.0]]), names=["a", "b", "c"])
    >>> v = judge(det, np.array([[0.9], [7.0]], np.float32), explain=1)
    >>> record("q", v, 1, det).get("nearest")
    [{'name': 'c', 'distance': 5.0, 'thumbnail': None}]
    >>> record("q", v, 0, det)["verdict"], error_record("x.png", "not an image")["verdict"]
    ('normal', None)
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .overlay import heatmap_overlay

__all__ = ["MapResults", "Verdicts", "anomaly_maps", "data_url", "error_record", "judge", "maps_enabled", "overlay_url", "record"]


@dataclass
class Verdicts:
    """Scores and nearest memory rows of a batch of embeddings (row i = image i)."""

    scores: np.ndarray  # (N,) float64, the paper's d(y)
    distances: np.ndarray  # (N, n) float32, nearest first
    rows: np.ndarray  # (N, n) int64 memory rows (-1: none)
    threshold: float


def judge(detector: Any, vectors: np.ndarray, explain: int) -> Verdicts:
    """Score ``vectors`` with a fitted :class:`~dn2.KNNDetector` and find their ``explain`` nearest normals."""
    scores = detector.anomaly_score(vectors) if len(vectors) else np.zeros(0)
    if explain > 0 and len(vectors):
        distances, rows = detector.kneighbors(vectors, explain)
    else:
        distances, rows = np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
    return Verdicts(np.asarray(scores, np.float64), distances, rows, float(detector.threshold_))


def record(name: str, verdicts: Verdicts, i: int, detector: Any, *,
           thumbnail: Callable[[int], str | None] = lambda row: None, heatmap: str | None = None) -> dict[str, Any]:
    """The record of image ``i`` of ``verdicts``; ``thumbnail(row)`` gives the URL of a memory image's picture."""
    score = float(verdicts.scores[i])
    nearest = [{"name": detector.memory_names_[int(row)], "distance": float(dist), "thumbnail": thumbnail(int(row))}
               for dist, row in zip(verdicts.distances[i], verdicts.rows[i]) if row >= 0]
    return {"name": name, "anomaly_score": score, "verdict": "anomaly" if score > verdicts.threshold else "normal",
            "threshold": verdicts.threshold, "nearest": nearest, "heatmap": heatmap, "error": None}


def error_record(name: str, error: str) -> dict[str, Any]:
    """The record of an image that could not be scored (the others of its batch still are)."""
    return {"name": name, "anomaly_score": None, "verdict": None, "threshold": None, "nearest": [],
            "heatmap": None, "error": error}


def data_url(data: bytes, media_type: str) -> str:
    """``data:`` URL of some bytes: images inline in JSON and in self-contained pages."""
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def maps_enabled(model: Any) -> bool:
    """Whether ``model`` makes anomaly maps (``DN2(maps=...)``); False for models and dn2s without them."""
    return getattr(getattr(model, "method_", None), "maps", None) is not None


@dataclass
class MapResults:
    """Anomaly maps of a batch of images (float32 (H, W) each) and, for a model whose image score is not
    the image-level one (``image_score`` "map" or "combined"), those scores and their threshold."""

    maps: list[np.ndarray]
    image_scores: np.ndarray | None = None
    threshold: float | None = None

    def apply(self, verdicts: Verdicts, start: int = 0) -> Verdicts:
        """``verdicts`` with rows ``start`` .. ``start + len(maps)`` judged by the model's own image score."""
        if self.image_scores is None:
            return verdicts
        scores = verdicts.scores.copy()
        scores[start:start + len(self.maps)] = self.image_scores
        return replace(verdicts, scores=scores, threshold=float(self.threshold))


def anomaly_maps(model: Any, images: Sequence[Image.Image], embeddings: Any = None) -> MapResults | None:
    """The maps of ``images`` by ``model.localize`` (``embeddings``: ``model.embed(images)`` if already
    made), or ``None`` when the model makes no maps."""
    if not maps_enabled(model) or not images:
        return None
    results = list(model.localize(list(images), embeddings=embeddings))
    if len(results) != len(images):
        raise ValueError(f"{len(images) - len(results)} of {len(images)} images could not be read for their maps")
    own = model.method_.image_score != "dn2"
    return MapResults([r.map() for r in results],
                      np.array([r.image_score for r in results], np.float64) if own else None,
                      float(model.threshold_) if own else None)


def overlay_url(model: Any, image: Image.Image, amap: np.ndarray) -> str:
    """The heat-map overlay of one image as a PNG data URL, against the model's pixel threshold."""
    return data_url(heatmap_overlay(image, amap, getattr(model, "pixel_threshold_", None)), "image/png")
