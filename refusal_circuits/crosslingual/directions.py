"""Each language's refusal direction, how parallel the languages' directions are, and how well the base
language's direction separates harmful from harmless prompts in every language.

* :func:`language_candidates` / :func:`direction_cosines`: each language's difference-in-means direction and
  their cosine similarities, at the selected site and across layers; :func:`shared_pca` places the per-language
  mean differences in one PCA. :func:`language_candidates_and_site` also keeps every prompt's activation at one
  site, from the same forward pass (for :mod:`~refusal_circuits.crosslingual.reliability`).
* :func:`language_candidate_halves` / :func:`split_half_cosines`: the same cosines from one pair of stratified
  halves of the prompts, against how well each language's direction reproduces itself
  (:class:`SplitHalfCosines`; the repeated, interval-carrying version is
  :func:`~refusal_circuits.crosslingual.reliability.split_half_reliability`).
* :func:`separation`: per language and layer, how well the English direction separates harmful from harmless
  prompts (AUROC and Cohen's d), from an :class:`~refusal_circuits.attribution.Attribution`.
* :func:`site_directions`: every language's candidate at the selected site, as directions (for the transfer
  matrix, :mod:`refusal_circuits.crosslingual.transfer`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_circuits.activations import GroupActivations, collect_groups, group_means
from refusal_circuits.attribution import Attribution
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction, DirectionCandidates, candidates_from_means
from refusal_circuits.errors import InputError
from refusal_circuits.io import nullable
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel, model_id
from refusal_circuits.stats import auroc, cohens_d, groups_why
from refusal_circuits.stats import fmt_stat as _fmt

# --------------------------------------------------------------------------------------------------------------
# Directions per language.


def _language_groups(prompts: PromptSet, lang: str, split: str, max_prompts: int | None, seed: int = 0
                     ) -> tuple[PromptSet, PromptSet, PromptSet]:
    own = prompts.filter(lang=lang)
    if any(r.split is not None for r in own):
        own = own.filter(split=split)
    if max_prompts:  # a seeded sample stratified by category (the same ids in every language), never a block
        own = own.sample(max_prompts, seed=seed)
    harmful, harmless = own.filter(label="harmful"), own.filter(label="harmless")
    if not len(harmful) or not len(harmless):
        raise InputError(f"language {lang!r} needs harmful and harmless {split} prompts (has {len(harmful)} harmful, "
                         f"{len(harmless)} harmless)")
    return harmful, harmless, own


def check_language_groups(prompts: PromptSet, langs: Sequence[str], *, split: str = "train",
                          max_prompts: int | None = None, what: str = "a language's direction") -> None:
    """Raise :class:`~refusal_circuits.errors.InputError` naming the first language of ``langs`` whose ``split``
    lacks harmful or harmless prompts (a difference in means, or a transfer cell, needs both), before any work."""
    for lang in langs:
        try:
            _language_groups(prompts, lang, split, max_prompts)
        except InputError as e:
            raise InputError(f"{what}: {e}") from None


def _collect(model: HookedModel, prompts: PromptSet, langs: Sequence[str] | None, split: str,
             max_prompts: int | None, seed: int, site: tuple[int, int] | None, batch_size: int, progress: bool
             ) -> tuple[dict[str, tuple[PromptSet, PromptSet, PromptSet]], GroupActivations,
                        dict[str, DirectionCandidates]]:
    groups = {lang: _language_groups(prompts, lang, split, max_prompts, seed) for lang in langs or prompts.langs}
    got = collect_groups(model, {(lang, label): part.instructions for lang, (h, b, _) in groups.items()
                                 for label, part in (("harmful", h), ("harmless", b))},
                         site=site, batch_size=batch_size, progress=progress, desc="activations")
    cands = {lang: candidates_from_means(got.means[lang, "harmful"], got.means[lang, "harmless"],
                                         model=model_id(model), lang=lang, prompts_sha256=own.sha256)
             for lang, (_, _, own) in groups.items()}
    return groups, got, cands


def language_candidates(model: HookedModel, prompts: PromptSet, langs: Sequence[str] | None = None, *, split: str = "train",
                        max_prompts: int | None = None, seed: int = 0, batch_size: int = 32, progress: bool = True
                        ) -> dict[str, DirectionCandidates]:
    """Difference-in-means candidates ``[n_post, n_layers, d_model]`` of every language, from its ``split`` (at
    most ``max_prompts`` per label: a sample stratified by category, seeded with ``seed``).

    Every language's prompts go through one length bucketing (:func:`~refusal_circuits.activations.group_means`),
    so batches mix languages of similar prompt length and are hardly padded."""
    return _collect(model, prompts, langs, split, max_prompts, seed, None, batch_size, progress)[2]


def language_candidates_and_site(model: HookedModel, prompts: PromptSet, langs: Sequence[str] | None, layer: int,
                                 position: int, *, split: str = "train", max_prompts: int | None = None,
                                 seed: int = 0, batch_size: int = 32, progress: bool = True
                                 ) -> tuple[dict[str, DirectionCandidates], dict[tuple[str, str], tuple[PromptSet, Tensor]]]:
    """:func:`language_candidates`, and from the same forward pass every prompt's ``resid_pre[layer]`` at
    ``position``: ``(lang, label) -> (its prompts, float64 [n, d_model] rows in their order)``."""
    groups, got, cands = _collect(model, prompts, langs, split, max_prompts, seed, (layer, position), batch_size,
                                  progress)
    rows = {(lang, label): (part, got.site[lang, label]) for lang, (h, b, _) in groups.items()
            for label, part in (("harmful", h), ("harmless", b))}
    return cands, rows


def language_candidate_halves(model: HookedModel, prompts: PromptSet, langs: Sequence[str] | None = None, *,
                              split: str = "train", max_prompts: int | None = None, seed: int = 0,
                              batch_size: int = 32, progress: bool = True
                              ) -> dict[str, tuple[DirectionCandidates, DirectionCandidates]]:
    """Every language's candidates from two disjoint halves of its ``split``, each holding half of every harm
    category (:meth:`~refusal_circuits.data.PromptSet.halves` with ``seed``: the same ids in every language).
    ``a.merge(b)`` gives the candidates of the whole split, so the split-half check (:func:`split_half_cosines`)
    costs no forward pass beyond :func:`language_candidates` (all languages' halves go through one length
    bucketing, as there)."""
    groups = {lang: _language_groups(prompts, lang, split, max_prompts, seed) for lang in langs or prompts.langs}
    parts: dict[tuple[str, int, str], list[str]] = {}
    for lang, (harmful, harmless, _) in groups.items():
        if len(harmful) < 2 or len(harmless) < 2:
            raise InputError(f"language {lang!r} needs at least 2 harmful and 2 harmless {split} prompts to split")
        for label, part in (("harmful", harmful), ("harmless", harmless)):
            first, second = part.halves(seed=seed)
            parts[lang, 0, label], parts[lang, 1, label] = first.instructions, second.instructions
    means = group_means(model, parts, batch_size=batch_size, progress=progress, desc="activations")
    name = model_id(model)

    def half(lang: str, k: int, sha: str) -> DirectionCandidates:
        return candidates_from_means(means[lang, k, "harmful"], means[lang, k, "harmless"], model=name, lang=lang,
                                     prompts_sha256=sha)

    return {lang: (half(lang, 0, own.sha256), half(lang, 1, own.sha256)) for lang, (_, _, own) in groups.items()}


def halves_why(prompts: PromptSet, langs: Sequence[str] | None = None, *, split: str = "train",
               max_prompts: int | None = None) -> dict[str, str]:
    """The languages :func:`language_candidate_halves` cannot split (fewer than 2 prompts of a label in
    ``split``), each with the reason; pass the others to it, and these to :func:`split_half_cosines`."""
    out = {}
    for lang in langs or prompts.langs:
        harmful, harmless, _ = _language_groups(prompts, lang, split, max_prompts)
        short = [f"{len(g)} {name}" for name, g in (("harmful", harmful), ("harmless", harmless)) if len(g) < 2]
        if short:
            out[lang] = f"too few {split} prompts to split in halves ({' and '.join(short)}; needs 2 of each)"
    return out


def _cosine(u: Tensor, v: Tensor) -> float:
    """Cosine similarity; NaN when either vector is zero (it has no direction)."""
    nu, nv = float(u.norm()), float(v.norm())
    return float(u @ v) / (nu * nv) if nu > 0 and nv > 0 else math.nan


#: Why a cosine with a zero vector is missing.
ZERO_DIRECTION = "zero direction (the harmful and harmless means are equal)"


@dataclass(frozen=True)
class SplitHalfCosines:
    """How parallel the languages' directions are, against how reproducible each one is.

    Translations of one prompt set share their content, and a difference in means over a few dozen prompts
    carries that content as well as refusal: the cosine of two languages' directions from the *same* (translated)
    prompts overstates how parallel their refusal directions are. Each language's train prompts are split in
    halves, and at r̂'s site:

    * ``within[lang]``: cosine of the language's two half directions, i.e. how well a half-size estimate
      reproduces itself (the ceiling for any cosine between half-size estimates of the same direction);
    * ``disjoint[lang]``: cosine of a base-language half and the *other* half of the language, averaged over both
      pairings: the cross-lingual cosine without shared prompts;
    * ``paired[lang]``: cosine of halves of the same prompts (base and translation), for comparison;
    * :meth:`corrected`: ``disjoint / sqrt(within[base] * within[lang])``, the cross-lingual cosine corrected for
      the noise of both estimates (about 1: as parallel as the noise lets one see).

    A cosine that cannot be computed is NaN here (``null`` in :meth:`to_json`, with the reason): a language too
    small to split (``unsplit[lang]`` says why), or a half whose direction is zero.
    """

    base: str
    layer: int
    position: int
    within: dict[str, float]
    disjoint: dict[str, float]
    paired: dict[str, float]
    unsplit: dict[str, str] = field(default_factory=dict)

    def corrected(self, lang: str) -> float:
        a, b = self.within[self.base], self.within[lang]
        return self.disjoint[lang] / math.sqrt(a * b) if a > 0 and b > 0 else math.nan

    def why(self, lang: str, what: str = "within") -> str:
        """Why ``what`` (within, disjoint, paired, corrected) of ``lang`` is missing."""
        if what == "within" and lang in self.unsplit:
            return self.unsplit[lang]
        own = [x for x in dict.fromkeys([self.base, lang]) if x in self.unsplit]
        if own:
            return "; ".join(f"{x}: {self.unsplit[x]}" for x in own)
        if what == "corrected" and not math.isnan(self.disjoint[lang]):
            return (f"a within-language cosine is not positive (within {self.base} {_fmt(self.within[self.base])}, "
                    f"within {lang} {_fmt(self.within[lang])}): the halves do not reproduce each other")
        return ZERO_DIRECTION + " in a half"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"base": self.base, "layer": self.layer, "position": self.position}
        corrected = {lang: self.corrected(lang) for lang in self.within}
        for name, values in (("within", self.within), ("disjoint", self.disjoint), ("paired", self.paired),
                             ("corrected", corrected)):
            out.update(nullable(name, values, {x: self.why(x, name) for x, v in values.items() if not math.isfinite(v)}))
        return out

    def _repr_html_(self) -> str:
        rows = (f"<tr><td>{esc(x)}</td><td>{_fmt(self.paired[x])}</td><td>{_fmt(self.disjoint[x])}</td>"
                f"<td>{_fmt(self.within[x])}</td><td>{_fmt(self.corrected(x))}</td></tr>" for x in self.within)
        return (f"<b>Split-half cosines with {esc(self.base)}</b> (layer {self.layer}, position {self.position})"
                + table("", ["lang", "same prompts", "disjoint prompts", "within language", "corrected"], rows))


def split_half_cosines(halves: Mapping[str, tuple[DirectionCandidates, DirectionCandidates]], base: str, layer: int,
                       position: int, *, unsplit: Mapping[str, str] | None = None,
                       langs: Sequence[str] | None = None) -> SplitHalfCosines:
    """The split-half check of :class:`SplitHalfCosines` from :func:`language_candidate_halves`.

    ``unsplit``: languages that could not be split, with the reason (:func:`halves_why`); their cosines (and, if
    the base language is among them, every disjoint and same-prompt cosine) are missing. ``langs``: the order of
    the languages (default: ``halves``, then ``unsplit``)."""
    unsplit = dict(unsplit or {})
    if base not in halves and base not in unsplit:
        raise InputError(f"the base language {base!r} has no halves")
    order = list(langs or dict.fromkeys([*halves, *unsplit]))
    nan = math.nan

    def cos(a: DirectionCandidates, b: DirectionCandidates) -> float:
        if a.is_zero(position, layer) or b.is_zero(position, layer):
            return nan
        return _cosine(a.vector(position, layer), b.vector(position, layer))

    def across(x: str, same: bool) -> float:
        """Mean cosine of the base language's halves with ``x``'s: the same prompts' halves, or the other ones."""
        if x not in halves or base not in halves:
            return nan
        (b1, b2), (x1, x2) = halves[base], halves[x]
        return (cos(b1, x1) + cos(b2, x2)) / 2 if same else (cos(b1, x2) + cos(b2, x1)) / 2

    within = {x: cos(*halves[x]) if x in halves else nan for x in order}
    disjoint = {x: across(x, same=False) for x in order}
    paired = {x: across(x, same=True) for x in order}
    return SplitHalfCosines(base, layer, position, within, disjoint, paired, unsplit)


