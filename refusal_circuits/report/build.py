"""The study's report page, assembled from its sections in reading order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_circuits.markup import page
from refusal_circuits.report.appendix import completions_section, gaps_section
from refusal_circuits.report.circuits import (
    attribution_section,
    effects_section,
    heads_section,
    projections_section,
    separation_section,
    trajectories_section,
    views_section,
)
from refusal_circuits.report.figures import Figures
from refusal_circuits.report.harm import harm_section
from refusal_circuits.report.languages import (
    cosines_per_layer_section,
    cosines_section,
    pca_section,
    split_half_section,
    transfer_section,
)
from refusal_circuits.report.overview import direction_section, header_section, judging_section, rates_section
from refusal_circuits.report.results import StudyView
from refusal_circuits.report.subspace import subspace_section
from refusal_circuits.report.totals import totals_section

#: Counts the drawn figures once the page has loaded (what the headless-browser test reads).
_COUNT_FIGURES = ("<script>document.body.dataset.figures=String(document.querySelectorAll('figure svg').length);"
                  "</script>")


def build_report(out: Path, results: dict[str, Any]) -> str:
    """The report page of a finished study in ``out`` (stage directories under ``out/stages``); figures are also
    written to ``out/figures``. Returns the HTML."""
    study = StudyView.load(results)
    figs = Figures(out)
    body = [
        header_section(study),
        direction_section(study),
        rates_section(study, figs),
        judging_section(study),
        cosines_section(study, figs),
        split_half_section(study, figs),
        cosines_per_layer_section(study, figs),
        pca_section(study, figs),
        transfer_section(study, figs),
        harm_section(study.results.get("harm"), figs, study.results.get("harm_why")),
        subspace_section(study.results.get("subspace"), figs, study.results.get("subspace_why")),
        attribution_section(study),
        effects_section(study),
        separation_section(study, figs),
        trajectories_section(study, figs),
        projections_section(study, figs),
        heads_section(study, figs),
        totals_section(study.divergence.get("totals"), figs),
        views_section(study),
        completions_section(study),
        gaps_section(results),
        _COUNT_FIGURES,
    ]
    return page(f"refusal_circuits: {study.direction['model']}", "".join(body), scripts=True)
