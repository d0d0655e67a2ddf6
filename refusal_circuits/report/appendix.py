"""The report's closing sections, and the report of a single evaluation: every completion, and every statistic
the prompts could not give with its reason."""

from __future__ import annotations

from typing import Any

from refusal_circuits.evaluation import RefusalEvaluation
from refusal_circuits.markup import esc, page
from refusal_circuits.report.results import StudyView
from refusal_circuits.report.text import completions_html, gaps


def completions_section(study: StudyView) -> str:
    """Every completion of the baseline, the r̂-ablated and the activation-addition evaluations, collapsed."""
    return ("<h2>Completions</h2><details><summary>Baseline</summary>"
            + completions_html(study.completions("baseline"))
            + f"</details><details><summary>r̂({esc(study.base)}) ablated</summary>"
            + completions_html(study.completions("ablate"))
            + "</details><details><summary>Activation addition</summary>"
            + completions_html(study.completions("actadd"))
            + "</details>")


def gaps_section(results: dict[str, Any]) -> str:
    """Every statistic that ``results`` holds as null, with the reason beside it (empty when there is none)."""
    found = gaps(results)
    if not found:
        return ""
    return ("<h2>Not computed on these prompts</h2><p>Statistics that the prompts cannot give (the results "
            f"hold them as null with the reason beside them): {len(found)}.</p><details><summary>Each, with "
            "its reason</summary><ul>" + "".join(f"<li><code>{esc(path)}</code>: n/a ({esc(why)})</li>"
                                               for path, why in found) + "</ul></details>")


def baseline_report_html(evaluation: RefusalEvaluation) -> str:
    """A report of one refusal evaluation: rates with 95% Wilson intervals and every completion."""
    parts = [f"<h1>Refusal evaluation: {esc(evaluation.model)}</h1>", "<h2>Refusal rates</h2>",
             evaluation._repr_html_(), "<h2>Completions</h2>", completions_html(evaluation.to_dict()["completions"])]
    return page(f"refusal_circuits: {evaluation.model}", "".join(parts))