@dataclass(frozen=True)
class CosineMatrix:
    """Cosine similarities of per-language directions: at one site, and per layer at that position."""

    langs: list[str]
    layer: int
    position: int
    at_site: Float[Tensor, "lang lang"]
    per_layer: Float[Tensor, "layer lang lang"]

    def zero_layers(self, lang: str) -> list[int]:
        """The layers where ``lang``'s direction is zero (its cosines there are NaN)."""
        i = self.langs.index(lang)
        return [k for k in range(self.per_layer.shape[0]) if bool(torch.isnan(self.per_layer[k, i, i]))]

    def to_json(self) -> dict[str, Any]:
        zero = {x: self.zero_layers(x) for x in self.langs}
        at_site = {x: ZERO_DIRECTION for x, layers in zero.items() if self.layer in layers}
        per_layer = {x: f"{ZERO_DIRECTION} at layer(s) {', '.join(map(str, layers))}"
                     for x, layers in zero.items() if layers}
        return {"langs": self.langs, "layer": self.layer, "position": self.position,
                **nullable("at_site", self.at_site, at_site), **nullable("per_layer", self.per_layer, per_layer)}

    def _repr_html_(self) -> str:
        rows = (f"<tr><th>{esc(a)}</th>" + "".join(
            f"<td style='background:rgba(31,119,180,{max(0.0, float(v.nan_to_num())):.2f})'>{_fmt(float(v))}</td>"
            for v in self.at_site[i]) + "</tr>" for i, a in enumerate(self.langs))
        return table(f"Cosine similarity of per-language refusal directions, layer {self.layer}, position "
                     f"{self.position}", ["", *self.langs], rows)


