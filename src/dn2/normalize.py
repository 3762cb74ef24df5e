"""Fitted embedding transforms applied before the kNN search (scikit-learn style, training-free).

DN2 compares raw pooled CNN features with the Euclidean distance. The distance is only as good
as the geometry of the embedding, and raw pooled features are dominated by their norm (image
contrast, object size, how "ImageNet-like" the picture is) rather than by their direction
(what is in the picture). The transforms here change that geometry without any training of the
network; the ones with state are fitted on the normal training embeddings only, and the same
fitted transform is applied to every query.

========================  =======================================================================
``normalize=``            what it does
========================  =======================================================================
``"none"``                raw features: the paper's method (Bergman, Cohen & Hoshen 2020).
``"l2"``                  each row scaled to unit norm: Euclidean distance then orders pairs as
                          the cosine distance does, ``||a - b||^2 = 2 - 2 cos(a, b)``. Standard
                          for retrieval with pretrained CNN features (Babenko & Lempitsky 2015,
                          "Aggregating local deep features for image retrieval"; Tolias et al.
                          2016, "Particular object retrieval with integral max-pooling").
``"sqrt_l2"``             signed square root, then unit norm: the Hellinger kernel / power
                          normalisation (Perronnin, Sanchez & Mensink 2010, "Improving the Fisher
                          kernel"; Arandjelovic & Zisserman 2012, "RootSIFT"). It damps the few
                          large, bursty channels that dominate pooled post-ReLU features.
``"centred_l2"``          subtract the normal training mean, then unit norm: the angular distance
                          of mean-shifted features (Reiss & Hoshen 2021, "Mean-Shifted Contrastive
                          Loss for Anomaly Detection").
``"standardise"``         per-feature z-score with the normal training mean and std, then unit
                          norm (a diagonal Mahalanobis metric).
``"whiten"``              PCA whitening with Ledoit-Wolf shrinkage of the normal training
                          covariance: Euclidean distance in the output is the Mahalanobis distance
                          under the shrunk covariance (Rippel, Mertens & Merhof 2020, "Modeling the
                          distribution of normal data in pre-trained deep features for anomaly
                          detection"; Ledoit & Wolf 2004).
========================  =======================================================================

Measured on CIFAR-10 (see BENCHMARKS.md): ``l2`` and ``sqrt_l2`` help a lot; centring and
standardising by the *normal* class's statistics hurt badly with frozen features, because after
centring the anomalies differ from the normal class mostly by their distance from the normal
mean, which the angular distance throws away (Reiss & Hoshen centre features that were trained
with their contrastive loss for exactly that geometry).

Example:
    >>> import numpy as np
    >>> from dn2.normalize import make_transform
    >>> t = make_transform("l2").fit(np.ones((3, 4), dtype=np.float32))
    >>> np.linalg.norm(t.transform(np.full((1, 4), 5.0)), axis=1).round(6).tolist()
    [1.0]
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .params import Interval, validate

EPS = 1e-12


def l2_rows(X: np.ndarray) -> np.ndarray:
    """Each row divided by its Euclidean norm (all-zero rows stay zero)."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, EPS)).astype(np.float32)


class EmbeddingTransform:
    """Base class: ``fit`` on normal training embeddings, ``transform`` any embeddings.

    The fitted state is a dict of float32 arrays (``state()``), stored as tensors in model files
    so that a saved model transforms queries exactly as the fitted one did.

    Each transform declares its properties, which the rest of dn2 reads instead of keeping lists
    of names: ``stateless`` (row-wise, nothing fitted: the benchmark protocols may apply it once to
    all embeddings), ``unit_norm`` (rows come out with norm 1) and ``bf16_safe`` (bf16 feature
    extraction was measured not to cost accuracy after it, see BENCHMARKS.md; ``precision="auto"``
    extracts in bf16 only for these). ``params`` lists the constructor's parameters and their
    constraints (:mod:`dn2.params`).
    """

    name = "none"
    stateless = True
    unit_norm = False
    bf16_safe = False
    params: dict[str, list] = {}

    def fit(self, X: np.ndarray) -> "EmbeddingTransform":
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float32)

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).transform(X)

    def state(self) -> dict[str, np.ndarray]:
        """The fitted arrays (empty for stateless transforms)."""
        return {}

    def set_state(self, state: dict[str, np.ndarray]) -> "EmbeddingTransform":
        """Restore the fitted arrays written by ``state()``."""
        for key, value in state.items():
            setattr(self, key, np.asarray(value, dtype=np.float32))
        return self


