"""Patching the heads where a translation loses most, chosen on one half of the pairs and measured on the other.

:func:`~refusal_circuits.crosslingual.paired.patch_top_heads` chooses the heads on the same pairs it measures, so
the fraction of the gap it closes is optimistic (the choice fits those pairs' noise). :func:`crossfit_patch_top_heads`
cuts the harmful pairs into two halves stratified by harm category (:func:`~refusal_circuits.sampling.stratified_halves`,
seeded), chooses the ``k`` most negative heads on half A and measures patching them on half B, and the other way
round; it reports both folds and their mean, each with a percentile-bootstrap interval (measured pairs resampled,
each fold independently). Every pair is measured exactly once, by heads chosen without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from refusal_circuits.attribution import Attribution
from refusal_circuits.chat import chat_format
from refusal_circuits.crosslingual.paired import attributed_instruction, pair_rows
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction
from refusal_circuits.io import nullable
from refusal_circuits.models import HookedModel
from refusal_circuits.patching import head_patch_hooks, prompt_run
from refusal_circuits.sampling import stratified_halves
from refusal_circuits.stats import percentile_interval

#: Why a language has no cross-fitted patch.
TOO_FEW_PAIRS = "fewer than 2 harmful pairs: no two halves to choose on one and measure on the other"


def losing_of(mean: Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` heads of ``mean`` (``[layer, head]`` paired differences) most negative, negative ones only."""
    flat = mean.flatten()
    n_heads = int(mean.shape[1])
    return [divmod(int(i), n_heads) for i in torch.argsort(flat)[:k].tolist() if float(flat[i]) < 0]


def _fraction(base: Tensor, other: Tensor, patched: Tensor) -> float:
    gap = float(base.mean() - other.mean())
    return float(patched.mean() - other.mean()) / gap if abs(gap) > 1e-9 else math.nan


@dataclass(frozen=True)
class CrossFitFold:
    """One fold: heads chosen on the pairs ``chosen_on`` (ids), patched and measured on ``measured_on``; per
    measured pair the r̂ projection at r̂'s site and the refusal score of the base run, the translation and the
    patched translation."""

    heads: list[tuple[int, int]]
    chosen_on: list[str]
    measured_on: list[str]
    runs: dict[str, Tensor]  # base/other/patched _projection and _score, each [measured pair]

    @property
    def fraction(self) -> float:
        return _fraction(self.runs["base_projection"], self.runs["other_projection"], self.runs["patched_projection"])

    @property
    def score_fraction(self) -> float:
        return _fraction(self.runs["base_score"], self.runs["other_score"], self.runs["patched_score"])

    def boot(self, key: str, idx: Tensor) -> Tensor:
        """The fraction (``key``: ``projection`` or ``score``) on each bootstrap resample ``idx`` ``[n_boot, n]``."""
        b, o, p = (self.runs[f"{w}_{key}"][idx].mean(1) for w in ("base", "other", "patched"))
        gap = b - o
        return torch.where(gap.abs() > 1e-9, (p - o) / gap.where(gap.abs() > 1e-9, torch.ones_like(gap)),
                           torch.full_like(gap, math.nan))


@dataclass(frozen=True)
class CrossFitPatch:
    """Both folds of a cross-fitted patch and their mean fractions of the gap closed, with intervals.

    ``stats`` holds ``fraction`` (mean of the folds' fractions in the r̂ projection), ``score_fraction`` (in the
    refusal score), each fold's (``fold_a_fraction``...), and ``_ci_low`` / ``_ci_high`` of each; NaN where a
    fold's gap is 0 (reason in ``why``)."""

    folds: tuple[CrossFitFold, CrossFitFold]
    stats: dict[str, float]
    halves: str
    why: dict[str, str] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.stats["fraction"]

    @property
    def score_fraction(self) -> float:
        return self.stats["score_fraction"]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"halves": self.halves, "method": (
            "heads chosen on one stratified half of the harmful pairs, patched and measured on the other, both "
            "ways; percentile bootstrap over the measured pairs, each fold independently")}
        for key, value in self.stats.items():
            out.update(nullable(key, value, self.why.get(key.removesuffix("_ci_low").removesuffix("_ci_high"))
                                or "not defined on any bootstrap resample"))
        out["folds"] = [{"heads": [list(h) for h in f.heads], "chosen_on": f.chosen_on, "measured_on": f.measured_on,
                         **{k: float(v.mean()) for k, v in f.runs.items()}} for f in self.folds]
        return out


