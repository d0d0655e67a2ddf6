"""Offline HTML report: no script or stylesheet leaves the page; every prompt and completion is escaped."""

from __future__ import annotations

import html

from refusal_circuits.evaluation import RefusalEvaluation

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}small{color:#666}.refused{color:#a00}.complied{color:#070}
details{margin:.3em 0}pre{white-space:pre-wrap;background:#fafafa;padding:.4em}
"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>")


def baseline_report_html(evaluation: RefusalEvaluation) -> str:
    """The report of a baseline refusal evaluation: rates with 95% Wilson intervals and every completion."""
    parts = [f"<h1>Refusal study: {html.escape(evaluation.model)}</h1>",
             "<h2>Baseline refusal rates</h2>", evaluation._repr_html_(),
             "<h2>Completions</h2>"]
    for c in evaluation.completions:
        verdict = "refused" if c.refused else "complied"
        parts.append(
            f"<details><summary>{html.escape(c.lang)} · {html.escape(c.label)} · {html.escape(c.id)} · "
            f"<span class='{verdict}'>{verdict}</span></summary><pre>{html.escape(c.completion)}</pre></details>")
    return _page(f"refusal_circuits: {evaluation.model}", "".join(parts))
