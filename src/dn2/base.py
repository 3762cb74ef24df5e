"""The shared scikit-learn outlier contract of every dn2 detector (as PyOD's ``BaseDetector``).

A detector implements ``anomaly_score(X)`` (the paper's d(y): higher = more anomalous) and sets
``threshold_`` and ``offset_ = -threshold_`` when fitted; this mixin turns that into
scikit-learn's ``score_samples`` / ``decision_function`` / ``predict`` (as in
``sklearn.neighbors.LocalOutlierFactor``: ``decision_function = score_samples - offset_``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ThresholdedScores:
    """``score_samples``, ``decision_function`` and ``predict`` from ``anomaly_score`` and ``offset_``."""

    offset_: float

    def anomaly_score(self, X: Any) -> np.ndarray:  # pragma: no cover - every detector overrides it
        raise NotImplementedError

    def score_samples(self, X: Any) -> np.ndarray:
        """Opposite of the anomaly score (scikit-learn convention: higher is more normal)."""
        return -self.anomaly_score(X)

    def decision_function(self, X: Any) -> np.ndarray:
        """``score_samples - offset_``: negative for anomalies, positive for normal items."""
        return self.score_samples(X) - self.offset_

    def predict(self, X: Any) -> np.ndarray:
        """+1 for normal items, -1 for anomalies (anomaly score above ``threshold_``), 0 for items that
        could not be scored (an unreadable image skipped with ``skip_bad``: its score is NaN)."""
        decision = self.decision_function(X)
        return np.where(np.isnan(decision), 0, np.where(decision >= 0, 1, -1))
