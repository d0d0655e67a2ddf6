"""The study's offline HTML report and its ``results.json``, built from the stage directories alone.

The page loads nothing: figures are inline SVG (each also saved under ``figures/`` as SVG for papers), the
attention views carry circuitsvis's JavaScript bundle inline, and a Content-Security-Policy with
``default-src 'none'`` forbids every request. All prompt, completion and token text goes through
:func:`~refusal_circuits.markup.esc` (HTML escaping, plus visible markers for the bidirectional-control characters
that could reorder what a reader sees).

One function per section of the page, in modules by topic: :mod:`~refusal_circuits.report.overview` (header, the
direction, refusal per language), :mod:`~refusal_circuits.report.languages` (directions across languages,
transfer), :mod:`~refusal_circuits.report.circuits` (attribution, separation, trajectories, projections, diverging
heads, attention views) and :mod:`~refusal_circuits.report.appendix` (completions, what was not computed, and the
single-evaluation report). :mod:`~refusal_circuits.report.results` collects ``results.json`` and reads a finished
study; :mod:`~refusal_circuits.report.figures` inlines and saves the figures; :mod:`~refusal_circuits.report.text`
holds the small text helpers; :func:`build_report` (:mod:`~refusal_circuits.report.build`) puts the sections in
order.
"""

from __future__ import annotations

from refusal_circuits.markup import esc, page
from refusal_circuits.report.appendix import baseline_report_html
from refusal_circuits.report.build import build_report
from refusal_circuits.report.results import collect_results

_page = page  # the former private name

__all__ = ["baseline_report_html", "build_report", "collect_results", "esc"]
