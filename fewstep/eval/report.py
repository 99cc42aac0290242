"""One self-contained HTML report a person can open or send alone: inline CSS, images embedded as base64 data URIs
(the files may lie beside it, the page does not need them), tables of metrics; no network, no script."""
from __future__ import annotations

import base64
import html
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..io import atomic_write_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
     padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #eee;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.3em .7em;text-align:right}
th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafafa}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figure img{max-width:100%;image-rendering:pixelated;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;text-align:center}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em;border-radius:4px}
.meta{color:#777;font-size:.85em}
"""


def format_value(v: Any) -> str:
    """Numbers to 4 significant digits, ints as they are, None as an em dash; everything else via ``str``."""
    if v is None:
        return "\u2014"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    try:  # numpy / torch scalars
        return format_value(v.item())
    except (AttributeError, ValueError):
        return str(v)


def _table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


#: suffix -> MIME type of the pictures a report embeds (a browser shows these inline; a PDF it would not)
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif", ".svg": "image/svg+xml"}


def data_uri(path: str | os.PathLike) -> str | None:
    """The picture at ``path`` as a ``data:`` URI (base64), or None when it is no file of :data:`IMAGE_TYPES`."""
    path = Path(path)
    kind = IMAGE_TYPES.get(path.suffix.lower())
    if kind is None or not path.is_file():
        return None
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _section(s: dict, base: Path) -> str:
    parts = [f"<h2>{html.escape(str(s.get('heading', '')))}</h2>"]
    if s.get("text"):
        parts.extend(f"<p>{html.escape(p)}</p>" for p in str(s["text"]).split("\n\n"))
    if s.get("table"):
        parts.append(_table(s["table"]))
    for caption, rel in s.get("images") or []:
        cap = html.escape(str(caption))
        src = data_uri(base / rel) if str(rel) else None
        if src is None:  # said on the page, not a broken link
            parts.append(f'<p class="meta">{cap}: no picture ({html.escape(str(rel) or "none was written")})</p>')
            continue
        parts.append(f'<figure><img src="{src}" alt="{cap}"><figcaption>{cap}</figcaption></figure>')
    if s.get("code"):
        parts.append(f"<pre><code>{html.escape(str(s['code']))}</code></pre>")
    return "<section>" + "\n".join(parts) + "</section>"


def write_report(path: str | os.PathLike, title: str, sections: list[dict]) -> Path:
    """Write one HTML file; returns its path.

    Args:
        path: the ``.html`` file to write (atomically).
        title: page title and top heading.
        sections: dicts with ``heading`` (str) and optional ``text`` (str; blank lines split paragraphs),
            ``table`` (list of dicts, one row each; columns in first-seen order), ``images`` (list of
            ``(caption, path relative to the report)``: each picture is read and embedded, so the page needs no
            file beside it; one that is missing is said in a line), ``code`` (preformatted, e.g. the resolved
            YAML config).
    """
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1><p class=\"meta\">written {when} by fewstep</p>\n"
        + "\n".join(_section(s, Path(path).parent) for s in sections)
        + "\n</body></html>\n"
    )
    return atomic_write_text(path, doc)