def crossfit_stats(folds: tuple[CrossFitFold, CrossFitFold], *, n_boot: int = 2000, seed: int = 0,
                   ci: float = 0.95) -> tuple[dict[str, float], dict[str, str]]:
    """Each fold's fractions, their mean, and percentile-bootstrap intervals (folds resampled independently)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    why: dict[str, str] = {}
    for key, name in (("projection", "fraction"), ("score", "score_fraction")):
        boots = [f.boot(key, torch.randint(0, len(f.measured_on), (n_boot, len(f.measured_on)), generator=g))
                 for f in folds]
        values = [getattr(f, name) for f in folds]
        for tag, value, bt in (("fold_a_", values[0], boots[0]), ("fold_b_", values[1], boots[1]),
                               ("", (values[0] + values[1]) / 2, (boots[0] + boots[1]) / 2)):
            lo, hi = percentile_interval(bt, ci)
            out |= {f"{tag}{name}": value, f"{tag}{name}_ci_low": lo, f"{tag}{name}_ci_high": hi}
            if not math.isfinite(value):
                why[f"{tag}{name}"] = (f"no gap in the {'r̂ projection' if key == 'projection' else 'refusal score'} "
                                       "between the base language and the translation on a measured half")
    return out, why


def crossfit_patch_top_heads(model: HookedModel, direction: Direction, attribution: Attribution, prompts: PromptSet,
                             base: str, langs: Sequence[str], k: int, refusal_tokens: Sequence[int], *,
                             positions: str | int = "post", seed: int = 0, n_boot: int = 2000, batch_size: int = 32,
                             progress: bool = True) -> tuple[dict[str, CrossFitPatch], dict[str, str]]:
    """Per language, the ``k`` heads that lose most chosen on each half of the harmful pairs and patched from the
    ``base`` run into the translations of the other half. Returns ``({lang: CrossFitPatch}, {lang: why})`` for the
    languages with fewer than 2 pairs. ``prompts`` must hold every attributed (id, language, label)."""
    text = attributed_instruction(attribution, prompts)
    by_key = {(r.id, r.lang, r.label): r for r in prompts}

    scores = attribution.head_scores(positions).double()
    plans: dict[str, list[tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]]] = {}
    skipped: dict[str, str] = {}
    stratified: dict[str, bool] = {}
    for lang in langs:
        rows = pair_rows(attribution, base, lang)
        if len(rows) < 2:
            skipped[lang] = TOO_FEW_PAIRS
            continue
        cats = {attribution.ids[i]: (by_key.get((attribution.ids[i], base, "harmful")) or _NO).category
                for i, _ in rows}
        stratified[lang] = any(c is not None for c in cats.values())
        first, _ = stratified_halves(cats, seed=seed)
        half_a = [p for p in rows if attribution.ids[p[0]] in first]
        half_b = [p for p in rows if attribution.ids[p[0]] not in first]
        folds = []
        for choose, measure in ((half_a, half_b), (half_b, half_a)):
            mean = (scores[[j for _, j in choose]] - scores[[i for i, _ in choose]]).mean(0)
            folds.append((losing_of(mean, k), choose, measure))
        plans[lang] = folds
    if not plans:
        return {}, skipped
    base_rows = sorted({i for folds in plans.values() for _, _, rows in folds for i, _ in rows})
    where = {row: n for n, row in enumerate(base_rows)}
    base_run = prompt_run(model, direction, [text(i, base) for i in base_rows], refusal_tokens,
                          z_layers=sorted({a for folds in plans.values() for heads, _, _ in folds for a, _ in heads}),
                          batch_size=batch_size)
    n_post, d_head = chat_format(model.tokenizer).n_post, int(model.cfg.d_head)
    out: dict[str, CrossFitPatch] = {}
    for lang in tqdm(list(plans), desc="cross-fitted patch from " + base, disable=not progress, leave=False):
        done = []
        for heads, choose, measure in plans[lang]:
            src = base_run.take([where[i] for i, _ in measure])
            other_texts = [text(j, lang) for _, j in measure]
            clean = prompt_run(model, direction, other_texts, refusal_tokens, batch_size=batch_size)

            def from_base(idx: list[int], src: Any = src, heads: list[tuple[int, int]] = heads) -> Any:
                return head_patch_hooks(model, {(a, h): src.z[a][idx][:, :, h * d_head:(h + 1) * d_head]
                                                for a, h in heads}, last=n_post)

            patched = (prompt_run(model, direction, other_texts, refusal_tokens, patch_for=from_base,
                                  batch_size=batch_size) if heads else clean)
            done.append(CrossFitFold(list(heads), [attribution.ids[i] for i, _ in choose],
                                     [attribution.ids[i] for i, _ in measure],
                                     {"base_projection": src.projections, "other_projection": clean.projections,
                                      "patched_projection": patched.projections, "base_score": src.scores,
                                      "other_score": clean.scores, "patched_score": patched.scores}))
        pair = (done[0], done[1])
        stats, why = crossfit_stats(pair, n_boot=n_boot, seed=seed)
        for n, f in zip("ab", pair, strict=True):
            if not f.heads:
                why[f"fold_{n}_heads"] = "no head loses on the choosing half: nothing patched"
        out[lang] = CrossFitPatch(pair, stats, "stratified by harm category" if stratified[lang]
                                  else "seeded random (no categories)", why)
    return out, skipped


class _NoRecord:
    category: str | None = None


_NO = _NoRecord()


def crossfit_json(patches: Mapping[str, CrossFitPatch]) -> dict[str, Any]:
    """``{lang: CrossFitPatch.to_json()}``."""
    return {lang: p.to_json() for lang, p in patches.items()}
