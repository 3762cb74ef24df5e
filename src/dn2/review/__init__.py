"""Showing verdicts to people: records, heat-map overlays, the review page's files and the static report.

One rendering for two places: ``dn2 serve`` (the page at ``/``, fed by the JSON API) and ``dn2 score
--report`` (one self-contained HTML file) draw the same verdict records (:mod:`~dn2.review.results`)
with the same script and style sheet (``static/``, :mod:`~dn2.review.assets`). Needs no optional
package: the report works without the ``serve`` extra.

- :mod:`~dn2.review.results`: scores and neighbours as records, anomaly maps where a model has them;
- :mod:`~dn2.review.overlay`: :func:`heatmap_overlay`;
- :mod:`~dn2.review.report`: :func:`write_report`.

Example:
    >>> from dn2.review import error_record
    >>> error_record("x.png", "not an image")["error"]
    'not an image'
"""

from .assets import ASSETS, asset, media_type
from .overlay import heatmap_overlay
from .report import report_records, report_target, write_report
from .results import MapResults, Verdicts, anomaly_maps, data_url, error_record, judge, maps_enabled, overlay_url, record

__all__ = [
    "ASSETS",
    "Verdicts",
    "MapResults",
    "anomaly_maps",
    "asset",
    "data_url",
    "error_record",
    "heatmap_overlay",
    "judge",
    "maps_enabled",
    "media_type",
    "overlay_url",
    "record",
    "report_records",
    "report_target",
    "write_report",
]
