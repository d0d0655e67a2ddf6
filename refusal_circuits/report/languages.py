"""The report's cross-lingual sections: per-language directions (cosines, split halves, per layer, PCA) and how
ablating one language's direction transfers to the others."""

from __future__ import annotations

import math
from typing import Any

import torch

from refusal_circuits import viz
from refusal_circuits.crosslingual.transfer import transfer_check_html
from refusal_circuits.markup import esc, table
from refusal_circuits.report.figures import Figures
from refusal_circuits.report.results import StudyView
from refusal_circuits.report.text import missing_text, nan_for_null


def cosines_section(study: StudyView, figs: Figures) -> str:
    """The cosine matrix of the per-language directions at r̂'s site."""
    cos = study.languages["cosines"]
    return "<h2>Directions across languages</h2>" + figs.add(
        "cosines", viz.matrix(cos["at_site"], cos["langs"], cos["langs"], vmin=0.0, vmax=1.0,
                              title=f"cosine of per-language directions (layer {cos['layer']}, "
                                    f"position {cos['position']})", cbar="cosine"),
        "Difference-in-means directions of each language at r̂'s site (train split). The languages' "
        "prompts are translations of each other, and shared content raises these cosines: the "
        "split-half figure below separates it from a shared direction." + missing_text(cos, ("at_site",)))


def _ci_text(halved: dict[str, Any], key: str, lang: str) -> str:
    """``value [low, high]`` of ``halved[key][lang]``, or "n/a (reason)"."""
    value, ci = halved.get(key, {}).get(lang), halved.get(f"{key}_ci", {}).get(lang)
    if value is None:
        why = halved.get(f"{key}_why", {}).get(lang)
        return f"n/a ({esc(why)})" if why else "–"
    if not ci or None in ci:
        why = halved.get(f"{key}_ci_why", {}).get(lang)
        return f"{value:.2f} <small>[n/a{f' ({esc(why)})' if why else ''}]</small>"
    return f"{value:.2f} <small>[{ci[0]:.2f}, {ci[1]:.2f}]</small>"


#: The split-half series: (record key, label in the figure and the table).
_SERIES = (("same_prompt", "same prompts"), ("disjoint", "disjoint prompts"), ("within", "within language"),
           ("corrected", "disjoint, noise-corrected"))


def split_half_section(study: StudyView, figs: Figures) -> str:
    """How much of each cosine is a shared direction rather than shared content: cosines over random stratified
    halves of the train prompts, with intervals and one sentence per language (empty where the study
    has no split halves)."""
    halved, base = study.languages.get("split_half"), study.base
    if not halved:
        return ""
    langs = list(halved["within"])
    others = [x for x in langs if x != base]
    # Older results (before the intervals) have "paired" for the same-prompt cosine and no "same_prompt".
    same = "same_prompt" if "same_prompt" in halved else "paired"
    series = {label: {x: halved[same if key == "same_prompt" else key].get(x)
                      for x in (langs if key == "within" else others)} for key, label in _SERIES}
    fig = viz.grouped_bars(series, ylabel=f"cosine (with {base})", langs=langs, title=(
        f"how much of the cosine is the shared direction (stratified halves of the train prompts, layer "
        f"{halved['layer']}, position {halved['position']})"))
    ax = fig.axes[0]
    ax.axhline(1.0, color="grey", linewidth=0.5, linestyle=":")
    for (key, _), bars in zip(_SERIES, ax.containers, strict=False):  # one bar per language, NaN where missing
        ci = halved.get(f"{key}_ci", {})
        for lang, bar in zip(langs, bars, strict=False):
            lo_hi, y = ci.get(lang), bar.get_height()
            if lo_hi and None not in lo_hi and math.isfinite(y):
                ax.errorbar(bar.get_x() + bar.get_width() / 2, y, yerr=[[max(0.0, y - lo_hi[0])],
                            [max(0.0, lo_hi[1] - y)]], fmt="none", ecolor="black", elinewidth=0.6, capsize=1.5)
    n_splits = halved.get("n_splits")
    how = (f"Means over {n_splits} random splits, each half holding half of every harm category; "
           f"{halved.get('confidence', 0.95):.0%} intervals (delete-one jackknife over prompts, each left out in "
           "every language at once). " if n_splits else "")
    caption = ("Translations share their prompts' content, and a difference in means carries content too. "
               f"Same prompts: cosine of {base} and the language on all (translated) prompts. Disjoint prompts: "
               f"{base} on one half, the language on the other. Within language: the language's own two halves (how "
               "well a half-size direction reproduces itself). Noise-corrected: disjoint / sqrt(within base × "
               "within language); about 1 means the directions are as parallel as their noise lets one see. " + how
               + missing_text(halved, tuple(k for k, _ in _SERIES) + ("paired",)))
    out = figs.add("split_half", fig, caption)
    if any(f"{key}_ci" in halved for key, _ in _SERIES):
        rows = [f"<tr><td>{esc(x)}</td>" + "".join(f"<td>{_ci_text(halved, key, x)}</td>" for key, _ in _SERIES)
                + "</tr>" for x in langs]
        out += table(f"Split-half cosines with {esc(base)} and their {halved.get('confidence', 0.95):.0%} intervals",
                     ["lang", *(label for _, label in _SERIES)], rows)
    summary = halved.get("summary") or {}
    if summary:
        out += "<ul>" + "".join(f"<li>{esc(summary[x])}</li>" for x in langs if x in summary) + "</ul>"
    return out


