"""The report's paired-total-effects section (issue 18, item 2 in the paired comparison): which heads and MLPs,
patched from the base language into each translation, would recover its refusal? Shared by the study's page and
the ``compare --totals`` record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from refusal_circuits import viz
from refusal_circuits.crosslingual.totals import totals_table
from refusal_circuits.markup import esc
from refusal_circuits.report.figures import Figures


def totals_section(obj: Mapping[str, Any] | None, figs: Figures) -> str:
    """The section from a :meth:`~refusal_circuits.crosslingual.totals.PairedTotals.to_json` (empty without one)."""
    if not obj or not obj.get("langs"):
        return ""
    base = obj["base"]
    sentences = "".join(f"<li>{esc(rec['sentence'])}</li>" for rec in obj["langs"].values())
    fig = figs.add("paired_totals", viz.paired_totals(obj),
                   f"Per language, the estimated change of r̂'s projection when a node's output at every "
                   f"post-instruction token is set to its value on the {base} original (attribution patching, harmful "
                   f"pairs), for every language's three largest, beside the whole gap ({base} − translation); 95% "
                   f"bootstrap intervals over pairs.")
    return ("<h3>Total effects, paired (attribution patching)</h3>"
            f"<p>The direct writes above say which heads write less r̂ in a translation; a head can also lose it "
            f"through what it feeds. Here every head and MLP of the translation is patched, to first order, with its "
            f"output on the {esc(base)} original (the same template tokens), and the change of r̂'s projection is "
            f"tested over pairs (Benjamini-Hochberg q &lt; {obj['alpha']}), with harmless pairs as the control. "
            f"Each language's estimates are checked against exact patching of its largest and random nodes "
            f"(last columns): read them within that error.</p><ul>{sentences}</ul>{fig}{totals_table(obj)}")
