"""One language's refusal direction: candidates from its train split, selection on its val split.

``directions`` and the study's ``direction`` stage both call :func:`find_direction`, so on the same prompt file
they choose the same direction (tested). :func:`plan_direction` checks everything that needs no model first, so bad
input stops a command before the model loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from refusal_circuits.chat import check_positions
from refusal_circuits.cosmic import CosmicSelection, cosmic_select, selection_agreement
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import extract_candidates
from refusal_circuits.errors import InputError
from refusal_circuits.forward import check_context
from refusal_circuits.models import HookedModel
from refusal_circuits.scores import RefusalTokens
from refusal_circuits.selection import (
    Selection,
    SelectionConfig,
    calibrate_actadd,
    filter_configs,
    select_direction,
)
from refusal_circuits.workflows import filtering
from refusal_circuits.workflows.splits import SplitPolicy, direction_splits
from refusal_circuits.workflows.tokens import resolve_refusal_tokens


@dataclass(frozen=True)
class DirectionPlan:
    """What a direction is extracted and selected on, checked before the model loads."""

    prompts: PromptSet  # every prompt, in its split
    policy: SplitPolicy
    lang: str
    train: PromptSet
    val: PromptSet
    config: SelectionConfig
    fallback: SelectionConfig | None


def plan_direction(prompts: PromptSet, policy: SplitPolicy, lang: str, *, max_prompts: int | None = None,
                   filter_name: str = "auto", kl_max: float | None = None, max_layer_frac: float | None = None,
                   what: str = "the prompts") -> DirectionPlan:
    """``lang``'s train and val prompts (at most ``max_prompts`` per label) and the selection filter; raises
    :class:`~refusal_circuits.errors.InputError` on a split that lacks a label or a bad filter setting."""
    train, val = direction_splits(prompts, lang, policy, max_prompts=max_prompts, what=what)
    config, fallback = filter_configs(filter_name, kl_max=kl_max, max_layer_frac=max_layer_frac)
    return DirectionPlan(prompts, policy, lang, train, val, config, fallback)


def find_direction(model: HookedModel, plan: DirectionPlan, *, source: str, refusal_tokens: str | None = None,
                   token_langs: Sequence[str] | None = None, positions: Sequence[int] | None = None,
                   refusal_filter: str = "none", strategy: str = "arditi", batch_size: int = 32,
                   progress: bool = True) -> Selection:
    """Extract ``plan.lang``'s candidates (difference in means on train) and select one on val.

    Args:
        source: the prompt set's name, recorded in the direction (``meta["prompts"]``).
        refusal_tokens: comma-separated token strings (for every language of ``token_langs``, by default the
            direction's own); without them, discovered on the train split of every language of ``token_langs``
            (each language's own openers; at most ``DISCOVERY_PROMPTS`` per language and label, a stratified
            sample).
        positions: post-instruction positions of the selection grid (None: all).
        refusal_filter: set aside harmful prompts the model does not refuse and harmless ones it refuses, on
            train and val, before extraction and selection (:mod:`~refusal_circuits.workflows.filtering`).
        strategy: ``arditi`` (refusal-score selection), ``cosmic`` (:mod:`~refusal_circuits.cosmic`, no refusal
            tokens read; the returned :class:`Selection` carries COSMIC's choice and no refusal-score columns) or
            ``both`` (Arditi's choice, with COSMIC's choice and their agreement in ``meta["cosmic"]``). With
            ``arditi`` and no refusal token of the language to select with, COSMIC chooses (said in
            ``meta["selection_strategy"]``).

    The selection's direction carries the prompts' name, the split policy and every candidate's scores.
    """
    check_positions(model.tokenizer, positions)
    for part in (plan.train, plan.val):
        check_context(model, part)
    # every language's own refusal tokens, each discovered on its own train split (the transfer matrix and the
    # per-language scores read them); the direction itself needs only plan.lang's
    discovery = plan.prompts.filter(split="train", lang=list(token_langs) if token_langs else plan.lang)
    tokens = resolve_refusal_tokens(model, refusal_tokens, discovery if len(discovery) else plan.train,
                                    langs=token_langs, progress=progress)
    kept, record = filtering.refusal_filter(model, {"train": plan.train, "val": plan.val}, refusal_filter, tokens,
                                            batch_size=batch_size, progress=progress)
    train, val = kept["train"], kept["val"]
    if strategy not in STRATEGIES:
        raise InputError(f"unknown selection strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    candidates = extract_candidates(
        model, train.filter(label="harmful").instructions, train.filter(label="harmless").instructions,
        lang=plan.lang, prompts_sha256=plan.prompts.filter(lang=plan.lang).sha256, batch_size=batch_size,
        progress=progress)
    harmful_val, harmless_val = val.filter(label="harmful").instructions, val.filter(label="harmless").instructions
    grid = list(positions) if positions else None
    has_tokens = bool(tokens.by_lang.get(plan.lang))
    used = "cosmic" if strategy == "cosmic" or not has_tokens else "arditi"
    cosmic = None
    if used == "cosmic" or strategy == "both":
        cosmic = cosmic_select(model, candidates, harmful_val, harmless_val, positions=grid,
                               kl_max=plan.config.kl_max if plan.fallback is None else plan.fallback.kl_max,
                               max_layer_frac=plan.config.max_layer_frac, batch_size=batch_size, progress=progress)
    if used == "cosmic":
        assert cosmic is not None
        selection = _cosmic_as_selection(cosmic, tokens, len(harmful_val), len(harmless_val))
        selection.direction.meta["refusal_tokens"] = tokens.to_json()
        if has_tokens:  # the activation-addition coefficient is calibrated by the refusal score
            selection.direction.meta["actadd"] = calibrate_actadd(model, selection.direction, harmless_val,
                                                                  tokens.for_lang(plan.lang), batch_size=batch_size)
    else:
        selection = select_direction(
            model, candidates, harmful_val, harmless_val, tokens, config=plan.config, fallback=plan.fallback,
            positions=grid, batch_size=batch_size, progress=progress)
    meta = selection.direction.meta
    meta["selection_strategy"] = used if used == strategy or strategy == "both" else (
        f"cosmic (no refusal tokens of {plan.lang} to select with)")
    if strategy == "both" and cosmic is not None:
        meta["cosmic"] = {**cosmic.to_json(top_k=5), "agreement": selection_agreement(cosmic, selection).to_json()}
        meta["cosmic"].pop("candidates")
    meta["prompts"] = source
    meta["split_policy"] = plan.policy.to_json()
    meta["selection_scores"] = cosmic.to_json() if used == "cosmic" and cosmic is not None else selection.to_json()
    meta["refusal_filter"] = record.to_json()
    return selection


#: The selection strategies of :func:`find_direction`.
STRATEGIES = ("arditi", "cosmic", "both")


def _cosmic_as_selection(cosmic: CosmicSelection, tokens: RefusalTokens, n_harmful: int, n_harmless: int
                         ) -> Selection:
    """COSMIC's choice in the :class:`Selection` record the commands and the study read (no refusal-score columns:
    the candidates' scores are COSMIC's, in ``meta["selection_scores"]``)."""
    return Selection(cosmic.direction, (), SelectionConfig("cosmic", kl_max=cosmic.kl_max, induce_min=None),
                     float("nan"), float("nan"), tokens, n_harmful, n_harmless, None, cosmic.max_layer)