class Identity(EmbeddingTransform):
    """No transform: the paper's raw features."""

    name = "none"


class L2(EmbeddingTransform):
    """Unit-norm rows: Euclidean kNN on them is cosine kNN (Babenko & Lempitsky 2015)."""

    name = "l2"
    unit_norm = True
    bf16_safe = True

    def transform(self, X: np.ndarray) -> np.ndarray:
        return l2_rows(X)


class SqrtL2(EmbeddingTransform):
    """Signed square root, then unit-norm rows: the Hellinger kernel (Perronnin et al. 2010)."""

    name = "sqrt_l2"
    unit_norm = True
    bf16_safe = True

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        return l2_rows(np.sign(X) * np.sqrt(np.abs(X)))


class CentredL2(EmbeddingTransform):
    """Subtract the normal training mean, then unit-norm rows (Reiss & Hoshen 2021's mean shift)."""

    name = "centred_l2"
    stateless = False
    unit_norm = True

    def fit(self, X: np.ndarray) -> "CentredL2":
        self.mean_ = np.asarray(X, dtype=np.float64).mean(axis=0).astype(np.float32)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return l2_rows(np.asarray(X, dtype=np.float32) - self.mean_)

    def state(self) -> dict[str, np.ndarray]:
        return {"mean_": self.mean_}


class Standardise(EmbeddingTransform):
    """Per-feature z-score with the normal training mean and std, then unit-norm rows."""

    name = "standardise"
    stateless = False
    unit_norm = True

    def fit(self, X: np.ndarray) -> "Standardise":
        X = np.asarray(X, dtype=np.float64)
        self.mean_ = X.mean(axis=0).astype(np.float32)
        std = X.std(axis=0)
        self.scale_ = np.where(std > 1e-6 * max(std.max(), EPS), std, 1.0).astype(np.float32)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return l2_rows((np.asarray(X, dtype=np.float32) - self.mean_) / self.scale_)

    def state(self) -> dict[str, np.ndarray]:
        return {"mean_": self.mean_, "scale_": self.scale_}


class Whiten(EmbeddingTransform):
    """PCA whitening with a shrunk covariance: Euclidean distance becomes Mahalanobis distance.

    The covariance of the normal training embeddings is shrunk towards a scaled identity,
    ``(1 - a) C + a tr(C)/d I``, with the Ledoit-Wolf optimal ``a`` unless ``shrinkage`` is
    given (Ledoit & Wolf 2004); this keeps it invertible when there are fewer images than
    features. Then ``x -> (x - mean) V diag(1/sqrt(w))`` with the eigenpairs ``(w, V)``, so the
    transformed training set has (shrunk) identity covariance (Rippel et al. 2020 use the same
    shrunk covariance for their Mahalanobis score).
    """

    name = "whiten"
    stateless = False
    params = {"shrinkage": [Interval(float, 0.0, 1.0), None]}

    def __init__(self, shrinkage: float | None = None):
        validate("Whiten", {"shrinkage": shrinkage}, self.params)
        self.shrinkage = shrinkage

    def fit(self, X: np.ndarray) -> "Whiten":
        from sklearn.covariance import ledoit_wolf_shrinkage

        X = np.asarray(X, dtype=np.float64)
        mean = X.mean(axis=0)
        Xc = X - mean
        cov = Xc.T @ Xc / len(X)
        a = ledoit_wolf_shrinkage(Xc, assume_centered=True) if self.shrinkage is None else self.shrinkage
        d = cov.shape[0]
        cov = (1.0 - a) * cov + a * np.trace(cov) / d * np.eye(d)
        w, V = np.linalg.eigh(cov)
        w = np.maximum(w, EPS * max(w.max(), EPS))
        self.mean_ = mean.astype(np.float32)
        self.components_ = (V / np.sqrt(w)).astype(np.float32)
        self.shrinkage_ = float(a)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, dtype=np.float32) - self.mean_) @ self.components_).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {"mean_": self.mean_, "components_": self.components_,
                "shrinkage_": np.array([self.shrinkage_], dtype=np.float32)}

    def set_state(self, state: dict[str, np.ndarray]) -> "Whiten":
        state = dict(state)
        shrinkage = state.pop("shrinkage_", None)  # absent in files written before it was saved
        super().set_state(state)
        if shrinkage is not None:
            self.shrinkage_ = float(np.asarray(shrinkage).reshape(-1)[0])
        return self


