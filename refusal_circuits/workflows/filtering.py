"""Refusal-based filtering of the prompts a direction is extracted and selected on (Arditi et al., PolyRefuse).

A difference in means over harmful prompts the model answers anyway, and harmless ones it refuses, mixes the
refusal it is meant to isolate with its absence. Arditi et al. set such prompts aside before extraction and
selection. Two rules are offered, and every direction records how many prompts each label kept:

* ``score``: Arditi's. A harmful prompt is kept when its first-token refusal log-odds
  (:func:`~refusal_circuits.scores.refusal_score`, the language's own refusal tokens) is above 0, a harmless one
  when it is below 0. On a weakly aligned small model it keeps few: run with its own data on the packaged 0.5B,
  Arditi's code keeps 19 of 128 harmful train prompts and 3 of 32 val prompts (issue 17).
* ``verdict``: the generated verdict. A short greedy generation (:data:`VERDICT_TOKENS` tokens) judged by the
  phrase judge: harmful prompts kept when refused, harmless ones when answered.

``none`` (the default until the measurement on the packaged models chooses otherwise) keeps every prompt. A rule
that leaves fewer than :data:`MIN_KEPT` prompts of a label in a split is refused with the counts, never applied
silently to a handful of prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refusal_circuits.data import LABELS, PromptSet
from refusal_circuits.errors import InputError
from refusal_circuits.generation import generate
from refusal_circuits.judges import PhraseJudge
from refusal_circuits.models import HookedModel
from refusal_circuits.scores import RefusalTokens, first_token_logits, refusal_score

RULES = ("none", "score", "verdict")
#: Tokens generated for the ``verdict`` rule (enough for the phrase judge to see the opening).
VERDICT_TOKENS = 16
#: The fewest prompts of a label a split may keep.
MIN_KEPT = 2


@dataclass(frozen=True)
class FilterRecord:
    """How many prompts of each split and label a rule kept (``kept`` of ``n``)."""

    rule: str
    counts: dict[str, dict[str, tuple[int, int]]]

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, **{split: {label: {"kept": k, "n": n} for label, (k, n) in groups.items()}
                                      for split, groups in self.counts.items()}}


def _refuses(model: HookedModel, prompts: PromptSet, rule: str, tokens: RefusalTokens, batch_size: int,
             progress: bool) -> list[bool]:
    if rule == "score":
        logits = first_token_logits(model, prompts.instructions, batch_size=batch_size)
        return [bool(refusal_score(logits[i : i + 1], tokens.for_lang(r.lang))[0] > 0) for i, r in enumerate(prompts)]
    texts = generate(model, prompts.instructions, max_new_tokens=VERDICT_TOKENS, batch_size=batch_size,
                     progress=progress, desc="refusal filter")
    return PhraseJudge().judge(texts, [r.lang for r in prompts])


def refusal_filter(model: HookedModel, parts: dict[str, PromptSet], rule: str, tokens: RefusalTokens, *,
                   batch_size: int = 32, progress: bool = True) -> tuple[dict[str, PromptSet], FilterRecord]:
    """``parts`` (``{"train": ..., "val": ...}``) with the prompts ``rule`` sets aside removed, and the counts."""
    if rule not in RULES:
        raise InputError(f"unknown refusal filter {rule!r}; use one of {', '.join(RULES)}")
    counts: dict[str, dict[str, tuple[int, int]]] = {}
    out: dict[str, PromptSet] = {}
    for split, part in parts.items():
        if rule == "none":
            out[split] = part
            counts[split] = {label: (len(part.filter(label=label)),) * 2 for label in LABELS}
            continue
        refused = _refuses(model, part, rule, tokens, batch_size, progress)
        keep = tuple(r for r, x in zip(part, refused, strict=True) if x == (r.label == "harmful"))
        out[split] = PromptSet(keep, part.source)
        counts[split] = {label: (len(out[split].filter(label=label)), len(part.filter(label=label)))
                         for label in LABELS}
        thin = {label: c for label, c in counts[split].items() if c[0] < MIN_KEPT}
        if thin:
            have = ", ".join(f"{k} of {n} {label}" for label, (k, n) in counts[split].items())
            raise InputError(f"the refusal filter {rule!r} keeps {have} {split} prompts: too few to extract and "
                             f"select a direction (use --refusal-filter none, or another rule)")
    return out, FilterRecord(rule, counts)