def direction_cosines(candidates: Mapping[str, DirectionCandidates], layer: int, position: int) -> CosineMatrix:
    """Cosines of every pair of languages' candidates at ``(layer, position)`` and per layer at ``position``; NaN
    where a language's direction is zero (:data:`ZERO_DIRECTION`)."""
    langs = list(candidates)
    if not langs:
        raise InputError("no languages to compare")
    vecs = torch.stack([candidates[x].vectors[candidates[x].positions.index(position)] for x in langs])  # [L, layer, d]
    zero = torch.tensor([[candidates[x].is_zero(position, k) for k in range(vecs.shape[1])] for x in langs])
    unit = vecs / vecs.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    unit[zero] = float("nan")
    per_layer = torch.einsum("ald,bld->lab", unit, unit).float()
    if not 0 <= layer < per_layer.shape[0]:
        raise InputError(f"layer {layer} out of range")
    return CosineMatrix(langs, layer, position, per_layer[layer], per_layer)


@dataclass(frozen=True)
class SharedPCA:
    """Per-language mean differences projected on their first principal components (shared across languages)."""

    langs: list[str]
    coords: Float[Tensor, "lang component"]
    explained: Float[Tensor, " component"]
    layer: int
    position: int

    def to_json(self) -> dict[str, Any]:
        return {"langs": self.langs, "coords": self.coords.tolist(),
                **nullable("explained_variance_ratio", self.explained,
                           "every language's direction is zero: no variance to explain"),
                "layer": self.layer, "position": self.position}


