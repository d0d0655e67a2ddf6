"""The report's harm-vs-refusal section (issue 18, item 1): does a translation fail to recognise harm, or fail to
refuse? Shared by the study's page and the ``harm`` command's page."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from refusal_circuits import viz
from refusal_circuits.crosslingual.harm import harm_table
from refusal_circuits.markup import esc, table
from refusal_circuits.report.figures import Figures


def _heads_table(obj: Mapping[str, Any]) -> str:
    """Per language and direction: the agreement of its head contrasts with the base language's and its top heads."""
    rows = []
    for lang, rec in obj["langs"].items():
        for target, h in rec.get("heads", {}).items():
            agree = h["agreement_with_base"]
            a = ("–" if agree.get("value") is None or agree.get("ci_low") is None else
                 f"{agree['value']:.2f} [{agree['ci_low']:.2f}, {agree['ci_high']:.2f}]")
            top = ", ".join(f"{t['head']} {t['mean']:+.2f} [{t['ci_low']:+.2f}, {t['ci_high']:+.2f}]"
                            for t in h["top"][:4])
            rows.append(f"<tr><td>{esc(lang)}</td><td>{esc(target)}</td><td>{a}</td><td>{esc(top)}</td></tr>")
    if not rows:
        return ""
    return table("Per-head direct write onto each direction at its site, harmful minus harmless (test prompts), "
                 "heads below the site's layer; agreement: Spearman with the base language's contrasts.",
                 ["lang", "direction", "agreement with base", "largest heads"], rows)


def harm_section(obj: Mapping[str, Any] | None, figs: Figures, why: str | None = None) -> str:
    """The section from a :meth:`~refusal_circuits.crosslingual.harm.HarmRefusal.to_json` (empty without one)."""
    if not obj:
        return f"<h2>Recognise harm or refuse? (Zhao et al.)</h2><p class='muted'>{esc(why)}</p>" if why else ""
    base = obj["base"]
    sentences = "".join(f"<li>{esc(rec['sentence'])}</li>" for rec in obj["langs"].values())
    fig = figs.add("harm_vs_refusal", viz.harm_vs_refusal(obj["langs"], base=base),
                   f"Harm retention against refusal retention per language, 95% bootstrap intervals over the test prompts. 1 on both axes "
                   f"is {base}; a language under the diagonal recognises harm (separates harmful from harmless prompts "
                   f"along {base}'s harm direction at the last instruction token) more than it turns it into refusal "
                   f"(separation along r̂ at the post-instruction site).")
    return ("<h2>Recognise harm or refuse? (Zhao et al.)</h2>"
            f"<p>Harm is read at the instruction's last token (layer {obj['harm_layer']}), refusal at r̂'s site "
            f"(layer {obj['refusal_layer']}, position {obj['refusal_position']}); directions from the train split, "
            f"everything measured on held-out test prompts. A retention is a language's harmful-minus-harmless gap "
            f"on {esc(base)}'s direction divided by {esc(base)}'s: 'as base' when its interval reaches 1 and stays "
            f"above {obj['kept_from']}, 'weaker' when it lies between 0 and 1, 'absent' when it includes 0.</p>"
            f"<ul>{sentences}</ul>{fig}{harm_table(obj)}{_heads_table(obj)}")
