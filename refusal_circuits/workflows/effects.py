"""Attribution and the total effects of the top heads: ``attribute`` and the study's ``attribute`` stage.

Direct attribution says how much each head writes onto r̂; the total effect (activation patching of that head
between harmful and harmless prompts) says how much the refusal score depends on it, through every later layer.
Both commands patch the heads with the largest harmful-minus-harmless direct write in one language (the
direction's, or the study's base language).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from refusal_circuits.attribution import Attribution, attribute, top_k_heads
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction
from refusal_circuits.models import HookedModel
from refusal_circuits.patching import HeadEffects, total_effects
from refusal_circuits.scores import RefusalTokens


@dataclass(frozen=True)
class AttributionRun:
    """An attribution and, where asked for and possible, the total effects of its top heads.

    ``effects_skipped`` says why there are no effects although they were asked for (None otherwise)."""

    attribution: Attribution
    effects: HeadEffects | None = None
    effects_lang: str | None = None
    effects_skipped: str | None = None


def effects_language(direction: Direction, prompts: PromptSet) -> str:
    """The language whose top heads are patched: the direction's, else the first of ``prompts``."""
    return direction.lang if direction.lang in prompts.langs else prompts.langs[0]


def effects_unavailable(attribution: Attribution, lang: str) -> str | None:
    """Why the total effects of ``lang``'s heads cannot be measured on ``attribution``'s prompts, or None."""
    labels = set(attribution.select(lang=lang).labels)
    if {"harmful", "harmless"} <= labels:
        return None
    return (f"they patch harmless means into harmful prompts and back, and the {lang} prompts are "
            f"{', '.join(sorted(labels))} only")


def top_head_effects(model: HookedModel, direction: Direction, attribution: Attribution, prompts: PromptSet,
                     lang: str, k: int, refusal_ids: Sequence[int], *, batch_size: int = 32, progress: bool = True
                     ) -> HeadEffects:
    """Total effects of the ``k`` heads of ``lang`` with the largest mean harmful-minus-harmless write onto r̂
    (``attribution``'s post-instruction head scores), patched between ``prompts``' harmful and harmless ``lang``
    prompts (the attributed ones)."""
    own = attribution.select(lang=lang)
    gap = own.select(label="harmful").head_scores().mean(0) - own.select(label="harmless").head_scores().mean(0)
    return total_effects(model, direction, prompts.filter(lang=lang, label="harmful").instructions,
                         prompts.filter(lang=lang, label="harmless").instructions, top_k_heads(gap, k),
                         refusal_ids, batch_size=batch_size, progress=progress)


def attribute_with_effects(model: HookedModel, direction: Direction, prompts: PromptSet, *,
                           refusal_tokens: RefusalTokens | None,
                           compliance_tokens: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
                           dla: bool = True, adv_suffix: str | None = None, total_effects_k: int = 0,
                           effects_lang: str | None = None, batch_size: int = 16, progress: bool = True
                           ) -> AttributionRun:
    """Attribute ``prompts`` onto ``direction`` and, with ``total_effects_k`` heads and refusal tokens, measure the
    total effects of ``effects_lang``'s top heads (by default :func:`effects_language`)."""
    result = attribute(model, direction, prompts, adv_suffix=adv_suffix, refusal_tokens=refusal_tokens,
                       compliance_tokens=compliance_tokens, dla=dla, batch_size=batch_size, progress=progress)
    if not total_effects_k or refusal_tokens is None:
        return AttributionRun(result)
    lang = effects_lang or effects_language(direction, prompts)
    why = effects_unavailable(result, lang)
    if why is not None:
        return AttributionRun(result, effects_lang=lang, effects_skipped=why)
    effects = top_head_effects(model, direction, result, prompts, lang, total_effects_k,
                               refusal_tokens.for_lang(lang), batch_size=batch_size, progress=progress)
    return AttributionRun(result, effects, lang)
