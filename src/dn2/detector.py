"""DN2 detectors: :class:`KNNDetector` scores embeddings, :class:`DN2` scores images.

Both follow scikit-learn's outlier-detector contract (as ``LocalOutlierFactor`` does):
parameters are only stored in ``__init__``, fitted state ends with ``_``, ``score_samples`` is
higher for more normal items, ``decision_function = score_samples - offset_`` and ``predict``
gives +1 (normal) / -1 (anomaly). ``anomaly_score`` is the paper's d(y): the mean Euclidean
distance to the k nearest training embeddings (higher = more anomalous).

The threshold needs no labelled anomalies: it is a quantile of the leave-one-out scores of the
training items, at ``1 - fpr`` (the expected false-positive rate on new normal images) or, when
``contamination`` is given, at ``1 - contamination`` over all training items.

Example:
    >>> import numpy as np
    >>> from dn2 import KNNDetector
    >>> rng = np.random.default_rng(0)
    >>> det = KNNDetector(k=2).fit(rng.normal(size=(200, 8)))
    >>> det.predict(np.array([[0.0] * 8, [9.0] * 8])).tolist()
    [1, -1]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.exceptions import NotFittedError

from .backbones import DEFAULT_BACKBONE
from .base import ThresholdedScores
from .features import Embedder, Embeddings
from .normalize import EmbeddingTransform, make_transform, method_precision, transform_from_state
from .search import kmeans, knn, knn_score, make_index

Neighbours = list[list[tuple[str, float]]]

#: Method settings of the presets of :class:`DN2`; an explicitly given parameter overrides them.
#: ``paper``: the DN2 paper's method bit for bit (raw pooled last-stage features, Euclidean
#: distance, k=2, resize 256 / crop 224), on the default offline backbone.
#: ``best``: the most accurate training-free combination measured on CIFAR-10 (BENCHMARKS.md,
#: "Beyond the paper"): the EfficientNet-Lite0 + Lite2 ensemble, each backbone's features
#: Hellinger-normalised (signed square root + L2) on their own, k=2. Flip TTA and multi-stage
#: pooling were measured and did not help, so they are off.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"backbone": DEFAULT_BACKBONE, "k": 2, "normalize": "none", "stages": (), "flip": False},
    "best": {"backbone": "efficientnet_lite0+efficientnet_lite2", "k": 2, "normalize": "sqrt_l2", "stages": (), "flip": False},
}
PRESET_PARAMS = ("backbone", "k", "normalize", "stages", "flip")


def _check_embeddings(X: Any, what: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array of embeddings (n_items, n_features), got shape {X.shape}")
    if len(X) == 0:
        raise ValueError(f"{what} is empty")
    if not np.isfinite(X).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return np.ascontiguousarray(X)


def clean_training_set(X: np.ndarray, k: int, fraction: float) -> np.ndarray:
    """Indices (sorted) of the items kept after dropping ``fraction`` with the largest kNN distance.

    This is the paper's unsupervised mode: a training set that may hold anomalies is cleaned by
    leave-one-out kNN scores before it is used as the normal set.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"clean must be in [0, 1), got {fraction}")
    n_keep = max(k + 1, int(round(len(X) * (1.0 - fraction))))
    if fraction == 0.0 or n_keep >= len(X):
        return np.arange(len(X))
    scores = knn_score(knn(X, None, k, exclude_self=True)[0])
    return np.sort(np.argsort(scores, kind="stable")[:n_keep])


