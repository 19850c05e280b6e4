"""report.html: the whole benchmark in one static page that opens from disk.

No server, no script, no file beside it: the figures are embedded as data URIs, so the page
can be mailed or attached to a CI run as it is. It holds the table (with the reference,
Pareto, picked and warning marks), the pick, the warnings, the latency/mIoU plot, the
per-class IoU changes between backends, the confusion matrix and the comparison grid.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from html import escape

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d1d1f; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
p.meta { color: #444; max-width: 70em; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #c8c8c8; padding: 3px 7px; }
th { background: #e8eef7; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.picked td { background: #fff3b0; font-weight: 600; }
tr.warn td { background: #fde7d4; }
tr.failed td { color: #8a8a8a; }
ul.notes li { margin: 3px 0; }
img { max-width: 100%; border: 1px solid #ddd; margin: 6px 0; }
"""


@dataclass
class Page:
    """What the page shows, already as text: `report.py` fills it from a `BenchReport`."""

    title: str
    meta: list[str]  # paragraphs under the title
    notes: list[str]  # the pick, the warnings, the rows that did not run
    columns: list[tuple[str, bool]]  # (title, numeric)
    rows: list[tuple[str, list[str]]]  # (css class: picked, warn, failed or "", cells)
    delta_columns: list[str]
    deltas: list[tuple[str, list[float | None]]]  # (class name, change per compared row)


def _table(page: Page) -> str:
    head = "".join(f"<th>{escape(title)}</th>" for title, _ in page.columns)
    body = "".join(
        f'<tr class="{css}">'
        + "".join(
            f"<td{' class=num' if numeric else ''}>{escape(cell)}</td>"
            for cell, (_, numeric) in zip(cells, page.columns, strict=True)
        )
        + "</tr>"
        for css, cells in page.rows
    )
    return f'<table id="rows"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _delta_colour(value: float | None) -> str:
    """Red for a class that lost IoU, green for one that gained, grey for none."""
    if value is None:
        return "#f4f4f4"
    strength = min(abs(value) / 5.0, 1.0)
    fade = int(255 - 140 * strength)
    return f"rgb(255,{fade},{fade})" if value < 0 else f"rgb({fade},255,{fade})"


def _deltas(page: Page) -> str:
    if not page.deltas:
        return "<p>No model has two backends that ran: nothing to compare class by class.</p>"
    head = "<th>class</th>" + "".join(f"<th>{escape(title)}</th>" for title in page.delta_columns)
    body = "".join(
        f"<tr><td>{escape(name)}</td>"
        + "".join(
            f'<td class=num style="background:{_delta_colour(v)}">{"-" if v is None else f"{v:.2f}"}</td>'
            for v in values
        )
        + "</tr>"
        for name, values in page.deltas
    )
    return f'<table id="class-deltas"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _image(pictures: dict[str, bytes], key: str, alt: str) -> str:
    if key not in pictures:
        return f"<p>{escape(alt)}: not drawn (matplotlib is not installed, or nothing ran).</p>"
    data = base64.b64encode(pictures[key]).decode("ascii")
    return f'<img id="{key}" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def to_html(page: Page, pictures: dict[str, bytes]) -> str:
    """The page; `pictures` are PNG bytes by key: png (the plot), confusion, compare."""
    items = "".join(f"<li>{escape(line.strip())}</li>" for line in page.notes)
    meta = "".join(f'<p class="meta">{escape(text)}</p>' for text in page.meta)
    grid = (
        _image(pictures, "compare", "comparison grid")
        if "compare" in pictures
        else "<p>No comparison grid: run <code>fakd-deploy bench RUN --compare N</code>.</p>"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{escape(page.title)}</title>
<style>{STYLE}</style></head>
<body>
<h1>{escape(page.title)}</h1>
{meta}
<h2>Read before you ship</h2>
<ul class="notes">{items or "<li>No warnings.</li>"}</ul>
<h2>Every model on every backend</h2>
{_table(page)}
<h2>Latency against mIoU</h2>
{_image(pictures, "png", "latency against mIoU")}
<h2>Per-class IoU change against each model's ref row</h2>
{_deltas(page)}
<h2>Confusion matrix</h2>
{_image(pictures, "confusion", "confusion matrix")}
<h2>Where backends disagree</h2>
{grid}
</body></html>
"""
