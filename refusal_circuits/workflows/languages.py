"""Every language's own direction at r̂'s site: ``compare --directions`` and the study's ``languages`` stage.

Each language's difference-in-means candidates come from its train split; read at the selected direction's (layer,
position) they give the cosine matrix (at that layer and per layer), one shared PCA, and the transfer matrix: each
language's direction ablated on every language's harmful test prompts and added on the harmless ones, judged by the
first token (a greedy refusal token or not).

The study also keeps every train prompt's activation at r̂'s site, collected in the same forward pass as the
candidates (the pass runs through every layer for the candidates anyway; the rows cost ``n × d_model`` per group
and no second pass): from them the split-half reliability
(:func:`~refusal_circuits.crosslingual.split_half_reliability`) says how much of a cross-lingual cosine is
shared prompt content rather than a shared direction, over many random stratified splits, with
intervals. Its first-token judge counts each language's own refusal openings, and its baseline row is read off the
evaluate stage's generation, so it costs no forward pass.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from refusal_circuits.crosslingual import (
    CosineMatrix,
    SharedPCA,
    SiteGroup,
    SplitHalfReliability,
    TransferCheck,
    TransferMatrix,
    check_transfer,
    direction_cosines,
    language_candidates,
    language_candidates_and_site,
    shared_pca,
    site_directions,
    split_half_reliability,
    transfer_matrix,
)
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction, DirectionCandidates
from refusal_circuits.errors import InputError
from refusal_circuits.models import HookedModel
from refusal_circuits.stats import Rate
from refusal_circuits.workflows.tokens import direction_token_ids, evaluated_first_tokens, judge_tokens


@dataclass(frozen=True)
class LanguageDirections:
    """Every language's candidates, their cosines and shared PCA at ``direction``'s site, and the site directions
    (the selected direction itself for its own language); ``split_half``, the split-half reliability at that
    site, when asked for (``halves``)."""

    candidates: dict[str, DirectionCandidates]
    cosines: CosineMatrix
    pca: SharedPCA
    directions: dict[str, Direction]
    split_half: SplitHalfReliability | None = None

    @property
    def norms(self) -> dict[str, float]:
        return {k: d.norm for k, d in self.directions.items()}

    def tensors(self) -> dict[str, Tensor]:
        """The site directions by language (``directions.safetensors``)."""
        return {lang: d.vector.contiguous() for lang, d in self.directions.items()}


def language_directions(model: HookedModel, prompts: PromptSet, langs: Sequence[str], direction: Direction, *,
                        max_prompts: int | None = None, halves: bool = False, seed: int = 0, batch_size: int = 32,
                        progress: bool = True) -> LanguageDirections:
    """Every language's candidates from (at most ``max_prompts`` per label, a stratified sample seeded with
    ``seed``, of) its train prompts, read at ``direction``'s site. With ``halves`` every prompt's activation at
    the site is kept from the same forward pass and the split-half reliability comes with them (a language with
    fewer than 4 prompts of a label has null statistics there, with the reason)."""
    split_half = None
    if halves:
        cands, rows = language_candidates_and_site(model, prompts, langs, direction.layer, direction.position,
                                                   split="train", max_prompts=max_prompts, seed=seed,
                                                   batch_size=batch_size, progress=progress)
        site = {key: SiteGroup.of(part, x) for key, (part, x) in rows.items()}
        split_half = split_half_reliability(site, direction.lang, layer=direction.layer, position=direction.position,
                                            langs=list(langs))
    else:
        cands = language_candidates(model, prompts, langs, split="train", max_prompts=max_prompts, seed=seed,
                                    batch_size=batch_size, progress=progress)
    dirs = site_directions(cands, direction)
    dirs[direction.lang] = direction  # the selected direction itself for its own language
    return LanguageDirections(cands, direction_cosines(cands, direction.layer, direction.position),
                              shared_pca(cands, direction.layer, direction.position), dirs, split_half)


def compare_directions(model: HookedModel, direction: Direction, prompts: PromptSet, test: PromptSet,
                       langs: Sequence[str], *, max_prompts: int | None = None, batch_size: int = 32,
                       progress: bool = True) -> dict[str, Any]:
    """``compare --directions``: every language's direction (whole train split, at most ``max_prompts`` per label)
    and the full transfer matrix on ``test``, judged by the direction's refusal tokens (JSON-ready)."""
    refusal_ids = direction_token_ids(direction)
    if not refusal_ids:
        raise InputError("--directions needs the direction's refusal tokens (direction.json refusal_tokens)")
    found = language_directions(model, prompts, langs, direction, max_prompts=max_prompts, batch_size=batch_size,
                                progress=progress)
    transfer = transfer_matrix(model, found.directions, test, targets=list(langs), refusal_ids=refusal_ids,
                               batch_size=batch_size, progress=progress)
    return {"directions": {"cosines": found.cosines.to_json(), "pca": found.pca.to_json(), "norms": found.norms},
            "transfer": transfer.to_json()}


