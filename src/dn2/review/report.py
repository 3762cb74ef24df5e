"""The static review report of ``dn2 score --report DIR``: one self-contained HTML file.

Everything is inline (images as data URLs, the page's own CSS and rendering script, the verdict
records as JSON), so the file can be mailed, archived or opened offline. It shows the images
sorted by score, their verdicts, a histogram of the scores with the threshold, each image beside
its nearest normal training images (the model's thumbnails, when it has them) and its heat map
(when the model makes maps). Without JavaScript a plain table of the verdicts is shown.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "review"
    >>> rec = {"name": "a.png", "anomaly_score": 1.5, "verdict": "anomaly", "threshold": 1.0,
    ...        "nearest": [], "heatmap": None, "error": None}
    >>> write_report(folder, [rec], title="parts.dn2").name
    'index.html'
    >>> "a.png" in (folder / "index.html").read_text()
    True
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ..features import Embeddings
from ..images import ImageSource
from ..outputs import atomic_path, check_output_path
from ..thumbnails import make_thumbnail
from .assets import asset
from .results import data_url, error_record, judge, maps_enabled, overlay_url, record

__all__ = ["QUERY_SIZE", "REPORT_FILE", "report_html", "report_records", "report_target", "write_report"]

REPORT_FILE = "index.html"
QUERY_SIZE = 256  # long side of the scored images in the report: enough to judge, small enough to mail


def report_target(folder: str | os.PathLike, *, force: bool = False) -> Path:
    """The report's file in ``folder``, checked before any work: ``FileExistsError`` if a report is
    there and not ``force``; the folder itself is made when the report is written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder (--report takes a folder for {REPORT_FILE})")
    if not folder.exists():
        check_output_path(folder, what="report folder")
        return folder / REPORT_FILE
    return check_output_path(folder / REPORT_FILE, force=force, what="report")


def _script_json(data: Any) -> str:
    """JSON that cannot end its <script> element nor open a comment or markup inside it."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fallback_table(records: Sequence[dict[str, Any]]) -> str:
    """The verdicts as a plain table, for readers without JavaScript."""
    rows = []
    for r in records:
        score = "" if r["error"] else format(r["anomaly_score"], ".4f")
        verdict = r["verdict"] or f"not scored: {r['error']}"
        rows.append(f"<tr><td>{html.escape(r['name'])}</td><td>{score}</td><td>{html.escape(verdict)}</td></tr>")
    return f"<table><tr><th>image</th><th>anomaly score</th><th>verdict</th></tr>{''.join(rows)}</table>"


def report_html(records: Sequence[dict[str, Any]], *, title: str, details: Sequence[str] = ()) -> str:
    """The report page for verdict records (:mod:`dn2.review.results`) as one HTML string."""
    script = asset("render.js").decode("utf-8")
    if "</script" in script.lower():  # would end the inline element early
        raise ValueError("render.js must not contain '</script'")
    ordered = sorted(records, key=lambda r: -r["anomaly_score"] if r["error"] is None else float("inf"))
    flagged = sum(r["verdict"] == "anomaly" for r in records)
    meta = [f"{len(records)} images, {flagged} flagged as anomalies", *details]
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>dn2 report: {html.escape(title)}</title>",
        f"<style>{asset('dn2.css').decode('utf-8')}</style></head><body>",
        '<a class="skip" href="#results">Skip to results</a>',
        f'<header class="top"><h1>dn2 <span>review report</span></h1><p>{html.escape(title)}</p></header>',
        "<main>",
        "".join(f'<p class="meta">{html.escape(line)}</p>' for line in meta),
        f"<noscript>{_fallback_table(ordered)}</noscript>",
        '<section class="summary panel" id="summary" aria-label="Summary" hidden></section>',
        '<section id="results" aria-label="Results"></section>',
        "</main>",
        f'<script type="application/json" id="dn2-data">{_script_json({"results": list(ordered)})}</script>',
        f"<script>{script}</script>",
        "</body></html>",
    ])


def write_report(folder: str | os.PathLike, records: Sequence[dict[str, Any]], *, title: str,
                 details: Sequence[str] = (), force: bool = False) -> Path:
    """Write the report to ``folder/index.html`` atomically; never overwrites one without ``force``."""
    path = report_target(folder, force=force)
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path, force=force, what="report") as tmp:
        tmp.write_text(report_html(records, title=title, details=details), encoding="utf-8")
    return path


def report_records(model: Any, source: ImageSource, embeddings: Embeddings, explain: int,
                   located: dict[int, Any] | None = None) -> list[dict[str, Any]]:
    """Verdict records of every input of ``source`` (``embeddings`` of it), with everything inline.

    Each scored image's record carries ``image`` (the image, long side 256 px), its nearest normals
    with the model's thumbnails (when it has them) and its heat map (when it makes maps), all as
    data URLs; a skipped input's record says why. The images are read again, one at a time.
    ``located``: the maps' :class:`dn2.maps.Localization` by input position, if already made (else made here).
    """
    detector = model.detector
    thumbs = getattr(model, "thumbnails_", None)

    def thumbnail(row: int) -> str | None:
        return data_url(thumbs[row], thumbs.media_type) if thumbs is not None else None

    verdicts = judge(detector, embeddings.vectors, explain)
    # The maps' grids of every image (small: the map is made at full size one image at a time, below),
    # from the same embeddings as the scores, so the report and the CSV agree.
    if located is None:  # ``located``: the maps' results by input position, when the caller has made them
        located = {r.index: r for r in model.localize(source, embeddings=embeddings)} if maps_enabled(model) else {}
    own_score = maps_enabled(model) and model.method_.image_score != "dn2"
    if own_score:
        verdicts = replace(verdicts, threshold=float(model.threshold_))
    by_position = {int(p): i for i, p in enumerate(embeddings.positions)}
    names = embeddings.input_names or source.names()
    out = []
    for position, name in enumerate(names):
        if position not in by_position:
            out.append(error_record(name, embeddings.errors.get(position, "not scored")))
            continue
        i = by_position[position]
        image = source.load(position)
        loc = located.get(position)
        if own_score:  # judged by the model's own image score, which needs the map
            if loc is None:
                out.append(error_record(name, f"{name}: no anomaly map (the image could not be read whole)"))
                continue
            verdicts.scores[i] = loc.image_score
        heatmap = overlay_url(model, image, loc.map()) if loc is not None else None
        rec = record(embeddings.names[i], verdicts, i, detector, thumbnail=thumbnail, heatmap=heatmap)
        rec["image"] = data_url(make_thumbnail(image, QUERY_SIZE), "image/jpeg")
        out.append(rec)
    return out
