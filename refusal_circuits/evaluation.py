"""Refusal rates per language and label: greedy completions (under any hooks) judged, with first-token scores.

Generation itself lives in :mod:`refusal_circuits.generation`; :func:`generate` and :func:`generate_ids` are
importable from here as they always were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from refusal_circuits.backends import Generator
from refusal_circuits.data import LABELS, PromptSet
from refusal_circuits.errors import InputError
from refusal_circuits.generation import generate as generate
from refusal_circuits.generation import generate_ids as generate_ids
from refusal_circuits.judges import Judge, JudgeComparison, PhraseJudge, compare_judges
from refusal_circuits.markup import esc
from refusal_circuits.models import HookedModel, model_id
from refusal_circuits.response_language import LanguageConfusion, detect, language_confusion
from refusal_circuits.scores import (
    RefusalTokens,
    completion_cross_entropy,
    first_token_logits,
    kl_divergence,
    refusal_score,
)
from refusal_circuits.stats import Rate
from refusal_circuits.stats import wilson_interval as wilson_interval  # re-exported: its former home


class GroupRate(Rate):
    """The former name of :class:`~refusal_circuits.stats.Rate` for a (language, label) group of the evaluation,
    with its former argument order ``(n, refused, refusal_score)``; new code builds a ``Rate(k, n, ...)``."""

    def __init__(self, n: int, refused: int, refusal_score: float | None = None) -> None:
        super().__init__(refused, n, refusal_score)


@dataclass(frozen=True)
class Completion:
    id: str
    lang: str
    label: str
    completion: str
    refused: bool
    first_token: int | None = None  # the greedy first token's id (None from a generator backend)
    response_lang: str | None = None  # the completion's language (refusal_circuits.response_language), None: unknown


@dataclass(frozen=True)
class RefusalEvaluation:
    """Refusal rates per language × label, with every completion and its provenance."""

    model: str
    intervention: str
    judge: str
    results: dict[str, dict[str, Rate]]
    completions: tuple[Completion, ...] = field(repr=False)
    prompts_sha256: str = ""
    max_new_tokens: int = 0
    #: the second judge's verdicts on a stratified sample, compared with the first per language (or None)
    second_judge: JudgeComparison | None = None

    @property
    def response_language(self) -> LanguageConfusion:
        """Per prompt language: which language the answers were in, and how many refusals were in English."""
        return language_confusion([c.lang for c in self.completions], [c.completion for c in self.completions],
                                  [c.refused for c in self.completions],
                                  detected=[c.response_lang for c in self.completions])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "intervention": self.intervention,
            "judge": self.judge,
            "prompts_sha256": self.prompts_sha256,
            "max_new_tokens": self.max_new_tokens,
            "results": {lang: {lab: g.to_dict() for lab, g in groups.items()} for lang, groups in self.results.items()},
            "response_language": self.response_language.to_json(),
            **({"second_judge": self.second_judge.to_json()} if self.second_judge is not None else {}),
            "completions": [c.__dict__ for c in self.completions],
        }

    def rate(self, lang: str, label: str) -> float:
        return self.results[lang][label].refusal_rate

    def _repr_html_(self) -> str:
        rows = []
        for lang, groups in self.results.items():
            cells = []
            for lab in LABELS:
                g = groups.get(lab)
                if g is None:
                    cells.append("<td>–</td>")
                    continue
                lo, hi = g.ci
                cells.append(f"<td>{g.refusal_rate:.0%} <small>[{lo:.0%}, {hi:.0%}] n={g.n}</small></td>")
            rows.append(f"<tr><td>{esc(lang)}</td>{''.join(cells)}</tr>")
        return (f"<b>Refusal rates</b> · {esc(self.model)} · intervention: {esc(self.intervention)}"
                f" · judge: {esc(self.judge)}<table><tr><th>lang</th><th>harmful</th><th>harmless</th></tr>"
                f"{''.join(rows)}</table>")


def evaluate_refusal(
    model: HookedModel | None,
    prompts: PromptSet,
    *,
    judge: Judge | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    intervention: str = "none",
    refusal_tokens: RefusalTokens | None = None,
    generator: Generator | None = None,
    second_judge: Judge | None = None,
    second_judge_sample: int | None = None,
    progress: bool = True,
) -> RefusalEvaluation:
    """Generate greedily for every prompt and judge refusal; rates per (language, label).

    Hooks already registered on the model (an intervention's context manager) apply; ``intervention`` only
    names them in the record. With ``refusal_tokens`` each group also gets its mean first-token refusal score
    (log-odds, see :mod:`refusal_circuits.scores`). ``generator`` replaces the model's own generation (e.g. a
    :class:`~refusal_circuits.backends.VLLMGenerator` serving an orthogonalized export); hooks do not reach it,
    and ``model`` may then be None unless ``refusal_tokens`` ask for first-token scores.

    Every completion's language is detected (:mod:`refusal_circuits.response_language`). With ``second_judge``
    (an independent judge, e.g. :class:`~refusal_circuits.llm_judge.LLMJudge`), it judges at most
    ``second_judge_sample`` completions of every (language, label), a stratified seeded sample (all when None), and
    the record compares both judges per language (:func:`~refusal_circuits.judges.compare_judges`).
    """
    judge = judge or PhraseJudge()
    records = list(prompts)
    if generator is not None:
        texts: list[str] = list(generator([r.instruction for r in records], max_new_tokens=max_new_tokens))
        if len(texts) != len(records):
            raise ValueError(f"generator {generator.name!r} returned {len(texts)} completions for {len(records)} prompts")
    first: list[torch.Tensor | None] = []
    ids: list[list[int]] = []
    if generator is None:
        ids = generate_ids(_required(model, "generation"), [r.instruction for r in records], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress, desc=f"generate ({intervention})",
                           first_logits=first if refusal_tokens is not None else None)
        texts = [_required(model, "generation").tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    verdicts = judge.judge(texts, [r.lang for r in records])
    found = detect(texts, {r.lang for r in records})
    comparison = None
    if second_judge is not None:
        chosen = prompts.sample(second_judge_sample, seed=0) if second_judge_sample else prompts
        keep = {(r.lang, r.id, r.label) for r in chosen}
        idx = [i for i, r in enumerate(records) if (r.lang, r.id, r.label) in keep]
        langs = [records[i].lang for i in idx]
        second = second_judge.judge([texts[i] for i in idx], langs)
        comparison = compare_judges(langs, [verdicts[i] for i in idx], second, names=(judge.name, second_judge.name))
    scores: list[float] = []
    if refusal_tokens is not None:
        if first and all(x is not None for x in first):
            logits = torch.stack([x for x in first if x is not None])  # generation's own first step
        else:
            logits = first_token_logits(_required(model, "refusal scores"), [r.instruction for r in records],
                                        batch_size=batch_size)
        scores = [float(refusal_score(logits[i : i + 1], refusal_tokens.for_lang(r.lang))[0])
                  for i, r in enumerate(records)]
    counts: dict[str, dict[str, list[float]]] = {}
    completions = []
    for i, (r, text, refused) in enumerate(zip(records, texts, verdicts, strict=True)):
        c = counts.setdefault(r.lang, {}).setdefault(r.label, [0, 0, 0.0])
        c[0] += 1
        c[1] += int(refused)
        c[2] += scores[i] if scores else 0.0
        completions.append(Completion(r.id, r.lang, r.label, text, bool(refused),
                                      int(ids[i][0]) if ids and ids[i] else None, found[i]))
    results = {lang: {lab: Rate(int(k), int(n), sc / n if scores else None)
                      for lab, (n, k, sc) in groups.items()} for lang, groups in counts.items()}
    name = model_id(model) if model is not None else str(getattr(generator, "model", "unknown"))
    return RefusalEvaluation(name, intervention, judge.name, results, tuple(completions),
                             prompts.sha256, max_new_tokens, comparison)


def _required(model: HookedModel | None, what: str) -> HookedModel:
    if model is None:
        raise InputError(f"evaluate_refusal needs a model for {what} (only a generator was given)")
    return model


@torch.inference_mode()
def capability_cost(model: HookedModel, instructions: Sequence[str],
                    intervention: Callable[[], AbstractContextManager[Any]], *, max_new_tokens: int = 32,
                    batch_size: int = 32, progress: bool = True) -> dict[str, float]:
    """What an intervention costs on harmless prompts: next-token KL and completion cross-entropy.

    ``intervention`` makes a fresh context manager each call (e.g. ``lambda: ablate(model, r)``). The
    cross-entropy is teacher-forced on the *unintervened* model's own greedy completions, with and without the
    intervention, so both numbers score the same tokens.
    """
    base_logits = first_token_logits(model, instructions, batch_size=batch_size)
    completions = generate_ids(model, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=progress, desc="generate (capability baseline)")
    ce_base = completion_cross_entropy(model, instructions, completions, batch_size=batch_size)
    with intervention():
        new_logits = first_token_logits(model, instructions, batch_size=batch_size)
        ce_new = completion_cross_entropy(model, instructions, completions, batch_size=batch_size)
    return {"kl_harmless": float(kl_divergence(base_logits, new_logits).mean()),
            "ce_harmless_base": ce_base, "ce_harmless_intervened": ce_new, "n_harmless": len(instructions)}


def evaluate_with_scores(model: HookedModel, prompts: PromptSet, refusal_tokens: RefusalTokens | None, *,
                         intervention: Callable[[], AbstractContextManager[Any]] | None = None,
                         intervention_name: str = "none", judge: Judge | None = None, max_new_tokens: int = 32,
                         batch_size: int = 32, second_judge: Judge | None = None,
                         second_judge_sample: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The ``evaluate`` command's JSON: refusal rates and scores per language x label under an intervention,
    every completion, and (under an intervention) its capability cost on the harmless prompts. Without refusal
    tokens (None, or none discovered) the refusal scores are left out and the rates still come from the judge."""
    make = intervention or contextlib.nullcontext
    tokens = refusal_tokens if refusal_tokens is not None and refusal_tokens.ids else None
    with make():
        ev = evaluate_refusal(model, prompts, judge=judge, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              intervention=intervention_name, refusal_tokens=tokens, second_judge=second_judge,
                              second_judge_sample=second_judge_sample, progress=progress)
    out = ev.to_dict()
    out["refusal_tokens"] = tokens.to_json() if tokens is not None else None
    harmless = prompts.filter(label="harmless").instructions
    if intervention is not None and harmless:
        out["capability"] = capability_cost(model, harmless, make, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size, progress=progress)
    return out
