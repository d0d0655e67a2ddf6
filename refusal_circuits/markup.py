"""The one place that turns text into HTML: the report, the figures' captions and every ``_repr_html_``.

Prompts and completions are untrusted text (a prompt file may hold markup, a completion may hold anything the model
wrote), so every string that reaches a page goes through :func:`esc`: HTML-escaped, quotes included, and with the
Unicode bidirectional controls shown as visible markers, so a right-to-left override cannot reorder what a reader
sees. :func:`table` is the table markup that the records' ``_repr_html_`` share. :func:`page` wraps a body in a self-contained document whose Content-Security-Policy loads nothing from outside.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}
th{background:#f3f3f3}small,.muted{color:#666}.refused{color:#a00}.complied{color:#070}
details{margin:.3em 0}pre{white-space:pre-wrap;background:#fafafa;padding:.4em}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}figcaption{font-size:.85em;color:#555;max-width:40em}
figure svg{max-width:100%;height:auto}.summary{background:#f7f7fb;padding:.5em .8em;border-left:3px solid #88a}
"""

#: Bidirectional-control characters shown as visible markers instead of being obeyed.
BIDI = {c: f"⟨U+{c:04X}⟩" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}


def esc(text: Any) -> str:
    """HTML-escape ``text`` (quotes included) and make bidi controls visible.

    >>> esc('<b onclick="x">\\u202eabc</b>')
    '&lt;b onclick=&quot;x&quot;&gt;⟨U+202E⟩abc&lt;/b&gt;'
    """
    return html.escape(str(text), quote=True).translate(BIDI)


def page(title: str, body: str, *, scripts: bool = False) -> str:
    """A complete HTML document around ``body``; inline scripts only when ``scripts`` (the attention views)."""
    script = "script-src 'unsafe-inline'; " if scripts else ""
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; {script}"
            "style-src 'unsafe-inline'; img-src data:\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>")


def table(caption: str, header: Sequence[str], rows: Iterable[str]) -> str:
    """A ``<table>``: ``caption`` (markup, its untrusted parts already through :func:`esc`; none when empty), one
    header cell per ``header`` text (escaped here; no header row when empty) and the body ``rows`` (``<tr>``
    markup built with :func:`esc`).

    >>> table("n = 2", ["lang", "<i>"], ["<tr><td>en</td><td>2</td></tr>"])
    '<table><caption>n = 2</caption><tr><th>lang</th><th>&lt;i&gt;</th></tr><tr><td>en</td><td>2</td></tr></table>'
    """
    head = f"<tr>{''.join(f'<th>{esc(h)}</th>' for h in header)}</tr>" if header else ""
    return f"<table>{f'<caption>{caption}</caption>' if caption else ''}{head}{''.join(rows)}</table>"
