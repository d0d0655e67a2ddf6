"""The report's subspace section (issue 18, item 3): one refusal direction or a subspace, per language? Shared by the
study's page and the ``subspace`` command's page."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from refusal_circuits import viz
from refusal_circuits.crosslingual.subspace import subspace_table
from refusal_circuits.markup import esc
from refusal_circuits.report.figures import Figures


def subspace_section(obj: Mapping[str, Any] | None, figs: Figures, why: str | None = None) -> str:
    """The section from a :meth:`~refusal_circuits.crosslingual.subspace.RefusalSubspaces.to_json` (empty without)."""
    if not obj:
        return f"<h2>One refusal direction or a subspace? (Wollschläger et al.)</h2><p class='muted'>{esc(why)}</p>" if why else ""
    base = obj["base"]
    sentences = "".join(f"<li>{esc(rec['sentence'])}</li>" for rec in obj["langs"].values())
    fig = figs.add("subspace_carried", viz.subspace_carried(obj["langs"], base=base),
                   f"Share of each language's harmful-minus-harmless refusal-score gap removed by ablating r̂({base}), "
                   f"{base}'s {obj['k']}-dimensional subspace with r̂, the languages' shared subspace with r̂, the "
                   f"language's own direction, r̂ with the language's residual component, and r̂ with one or k − 1 "
                   f"random orthogonal dimensions (the controls); harmful test prompts, the language's own refusal "
                   f"tokens, 95% bootstrap intervals.")
    return ("<h2>One refusal direction or a subspace? (Wollschläger et al.)</h2>"
            f"<p>At r̂'s site (layer {obj['layer']}, position {obj['position']}), each language's "
            f"{obj['k']}-dimensional refusal subspace is the top singular vectors of its category-wise differences "
            f"in means (train split); the ablations are measured on its held-out harmful prompts. 'A subspace' where "
            f"{esc(base)}'s subspace removes more refusal than r̂ alone, or the language's own residual component more "
            f"than a random second dimension, or adding that residual with r̂ ablated induces refusal, each with its "
            f"interval beyond 0.</p><ul>{sentences}</ul>{fig}{subspace_table(obj)}")