#: The registry: ``normalize=`` name -> transform class (its properties say what it is).
TRANSFORMS: dict[str, type[EmbeddingTransform]] = {
    t.name: t for t in (Identity, L2, SqrtL2, CentredL2, Standardise, Whiten)
}
NORMALIZATIONS = tuple(TRANSFORMS)
STATELESS_NORMALIZATIONS = tuple(n for n, t in TRANSFORMS.items() if t.stateless)


def transform_class(name: str | None) -> type[EmbeddingTransform]:
    """The transform class registered as ``name`` (``None`` means ``"none"``)."""
    name = "none" if name is None else name
    if name not in TRANSFORMS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {name!r}")
    return TRANSFORMS[name]


class Blockwise(EmbeddingTransform):
    """One transform per block of columns (one block per backbone of an ensemble), concatenated.

    Each backbone's part is normalised on its own, then the parts are scaled by 1/sqrt(number of
    parts), so that with unit-norm transforms every backbone weighs the same in the distance and
    rows keep unit norm: ``||a - b||^2`` is the mean of the per-backbone squared distances.
    """

    def __init__(self, name: str, blocks: tuple[int, ...], **params: Any):
        self.name = name
        self.blocks = tuple(int(b) for b in blocks)
        cls = transform_class(name)
        self.stateless, self.unit_norm, self.bf16_safe = cls.stateless, cls.unit_norm, cls.bf16_safe
        self.parts = [cls(**params) for _ in self.blocks]

    def _split(self, X: np.ndarray) -> list[np.ndarray]:
        X = np.asarray(X, dtype=np.float32)
        if X.shape[1] != sum(self.blocks):
            raise ValueError(f"embeddings have {X.shape[1]} features, blocks {self.blocks} need {sum(self.blocks)}")
        return np.split(X, np.cumsum(self.blocks)[:-1], axis=1)

    def fit(self, X: np.ndarray) -> "Blockwise":
        for part, block in zip(self.parts, self._split(X)):
            part.fit(block)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        out = np.hstack([part.transform(block) for part, block in zip(self.parts, self._split(X))])
        return (out / np.sqrt(len(self.parts))).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {f"{i}/{key}": value for i, part in enumerate(self.parts) for key, value in part.state().items()}

    def set_state(self, state: dict[str, np.ndarray]) -> "Blockwise":
        for i, part in enumerate(self.parts):
            part.set_state({key.split("/", 1)[1]: value for key, value in state.items() if key.split("/", 1)[0] == str(i)})
        return self


def make_transform(name: str | None, blocks: Sequence[int] | None = None, **params: Any) -> EmbeddingTransform:
    """The (unfitted) transform called ``name``; ``None`` means ``"none"``.

    ``blocks`` (column counts, one per backbone of an ensemble) applies it to each block on its
    own (:class:`Blockwise`); ``None`` or a single block is the plain transform. ``params`` go to
    the transform's constructor (e.g. ``make_transform("whiten", shrinkage=0.1)``), checked
    against its declared ``params``.
    """
    cls = transform_class(name)
    validate(f"normalize={cls.name!r}", params, cls.params)
    if blocks is not None and len(blocks) > 1:
        return Blockwise(cls.name, tuple(blocks), **params)
    return cls(**params)


def transform_from_state(name: str | None, state: dict[str, Any], blocks: Sequence[int] | None = None,
                         **params: Any) -> EmbeddingTransform:
    """Rebuild a fitted transform from its name, its blocks, its parameters and the arrays of ``state()``."""
    return make_transform(name, blocks, **params).set_state(state)


__all__ = [
    "NORMALIZATIONS",
    "STATELESS_NORMALIZATIONS",
    "TRANSFORMS",
    "transform_class",
    "EmbeddingTransform",
    "Identity",
    "L2",
    "SqrtL2",
    "CentredL2",
    "Standardise",
    "Whiten",
    "Blockwise",
    "l2_rows",
    "make_transform",
    "transform_from_state",
]

