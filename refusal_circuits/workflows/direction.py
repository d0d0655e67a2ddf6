"""One language's refusal direction: candidates from its train split, selection on its val split.

``directions`` and the study's ``direction`` stage both call :func:`find_direction`, so on the same prompt file
they choose the same direction (tested). :func:`plan_direction` checks everything that needs no model first, so bad
input stops a command before the model loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from refusal_circuits.chat import check_positions
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import extract_candidates
from refusal_circuits.forward import check_context
from refusal_circuits.models import HookedModel
from refusal_circuits.selection import Selection, SelectionConfig, filter_configs, select_direction
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
                   refusal_filter: str = "none", batch_size: int = 32, progress: bool = True) -> Selection:
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
    candidates = extract_candidates(
        model, train.filter(label="harmful").instructions, train.filter(label="harmless").instructions,
        lang=plan.lang, prompts_sha256=plan.prompts.filter(lang=plan.lang).sha256, batch_size=batch_size,
        progress=progress)
    selection = select_direction(
        model, candidates, val.filter(label="harmful").instructions,
        val.filter(label="harmless").instructions, tokens, config=plan.config, fallback=plan.fallback,
        positions=list(positions) if positions else None, batch_size=batch_size, progress=progress)
    meta = selection.direction.meta
    meta["prompts"] = source
    meta["split_policy"] = plan.policy.to_json()
    meta["selection_scores"] = selection.to_json()
    meta["refusal_filter"] = record.to_json()
    return selection
