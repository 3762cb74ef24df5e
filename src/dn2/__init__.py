"""dn2: Deep Nearest Neighbor anomaly detection (Bergman, Cohen & Hoshen, 2020) on pretrained features.

Images -> embeddings (:class:`Embedder`) -> kNN index and scores (:class:`KNNDetector`) ->
threshold. :class:`DN2` composes the two; :func:`load` opens a saved model safely.

Example:
    >>> import dn2
    >>> model = dn2.DN2().fit("normal_images/")      # doctest: +SKIP
    >>> model.anomaly_score(["a.jpg", "b.jpg"])      # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version

from .backbones import list_backbones, load_backbone
from .detector import DN2, KNNDetector, load
from .features import Embedder, Embeddings
from .images import BadImageError

try:
    __version__ = version("dn2")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "DN2",
    "BadImageError",
    "Embedder",
    "Embeddings",
    "KNNDetector",
    "list_backbones",
    "load",
    "load_backbone",
    "__version__",
]
