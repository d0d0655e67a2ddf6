"""The two token sets whose mean logit difference direct logit attribution (DLA) explains.

The refusal side comes from the direction (or the caller); the compliance side defaults to the tokens the model
starts its answers to harmless prompts with, refusal tokens excluded, per language.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from refusal_circuits.data import PromptSet
from refusal_circuits.errors import InputError
from refusal_circuits.models import HookedModel
from refusal_circuits.scores import RefusalTokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogitTargets:
    """Per language: the refusal tokens and the compliance tokens whose mean logit difference DLA explains."""

    refusal: dict[str, tuple[int, ...]]
    compliance: dict[str, tuple[int, ...]]
    strings: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"refusal": {k: [self.strings.get(t, str(t)) for t in v] for k, v in self.refusal.items()},
                "compliance": {k: [self.strings.get(t, str(t)) for t in v] for k, v in self.compliance.items()},
                "refusal_ids": {k: list(v) for k, v in self.refusal.items()},
                "compliance_ids": {k: list(v) for k, v in self.compliance.items()}}


def rank_compliance_tokens(first_tokens: Sequence[int], refusal_ids: Sequence[int], *, k: int = 5,
                           min_count: int = 2) -> tuple[int, ...]:
    """The ``k`` most frequent of ``first_tokens`` (greedy first tokens of answers) that are not refusal tokens.

    A token must begin at least ``min_count`` answers (fewer than ``8 * min_count`` answers: at least one).
    """
    refusal = set(int(t) for t in refusal_ids)
    counts: dict[int, int] = {}
    for t in first_tokens:
        if int(t) not in refusal:
            counts[int(t)] = counts.get(int(t), 0) + 1
    need = min(min_count, max(1, len(first_tokens) // 8))
    ranked = [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= need][:k]
    if not ranked:
        raise InputError("every greedy first token was a refusal token: no compliance tokens to contrast with; "
                         "pass compliance_tokens explicitly")
    return tuple(ranked)


def compliance_tokens_by_lang(first_tokens: Mapping[str, Sequence[int]], refusal: Mapping[str, Sequence[int]]
                              ) -> dict[str, tuple[int, ...]]:
    """Each language's compliance tokens from the greedy first tokens on its harmless prompts.

    ``first_tokens`` may come from a forward pass or from an earlier greedy generation (its first tokens are the
    same argmax). A model that does not understand a language may refuse every prompt in it, harmless ones
    included (the packaged 0.5B answers every Yoruba prompt with an English refusal); the logit difference still
    needs a compliance side, so such a language borrows the tokens the model starts its answers with in the other
    languages, and the log says so.
    """
    out: dict[str, tuple[int, ...]] = {}
    for lang in refusal:
        own = list(first_tokens.get(lang, ()))
        if own:
            try:
                out[lang] = rank_compliance_tokens(own, refusal[lang])
                continue
            except InputError:
                if not any(first_tokens.get(x) for x in first_tokens if x != lang):
                    raise
                log.warning("every greedy first token on %r harmless prompts is a refusal token: its compliance "
                            "tokens are taken from the other languages' harmless prompts", lang)
        others = [t for x, ts in first_tokens.items() if x != lang for t in ts]
        out[lang] = rank_compliance_tokens(others, refusal[lang]) if others else ()
    return out


def _logit_targets(model: HookedModel, prompts: PromptSet, saved: dict[str, Any] | None, refusal_tokens: RefusalTokens | None,
                   compliance: Mapping[str, Sequence[int]] | Sequence[int] | None, batch_size: int) -> LogitTargets | None:
    """The targets of DLA on ``prompts``, or None (with a warning) where one side is missing."""
    tok = model.tokenizer
    if refusal_tokens is None:
        if not saved:
            log.warning("no refusal tokens given or saved with the direction: skipping direct logit attribution")
            return None
        refusal_tokens = RefusalTokens.from_json(saved)
    refusal = {lang: tuple(refusal_tokens.for_lang(lang)) for lang in prompts.langs}
    comp: dict[str, tuple[int, ...]] = {}
    if compliance is None:
        # Looked up on the module at call time, so tests can stand in for the forward pass.
        from refusal_circuits.scores import first_token_logits

        harmless = prompts.filter(label="harmless")
        top = first_token_logits(model, harmless.instructions, batch_size=batch_size).argmax(-1).tolist() \
            if len(harmless) else []
        first: dict[str, list[int]] = {}
        for rec, t in zip(harmless, top, strict=True):
            first.setdefault(rec.lang, []).append(int(t))
        comp = compliance_tokens_by_lang(first, refusal)
    for lang in prompts.langs:
        if isinstance(compliance, Mapping):
            if lang not in compliance:
                raise InputError(f"compliance tokens given for {sorted(compliance)} but not for language {lang!r}")
            comp[lang] = tuple(int(t) for t in compliance[lang])
        elif compliance is not None:
            comp[lang] = tuple(int(t) for t in compliance)
        elif not comp[lang]:
            log.warning("no harmless prompts to discover compliance tokens from: skipping direct logit "
                        "attribution (pass compliance_tokens)")
            return None
        overlap = set(comp[lang]) & set(refusal[lang])
        if overlap:
            raise InputError(f"tokens {sorted(overlap)} are both refusal and compliance tokens for {lang!r}")
    ids = {t for d in (refusal, comp) for v in d.values() for t in v}
    return LogitTargets(refusal, comp, {t: tok.decode([t]) for t in ids})
