"""HTML building blocks of the report pages: escaping, number cells, tables, thumbnails, the page shell.

Pages are self-contained: one inline style sheet, no script, nothing fetched from the network, images by
relative path. Every value that comes from data (case and method names, folders, notes) goes through
:func:`esc`.
"""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote

STYLE = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;padding:18px 28px;
 color:#1d2125;background:#f6f7f9;font-size:14px;line-height:1.4}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #d5d9de;
 padding-bottom:3px}h3{font-size:15px;margin:14px 0 6px}
.meta{color:#5b636b;font-size:12px}.note{color:#5b636b;font-size:12.5px;margin:4px 0}
.warn{background:#fff4e0;border-left:4px solid #e8a33d;padding:6px 10px;margin:6px 0}
.headline{background:#fff;border:1px solid #d5d9de;border-radius:6px;padding:10px 16px;margin:10px 0}
.headline li{margin:3px 0}
table{border-collapse:collapse;background:#fff;font-size:12.5px;margin:6px 0}
th,td{border:1px solid #dde1e5;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#eef1f4;position:sticky;top:0}td.t,th.t{text-align:left}
tr.pooled td{background:#f3f6fb;font-weight:600}tr.best td.t:first-child{font-weight:700}
td.flag{color:#b3261e;font-weight:700;background:#fdeeee}tr.flagged td{background:#fdeeee}
.scroll{overflow-x:auto;max-width:100%}
.plots{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.plots img{width:620px;max-width:100%;height:auto;background:#fff;border:1px solid #dde1e5}
.plots img.wide{width:auto;max-width:100%}
details{margin:6px 0}summary{cursor:pointer;color:#29527a}
.cards{display:flex;flex-direction:column;gap:10px}
.card{background:#fff;border:1px solid #d5d9de;border-radius:6px;padding:8px 12px;display:flex;gap:14px;
 align-items:flex-start;flex-wrap:wrap}
.card.flagged{border-left:5px solid #c0392b}.card.ok{border-left:5px solid #4b9a5b}
.card h3{margin:0 0 4px}.card .info{min-width:260px;flex:1}
.card table{font-size:11.5px}.card th,.card td{padding:2px 5px}.card th{white-space:normal;vertical-align:bottom}
.thumbs{display:flex;gap:6px}
figure{margin:0;text-align:center;font-size:11.5px;color:#454c53}
figure img{display:block;border:1px solid #c9ced4;image-rendering:pixelated;background:#2e2e2e}
.missing{display:flex;align-items:center;justify-content:center;border:1px dashed #b8bec5;color:#6b737b;
 font-size:11px;padding:4px;box-sizing:border-box;background:#fafbfc}
.legend span{display:inline-block;width:11px;height:11px;margin:0 3px 0 10px;vertical-align:-1px;
 border:1px solid #777}
.pill{display:inline-block;border-radius:9px;padding:0 7px;font-size:11.5px;font-weight:600}
.pill.bad{background:#fbe0de;color:#a3221b}.pill.good{background:#e1f2e4;color:#2d6b3a}
.statement{font-size:15px;margin:4px 0 8px}.drift{margin:4px 0}.reason{color:#a3221b;font-weight:600;margin:2px 0}
""".strip()


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML elements and quoted attributes."""
    return html.escape(str(value), quote=True)


def number(value: Any, digits: int = 3) -> str:
    """A float with ``digits`` decimals, an integer as is; "-" for NaN or None (undefined), text otherwise."""
    if value is None:
        return "-"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    x = float(value)
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def compact(value: float) -> str:
    """A raw score of any magnitude in a few characters (4 significant digits); "-" for NaN."""
    return "-" if value is None or math.isnan(value) else f"{value:.4g}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], text_columns: int = 1,
          row_classes: Iterable[str] | None = None, left: Iterable[int] = ()) -> str:
    """A table; cells are HTML already (escape data with :func:`esc`). The first ``text_columns`` and the columns
    in ``left`` are left-aligned, the others (numbers) right-aligned."""
    aligned_left = set(range(text_columns)) | set(left)
    head = "".join(f'<th class="t">{h}</th>' if i in aligned_left else f"<th>{h}</th>" for i, h in enumerate(headers))
    classes = list(row_classes) if row_classes is not None else None
    body = []
    for k, row in enumerate(rows):
        cls = f' class="{classes[k]}"' if classes and classes[k] else ""
        cells = "".join(c if c.startswith("<td") else (f'<td class="t">{c}</td>' if i in aligned_left
                                                      else f"<td>{c}</td>") for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def image(src: str, alt: str, css_class: str | None = None) -> str:
    """An ``<img>`` with a relative ``src`` (path segments URL-quoted)."""
    cls = f' class="{esc(css_class)}"' if css_class else ""
    return f'<img src="{esc(quote(src))}" alt="{esc(alt)}"{cls} loading="lazy">'


def linked_image(src: str, alt: str, css_class: str | None = None) -> str:
    """An image that opens at full size when clicked (a plain link: no script)."""
    return f'<a href="{esc(quote(src))}">{image(src, alt, css_class)}</a>'


def figure(src: str | None, caption: str, alt: str, missing: str = "not available",
           box: tuple[int, int] = (168, 168)) -> str:
    """A captioned thumbnail, or a dashed box of the thumbnails' ``box`` (height, width) saying why it is missing."""
    if src is None:
        content = f'<div class="missing" style="width:{box[1]}px;height:{box[0]}px">{esc(missing)}</div>'
    else:
        content = image(src, alt)
    return f"<figure>{content}<figcaption>{esc(caption)}</figcaption></figure>"


def breakable(name: str) -> str:
    """``name`` escaped, with line-break opportunities after underscores (long method names in narrow headers)."""
    return esc(name).replace("_", "_<wbr>")


def label_legend(labels: dict[int, str], colors: Sequence[Sequence[float]]) -> str:
    """Coloured squares naming the foreground labels, in the colours of the label overlays."""
    items = []
    for value, name in sorted(labels.items()):
        r, g, b = (round(255 * c) for c in colors[(max(value, 1) - 1) % len(colors)])
        items.append(f'<span style="background:rgb({r},{g},{b})"></span>{esc(name)} ({value})')
    return f'<div class="legend note">labels:{"".join(items)}</div>' if items else ""


def document(title: str, body: str) -> str:
    """A complete HTML5 page with the inline style sheet."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")
