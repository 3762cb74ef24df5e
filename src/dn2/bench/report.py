"""Benchmark result tables and how they are written: console text, CSV, markdown, PNG, one HTML page.

A :class:`Table` is what every protocol of :mod:`dn2.bench.protocols` returns: named columns, rows of
plain values (ROCAUC in %), notes, and optionally how to plot it. Writing is kept apart from
computing so protocols stay pure functions that are easy to test.

Example:
    >>> from dn2.bench.report import Table, format_table
    >>> t = Table("demo", "Demo", ["class", "ROCAUC %"], [["cat", 91.34], ["mean", 91.34]])
    >>> print(format_table(t).splitlines()[-1])
    mean       91.3
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["Plot", "Table", "format_value", "format_table", "to_markdown", "write_csv", "write_png", "write_table", "write_html"]


@dataclass
class Plot:
    """How to draw a table: ``x`` column against ``series`` of (label, y column, error column or None)."""

    x: str
    series: list[tuple[str, str, str | None]]
    xlabel: str = ""
    ylabel: str = "ROCAUC %"
    kind: str = "line"  # "line" or "bar" (bar: one bar per row, categorical x)
    logx: bool = False


@dataclass
class Table:
    """One result table: ``name`` is the file stem (``unimodal`` -> unimodal.csv/.md/.png)."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)
    plot: Plot | None = None

    def column(self, name: str) -> list[Any]:
        """All values of one column, in row order."""
        j = self.columns.index(name)
        return [row[j] for row in self.rows]

    def row(self, first: Any) -> dict[str, Any]:
        """The row whose first cell is ``first``, as {column: value}."""
        for row in self.rows:
            if row[0] == first:
                return dict(zip(self.columns, row))
        raise KeyError(f"{self.name}: no row {first!r}")


def format_value(value: Any) -> str:
    """Floats with one decimal (ROCAUC %), None as empty, everything else as str."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _cells(table: Table) -> list[list[str]]:
    return [[format_value(v) for v in row] for row in table.rows]


def format_table(table: Table) -> str:
    """Plain-text table for the console: title, aligned columns, notes."""
    cells = _cells(table)
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(table.columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(zip(values, widths))).rstrip()

    out = [table.title, line(table.columns)] + [line(r) for r in cells]
    out += [f"  note: {n}" for n in table.notes]
    return "\n".join(out)


def to_markdown(table: Table, image: str | None = None) -> str:
    """A markdown section: heading, pipe table, notes, and the plot as an image link if given."""
    out = [f"## {table.title}", "", "| " + " | ".join(table.columns) + " |"]
    out.append("| " + " | ".join(["---"] + ["---:"] * (len(table.columns) - 1)) + " |")
    out += ["| " + " | ".join(r) + " |" for r in _cells(table)]
    if table.notes:
        out += [""] + [f"- {n}" for n in table.notes]
    if image:
        out += ["", f"![{table.title}]({image})"]
    return "\n".join(out) + "\n"


def write_csv(table: Table, path: str | os.PathLike) -> Path:
    """CSV with full precision (floats as repr), header = columns."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table.columns)
        writer.writerows([["" if v is None else v for v in row] for row in table.rows])
    return path


def _numbers(values: list[Any]) -> list[float]:
    return [float("nan") if not isinstance(v, (int, float)) else float(v) for v in values]


def render_png(table: Table) -> bytes | None:
    """The table's plot as PNG bytes (matplotlib, Agg backend); None if it has no plot or no matplotlib."""
    if table.plot is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    plot = table.plot
    numeric = [c for _, c, _ in plot.series] + ([plot.x] if plot.kind == "line" else [])
    rows = [r for r in table.rows if all(isinstance(r[table.columns.index(c)], (int, float)) for c in numeric)]
    shown = Table(table.name, table.title, table.columns, rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    xs = shown.column(plot.x)
    if plot.kind == "bar":
        width = 0.8 / len(plot.series)
        for s, (label, ycol, errcol) in enumerate(plot.series):
            pos = [i + (s - (len(plot.series) - 1) / 2) * width for i in range(len(xs))]
            err = _numbers(shown.column(errcol)) if errcol else None
            ax.bar(pos, _numbers(shown.column(ycol)), width, yerr=err, label=label)
        ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=30, ha="right")
    else:
        for label, ycol, errcol in plot.series:
            err = _numbers(shown.column(errcol)) if errcol else None
            ax.errorbar(_numbers(xs), _numbers(shown.column(ycol)), yerr=err, marker="o", capsize=3, label=label)
        if plot.logx:
            ax.set_xscale("log")
    ax.set_xlabel(plot.xlabel or plot.x)
    ax.set_ylabel(plot.ylabel)
    ax.set_title(table.title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(plot.series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_png(table: Table, path: str | os.PathLike) -> Path | None:
    """Write the table's plot; returns None (and writes nothing) when there is nothing to draw."""
    png = render_png(table)
    if png is None:
        return None
    path = Path(path)
    path.write_bytes(png)
    return path


def write_table(table: Table, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``<name>.csv``, ``<name>.md`` and (if it has a plot) ``<name>.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_csv(table, out_dir / f"{table.name}.csv")]
    png = write_png(table, out_dir / f"{table.name}.png")
    md = out_dir / f"{table.name}.md"
    md.write_text(to_markdown(table, png.name if png else None))
    written.append(md)
    if png:
        written.append(png)
    return written


def write_html(tables: Sequence[Table], report_dir: str | os.PathLike, title: str = "dn2 bench", preamble: Sequence[str] = (),
               figures: Sequence[tuple[str, str, bytes]] = ()) -> Path:
    """A self-contained ``index.html`` (plots inlined as base64 PNG) plus every table's CSV/markdown/PNG
    and a combined ``report.md``, all in ``report_dir``. ``figures``: more PNG images (file stem, title,
    PNG bytes), written beside the tables and shown after them."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p>{html.escape(line)}</p>" for line in preamble]
    markdown = [f"# {title}", ""] + [f"{line}  " for line in preamble] + [""]
    for table in tables:
        written = write_table(table, report_dir)
        png = next((p for p in written if p.suffix == ".png"), None)
        markdown.append(to_markdown(table, png.name if png else None))
        parts.append(f"<h2>{html.escape(table.title)}</h2><table>")
        parts.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in table.columns) + "</tr>")
        for row in _cells(table):
            parts.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>")
        parts.append("</table>")
        if table.notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in table.notes) + "</ul>")
        if png:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(f'<p><img src="data:image/png;base64,{data}" alt="{html.escape(table.title)}"></p>')
    for stem, caption, png_bytes in figures:
        (report_dir / f"{stem}.png").write_bytes(png_bytes)
        markdown.append(f"## {caption}\n\n![{caption}]({stem}.png)\n")
        data = base64.b64encode(png_bytes).decode("ascii")
        parts.append(f'<h2>{html.escape(caption)}</h2><p><img src="data:image/png;base64,{data}" '
                     f'alt="{html.escape(caption)}" style="max-width:100%"></p>')
    parts.append("</body></html>")
    (report_dir / "report.md").write_text("\n".join(markdown))
    index = report_dir / "index.html"
    index.write_text("\n".join(parts))
    return index
