"""Building blocks for self-contained HTML pages and Markdown tables.

Reports are opened from a bucket, an artifact store or a mail attachment, often offline, so pages
carry their CSS and images inline (PNG data URIs) and never reference external URLs, scripts or fonts.
Every cell is escaped, so names coming from data (sources, tests, families) cannot break markup.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

EN_DASH = "\u2013"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 80em; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .1em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
caption { text-align: left; font-weight: 600; padding-bottom: .3em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; }
code, pre { background: #f5f5f5; padding: .1em .3em; border-radius: 3px; }
pre { padding: .6em; overflow-x: auto; white-space: pre-wrap; }
nav ul { columns: 2; }
"""


def format_cell(value: object, digits: int = 3) -> str:
    """One text form for every table cell: fixed decimals keep columns comparable by eye.

    None and NaN (e.g. an FDR with nothing flagged) both read as an en dash: there is no value.
    """
    if value is None:
        return EN_DASH
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return EN_DASH if math.isnan(value) else f"{float(value):.{digits}f}"
    return str(value)


def _is_number(value: object) -> bool:
    numeric = isinstance(value, int | float | np.integer | np.floating)
    return numeric and not isinstance(value, bool | np.bool_)


def html_table(
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    bold: set[tuple[int, int]] | None = None,
    caption: str | None = None,
) -> str:
    """An HTML table; ``bold`` holds (row, column) indices into ``rows``, numbers are right-aligned."""
    bold = bold or set()
    lines = ["<table>"]
    if caption is not None:
        lines.append(f"<caption>{html.escape(caption)}</caption>")
    lines.append("<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr></thead>")
    lines.append("<tbody>")
    for i, row in enumerate(rows):
        cells = []
        for j, value in enumerate(row):
            text = html.escape(format_cell(value))
            if (i, j) in bold:
                text = f"<strong>{text}</strong>"
            attr = ' class="num"' if _is_number(value) else ""
            cells.append(f"<td{attr}>{text}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</tbody>")
    lines.append("</table>")
    return "\n".join(lines)


def markdown_escape(text: str) -> str:
    """Backslash-escape what would end a table cell or start emphasis, code or inline HTML."""
    text = text.replace("\\", "\\\\").replace("\n", " ")
    for ch in "|*`<":
        text = text.replace(ch, "\\" + ch)
    return text


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], bold: set[tuple[int, int]] | None = None
) -> str:
    """A GitHub-flavoured Markdown table with the same cell text as :func:`html_table`."""
    bold = bold or set()

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    out = [line([markdown_escape(str(h)) for h in header]), line(["---"] * len(header))]
    for i, row in enumerate(rows):
        cells = []
        for j, value in enumerate(row):
            text = markdown_escape(format_cell(value))
            cells.append(f"**{text}**" if (i, j) in bold else text)
        out.append(line(cells))
    return "\n".join(out)


def html_list(items: Sequence[str]) -> str:
    """A bullet list of plain-text items (escaped)."""
    return "<ul>\n" + "\n".join(f"<li>{html.escape(item)}</li>" for item in items) + "\n</ul>"


def html_page(title: str, sections: Sequence[tuple[str, str]], *, intro: str = "") -> str:
    """A complete HTML5 document with inline CSS and a contents list.

    ``intro`` and each section body are HTML fragments, trusted as given; the title and the section
    headings are plain text and escaped.
    """
    title_html = html.escape(title)
    nav = "".join(
        f'<li><a href="#section-{k}">{html.escape(h)}</a></li>' for k, (h, _) in enumerate(sections)
    )
    body = [f"<h1>{title_html}</h1>", intro]
    if len(sections) > 1:
        body.append(f"<nav><ul>{nav}</ul></nav>")
    for k, (heading, content) in enumerate(sections):
        body.append(f'<section id="section-{k}">\n<h2>{html.escape(heading)}</h2>\n{content}\n</section>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title_html}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """Render through the figure's own canvas (Agg for PNG): no pyplot state is created or closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def figure_data_uri(fig: Figure) -> str:
    return png_data_uri(figure_png(fig))


def save_figure(fig: Figure, path: str | Path) -> bytes:
    """Write the figure as PNG; returns the bytes so a page can inline the same render."""
    png = figure_png(fig)
    Path(path).write_bytes(png)
    return png


def image_data_uri(array: np.ndarray) -> str:
    """A small uint8 image (H x W gray, H x W x 1, or H x W x 3 RGB) as a PNG data URI, for thumbnails."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"image must be H x W or H x W x 3, got shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return png_data_uri(buf.getvalue())
