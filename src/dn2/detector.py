"""DN2 detectors: :class:`KNNDetector` scores embeddings, :class:`DN2` scores images.

Both follow scikit-learn's outlier-detector contract (as ``LocalOutlierFactor`` does):
parameters are only stored in ``__init__``, fitted state ends with ``_``, ``score_samples`` is
higher for more normal items, ``decision_function = score_samples - offset_`` and ``predict``
gives +1 (normal) / -1 (anomaly). ``anomaly_score`` is the paper's d(y): the mean Euclidean
distance to the k nearest training embeddings (higher = more anomalous). Like
``LocalOutlierFactor(novelty=True)``, a detector scores *new* data by default; ``novelty=False``
offers ``fit_predict``, the labels of the training items themselves from their leave-one-out scores.

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
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import validate_data

from .backbones import backbone_status
from .base import ThresholdedScores
from .features import Embedder, Embeddings, backbone_names
from .images import as_source
from .maps import Localization, MapModel, PatchNet, fit_maps, load_patch_nets
from .modelfile import ModelFileError, read_model_file, write_model
from .normalize import NORMALIZATIONS, EmbeddingTransform, make_transform, transform_from_state
from .params import Constraint, InstanceOf, Interval, Options, Predicate, TupleOf, validate
from .runtime import PRECISION_TABLE, RUNTIMES, QuantizedNetwork, resolve_precision, resolve_runtime
from .search import INDEX_KINDS, kmeans, knn_score, make_index, restore_index
from .settings import MAP_SETTINGS, PRECISION_CHOICES, PRESETS, Method, method_for
from .thumbnails import MAX_SIZE as MAX_THUMBNAIL, MIN_SIZE as MIN_THUMBNAIL, Thumbnails, thumbnails_of

__all__ = ["DN2", "KNNDetector", "Neighbours", "clean_training_set", "load", "training_threshold"]

Neighbours = list[list[tuple[str, float]]]


def training_threshold(train_scores: np.ndarray, kept: np.ndarray, *, fpr: float,
                       contamination: float | None) -> float:
    """The threshold set without labelled anomalies: the ``1 - fpr`` quantile of the kept training items'
    leave-one-out scores, or with ``contamination`` the ``1 - contamination`` quantile of all of them.

    Example:
        >>> training_threshold(np.arange(100.0), np.arange(100), fpr=0.05, contamination=None)
        94.05
    """
    if contamination is None:
        return float(np.quantile(np.asarray(train_scores)[kept], 1.0 - fpr))
    return float(np.quantile(train_scores, 1.0 - contamination))


def clean_training_set(loo_scores: np.ndarray, fraction: float, k: int) -> np.ndarray:
    """Indices (sorted) of the items kept after dropping ``fraction`` with the largest leave-one-out score.

    This is the paper's unsupervised mode: a training set that may hold anomalies is cleaned by the
    leave-one-out kNN scores of its items (``loo_scores``, computed by any index) before it is used
    as the normal set. At least ``k + 1`` items are kept, so the kept set can still be scored
    leave-one-out with ``k`` neighbours.

    Example:
        >>> clean_training_set(np.array([0.1, 5.0, 0.2, 0.3]), 0.25, k=1).tolist()
        [0, 2, 3]
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"clean must be in [0, 1), got {fraction}")
    n = len(loo_scores)
    n_keep = max(k + 1, int(round(n * (1.0 - fraction))))
    if fraction == 0.0 or n_keep >= n:
        return np.arange(n)
    return np.sort(np.argsort(np.asarray(loo_scores), kind="stable")[:n_keep])


def _novelty_off(estimator: Any) -> bool:
    if estimator.novelty:
        raise AttributeError("fit_predict labels the training items and is offered only with novelty=False "
                             "(as in scikit-learn's LocalOutlierFactor); with novelty=True use fit(X).predict(new)")
    return True