def shared_pca(candidates: Mapping[str, DirectionCandidates], layer: int, position: int, k: int = 2) -> SharedPCA:
    """PCA (uncentred across the origin: the mean differences themselves) of the languages' candidates."""
    langs = list(candidates)
    x = torch.stack([candidates[a].vector(position, layer) for a in langs]).double()
    _, s, vt = torch.linalg.svd(x, full_matrices=False)
    k = min(k, vt.shape[0])
    coords = x @ vt[:k].T
    explained = (s**2 / (s**2).sum())[:k]
    return SharedPCA(langs, coords.float(), explained.float(), layer, position)


# --------------------------------------------------------------------------------------------------------------
# Separation along the English direction.


@dataclass(frozen=True)
class Separation:
    """Per language and layer: AUROC and Cohen's d of harmful vs harmless projections on r̂ at r̂'s position.

    NaN where a statistic cannot be computed; ``auroc_why`` / ``effect_size_why`` give the reason per language
    (e.g. no harmless prompts; for Cohen's d also fewer than 2 prompts of a label, or layers where every prompt
    has the same projection, as at layer 0 on a template token, whose embedding is the same in every prompt).
    """

    langs: list[str]
    auroc: Float[Tensor, "lang layer"]
    effect_size: Float[Tensor, "lang layer"]
    position: int
    auroc_why: dict[str, str] = field(default_factory=dict)
    effect_size_why: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"langs": self.langs, "position": self.position, **nullable("auroc", self.auroc, self.auroc_why),
                **nullable("effect_size", self.effect_size, self.effect_size_why)}


