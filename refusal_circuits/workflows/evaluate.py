"""Refusal with and without a direction: ``evaluate``'s measurement and the study's ``evaluate`` stage.

Both generate greedily and judge with the refusal-phrase judge. ``evaluate`` applies one intervention to every
prompt it is given and adds the capability cost; the study measures the baseline on every language and the two
interventions on the base language only (ablation in the other languages is the ``languages`` stage's transfer
matrix, measured with the first-token judge: generation is the study's largest cost).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from refusal_circuits import interventions
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction
from refusal_circuits.evaluation import RefusalEvaluation, evaluate_refusal, evaluate_with_scores
from refusal_circuits.hooks import HookHandle
from refusal_circuits.io import nullable
from refusal_circuits.models import HookedModel
from refusal_circuits.scores import RefusalTokens
from refusal_circuits.workflows import judging

INTERVENTIONS = ("none", "ablate", "actadd")


def intervention_for(model: HookedModel, direction: Direction | None, name: str, *, layer: int | None = None,
                     alpha: float | None = None) -> Callable[[], HookHandle] | None:
    """A factory of ``name``'s hooks (``ablate`` or ``actadd`` of ``direction``), or None for ``none``."""
    if name == "none" or direction is None:
        return None
    chosen = direction
    if name == "ablate":
        return lambda: interventions.ablate(model, chosen)
    if name == "actadd":
        return lambda: interventions.actadd(model, chosen, layer=layer, alpha=alpha)
    raise ValueError(f"unknown intervention {name!r}; use one of {', '.join(INTERVENTIONS)}")


def evaluate_under(model: HookedModel, prompts: PromptSet, tokens: RefusalTokens | None, *,
                   direction: Direction | None = None, intervention: str = "none", layer: int | None = None,
                   alpha: float | None = None, max_new_tokens: int = 32, batch_size: int = 32,
                   second_judge: str | None = None, second_judge_sample: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """``evaluate``'s JSON (without the provenance the command adds): refusal rates and scores per language and
    label under ``intervention``, every completion, the activation-addition site, and under an intervention its
    capability cost on the harmless prompts (null, with the reason, when there are none), and with
    ``second_judge`` (:func:`~refusal_circuits.workflows.judging.second_judge`) the two judges' agreement per
    language on at most ``second_judge_sample`` completions per language and label."""
    make = intervention_for(model, direction, intervention, layer=layer, alpha=alpha)
    judge2, why = judging.second_judge(second_judge)
    result = evaluate_with_scores(model, prompts, tokens, intervention=make, intervention_name=intervention,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, second_judge=judge2,
                                  second_judge_sample=second_judge_sample, progress=progress)
    if judge2 is None:
        result.update(nullable("second_judge", None, why))
    if direction is not None and intervention == "actadd":
        result["actadd"] = {"layer": layer if layer is not None else direction.layer,
                            "alpha": alpha if alpha is not None else interventions.default_alpha(direction),
                            "norm": direction.norm}
    if make is not None and "capability" not in result:
        result.update(nullable("capability", None, "no harmless prompts to measure it on"))
    return result


@dataclass(frozen=True)
class StudyRefusal:
    """The study's refusal measurements: baseline on every language, r̂ ablated on the base language's harmful
    prompts, r̂ added (at ``layer``, coefficient ``alpha``) on its harmless ones."""

    baseline: RefusalEvaluation
    ablated: RefusalEvaluation
    added: RefusalEvaluation
    alpha: float
    layer: int
    second_judge_why: str | None = None


def study_refusal(model: HookedModel, direction: Direction, test: PromptSet, base: str, tokens: RefusalTokens, *,
                  max_new_tokens: int, batch_size: int = 32, second_judge: str | None = None,
                  second_judge_sample: int | None = None, progress: bool = True) -> StudyRefusal:
    """Generation + phrase judge on ``test``: see :class:`StudyRefusal`. The second judge (if any) checks the
    baseline, on at most ``second_judge_sample`` completions per language and label; ``second_judge_why`` says why
    there is none."""
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "progress": progress,
                          "refusal_tokens": tokens}
    judge2, why = judging.second_judge(second_judge)
    baseline = evaluate_refusal(model, test, intervention="none", second_judge=judge2,
                                second_judge_sample=second_judge_sample, **kw)
    with interventions.ablate(model, direction):
        ablated = evaluate_refusal(model, test.filter(lang=base, label="harmful"), intervention="ablate", **kw)
    with interventions.actadd(model, direction):
        added = evaluate_refusal(model, test.filter(lang=base, label="harmless"), intervention="actadd", **kw)
    return StudyRefusal(baseline, ablated, added, interventions.default_alpha(direction), direction.layer, why)