class KNNDetector(ThresholdedScores, OutlierMixin, BaseEstimator):
    """DN2 scoring on embeddings: mean distance to the k nearest normal training embeddings.

    Parameters:
        k: number of neighbours (the paper finds k=2 usually best).
        clean: fraction of training items with the largest leave-one-out score dropped before
            fitting (0.5 is the paper's unsupervised mode; 0 trusts the training set). The
            leave-one-out scores come from the chosen ``index``, so cleaning a huge training set
            with ``index="ivf"`` stays approximate and fast.
        contamination: expected fraction of anomalies in the training set; sets the threshold
            at that quantile of all training scores. ``None`` uses ``fpr`` instead.
        fpr: target false-positive rate on new normal items; the threshold is the ``1 - fpr``
            quantile of the leave-one-out scores of the kept training items.
        n_centres: if set, replace the training set by this many k-means centres (the paper's
            speed-up; the model size no longer grows with the training set).
        index: search backend, ``"exact"``, ``"ivf"`` (dn2's approximate inverted file, for very
            large training sets) or a FAISS kind (``"flat"``, ``"ivf_faiss"``, ``"ivfpq"``,
            ``"hnsw"``); ``index_params`` are passed to it (see :func:`dn2.search.make_index`).
        seed: seed of the k-means compression.
        normalize: embedding transform applied to training and query embeddings before the
            search (see :mod:`dn2.normalize`); ``normalize_params`` go to its constructor (e.g.
            ``{"shrinkage": 0.1}`` for ``"whiten"``). Transforms with state are fitted on all
            training embeddings passed to ``fit`` (before ``clean``), never on queries.
        blocks: column counts of the parts of an ensemble embedding (one per backbone); the
            transform is then applied to each part on its own (:class:`dn2.normalize.Blockwise`).
            :class:`DN2` sets it from its embedder.
        novelty: True (default): a detector of new items; False: ``fit_predict`` labels the
            training items by their leave-one-out scores (scikit-learn's ``novelty`` convention).

    Fitted attributes: ``memory_`` (the embeddings searched, transformed: kept training items or
    centres), ``normalizer_``, ``index_``, ``memory_names_``, ``kept_`` (indices of kept training
    items), ``train_scores_`` (score of every training item, leave-one-out), ``threshold_``,
    ``offset_ = -threshold_``, ``n_features_in_``.
    """

    parameter_constraints: ClassVar[dict[str, list[Constraint | None]]] = {
        "k": [Interval(int, 1, None)],
        "clean": [Interval(float, 0.0, 1.0, closed="left")],
        "contamination": [Interval(float, 0.0, 0.5, closed="neither"), None],
        "fpr": [Interval(float, 0.0, 1.0, closed="neither")],
        "n_centres": [Interval(int, 1, None), None],
        "index": [Options(INDEX_KINDS)],
        "index_params": [InstanceOf(dict), None],
        "seed": [Interval(int, 0, 2**32 - 1)],
        "normalize": [Options(NORMALIZATIONS)],
        "normalize_params": [InstanceOf(dict), None],
        "blocks": [TupleOf(Interval(int, 1, None)), None],
        "novelty": [InstanceOf(bool)],
    }

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
        normalize_params: dict[str, Any] | None = None,
        novelty: bool = True,
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
        self.normalize_params = normalize_params
        self.novelty = novelty

    def check_params(self, n_samples: int | None = None) -> None:
        """Check every parameter (and, given ``n_samples``, that there are enough training items).

        Called by ``fit`` first, and by :class:`DN2` before any image is embedded.
        """
        validate(type(self).__name__, self.get_params(), self.parameter_constraints)
        make_index(self.index, **(self.index_params or {}))  # each kind checks its own parameters
        make_transform(self.normalize, self.blocks, **(self.normalize_params or {}))
        if self.n_centres is not None and self.n_centres < self.k:
            raise ValueError(f"n_centres={self.n_centres} must be >= k={self.k}")
        if n_samples is not None:
            needed = self.k + 1 if self.n_centres is None else self.k
            if n_samples < needed:
                raise ValueError(f"k={self.k} needs at least {needed} training samples, got n_samples={n_samples}")

    def _new_index(self) -> Any:
        return make_index(self.index, **(self.index_params or {}))

    def fit(self, X: Any, y: Any = None, names: Sequence[str] | None = None) -> "KNNDetector":
        """Index the normal training embeddings and set the threshold from their own scores."""
        self.check_params()
        X = np.ascontiguousarray(validate_data(self, X, dtype=np.float32))
        self.check_params(len(X))
        names = [str(i) for i in range(len(X))] if names is None else [str(n) for n in names]
        if len(names) != len(X):
            raise ValueError(f"{len(names)} names for {len(X)} embeddings")
        self.normalizer_: EmbeddingTransform = make_transform(
            self.normalize, self.blocks, **(self.normalize_params or {})).fit(X)
        X = self.normalizer_.transform(X)
        kept = np.arange(len(X))
        if self.clean > 0:
            loo = knn_score(self._new_index().fit(X).search_self(self.k)[0])
            kept = clean_training_set(loo, self.clean, self.k)
        train = X[kept]
        if self.n_centres is not None:
            if self.n_centres > len(train):
                raise ValueError(f"n_centres={self.n_centres} exceeds the {len(train)} kept training items")
            memory = kmeans(train, self.n_centres, seed=self.seed)
            memory_names = [f"centre {i}" for i in range(len(memory))]
        else:
            memory, memory_names = train, [names[i] for i in kept]
        self._set_memory(memory, memory_names)
        self.kept_ = kept
        self.train_scores_ = self._training_scores(X, kept)
        self._set_threshold()
        return self

    def _set_threshold(self) -> None:
        self.threshold_ = training_threshold(self.train_scores_, self.kept_, fpr=self.fpr,
                                             contamination=self.contamination)
        self.offset_ = -self.threshold_

    def _set_memory(self, memory: np.ndarray, names: list[str], index_state: dict[str, np.ndarray] | None = None) -> None:
        """Keep the searched embeddings and index them; with the saved ``index_state`` the index is
        rebuilt as it was (an IVF without re-running k-means) instead of fitted anew."""
        self.memory_ = np.ascontiguousarray(memory, dtype=np.float32)
        self.memory_names_ = names
        if index_state:
            self.index_ = restore_index(self.index, self.memory_, self.index_params or {}, index_state)
        else:
            self.index_ = self._new_index().fit(self.memory_)

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
        X = np.ascontiguousarray(validate_data(self, X, dtype=np.float32, reset=False))
        return self.index_.search(self.normalizer_.transform(X), k)

    def anomaly_score(self, X: Any) -> np.ndarray:
        """The paper's d(y): mean Euclidean distance to the k nearest training embeddings (float64)."""
        return knn_score(self._search(X, self.k)[0]).astype(np.float64)

    @available_if(_novelty_off)
    def fit_predict(self, X: Any, y: Any = None, names: Sequence[str] | None = None) -> np.ndarray:
        """Fit, then label the training items themselves by their leave-one-out scores (novelty=False)."""
        self.fit(X, names=names)
        return np.where(self.train_scores_ <= self.threshold_, 1, -1)

    def kneighbors(self, X: Any, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """(distances, memory rows) of the ``n`` nearest training items of each query, nearest first.

        The rows index ``memory_`` and ``memory_names_`` (and a model's thumbnails); -1 pads a row
        when the index found fewer than ``n``.
        """
        validate("nearest", {"n": n}, {"n": [Interval(int, 1, None)]})
        self._check_fitted()
        return self._search(X, min(n, len(self.memory_)))

    def nearest(self, X: Any, n: int = 3) -> Neighbours:
        """The ``n`` nearest training items (name, distance) of each query: why it scored as it did."""
        dist, idx = self.kneighbors(X, n)
        return [
            [(self.memory_names_[j], float(d)) for d, j in zip(drow, irow) if j >= 0]
            for drow, irow in zip(dist, idx)
        ]

    # -- persistence (the file format lives in dn2.modelfile) --------------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The fitted detector as (JSON header, tensors), as stored in model files."""
        self._check_fitted()
        header = {
            "params": self.get_params(),
            "memory_names": self.memory_names_,
            "threshold": self.threshold_,
            "n_features_in": self.n_features_in_,
        }
        tensors = {"memory": self.memory_, "train_scores": self.train_scores_, "kept": self.kept_}
        tensors.update({f"normalize/{key}": value for key, value in self.normalizer_.state().items()})
        tensors.update({f"index/{key}": value for key, value in self.index_.state().items()})
        return header, tensors

    @classmethod
    def from_state(cls, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> "KNNDetector":
        """Rebuild a fitted detector from :meth:`to_state`'s output, validating every field.

        Raises ``ValueError`` (naming the field) for anything a fitted detector could not have written.
        """
        if not isinstance(header, dict):
            raise ValueError("detector header must be a mapping")
        params = header.get("params")
        if not isinstance(params, dict):
            raise ValueError("detector header has no parameter mapping")
        unknown = sorted(set(params) - set(cls._get_param_names()))
        if unknown:
            raise ValueError(f"detector parameters this dn2 does not know: {unknown} (written by a newer dn2?)")
        params = dict(params)
        if isinstance(params.get("blocks"), list):
            params["blocks"] = tuple(params["blocks"])
        det = cls(**params)
        det.check_params()
        memory = _tensor(tensors, "memory", np.float32, ndim=2)
        if len(memory) < det.k or memory.shape[1] < 1:
            raise ValueError(f"memory of shape {memory.shape} cannot serve k={det.k}")
        train_scores = _tensor(tensors, "train_scores", np.float32, ndim=1)
        kept = _tensor(tensors, "kept", np.int64, ndim=1)
        if len(kept) == 0 or (np.diff(kept) <= 0).any() or kept[0] < 0 or kept[-1] >= len(train_scores):
            raise ValueError("kept indices are not sorted, unique indices of training items")
        if det.n_centres is None and len(kept) != len(memory):
            raise ValueError(f"{len(kept)} kept items but {len(memory)} memory rows")
        names = header.get("memory_names")
        if not isinstance(names, list) or len(names) != len(memory) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"memory_names must be a list of {len(memory)} strings")
        n_features = header.get("n_features_in")
        if not isinstance(n_features, int) or isinstance(n_features, bool) or n_features != memory.shape[1]:
            raise ValueError(f"n_features_in {n_features!r} does not match the memory's {memory.shape[1]} columns")
        threshold = header.get("threshold")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not np.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        state = {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith("normalize/")}
        for key, value in state.items():
            if value.dtype != np.float32 or not np.isfinite(value).all():
                raise ValueError(f"tensor 'normalize/{key}' must be finite float32")
        try:
            det.normalizer_ = transform_from_state(det.normalize, state, det.blocks, **(det.normalize_params or {}))
            probe = det.normalizer_.transform(np.ones((1, n_features), dtype=np.float32))
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
            raise ValueError(f"the {det.normalize!r} transform's state does not fit {n_features} features ({e})") from None
        if probe.shape != (1, n_features) or not np.isfinite(probe).all():
            raise ValueError(f"the {det.normalize!r} transform's state does not fit {n_features} features")
        index_state = {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith("index/")}
        det._set_memory(memory, list(names), index_state)
        det.n_features_in_ = n_features
        det.kept_ = kept
        det.train_scores_ = train_scores
        det.threshold_ = float(threshold)
        det.offset_ = -det.threshold_
        return det

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the fitted detector to a safe model file (safetensors + JSON; see :func:`dn2.load`)."""
        header, tensors = self.to_state()
        return write_model(path, {"kind": "KNNDetector", "detector": header}, tensors, force=force)


def _tensor(tensors: dict[str, np.ndarray], name: str, dtype: type, ndim: int) -> np.ndarray:
    """A model file's tensor, checked for presence, dtype, rank and finiteness."""
    if name not in tensors:
        raise ValueError(f"tensor {name!r} is missing")
    a = tensors[name]
    if a.dtype != np.dtype(dtype) or a.ndim != ndim:
        raise ValueError(f"tensor {name!r} must be {ndim}-D {np.dtype(dtype)}, got {a.ndim}-D {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"tensor {name!r} holds NaN or infinite values")
    return a


#: How a DN2 model runs, as opposed to what it computes: never read from a model file.
RUN_OPTIONS = ("weights", "batch_size", "num_workers", "progress", "skip_bad", "runtime")
_DETECTOR_PARAMS = ("clean", "contamination", "fpr", "n_centres", "index", "index_params", "seed", "novelty")


def _bool_or_none(value: Any) -> bool:
    return value is None or isinstance(value, bool)


class DN2(ThresholdedScores, OutlierMixin, BaseEstimator):
    """Deep Nearest Neighbour anomaly detection on images: a pretrained embedder + :class:`KNNDetector`.

    Takes anything :func:`dn2.images.as_source` accepts (a folder, paths, a zip, PIL images,
    numpy arrays). The fitted parts are exposed as ``.embedder`` and ``.detector``.

    ``preset`` chooses the method settings (a :class:`dn2.settings.Method`: ``backbone``, ``k``,
    ``normalize``, ``stages``, ``flip``, ``precision``): ``"best"`` (default) or ``"paper"`` (the
    paper's method exactly). Each of those parameters left at ``None`` takes the preset's value;
    one given explicitly overrides it. The fitted model records the resolved method (``method_``,
    with ``precision`` resolved for this CPU) and scores with exactly that method, also after
    save and load, even if a later dn2 changes a preset.

    ``thumbnails=96`` also keeps a small JPEG (long side in pixels) of each memory image in
    ``thumbnails_`` and the model file (:mod:`dn2.thumbnails`), so that a verdict's nearest normal
    images can be shown where the training images are not at hand (``dn2 serve``, ``--report``).
    ``maps="spade"`` or ``"patchcore"`` also makes anomaly maps (:mod:`dn2.maps`): ``anomaly_map``,
    ``predict_mask``, ``pixel_threshold_``; the settings ``map_backbone``, ``map_size``,
    ``map_stages``, ``map_coreset``, ``map_k`` and ``image_score`` are those of
    :class:`dn2.settings.Method` (``None``: the preset's). The image score stays the image-level DN2
    score unless ``image_score`` says otherwise ("combined" for defect data).

    Example:
        >>> from dn2 import DN2
        >>> model = DN2(k=2).fit("normal_images/")  # doctest: +SKIP
        >>> model.anomaly_score(["new.jpg"])         # doctest: +SKIP
        >>> model.predict(["new.jpg"])                # +1 normal, -1 anomaly  # doctest: +SKIP
        >>> model.save("parts.dn2")                   # doctest: +SKIP
        >>> maps = DN2(maps="spade").fit("normal_images/").anomaly_map(["new.jpg"])  # doctest: +SKIP
    """

    parameter_constraints: ClassVar[dict[str, list[Constraint | None]]] = {
        **{name: KNNDetector.parameter_constraints[name] for name in _DETECTOR_PARAMS},
        "preset": [Options(PRESETS)],
        "backbone": [InstanceOf(str), None],
        "k": [Interval(int, 1, None), None],
        "normalize": [Options(NORMALIZATIONS), None],
        "stages": [TupleOf(Interval(int, None, None)), None],
        "flip": [Predicate(_bool_or_none, "True, False or None")],
        "precision": [Options(PRECISION_CHOICES)],
        "weights": [InstanceOf((str, os.PathLike), "a path or 'random'"), None],
        "batch_size": [Interval(int, 1, None), None],
        "num_workers": [Interval(int, 0, None), None],
        "progress": [InstanceOf(bool)],
        "skip_bad": [InstanceOf(bool)],
        "runtime": [Options(RUNTIMES)],
        "thumbnails": [Interval(int, MIN_THUMBNAIL, MAX_THUMBNAIL), None],
        # the map settings of Method, each also None (= the preset's)
        **{name: [c for c in Method.constraints[name] if c is not None] + [None] for name in MAP_SETTINGS},
    }

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
        novelty: bool = True,
        thumbnails: int | None = None,
        maps: str | None = None,
        map_backbone: str | None = None,
        map_size: int | None = None,
        map_stages: tuple[int, ...] | None = None,
        map_coreset: float | None = None,
        map_k: int | None = None,
        image_score: str | None = None,
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
        self.novelty = novelty
        self.thumbnails = thumbnails
        self.maps = maps
        self.map_backbone = map_backbone
        self.map_size = map_size
        self.map_stages = map_stages
        self.map_coreset = map_coreset
        self.map_k = map_k
        self.image_score = image_score

    def method(self) -> Method:
        """The preset's method settings with the explicitly given parameters laid over them."""
        validate("DN2", {"preset": self.preset}, {"preset": self.parameter_constraints["preset"]})
        stages = tuple(self.stages) if self.stages is not None else None
        map_stages = tuple(self.map_stages) if self.map_stages is not None else None
        return method_for(self.preset, backbone=self.backbone, k=self.k, normalize=self.normalize, stages=stages,
                          flip=self.flip, precision=self.precision, map_stages=map_stages,
                          **{name: getattr(self, name) for name in MAP_SETTINGS if name != "map_stages"})

    def method_params(self) -> dict[str, Any]:
        """:meth:`method` as a dict."""
        return asdict(self.method())

    def check_params(self) -> None:
        """Check every parameter, the method and the detector's index parameters, and that the runtime runs
        the precision (int8: OpenVINO only): before any image is embedded."""
        validate("DN2", self.get_params(), self.parameter_constraints)
        method = self.method()
        self._make_detector(method).check_params()
        if self.thumbnails and self.n_centres is not None:
            raise ValueError("thumbnails show memory images; with n_centres the memory holds k-means centres instead")
        if method.maps == "spade" and self.n_centres is not None:
            raise ValueError("DN2: maps='spade' finds each image's nearest training images, which n_centres "
                             "replaces by k-means centres: use maps='patchcore' or drop n_centres")
        if method.image_score != "dn2" and not self.novelty:
            raise ValueError(f"DN2: novelty=False labels training images by their image-level leave-one-out "
                             f"scores; it needs image_score='dn2', got {method.image_score!r}")
        resolve_runtime(self.runtime, method.extraction_precision())

    def _run_options(self) -> dict[str, Any]:
        """How the embedder runs (not what it computes)."""
        return dict(batch_size=self.batch_size, num_workers=self.num_workers, runtime=self.runtime,
                    progress=self.progress, skip_bad=self.skip_bad)

    def _make_embedder(self, method: Method) -> Embedder:
        return Embedder(backbone=method.backbone, weights=self.weights, stages=method.stages, flip=method.flip,
                        precision=method.precision, **self._run_options())

    def _make_detector(self, method: Method) -> KNNDetector:
        return KNNDetector(k=method.k, normalize=method.normalize,
                           **{name: getattr(self, name) for name in _DETECTOR_PARAMS})

    def fit(self, X: Any, y: Any = None) -> "DN2":
        """Embed the normal training images and index them (in int8, first quantise the backbones on a sample
        of them: the model keeps those networks and scores with them)."""
        self.check_params()
        method = self.method()
        self.method_ = method.fitted(resolve_precision(method.extraction_precision(), self.runtime))
        nets = self._patch_nets() if self.method_.maps else None  # map settings checked before any embedding
        source = as_source(X)
        self.embedder_ = self._make_embedder(self.method_).fit(source)
        train = self.embedder_.embed(source)
        if len(train.vectors) == 0:
            raise ValueError("no training image could be read")
        blocks = self.embedder_.part_dims()
        self.detector_ = self._make_detector(self.method_).set_params(blocks=tuple(blocks) if len(blocks) > 1 else None)
        self.detector_.fit(train.vectors, names=train.names)
        self.skipped_ = list(train.skipped)
        # thumbnails_: dn2.thumbnails.Thumbnails of the memory images (row i = memory row i), or None
        self.thumbnails_ = (thumbnails_of(source, train.positions[self.detector_.kept_], self.thumbnails)
                            if self.thumbnails else None)
        self.maps_ = self._fit_maps(nets, source, train) if nets is not None else None
        return self

    def _fit_maps(self, nets: list[PatchNet], source: Any, train: Embeddings) -> MapModel:
        """The maps of the kept training images (the image-level detector is fitted: it chose them)."""
        m, det = self.method_, self.detector_
        positions = train.positions[det.kept_]
        spade = m.maps == "spade"
        return fit_maps(nets, source, positions, method=m.maps, fraction=m.map_coreset, k=m.map_k,
                        image_score=m.image_score, image_index=det.index_ if spade else None,
                        image_memory=det.memory_ if spade else None, dn2_loo=det.train_scores_[det.kept_],
                        rate=self.fpr if self.contamination is None else self.contamination, index=self.index,
                        index_params=self.index_params, skipped=self.skipped_, **self._map_run_options())

    def _patch_nets(self) -> list[PatchNet]:
        """The map's patch networks; ``weights`` (a file of the image-level backbone's weights) is used for
        them only when the map backbone is that backbone ("random", for tests, always)."""
        m = self.method_
        weights = self.weights if self.weights == "random" or m.map_backbone == m.backbone else None
        return load_patch_nets(m.map_backbone, weights, m.map_stages, m.map_size)

    def _map_run_options(self) -> dict[str, Any]:
        precision = self._scoring_precision()
        if PRECISION_TABLE[precision].calibrated:  # int8 quantises the image-level networks; maps stay fp32
            precision = "fp32"
        return dict(runtime=self.runtime, precision=precision, batch_size=self.batch_size,
                    num_workers=self.num_workers, progress=self.progress, skip_bad=self.skip_bad)

    def _scoring_precision(self) -> str:
        """The fitted precision, unless the caller explicitly chose another one (with a warning)."""
        if self.precision in ("auto", self.method_.precision):
            return self.method_.precision
        warnings.warn(f"the model's embeddings were made in {self.method_.precision}; scoring in {self.precision} "
                      "shifts the scores slightly against the threshold", UserWarning, stacklevel=3)
        return self.precision

    @property
    def embedder(self) -> Embedder:
        """The fitted :class:`Embedder` (images -> embeddings), with this model's run options."""
        self._check_fitted()
        return self.embedder_.set_params(precision=self._scoring_precision(), **self._run_options())

    @property
    def detector(self) -> KNNDetector:
        """The fitted :class:`KNNDetector` (embeddings -> scores)."""
        self._check_fitted()
        return self.detector_

    @property
    def threshold_(self) -> float:
        """The image threshold: the image-level detector's, or with ``image_score`` "map"/"combined" the maps'."""
        maps = getattr(self, "maps_", None)
        if maps is not None and maps.image_threshold is not None:
            return maps.image_threshold
        return self.detector.threshold_

    @property
    def offset_(self) -> float:
        return -self.threshold_

    @property
    def pixel_threshold_(self) -> float:
        """Map values above it are flagged by :meth:`predict_mask` (set without labels: see :mod:`dn2.maps`)."""
        return self._fitted_maps().pixel_threshold

    def _fitted_maps(self) -> MapModel:
        self._check_fitted()
        if getattr(self, "maps_", None) is None:
            raise ValueError("this model was fitted without maps: fit it with maps='spade' or 'patchcore' "
                             "(dn2 fit --maps spade|patchcore)")
        return self.maps_

    def _check_fitted(self) -> None:
        if not hasattr(self, "detector_"):
            raise NotFittedError("this DN2 is not fitted yet: call fit first")

    def embed(self, X: Any) -> Embeddings:
        """Embeddings of the images (with names, and the skipped bad files under ``skip_bad``)."""
        return self.embedder.embed(X)

    def anomaly_score(self, X: Any) -> np.ndarray:
        """The paper's d(y) per image: mean distance to the k nearest normal training images (with
        ``image_score`` "map" or "combined": that score, see :class:`dn2.settings.Method`).

        One score per input, in input order; an image skipped as unreadable (``skip_bad=True``)
        gets NaN (and ``predict`` gives it 0), so scores never shift onto the wrong images.
        """
        maps = getattr(self, "maps_", None)
        source = as_source(X)
        emb = self.embed(source)
        if maps is None or maps.image_score == "dn2":
            return emb.aligned(self.detector.anomaly_score(emb.vectors) if len(emb.vectors) else np.empty(0))
        scores = np.full(emb.n_inputs, np.nan)
        for r in self.localize(source, embeddings=emb):
            scores[r.index] = r.image_score
        return scores

    def localize(self, X: Any, skipped: list[str] | None = None, embeddings: Embeddings | None = None) -> Iterator[Localization]:
        """Score the images with their maps, one at a time (memory: one batch, whatever the number of images).

        Yields a :class:`dn2.maps.Localization` per image read: name, image score, image-level score,
        the map's score, ``.map()`` at the image's original size and ``index``, its position in the
        input. With ``skip_bad``, unreadable images are left out and their messages appended to
        ``skipped``. ``embeddings``: :meth:`embed` of the same images, if already made.
        """
        maps = self._fitted_maps()
        source = as_source(X)
        if embeddings is not None and embeddings.n_inputs != len(source):
            raise ValueError(f"embeddings of {embeddings.n_inputs} images for {len(source)} inputs")
        emb = self.embed(source) if embeddings is None else embeddings
        if skipped is not None and embeddings is None:
            skipped.extend(emb.skipped)
        if not len(emb.vectors):
            return
        det = self.detector
        dn2_scores = det.anomaly_score(emb.vectors)
        queries = det.normalizer_.transform(emb.vectors) if self.method_.maps == "spade" else None
        yield from maps.score(source, names=emb.names, dn2_scores=dn2_scores, indices=emb.positions,
                              image_index=det.index_, embeddings=queries, skipped=skipped, **self._map_run_options())

    def anomaly_map(self, X: Any) -> list[np.ndarray | None]:
        """One float32 anomaly map per input, each of that image's original (H, W): the distance of each
        location's patch to its nearest normal patch, upsampled and smoothed (see :mod:`dn2.maps`).
        An image skipped as unreadable (``skip_bad=True``) keeps its place as ``None``."""
        source = as_source(X)
        maps: list[np.ndarray | None] = [None] * len(source)
        for r in self.localize(source):
            maps[r.index] = r.map()
        return maps

    def predict_mask(self, X: Any) -> list[np.ndarray | None]:
        """One boolean (H, W) mask per input: map values above ``pixel_threshold_`` (``None`` where skipped)."""
        threshold = self.pixel_threshold_
        return [None if m is None else m > threshold for m in self.anomaly_map(X)]

    @available_if(_novelty_off)
    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        """Fit, then label the training images by their leave-one-out scores (novelty=False)."""
        self.fit(X)
        return np.where(self.detector.train_scores_ <= self.threshold_, 1, -1)

    def nearest(self, X: Any, n: int = 3) -> Neighbours:
        """The ``n`` nearest normal training images (name, distance) per image, as an explanation
        (an empty list for an image skipped as unreadable)."""
        emb = self.embed(X)
        found = self.detector.nearest(emb.vectors, n) if len(emb.vectors) else []
        out: Neighbours = [[] for _ in range(emb.n_inputs)]
        for position, row in zip(emb.positions, found):
            out[position] = row
        return out

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the model (method, embeddings, names, threshold, backbone identity) to a safe model file.

        Only what the model computes is stored; how it runs (weights path, workers, runtime) is
        the loader's choice. An int8 model also stores its quantised networks (OpenVINO IR bytes).
        """
        self._check_fitted()
        if self.method_.maps and getattr(self, "maps_", None) is None:
            raise ValueError("the method has maps but no map model was fitted (fit without --ray)")
        detector, tensors = self.detector.to_state()
        if PRECISION_TABLE[self.method_.precision].calibrated:
            for i, network in enumerate(self.embedder_.int8_networks_):
                tensors.update(network.tensors(f"int8/{i}/"))  # its identity is in "backbone" (Embedder.identity)
        meta = {"kind": "DN2", "preset": self.preset, "method": self.method_.to_dict(),
                "backbone": self.embedder_.identity(precision=self.method_.precision), "detector": detector}
        if getattr(self, "thumbnails_", None) is not None:
            meta["thumbnails"], thumbnail_tensors = self.thumbnails_.to_state()
            tensors = {**tensors, **thumbnail_tensors}
        if getattr(self, "maps_", None) is not None:  # written only with maps: image-level files are unchanged
            meta["maps"], map_tensors = self.maps_.to_state()
            tensors.update(map_tensors)
        return write_model(path, meta, tensors, force=force)


def _method_from_header(header: dict[str, Any]) -> tuple[str, Method]:
    """(preset, method) of a DN2 header; format 1 files stored every constructor parameter instead."""
    if "method" in header:
        preset = header.get("preset", "best")
        if preset not in PRESETS:  # a preset this dn2 does not know: the method itself is what matters
            preset = "best"
        return preset, Method.from_dict(header["method"])
    params = header.get("params")
    if not isinstance(params, dict):
        raise ValueError("the header has neither method settings nor parameters")
    preset = params.get("preset", "paper")  # files written before presets existed
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}")
    method = PRESETS[preset].overlay(**{name: params.get(name) for name in ("backbone", "k", "normalize", "flip")},
                                     stages=tuple(params["stages"]) if params.get("stages") is not None else None,
                                     precision=params.get("precision"))
    return preset, method


def _stored_int8_networks(stored: dict[str, Any], tensors: dict[str, np.ndarray]) -> list[QuantizedNetwork]:
    """The int8 networks of a model file, one per backbone, each checked against its recorded sha256."""
    parts = stored.get("parts", [stored])
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise ValueError("backbone parts must be a list of mappings")
    return [QuantizedNetwork.from_tensors(part.get("int8"), tensors, f"int8/{i}/") for i, part in enumerate(parts)]


def load(path: str | os.PathLike, *, weights: str | os.PathLike | None = None, allow_download: bool = False,
         **run_options: Any) -> DN2 | KNNDetector:
    """Open a model file written by ``save``; never unpickles anything, never trusts a field unchecked.

    Only the method is taken from the file. How to run it is the caller's: ``weights`` (a local
    copy of the backbone's weights, needed when the model was fitted with weights from a file),
    ``allow_download`` (whether the backbone's weights may be fetched from the internet when they
    are not on this machine; never by default) and ``run_options`` (``batch_size``,
    ``num_workers``, ``progress``, ``skip_bad``, ``runtime``). The backbone is checked against
    the one the model was fitted with (same weights hash and preprocessing).

    Example:
        >>> import dn2
        >>> model = dn2.load("parts.dn2", runtime="openvino")  # doctest: +SKIP
    """
    unknown = sorted(set(run_options) - set(RUN_OPTIONS) - {"weights"})
    if unknown:
        raise TypeError(f"load() got unknown run options {unknown}; allowed: {sorted(set(RUN_OPTIONS) - {'weights'})}")
    model_file = read_model_file(path)
    header, tensors = model_file.header, model_file.tensors
    try:
        kind = header.get("kind")
        if kind == "KNNDetector":
            return KNNDetector.from_state(header.get("detector"), tensors)
        if kind != "DN2":
            raise ValueError(f"unknown model kind {kind!r}")
        preset, method = _method_from_header(header)
        detector = KNNDetector.from_state(header.get("detector"), tensors)
        stored = header.get("backbone")
        if not isinstance(stored, dict):
            raise ValueError("backbone identity missing")
        thumbnails = Thumbnails.from_state(header.get("thumbnails"), tensors, len(detector.memory_))
        spec = PRECISION_TABLE.get(method.precision)  # None for "auto" (format 1 files)
        networks = _stored_int8_networks(stored, tensors) if spec is not None and spec.calibrated else None
    except (ValueError, TypeError, KeyError) as e:
        raise ModelFileError(path, f"invalid model header: {e}") from None
    if weights is None and stored.get("weights_id") == "random:0":
        weights = "random"  # not a file: the deterministic random initialisation used in tests and benchmarks
    if weights is None and not allow_download:
        for name in backbone_names(method.backbone) + (backbone_names(method.map_backbone) if method.maps else []):
            if backbone_status(name) == "download":
                raise ModelFileError(path, f"the weights of backbone {name!r} are not on this machine; pass "
                                     "weights=FILE (--weights FILE), or allow_download=True (--allow-download)")
    params = {name: getattr(detector, name) for name in _DETECTOR_PARAMS}
    model = DN2(preset=preset, backbone=method.backbone, k=method.k, normalize=method.normalize, stages=method.stages,
                flip=method.flip, precision=method.precision, weights=weights, **params, **run_options,
                thumbnails=thumbnails.size if thumbnails else None,
                **{name: getattr(method, name) for name in MAP_SETTINGS})
    model.check_params()
    model.method_ = replace(method, precision=resolve_precision(method.extraction_precision(), model.runtime))
    model.embedder_ = model._make_embedder(model.method_).fit()
    if networks is not None:  # the very networks that embedded the training images, not a new calibration
        try:
            model.embedder_.set_int8_networks(networks)
        except ValueError as e:
            raise ModelFileError(path, str(e)) from None
    ours = model.embedder_.identity(precision=model.method_.precision)
    if ours != stored:
        diff = {k: (stored.get(k), ours.get(k)) for k in set(ours) | set(stored) if ours.get(k) != stored.get(k)}
        raise ModelFileError(
            path, f"backbone mismatch: the model was fitted with a different backbone or weights "
            f"(stored vs loaded: {diff}); pass the original weights with weights=FILE / --weights FILE"
        )
    model.detector_ = detector
    model.maps_ = None
    if method.maps is not None:
        if not isinstance(header.get("maps"), dict):
            raise ModelFileError(path, "invalid model header: the method has maps but the file has no maps part")
        try:
            model.maps_ = MapModel.from_state(header["maps"], tensors, model._patch_nets(), k=method.map_k,
                                              image_score=method.image_score)
        except (ValueError, TypeError) as e:
            raise ModelFileError(path, f"invalid maps: {e}") from None
        if model.maps_.n_images != len(detector.kept_):
            raise ModelFileError(path, f"invalid maps: {model.maps_.n_images} images, the detector kept {len(detector.kept_)}")
    elif "maps" in header:
        raise ModelFileError(path, "invalid model header: a maps part without maps in the method")
    model.skipped_ = []
    model.thumbnails_ = thumbnails
    model.file_info_ = {"format_version": model_file.format_version, "dn2_version": model_file.dn2_version,
                        "header_verified": model_file.header_verified}
    return model
