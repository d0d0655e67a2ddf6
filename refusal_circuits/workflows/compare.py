"""Each language against the base language, prompt by prompt: ``compare`` and the study's ``compare`` stage.

The paired per-head comparison (:func:`~refusal_circuits.crosslingual.divergence`), how well r̂ separates the labels
per language, baseline refusal, and patching of the heads where a translation loses most of r̂, from the base run.
Baseline rates come from an evaluation (``compare --evaluation``, the study's ``evaluate`` stage) or, without one,
from a greedy generation of :data:`~refusal_circuits.workflows.defaults.COMPARE_BASELINE_NEW_TOKENS` tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from refusal_circuits.attribution import Attribution, source_matrix, top_k_heads
from refusal_circuits.crosslingual import (
    Divergence,
    Separation,
    divergence,
    pair_rows,
    patch_json,
    patch_top_heads,
    separation,
    unpaired_why,
)
from refusal_circuits.crosslingual.controls import value_bias_writes
from refusal_circuits.crosslingual.crossfit import CrossFitPatch, crossfit_patch_top_heads
from refusal_circuits.crosslingual.totals import PairedTotals, paired_totals
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction
from refusal_circuits.errors import InputError
from refusal_circuits.evaluation import RefusalEvaluation, evaluate_refusal
from refusal_circuits.models import HookedModel
from refusal_circuits.stats import Rate
from refusal_circuits.workflows.defaults import ALPHA, COMPARE_BASELINE_NEW_TOKENS
from refusal_circuits.workflows.tokens import direction_token_ids, saved_refusal_tokens

#: (harmful, harmless) baseline refusal per language; a label the evaluation lacks is None.
Baseline = dict[str, tuple[Rate | None, Rate | None]]
#: Heads shown in the attention views of the study's report.
VIEW_HEADS = 4


def baseline_from_results(results: Mapping[str, Mapping[str, Any]]) -> Baseline:
    """Baseline rates from an evaluation's ``results`` JSON (``{lang: {label: {"n", "refusal_rate", ...}}}``).

    Raises KeyError, TypeError or ValueError on a record of another shape (the caller names the file)."""
    def rate(g: Mapping[str, Any] | None) -> Rate | None:
        if g is None:
            return None
        refused = g["refused"] if "refused" in g else round((g["refusal_rate"] or 0.0) * g["n"])
        return Rate(int(refused), int(g["n"]))

    out: Baseline = {}
    for lang, groups in results.items():
        if not {"harmful", "harmless"} & set(groups):
            raise KeyError("harmful or harmless")
        out[lang] = (rate(groups.get("harmful")), rate(groups.get("harmless")))
    return out


def baseline_of(evaluation: RefusalEvaluation) -> Baseline:
    """Baseline rates from an evaluation record."""
    def rate(g: Mapping[str, Rate], label: str) -> Rate | None:
        return Rate(g[label].refused, g[label].n) if label in g else None

    return {lang: (rate(g, "harmful"), rate(g, "harmless")) for lang, g in evaluation.results.items()}


def measured_baseline(model: HookedModel, prompts: PromptSet, *, max_new_tokens: int = COMPARE_BASELINE_NEW_TOKENS,
                      batch_size: int = 32, progress: bool = True) -> Baseline:
    """Baseline rates of ``prompts`` by greedy generation and the phrase judge, without any intervention."""
    return baseline_of(evaluate_refusal(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                        progress=progress))


def attributed_prompts(attribution: Attribution, prompts: PromptSet, langs: Sequence[str], where: str) -> PromptSet:
    """The attributed prompts of ``langs``, in the attribution's row order, from ``prompts`` (all of them there,
    else an :class:`~refusal_circuits.errors.InputError` naming ``where``)."""
    by_key = {(r.id, r.lang, r.label): r for r in prompts}
    rows = [k for k in zip(attribution.ids, attribution.langs, attribution.labels, strict=True) if k[1] in langs]
    missing = [k for k in rows if k not in by_key]
    if missing:
        raise InputError(f"{where}: lacks {len(missing)} attributed prompts, e.g. {missing[0]}")
    return PromptSet(tuple(by_key[k] for k in rows), prompts.source)


def paired_languages(attribution: Attribution, base: str, langs: Sequence[str]) -> list[str]:
    """The languages of ``langs`` with at least one harmful prompt paired (same id) with the base language."""
    return [x for x in langs if unpaired_why(attribution, base, x) is None]


@dataclass(frozen=True)
class Comparison:
    """The paired comparison, the separation per language, the patches per language (``PairPatch``, heads chosen
    on the pairs measured) and the cross-fitted patches (:class:`~refusal_circuits.crosslingual.crossfit.CrossFitPatch`,
    also in :attr:`divergence`)."""

    divergence: Divergence
    separation: Separation
    patches: dict[str, Any] = field(default_factory=dict)
    crossfit: dict[str, CrossFitPatch] = field(default_factory=dict)
    totals: PairedTotals | None = None

    def to_json(self) -> dict[str, Any]:
        """``divergence.json``: the divergence record, with ``separation``, each language's ``patch`` and, where
        measured, the paired total effects (``totals``)."""
        obj = self.divergence.to_json()
        obj["separation"] = self.separation.to_json()
        for lang, pp in self.patches.items():
            obj["languages"][lang]["patch"] = patch_json(pp)
        if self.totals is not None:
            obj["totals"] = self.totals.to_json()
        return obj


def compare_languages(attribution: Attribution, base: str, langs: Sequence[str], *, baseline: Baseline | None,
                      model: HookedModel | None = None, direction: Direction | None = None,
                      prompts: PromptSet | None = None, patch_top_k: int = 0, alpha: float = ALPHA,
                      totals: int = 0, batch_size: int = 32, progress: bool = True) -> Comparison:
    """Compare every language of ``langs`` with ``base`` on ``attribution`` (languages without a pair are kept,
    as skipped, with the reason). With a model, the direction and the attributed ``prompts`` (every attributed
    (id, language, label)), also patch the ``patch_top_k`` heads where each paired language loses most of r̂, when
    the direction has refusal tokens for its language: once with the heads chosen on all pairs, and cross-fitted
    (chosen on one stratified half of the pairs, measured on the other, both ways).

    The controls of the paired comparison (:mod:`~refusal_circuits.crosslingual.controls`) stratify their halves
    by the ``prompts``' harm categories where given, and take the value-bias terms from the model's weights where
    one is given.

    ``totals > 0`` also estimates the total effect of every head and MLP of the base run on each paired
    translation by attribution patching, on the attributed pairs, validated against exact patching of ``totals``
    largest and ``totals`` random nodes per language (:func:`~refusal_circuits.crosslingual.totals.paired_totals`)."""
    patches: dict[str, Any] = {}
    crossfit: dict[str, CrossFitPatch] = {}
    crossfit_why: dict[str, str] = {}
    tokens = direction_token_ids(direction, direction.lang) if direction is not None else []
    paired = paired_languages(attribution, base, langs)
    if model is not None and direction is not None and prompts is not None and paired and patch_top_k and tokens:
        patches = patch_top_heads(model, direction, attribution, prompts, base, paired, patch_top_k, tokens,
                                  alpha=alpha, batch_size=batch_size, progress=progress)
        crossfit, crossfit_why = crossfit_patch_top_heads(model, direction, attribution, prompts, base, paired,
                                                          patch_top_k, tokens, batch_size=batch_size,
                                                          progress=progress)
    categories = ({r.id: r.category for r in prompts if r.lang == base} if prompts is not None else None)
    value_bias, value_bias_why = (value_bias_writes(model, direction) if model is not None and direction is not None
                                  else (None, None))
    result = divergence(attribution, base, list(langs), baseline=baseline, patch=patches, alpha=alpha,
                        categories=categories, value_bias=value_bias, value_bias_why=value_bias_why,
                        crossfit=crossfit, crossfit_why=crossfit_why)
    found = None
    if totals and model is not None and direction is not None and prompts is not None and paired:
        attributed = attributed_prompts(attribution, prompts, [base, *paired], f"prompts {prompts.source}")
        found = paired_totals(model, direction, attributed, paired, base=base,
                              tokens=saved_refusal_tokens(direction, "the direction"), split=None, validate=totals,
                              alpha=alpha, batch_size=batch_size, progress=progress)
    return Comparison(result, separation(attribution), patches, crossfit, found)


def paired_tensors(result: Divergence) -> dict[str, Tensor]:
    """The paired comparison's tensors (``paired.safetensors``): the base language's mean head writes, and every
    compared language's mean, mean paired difference and significance mask. Needs one compared language."""
    first = next(iter(result.languages.values()))
    out = {f"{result.base}.mean": first.paired.base_mean.float().contiguous()}
    for lang, d in result.languages.items():
        out[f"{lang}.mean"] = d.paired.other_mean.float().contiguous()
        out[f"{lang}.diff"] = d.paired.heads["mean"].float().contiguous()
        out[f"{lang}.significant"] = d.paired.heads["significant"].to(torch.uint8).contiguous()
        c = d.paired.controls
        if c is not None:
            out[f"{lang}.did"] = c.did["mean"].float().contiguous()
            out[f"{lang}.did_ci_low"] = c.did["ci_low"].float().contiguous()
            out[f"{lang}.did_ci_high"] = c.did["ci_high"].float().contiguous()
            out[f"{lang}.did_significant"] = c.did["significant"].to(torch.uint8).contiguous()
            if c.value_bias is not None:
                out["value_bias"] = c.value_bias.float().contiguous()
    return out