class KNNDetector(ThresholdedScores, OutlierMixin, BaseEstimator):
    """DN2 scoring on embeddings: mean distance to the k nearest normal training embeddings.

    Parameters:
        k: number of neighbours (the paper finds k=2 usually best).
        clean: fraction of training items with the largest leave-one-out score dropped before
            fitting (0.5 is the paper's unsupervised mode; 0 trusts the training set).
        contamination: expected fraction of anomalies in the training set; sets the threshold
            at that quantile of all training scores. ``None`` uses ``fpr`` instead.
        fpr: target false-positive rate on new normal items; the threshold is the ``1 - fpr``
            quantile of the leave-one-out scores of the kept training items.
        n_centres: if set, replace the training set by this many k-means centres (the paper's
            speed-up; the model size no longer grows with the training set).
        index: search backend, ``"exact"``, ``"ivf"`` (dn2's approximate inverted file, for very
            large training sets) or a FAISS kind (``"flat"``, ``"ivf_faiss"``, ``"ivfpq"``,
            ``"hnsw"``); ``index_params`` are passed to it (see :func:`dn2.search.make_index`).
        normalize: embedding transform applied to training and query embeddings before the
            search (see :mod:`dn2.normalize`): ``"none"`` (the paper), ``"l2"`` (cosine),
            ``"sqrt_l2"`` (Hellinger), ``"centred_l2"``, ``"standardise"``, ``"whiten"``.
            Transforms with state are fitted on all training embeddings passed to ``fit``
            (before ``clean``), never on queries.
        blocks: column counts of the parts of an ensemble embedding (one per backbone); the
            transform is then applied to each part on its own (:class:`dn2.normalize.Blockwise`).
            :class:`DN2` sets it from its embedder.

    Fitted attributes: ``memory_`` (the embeddings searched, transformed: kept training items or centres),
    ``normalizer_`` (the fitted :class:`dn2.normalize.EmbeddingTransform`),
    ``memory_names_``, ``kept_`` (indices of kept training items), ``train_scores_`` (score of
    every training item, leave-one-out), ``threshold_``, ``offset_ = -threshold_``.
    """

    def __init__(
        self,
        k: int = 2,
        clean: float = 0.0,
        contamination: float | None = None,
        fpr: float = 0.05,
        n_centres: int | None = None,
        index: str = "exact",
        index_params: dict[str, Any] | None = None,
        seed: int = 0,
        normalize: str = "none",
        blocks: tuple[int, ...] | None = None,
    ):
        self.k = k
        self.clean = clean
        self.contamination = contamination
        self.fpr = fpr
        self.n_centres = n_centres
        self.index = index
        self.index_params = index_params
        self.seed = seed
        self.normalize = normalize
        self.blocks = blocks

    def _validate_params(self, n: int) -> None:
        if not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.contamination is not None and not 0.0 < self.contamination < 0.5:
            raise ValueError(f"contamination must be in (0, 0.5), got {self.contamination}")
        if not 0.0 < self.fpr < 1.0:
            raise ValueError(f"fpr must be in (0, 1), got {self.fpr}")
        needed = self.k + 1 if self.n_centres is None else self.k
        if n < needed:
            raise ValueError(f"k={self.k} needs at least {needed} training items, got {n}")
        if self.n_centres is not None and not self.k <= self.n_centres:
            raise ValueError(f"n_centres={self.n_centres} must be >= k={self.k}")

    def fit(self, X: Any, y: Any = None, names: Sequence[str] | None = None) -> "KNNDetector":
        """Index the normal training embeddings and set the threshold from their own scores."""
        X = _check_embeddings(X)
        self._validate_params(len(X))
        names = [str(i) for i in range(len(X))] if names is None else [str(n) for n in names]
        if len(names) != len(X):
            raise ValueError(f"{len(names)} names for {len(X)} embeddings")
        self.normalizer_: EmbeddingTransform = make_transform(self.normalize, self.blocks).fit(X)
        X = self.normalizer_.transform(X)
        kept = clean_training_set(X, self.k, self.clean)
        train = X[kept]
        if self.n_centres is not None:
            if self.n_centres > len(train):
                raise ValueError(f"n_centres={self.n_centres} exceeds the {len(train)} kept training items")
            memory = kmeans(train, self.n_centres, seed=self.seed)
            memory_names = [f"centre {i}" for i in range(len(memory))]
        else:
            memory, memory_names = train, [names[i] for i in kept]
        self._set_memory(memory, memory_names)
        self.n_features_in_ = X.shape[1]
        self.kept_ = kept
        self.train_scores_ = self._training_scores(X, kept)
        rate = self.fpr if self.contamination is None else self.contamination
        reference = self.train_scores_[kept] if self.contamination is None else self.train_scores_
        self.threshold_ = float(np.quantile(reference, 1.0 - rate))
        self.offset_ = -self.threshold_
        return self

    def _set_memory(self, memory: np.ndarray, names: list[str]) -> None:
        self.memory_ = np.ascontiguousarray(memory, dtype=np.float32)
        self.memory_names_ = names
        self.index_ = make_index(self.index, **(self.index_params or {})).fit(self.memory_)

    def _training_scores(self, X: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """Score of every training item: leave-one-out for items in memory, plain search otherwise."""
        if self.n_centres is not None:
            return knn_score(self.index_.search(X, self.k)[0])
        scores = np.empty(len(X), dtype=np.float32)
        scores[kept] = knn_score(self.index_.search_self(self.k)[0])
        dropped = np.setdiff1d(np.arange(len(X)), kept)
        if len(dropped):
            scores[dropped] = knn_score(self.index_.search(X[dropped], self.k)[0])
        return scores

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit first")

    def _search(self, X: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        X = _check_embeddings(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"embeddings have {X.shape[1]} features, the model was fitted on {self.n_features_in_}")
        return self.index_.search(self.normalizer_.transform(X), k)

    def anomaly_score(self, X: Any) -> np.ndarray:
        """The paper's d(y): mean Euclidean distance to the k nearest training embeddings."""
        return knn_score(self._search(X, self.k)[0])

    def fit_predict(self, X: Any, y: Any = None, names: Sequence[str] | None = None) -> np.ndarray:
        """Fit, then label the training items themselves by their leave-one-out scores."""
        self.fit(X, names=names)
        return np.where(self.train_scores_ <= self.threshold_, 1, -1)

    def nearest(self, X: Any, n: int = 3) -> Neighbours:
        """The ``n`` nearest training items (name, distance) of each query: why it scored as it did."""
        dist, idx = self._search(X, min(n, len(self.memory_)))
        return [
            [(self.memory_names_[j], float(d)) for d, j in zip(drow, irow) if j >= 0]
            for drow, irow in zip(dist, idx)
        ]

    # -- persistence (the file format lives in dn2.modelfile) --------------------------------
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._check_fitted()
        header = {
            "params": self.get_params(),
            "memory_names": self.memory_names_,
            "threshold": self.threshold_,
            "n_features_in": self.n_features_in_,
        }
        tensors = {"memory": self.memory_, "train_scores": self.train_scores_, "kept": self.kept_}
        tensors.update({f"normalize/{key}": value for key, value in self.normalizer_.state().items()})
        return header, tensors

    @classmethod
    def _from_state(cls, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> "KNNDetector":
        det = cls(**header["params"])
        if det.blocks is not None:
            det.blocks = tuple(int(b) for b in det.blocks)
        state = {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith("normalize/")}
        det.normalizer_ = transform_from_state(det.normalize, state, det.blocks)
        det._set_memory(tensors["memory"], list(header["memory_names"]))
        det.n_features_in_ = int(header["n_features_in"])
        det.kept_ = tensors["kept"]
        det.train_scores_ = tensors["train_scores"]
        det.threshold_ = float(header["threshold"])
        det.offset_ = -det.threshold_
        return det

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the fitted detector to a safe model file (safetensors + JSON; see :func:`dn2.load`)."""
        from .modelfile import write_model

        header, tensors = self._state()
        return write_model(path, {"kind": "KNNDetector", "detector": header}, tensors, force=force)


class DN2(ThresholdedScores, OutlierMixin, BaseEstimator):
    """Deep Nearest Neighbour anomaly detection on images: a pretrained embedder + :class:`KNNDetector`.

    Takes anything :func:`dn2.images.as_source` accepts (a folder, paths, a zip, PIL images,
    numpy arrays). The fitted parts are exposed as ``.embedder`` and ``.detector``.

    ``preset`` chooses the method settings (``backbone``, ``k``, ``normalize``, ``stages``,
    ``flip``; see :data:`PRESETS`): ``"best"`` (default) or ``"paper"`` (the paper's method
    exactly). Each of those parameters left at ``None`` takes the preset's value; one given
    explicitly overrides it. A saved model stores the resolved values, so it reloads with the
    same method even if a later dn2 changes a preset.

    Example:
        >>> from dn2 import DN2
        >>> model = DN2(k=2).fit("normal_images/")  # doctest: +SKIP
        >>> model.anomaly_score(["new.jpg"])         # doctest: +SKIP
        >>> model.predict(["new.jpg"])                # +1 normal, -1 anomaly  # doctest: +SKIP
        >>> model.save("parts.dn2")                   # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: str | None = None,
        weights: str | os.PathLike | None = None,
        k: int | None = None,
        clean: float = 0.0,
        contamination: float | None = None,
        fpr: float = 0.05,
        n_centres: int | None = None,
        index: str = "exact",
        index_params: dict[str, Any] | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        precision: str = "auto",
        progress: bool = True,
        skip_bad: bool = False,
        seed: int = 0,
        runtime: str = "auto",
        preset: str = "best",
        normalize: str | None = None,
        stages: tuple[int, ...] | None = None,
        flip: bool | None = None,
    ):
        self.backbone = backbone
        self.weights = weights
        self.k = k
        self.clean = clean
        self.contamination = contamination
        self.fpr = fpr
        self.n_centres = n_centres
        self.index = index
        self.index_params = index_params
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.precision = precision
        self.progress = progress
        self.skip_bad = skip_bad
        self.seed = seed
        self.runtime = runtime
        self.preset = preset
        self.normalize = normalize
        self.stages = stages
        self.flip = flip

    def method_params(self) -> dict[str, Any]:
        """The preset's method settings with the explicitly given parameters applied on top."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        out = dict(PRESETS[self.preset])
        for name in PRESET_PARAMS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["stages"] = tuple(out["stages"])
        return out

    def _run_options(self) -> dict[str, Any]:
        """How the embedder runs (not what it computes): batch, workers, precision, runtime, progress, skip_bad."""
        return dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            precision=method_precision(self.precision, self.method_params()["normalize"]),
            runtime=self.runtime,
            progress=self.progress,
            skip_bad=self.skip_bad,
        )

    def _make_embedder(self) -> Embedder:
        method = self.method_params()
        return Embedder(backbone=method["backbone"], weights=self.weights, stages=method["stages"], flip=method["flip"],
                        **self._run_options())

    def _make_detector(self) -> KNNDetector:
        method = self.method_params()
        return KNNDetector(
            k=method["k"],
            clean=self.clean,
            contamination=self.contamination,
            fpr=self.fpr,
            n_centres=self.n_centres,
            index=self.index,
            index_params=self.index_params,
            seed=self.seed,
            normalize=method["normalize"],
        )

    def fit(self, X: Any, y: Any = None) -> "DN2":
        """Embed the normal training images and index them."""
        self.embedder_ = self._make_embedder().fit()
        train = self.embedder_.embed(X)
        if len(train.vectors) == 0:
            raise ValueError("no training image could be read")
        blocks = self.embedder_.part_dims()
        self.detector_ = self._make_detector().set_params(blocks=tuple(blocks) if len(blocks) > 1 else None)
        self.detector_.fit(train.vectors, names=train.names)
        self.skipped_ = train.skipped
        return self

    @property
    def embedder(self) -> Embedder:
        """The fitted :class:`Embedder` (images -> embeddings), with this model's runtime options."""
        self._check_fitted()
        return self.embedder_.set_params(**self._run_options())

    @property
    def detector(self) -> KNNDetector:
        """The fitted :class:`KNNDetector` (embeddings -> scores)."""
        self._check_fitted()
        return self.detector_

    @property
    def threshold_(self) -> float:
        return self.detector.threshold_

    @property
    def offset_(self) -> float:
        return self.detector.offset_

    def _check_fitted(self) -> None:
        if not hasattr(self, "detector_"):
            raise NotFittedError("this DN2 is not fitted yet: call fit first")

    def embed(self, X: Any) -> Embeddings:
        """Embeddings of the images (with names, and the skipped bad files under ``skip_bad``)."""
        return self.embedder.embed(X)

    def anomaly_score(self, X: Any) -> np.ndarray:
        """The paper's d(y) per image: mean distance to the k nearest normal training images."""
        return self.detector.anomaly_score(self.embedder.transform(X))

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        """Fit, then label the training images by their leave-one-out scores."""
        self.fit(X)
        return np.where(self.detector.train_scores_ <= self.threshold_, 1, -1)

    def nearest(self, X: Any, n: int = 3) -> Neighbours:
        """The ``n`` nearest normal training images (name, distance) per image, as an explanation."""
        return self.detector.nearest(self.embedder.transform(X), n)

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the model (embeddings, names, threshold, backbone identity) to a safe model file."""
        from .modelfile import write_model

        header, tensors = self.detector._state()
        params = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in self.get_params().items()}
        method = self.method_params()
        params.update(method, stages=list(method["stages"]))  # resolved: reloads identically
        meta = {"kind": "DN2", "params": params, "backbone": self.embedder.identity(), "detector": header}
        return write_model(path, meta, tensors, force=force)


def _params_for(cls: type, params: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    from .modelfile import ModelFileError

    unknown = set(params) - set(cls._get_param_names())
    if unknown:
        raise ModelFileError(path, f"written with options this dn2 does not know: {sorted(unknown)}; upgrade dn2")
    return params


def load(path: str | os.PathLike, *, weights: str | os.PathLike | None = None) -> DN2 | KNNDetector:
    """Open a model file written by ``save``; never unpickles anything.

    For an image model the backbone is loaded and checked against the one the model was fitted
    with (same weights hash and preprocessing); ``weights`` points at a local copy of the
    backbone's weights when the original path does not exist on this machine.

    Example:
        >>> import dn2
        >>> model = dn2.load("parts.dn2")  # doctest: +SKIP
    """
    from .modelfile import ModelFileError, read_model

    header, tensors = read_model(path)
    kind = header.get("kind")
    try:
        if kind == "KNNDetector":
            header["detector"]["params"] = _params_for(KNNDetector, header["detector"]["params"], path)
            return KNNDetector._from_state(header["detector"], tensors)
        if kind != "DN2":
            raise ModelFileError(path, f"unknown model kind {kind!r}")
        params = _params_for(DN2, dict(header["params"]), path)
        params.setdefault("preset", "paper")  # files written before presets existed
        if params.get("stages") is not None:
            params["stages"] = tuple(params["stages"])
        header["detector"]["params"] = _params_for(KNNDetector, header["detector"]["params"], path)
    except (KeyError, TypeError) as e:
        raise ModelFileError(path, f"model header is incomplete ({e})") from e
    if weights is not None:
        params["weights"] = str(weights)
    model = DN2(**params)
    model.embedder_ = model._make_embedder().fit()
    ours, stored = model.embedder_.identity(), header["backbone"]
    if ours != stored:
        diff = {k: (stored.get(k), ours.get(k)) for k in set(ours) | set(stored) if ours.get(k) != stored.get(k)}
        raise ModelFileError(
            path, f"backbone mismatch: the model was fitted with a different backbone or weights "
            f"(stored vs loaded: {diff}); pass the original weights with weights=FILE / --weights FILE"
        )
    model.detector_ = KNNDetector._from_state(header["detector"], tensors)
    model.skipped_ = []
    return model
