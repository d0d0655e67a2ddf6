"""Which tokens score a refusal (and, for direct logit attribution, a compliance), for every command and stage.

Refusal tokens come from one of three places, in this order of precedence: token strings the user gave (the first
token of each), the ones stored with a direction (``direction.json`` ``refusal_tokens``, discovered when it was
selected), or discovery on (at most :data:`~refusal_circuits.workflows.defaults.DISCOVERY_PROMPTS` per language and
label of) train prompts, never test ones. The study also reads tokens off its own generation: the greedy first tokens
of the evaluate stage are what a forward pass would give, so they cost nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from refusal_circuits.attribution import compliance_tokens_by_lang
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction
from refusal_circuits.errors import InputError
from refusal_circuits.forward import check_context
from refusal_circuits.models import HookedModel
from refusal_circuits.scores import (
    RefusalTokens,
    discover_refusal_tokens,
    first_token_ids,
    refusal_tokens_from_strings,
)
from refusal_circuits.workflows.defaults import DISCOVERY_PROMPTS, SAMPLE_SEED

log = logging.getLogger(__name__)


def token_strings(value: str, flag: str) -> list[str]:
    """The comma-separated token strings of ``flag`` (at least one)."""
    strings = [v for v in value.split(",") if v.strip()]
    if not strings:
        raise InputError(f"{flag} needs at least one token")
    return strings


def resolve_refusal_tokens(model: HookedModel, value: str | None, prompts: PromptSet, *,
                           langs: Sequence[str] | None = None, flag: str = "--refusal-tokens", progress: bool = True
                           ) -> RefusalTokens:
    """The refusal tokens named by ``value`` (comma-separated strings, for every language of ``langs``, by default
    ``prompts``'); without it, discovered on at most :data:`DISCOVERY_PROMPTS` of ``prompts`` per language and label
    (pass train prompts)."""
    if value:
        return refusal_tokens_from_strings(model.tokenizer, token_strings(value, flag),
                                           langs=list(langs) if langs is not None else prompts.langs)
    return discover_refusal_tokens(model, prompts.sample(DISCOVERY_PROMPTS, seed=SAMPLE_SEED), progress=progress)


def saved_refusal_tokens(direction: Direction, where: str) -> RefusalTokens | None:
    """The refusal tokens stored with ``direction``, or None; a malformed record is a one-line error naming
    ``where``."""
    if "refusal_tokens" not in direction.meta:
        return None
    try:
        return RefusalTokens.from_json(direction.meta["refusal_tokens"], source="direction")
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{where}: direction.json has malformed refusal_tokens ({e})") from None


def required_refusal_tokens(direction: Direction, where: str) -> RefusalTokens:
    """:func:`saved_refusal_tokens`, where the direction must have them (the study's own direction always does)."""
    tokens = saved_refusal_tokens(direction, where)
    if tokens is None:
        raise InputError(f"{where}: direction.json has no refusal_tokens")
    return tokens


def direction_token_ids(direction: Direction, lang: str | None = None) -> list[int]:
    """The ids of ``direction``'s stored refusal tokens: of ``lang`` (empty where it has none), or of every
    language together, sorted (``lang=None``)."""
    ids = direction.meta.get("refusal_tokens", {}).get("ids", {})
    if lang is not None:
        return [int(t) for t in ids.get(lang) or ()]
    return sorted({int(t) for v in ids.values() for t in v})


def evaluation_refusal_tokens(model: HookedModel, everything: PromptSet, chosen: PromptSet,
                              direction: Direction | None, value: str | None, *, where: str = "--direction",
                              progress: bool = True) -> RefusalTokens | None:
    """The refusal tokens ``evaluate`` scores with: ``value``'s; else the direction's; else discovered on the train
    prompts of ``everything`` (``chosen``, the evaluated prompts, when there are none), never on test prompts."""
    if value or direction is None or "refusal_tokens" not in direction.meta:
        train = everything.filter(split="train")
        train = train if len(train) else chosen
        if not value:
            # the prompts the refusal tokens are discovered on
            check_context(model, train.sample(DISCOVERY_PROMPTS, seed=SAMPLE_SEED))
        tokens = resolve_refusal_tokens(model, value, train, progress=progress)
        if not tokens.ids:
            log.warning("the model refused none of the discovery prompts, so no refusal tokens were found: refusal "
                        "scores are left out (pass --refusal-tokens to score them); refusal rates still come from "
                        "the judge")
        return tokens
    return saved_refusal_tokens(direction, where)


def compliance_token_ids(tokenizer: Any, value: str, flag: str = "--compliance-tokens") -> list[int]:
    """The first token of each comma-separated string of ``value``: the compliance side of direct logit
    attribution, for every language."""
    return list(first_token_ids(tokenizer, token_strings(value, flag), f"{flag} token")[0])


def evaluated_first_tokens(completions: Sequence[Mapping[str, Any]], prompts: PromptSet, label: str,
                           langs: Sequence[str]) -> dict[str, list[int]]:
    """The greedy first tokens of an evaluation's ``completions`` (its ``completions`` JSON) on ``prompts``'
    ``label`` prompts, per language of ``langs`` (languages with a prompt the record lacks, or whose record has no
    first tokens, are left out)."""
    first = {(c["lang"], c["id"]): c.get("first_token") for c in completions}
    out: dict[str, list[int]] = {}
    for lang in langs:
        toks = [first.get((lang, r.id)) for r in prompts.filter(lang=lang, label=label)]
        known = [int(t) for t in toks if t is not None]
        if known and len(known) == len(toks):
            out[lang] = known
    return out


def compliance_from_completions(completions: Sequence[Mapping[str, Any]], prompts: PromptSet,
                                tokens: RefusalTokens, langs: Sequence[str]) -> dict[str, tuple[int, ...]] | None:
    """Each language's compliance tokens read off an evaluation's greedy first tokens on ``prompts``' harmless
    prompts (what discovering them by a forward pass computes), or None when some language's are missing (then
    attribution discovers them)."""
    first = evaluated_first_tokens(completions, prompts, "harmless", langs)
    if set(first) != set(prompts.filter(label="harmless").langs):
        return None
    return compliance_tokens_by_lang(first, {lang: tokens.for_lang(lang) for lang in first})


def judge_tokens(direction: Direction, langs: Sequence[str]) -> dict[str, list[int]]:
    """Per language, what the first-token judge counts as the start of a refusal: the tokens discovered on the
    train split with the direction (``meta.refusal_tokens``: each language's own openers, "Je", "Lo", "申し",
    or its native-phrase openers where it refused too rarely to discover any), plus every language's together
    (a model may refuse a foreign-language request in English). Nothing is read off the test completions the
    transfer matrix then scores: the judge is fixed before the prompts it judges."""
    every = direction_token_ids(direction)
    return {lang: list(dict.fromkeys([*direction_token_ids(direction, lang), *every])) for lang in langs}