def separation(attribution: Attribution, position: int | None = None) -> Separation:
    """How well the attributed direction separates harmful from harmless prompts, per language and layer."""
    pos = int(attribution.direction.get("position", -1) if position is None else position)
    langs = list(dict.fromkeys(attribution.langs))
    n_layers = attribution.resid.shape[1]
    au = torch.full((len(langs), n_layers), float("nan"))
    es = torch.full((len(langs), n_layers), float("nan"))
    au_why: dict[str, str] = {}
    es_why: dict[str, str] = {}
    for i, lang in enumerate(langs):
        rows_h = [j for j, (a, b) in enumerate(zip(attribution.langs, attribution.labels, strict=True))
                  if a == lang and b == "harmful"]
        rows_l = [j for j, (a, b) in enumerate(zip(attribution.langs, attribution.labels, strict=True))
                  if a == lang and b == "harmless"]
        why = groups_why(len(rows_h), len(rows_l))
        if why is not None:
            au_why[lang] = es_why[lang] = why
            continue
        flat = []
        for layer in range(n_layers):
            h = attribution.resid[rows_h, layer, pos]
            s = attribution.resid[rows_l, layer, pos]
            au[i, layer] = auroc(h, s)
            es[i, layer] = cohens_d(h, s)
            if math.isnan(float(es[i, layer])) and len(rows_h) >= 2 and len(rows_l) >= 2:
                flat.append(layer)
        short = groups_why(len(rows_h), len(rows_l), need=2)
        if short is not None:
            es_why[lang] = short
        elif flat:
            es_why[lang] = f"no variation within the groups at layer(s) {', '.join(map(str, flat))}"
    return Separation(langs, au, es, pos, au_why, es_why)



def site_directions(candidates: Mapping[str, DirectionCandidates], like: Direction) -> dict[str, Direction]:
    """Every language's candidate at ``like``'s (layer, position), as directions (activation addition scaled
    by the same multiple of each language's own norm that ``like`` was calibrated to)."""
    scale = float(like.meta.get("actadd", {}).get("scale", 1.0)) if like.meta else 1.0
    out = {}
    for lang, c in candidates.items():
        d = c.direction(like.position, like.layer, source="site of " + like.lang)
        d.meta["actadd"] = {"alpha": scale * d.norm, "scale": scale, "layer": like.layer}
        out[lang] = d
    return out