def attention_views(model: HookedModel, direction: Direction, attribution: Attribution, prompts: PromptSet,
                    base: str, langs: Sequence[str], baseline: Baseline) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The base language's top :data:`VIEW_HEADS` heads (harmful prompts) on its first harmful prompt paired with
    the language of ``langs`` whose harmful prompts it refuses least (by ``baseline``), and on that translation:
    attention patterns and per-source contributions (``views.safetensors``) with their tokens (``views.json``)."""
    heads = top_k_heads(attribution.select(lang=base, label="harmful").head_scores().mean(0), VIEW_HEADS)

    def harmful_rate(lang: str) -> float:
        h = baseline.get(lang, (None, None))[0]
        return h.rate if h is not None and h.n else 1.0

    worst = min(langs, key=harmful_rate)
    i, j = pair_rows(attribution, base, worst)[0]
    by_key = {(r.id, r.lang, r.label): r for r in prompts}
    views: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"heads": [list(h) for h in heads], "prompts": {}}
    for lang, row in ((base, i), (worst, j)):
        rec = by_key[(attribution.ids[row], lang, attribution.labels[row])]
        sm = source_matrix(model, direction, rec.instruction, heads)
        views[f"{lang}.pattern"] = sm.pattern.contiguous()
        views[f"{lang}.contributions"] = sm.contributions.contiguous()
        meta["prompts"][lang] = {"id": rec.id, "row": row, "instruction": rec.instruction, "tokens": sm.tokens,
                                 "spans": sm.spans}
    meta["pair"] = [base, worst]
    return views, meta