def cosines_per_layer_section(study: StudyView, figs: Figures) -> str:
    """Each language's cosine with the base language's direction, per layer at r̂'s position."""
    cos, base = study.languages["cosines"], study.base
    per_layer = torch.tensor(nan_for_null(cos["per_layer"]), dtype=torch.float32)
    bi = cos["langs"].index(base)
    curves = {lang: per_layer[:, bi, i].tolist() for i, lang in enumerate(cos["langs"]) if lang != base}
    fig = viz.trajectories(curves, title=f"cosine with the {base} direction per layer", marker_layer=cos["layer"])
    fig.axes[0].set_ylabel(f"cosine with {base}")
    return figs.add("cosines_per_layer", fig, "Per layer, at r̂'s position.")


def pca_section(study: StudyView, figs: Figures) -> str:
    """The languages' mean differences on their first two shared principal components."""
    pca = study.languages["pca"]
    return figs.add("pca", viz.scatter(pca["coords"], pca["langs"], title="shared PCA of the mean differences",
                                       explained=pca["explained_variance_ratio"]),
                    "Each language's harmful-minus-harmless mean at r̂'s site on the first two principal "
                    "components of all languages' means.")


def transfer_section(study: StudyView, figs: Figures) -> str:
    """Harmful refusal per prompt language with each language's direction ablated (the transfer matrix)."""
    transfer, langs = study.transfer, study.langs
    sources = [s for s in transfer["sources"] if transfer["ablate"].get(s)]
    grid = [[transfer["baseline"][t]["harmful"]["rate"] for t in langs]]
    grid += [[transfer["ablate"][s][t]["rate"] if t in transfer["ablate"][s] else math.nan for t in langs]
             for s in sources]
    html = figs.add("transfer", viz.matrix(grid, ["none", *sources], langs, vmin=0.0, vmax=1.0, cmap="viridis",
                                           fmt="{:.0%}", title="harmful refusal with a direction ablated",
                                           cbar="refusal rate", xlabel="prompts in", ylabel="direction from"),
                    "Rows: whose direction is ablated (first row: none); columns: the language of the harmful "
                    "test prompts; first-token judge. Empty cells were not measured (transfer='base'); n/a: no "
                    "prompts.")
    check = transfer.get("check")
    if not check:
        return html + ("<p>The first-token judge of these cells was not checked against generation "
                       "(--transfer-check 0).</p>")
    return html + (f"<p>Is the first token a fair judge of a cell? The same greedy completions ({check['max_new_tokens']} "
                   "new tokens) judged both ways: every baseline test completion, and a stratified sample of "
                   f"{check['per_lang']} prompts per language with {esc(check['source'])}'s direction ablated "
                   "(harmful) or added (harmless). A kappa near 1 says the cell's rate is the phrase judge's rate; "
                   "a low one (or one a single judge's constant verdict leaves undefined, n/a) says to read the "
                   "cell as a first-token rate only.</p>") + transfer_check_html(check)