def first_token_baseline(completions: Sequence[Mapping[str, Any]], test: PromptSet,
                         refusal_ids: Mapping[str, Sequence[int]], langs: Sequence[str]
                         ) -> dict[str, tuple[Rate, Rate]]:
    """The transfer matrix's baseline row from an evaluation's greedy first tokens (``completions``), which are
    what the first-token judge (``refusal_ids`` per language) looks at: the row costs no forward pass (languages
    whose records lack them, or whose prompts differ, are measured again by
    :func:`~refusal_circuits.crosslingual.transfer_matrix`)."""
    harmful, harmless = (evaluated_first_tokens(completions, test, label, langs) for label in ("harmful", "harmless"))
    out = {}
    for lang in langs:
        if lang in harmful and lang in harmless:
            refusal = {int(t) for t in refusal_ids[lang]}
            out[lang] = (Rate(sum(t in refusal for t in harmful[lang]), len(harmful[lang])),
                         Rate(sum(t in refusal for t in harmless[lang]), len(harmless[lang])))
    return out


def transfer_cells(mode: str, base: str, langs: Sequence[str]) -> set[tuple[str, str]] | None:
    """The transfer matrix's ``(source, target)`` cells: every one for ``all`` (None), else the base language's
    direction on every language and each language's own direction on itself (``base``)."""
    if mode == "all":
        return None
    return {(base, t) for t in langs} | {(t, t) for t in langs}


@dataclass(frozen=True)
class LanguageStudy:
    """The study's ``languages`` stage: the language directions, the transfer matrix, its judge's tokens and, when
    asked for, that judge checked against generation + the phrase judge (``check``)."""

    found: LanguageDirections
    transfer: TransferMatrix
    judge_tokens: dict[str, list[int]]
    judge_strings: dict[str, list[str]]
    check: TransferCheck | None = None

    def to_json(self) -> dict[str, Any]:
        """``languages.json``."""
        split_half = self.found.split_half
        return {"cosines": self.found.cosines.to_json(), "split_half": split_half.to_json() if split_half is not None else None,
                "pca": self.found.pca.to_json(), "norms": self.found.norms,
                "transfer": {**self.transfer.to_json(), "judge_tokens": {
                    lang: {"ids": v, "strings": self.judge_strings[lang]} for lang, v in self.judge_tokens.items()},
                    "check": self.check.to_json() if self.check is not None else None}}


def study_languages(model: HookedModel, direction: Direction, prompts: PromptSet, test: PromptSet,
                    langs: Sequence[str], completions: Sequence[Mapping[str, Any]], *, max_prompts: int | None = None,
                    cells: Collection[tuple[str, str]] | None = None, check_per_lang: int = 0,
                    max_new_tokens: int = 16, batch_size: int = 32, progress: bool = True) -> LanguageStudy:
    """Every language's direction at r̂'s site from its train prompts (at most ``max_prompts`` per label) with the
    split-half reliability, and the transfer matrix on ``test`` (``cells``, default all) judged by each language's own refusal
    openings in ``completions`` (the evaluate stage's baseline generation), its baseline row read off them.

    With ``check_per_lang`` that first-token judge is checked against generation (``max_new_tokens``) + the phrase
    judge (:func:`~refusal_circuits.crosslingual.check_transfer`): on every baseline completion, and on
    ``check_per_lang`` harmful (ablated) and harmless (added) test prompts per language under the base direction."""
    found = language_directions(model, prompts, langs, direction, max_prompts=max_prompts, halves=True,
                                batch_size=batch_size, progress=progress)
    judged = judge_tokens(direction, langs)
    transfer = transfer_matrix(model, found.directions, test, targets=list(langs), refusal_ids=judged, cells=cells,
                               baseline=first_token_baseline(completions, test, judged, langs),
                               batch_size=batch_size, progress=progress)
    check = None
    if check_per_lang:
        check = check_transfer(model, direction, test.filter(lang=list(langs)), judged, completions=completions,
                               per_lang=check_per_lang, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=progress)
    strings = {lang: [model.tokenizer.decode([t]) for t in v] for lang, v in judged.items()}
    return LanguageStudy(found, transfer, judged, strings, check)
