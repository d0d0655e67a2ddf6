"""The report's cross-lingual sections: per-language directions (cosines, split halves, per layer, PCA) and how
ablating one language's direction transfers to the others."""

from __future__ import annotations

import math

import torch

from refusal_circuits import viz
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


def split_half_section(study: StudyView, figs: Figures) -> str:
    """How much of each cosine is a shared direction rather than shared content: cosines on halves of the train
    prompts (empty where the study has no split halves)."""
    halved, base = study.languages.get("split_half"), study.base
    if not halved:
        return ""
    others = [x for x in halved["within"] if x != base]
    series = {"same prompts": {x: halved["paired"][x] for x in others},
              "disjoint prompts": {x: halved["disjoint"][x] for x in others},
              "within language": {x: halved["within"][x] for x in halved["within"]},
              "disjoint, noise-corrected": {x: halved["corrected"][x] for x in others}}
    fig = viz.grouped_bars(series, ylabel=f"cosine (with {base})", langs=list(halved["within"]), title=(
        f"how much of the cosine is the shared direction (halves of the train prompts, layer {halved['layer']}, "
        f"position {halved['position']})"))
    fig.axes[0].axhline(1.0, color="grey", linewidth=0.5, linestyle=":")
    return figs.add("split_half", fig,
                    "Translations share their prompts' content, and a difference in means carries content too. "
                    f"Same prompts: cosine of {base} and the language on halves of the same (translated) prompts. "
                    "Disjoint prompts: on different halves. Within language: the language's own two halves (how "
                    "well a half-size direction reproduces itself). Noise-corrected: disjoint / sqrt(within base × "
                    "within language); near 1 means the directions are as parallel as their noise lets one see."
                    + missing_text(halved, ("within", "disjoint", "paired", "corrected")))


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
    return figs.add("transfer", viz.matrix(grid, ["none", *sources], langs, vmin=0.0, vmax=1.0, cmap="viridis",
                                           fmt="{:.0%}", title="harmful refusal with a direction ablated",
                                           cbar="refusal rate", xlabel="prompts in", ylabel="direction from"),
                    "Rows: whose direction is ablated (first row: none); columns: the language of the harmful "
                    "test prompts; first-token judge. Empty cells were not measured (transfer='base'); n/a: no "
                    "prompts.")
