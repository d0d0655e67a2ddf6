"""Where refusal diverges between English and its translations.

Wang et al. (PolyRefuse) find one refusal direction shared by the languages a model is safety-aligned in. This
module measures that and goes down to heads:

* :func:`language_candidates` / :func:`direction_cosines`: each language's difference-in-means direction and
  their cosine similarities, at the selected site and across layers; :func:`shared_pca` places the per-language
  mean differences in one PCA.
* :func:`transfer_matrix`: language A's direction ablated on language B's harmful prompts (and added on B's
  harmless prompts), refusal rates with Wilson intervals, next to the baseline row.
* :func:`separation`: per language and layer, how well the English direction separates harmful from harmless
  prompts (AUROC and Cohen's d), from an :class:`~refusal_circuits.attribution.Attribution`.
* :func:`paired_heads`: for every prompt id, each head's write in English vs in the translation; mean paired
  difference with bootstrap intervals and sign-flip permutation p-values, Benjamini-Hochberg across heads, plus
  a floor of practical size so float noise never counts; rank correlation tells "the same heads, weaker" from
  "different heads".
* :func:`divergence`: the per-language summary, in words and numbers.
"""

from __future__ import annotations

import html
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_circuits.activations import group_means
from refusal_circuits.attribution import Attribution
from refusal_circuits.chat import SPAN_NAMES, Span
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction, DirectionCandidates, candidates_from_means
from refusal_circuits.errors import InputError
from refusal_circuits.evaluation import wilson_interval
from refusal_circuits.io import nullable
from refusal_circuits.models import model_id

# --------------------------------------------------------------------------------------------------------------
# Statistics (small, exact, seeded).


def auroc(pos: Tensor, neg: Tensor) -> float:
    """Area under the ROC curve of ``pos`` above ``neg`` (ties count half): P(pos > neg); NaN when either group is
    empty (:func:`groups_why` says which)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos.double()[:, None] - neg.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def cohens_d(pos: Tensor, neg: Tensor) -> float:
    """Standardised mean difference with the pooled standard deviation; NaN with fewer than 2 values in a group
    or no variation within the groups (:func:`groups_why`)."""
    n1, n2 = len(pos), len(neg)
    if n1 < 2 or n2 < 2:
        return float("nan")
    v = ((n1 - 1) * pos.double().var() + (n2 - 1) * neg.double().var()) / (n1 + n2 - 2)
    if float(v) <= 0.0:
        return float("nan")
    return float((pos.double().mean() - neg.double().mean()) / v.sqrt())


def groups_why(n_pos: int, n_neg: int, *, need: int = 1, pos: str = "harmful", neg: str = "harmless"
               ) -> str | None:
    """Why a two-group statistic (:func:`auroc`: ``need=1``; :func:`cohens_d`: ``need=2``) cannot be computed on
    groups of these sizes, or None when it can (Cohen's d also needs some spread within the groups)."""
    short = [name for name, n in ((pos, n_pos), (neg, n_neg)) if n < need]
    if not short:
        return None
    if need == 1:
        return " and ".join(f"no {name} prompts" for name in short)
    return " and ".join(f"fewer than {need} {name} prompts" for name in short)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 points or a constant input
    (:func:`correlation_why`)."""
    if correlation_why(a, b) is not None:
        return float("nan")

    def ranks(x: Tensor) -> Tensor:
        x = x.double().flatten()
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        # average ties
        uniq, inv = torch.unique(x, return_inverse=True)
        if len(uniq) < len(x):
            sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
            counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
            r = (sums / counts)[inv]
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def correlation_why(a: Tensor, b: Tensor, what: str = "points") -> str | None:
    """Why the correlation of ``a`` and ``b`` is not defined (fewer than 3 ``what``, or a constant side), or None."""
    if a.numel() < 3:
        return f"fewer than 3 {what}"
    if bool((a.flatten() == a.flatten()[0]).all()) or bool((b.flatten() == b.flatten()[0]).all()):
        return f"the {what} do not vary"
    return None


def benjamini_hochberg(p: Tensor) -> Tensor:
    """Benjamini-Hochberg adjusted p-values (monotone, capped at 1), same shape as ``p``; NaN p-values (no test)
    stay NaN and do not count among the tests."""
    flat = p.double().flatten()
    out = torch.full_like(flat, float("nan"))
    tested = torch.nonzero(~torch.isnan(flat)).flatten()
    m = len(tested)
    if m == 0:
        return out.view(p.shape)
    order = tested[torch.argsort(flat[tested])]
    ranked = flat[order] * m / torch.arange(1, m + 1, dtype=torch.float64)
    adj = torch.flip(torch.cummin(torch.flip(ranked, [0]), 0).values, [0]).clamp(max=1.0)
    out[order] = adj
    return out.view(p.shape)


def paired_stats(diffs: Float[Tensor, "pair ..."], *, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0,
                 ci: float = 0.95) -> dict[str, Tensor]:
    """Mean of paired differences per feature, percentile bootstrap interval and sign-flip permutation p-value.

    ``diffs`` is ``[pair, ...]``; every statistic has the trailing shape. Both resamplings use one seeded
    generator and are vectorised over features.
    """
    n = diffs.shape[0]
    if n < 2:
        raise InputError(f"need at least 2 pairs for a paired comparison, got {n}")
    d = diffs.double().reshape(n, -1)
    g = torch.Generator().manual_seed(seed)
    mean = d.mean(0)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    boots = d[idx].mean(1)  # [n_boot, features]
    lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2
    lo, hi = torch.quantile(boots, lo_q, dim=0), torch.quantile(boots, hi_q, dim=0)
    signs = torch.randint(0, 2, (n_perm, n), generator=g).double() * 2 - 1
    perm = (signs @ d) / n  # [n_perm, features]
    # Compare with a relative tolerance so that exact-zero differences give p = 1.
    exceed = (perm.abs() >= mean.abs()[None] * (1 - 1e-12)).sum(0)
    p = (exceed + 1).double() / (n_perm + 1)
    shape = diffs.shape[1:]
    return {"mean": mean.view(shape), "ci_low": lo.view(shape), "ci_high": hi.view(shape), "p": p.view(shape),
            "std": d.std(0).view(shape)}


#: Why a paired comparison of one pair has no interval, test or significance.
ONE_PAIR = "one pair: no interval or test from a single difference"


def _paired_stats_or_single(diffs: Tensor, **kw: Any) -> dict[str, Tensor]:
    """:func:`paired_stats`, or for a single pair its difference as the mean and NaN for everything else."""
    if diffs.shape[0] != 1:
        return paired_stats(diffs, **kw)
    mean = diffs[0].double()
    nan = torch.full_like(mean, float("nan"))
    return {"mean": mean, "ci_low": nan, "ci_high": nan.clone(), "p": nan.clone(), "std": nan.clone()}


# --------------------------------------------------------------------------------------------------------------
# Directions per language.


def _language_groups(prompts: PromptSet, lang: str, split: str, max_prompts: int | None
                     ) -> tuple[PromptSet, PromptSet, PromptSet]:
    own = prompts.filter(lang=lang)
    if any(r.split is not None for r in own):
        own = own.filter(split=split)
    if max_prompts:
        own = own.head(max_prompts)
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


def language_candidates(model: Any, prompts: PromptSet, langs: Sequence[str] | None = None, *, split: str = "train",
                        max_prompts: int | None = None, batch_size: int = 32, progress: bool = True
                        ) -> dict[str, DirectionCandidates]:
    """Difference-in-means candidates ``[n_post, n_layers, d_model]`` of every language, from its ``split``.

    Every language's prompts go through one length bucketing (:func:`~refusal_circuits.activations.group_means`),
    so batches mix languages of similar prompt length and are hardly padded."""
    groups = {lang: _language_groups(prompts, lang, split, max_prompts) for lang in langs or prompts.langs}
    means = group_means(model, {(lang, label): part.instructions for lang, (h, b, _) in groups.items()
                                for label, part in (("harmful", h), ("harmless", b))},
                        batch_size=batch_size, progress=progress, desc="activations")
    return {lang: candidates_from_means(means[lang, "harmful"], means[lang, "harmless"], model=model_id(model),
                                        lang=lang, prompts_sha256=own.sha256)
            for lang, (_, _, own) in groups.items()}


def language_candidate_halves(model: Any, prompts: PromptSet, langs: Sequence[str] | None = None, *,
                              split: str = "train", max_prompts: int | None = None, batch_size: int = 32,
                              progress: bool = True
                              ) -> dict[str, tuple[DirectionCandidates, DirectionCandidates]]:
    """Every language's candidates from two disjoint halves of its ``split`` (the first and the second half of
    each label, in file order). ``a.merge(b)`` gives the candidates of the whole split, so the split-half check
    (:func:`split_half_cosines`) costs no forward pass beyond :func:`language_candidates` (all languages' halves
    go through one length bucketing, as there)."""
    groups = {lang: _language_groups(prompts, lang, split, max_prompts) for lang in langs or prompts.langs}
    parts: dict[tuple[str, int, str], list[str]] = {}
    for lang, (harmful, harmless, _) in groups.items():
        if len(harmful) < 2 or len(harmless) < 2:
            raise InputError(f"language {lang!r} needs at least 2 harmful and 2 harmless {split} prompts to split")
        for label, part in (("harmful", harmful.instructions), ("harmless", harmless.instructions)):
            cut = len(part) // 2
            parts[lang, 0, label], parts[lang, 1, label] = part[:cut], part[cut:]
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
        rows = "".join(f"<tr><td>{html.escape(x)}</td><td>{_fmt(self.paired[x])}</td><td>{_fmt(self.disjoint[x])}</td>"
                       f"<td>{_fmt(self.within[x])}</td><td>{_fmt(self.corrected(x))}</td></tr>" for x in self.within)
        return (f"<b>Split-half cosines with {html.escape(self.base)}</b> (layer {self.layer}, position "
                f"{self.position})<table><tr><th>lang</th><th>same prompts</th><th>disjoint prompts</th>"
                f"<th>within language</th><th>corrected</th></tr>{rows}</table>")


def _fmt(x: float | None, spec: str = ".2f", why: str | None = None) -> str:
    """``x`` formatted, or ``n/a`` (with ``why`` in brackets) when it is None or not finite."""
    if x is None or not math.isfinite(x):
        return f"n/a ({why})" if why else "n/a"
    return format(x, spec)


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
        head = "".join(f"<th>{html.escape(x)}</th>" for x in self.langs)
        rows = "".join(f"<tr><th>{html.escape(a)}</th>" + "".join(
            f"<td style='background:rgba(31,119,180,{max(0.0, float(v.nan_to_num())):.2f})'>{_fmt(float(v))}</td>"
            for v in self.at_site[i]) + "</tr>" for i, a in enumerate(self.langs))
        return (f"<table><caption>Cosine similarity of per-language refusal directions, layer {self.layer}, "
                f"position {self.position}</caption><tr><th></th>{head}</tr>{rows}</table>")


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


# --------------------------------------------------------------------------------------------------------------
# Paired per-head comparison.


@dataclass(frozen=True)
class PairedHeads:
    """English vs one translation, paired by prompt id: per-head, per-layer and per-span differences.

    All differences are translation minus English (negative: the translation loses the refusal direction there).

    Attributes:
        heads: per head ``mean``, ``ci_low``, ``ci_high``, ``p`` (sign-flip permutation), ``q`` (Benjamini-Hochberg)
            and ``significant`` (``q < alpha`` and ``|mean| >= floor``), each ``[layer, head]``.
        layers: per layer (all heads + MLP), the same statistics ``[layer]``.
        spans: per source span (heads' writes at the post-instruction tokens by where they read), ``[span]``.
        base_mean / other_mean: mean head scores ``[layer, head]`` in each language.
        rank_correlation: Spearman correlation of the two languages' mean head scores.
        slope: least-squares slope (through 0) of the translation's head scores on English's.
        floor: the smallest |mean difference| that can count as significant (see :func:`paired_heads`).
        why: the reasons for statistics that are NaN: ``ci`` (the intervals), ``p`` (p- and q-values; such heads
            are never significant), ``rank_correlation``, ``slope``. One pair gives differences but no interval
            or test (:data:`ONE_PAIR`).
    """

    base: str
    lang: str
    n_pairs: int
    label: str
    positions: str
    heads: dict[str, Tensor]
    layers: dict[str, Tensor]
    spans: dict[str, Tensor]
    base_mean: Tensor
    other_mean: Tensor
    rank_correlation: float
    slope: float
    floor: float
    alpha: float
    method: str = field(default="sign-flip permutation test per head, Benjamini-Hochberg across heads")
    why: dict[str, str] = field(default_factory=dict)

    @property
    def pattern(self) -> str | None:
        """"same heads, weaker", "same heads, stronger", "same heads, similar strength" or "different heads"; None
        where the rank correlation or the slope it needs is missing (:meth:`pattern_why`)."""
        if math.isnan(self.rank_correlation):
            return None
        if self.rank_correlation < 0.6:
            return "different heads"
        if math.isnan(self.slope):
            return None
        if self.slope < 0.75:
            return "same heads, weaker"
        if self.slope > 1.25:
            return "same heads, stronger"
        return "same heads, similar strength"

    def pattern_why(self) -> str | None:
        if self.pattern is not None:
            return None
        key = "rank_correlation" if math.isnan(self.rank_correlation) else "slope"
        return f"no {key.replace('_', ' ')}: {self.why.get(key, 'not computed')}"

    def ranked_heads(self, k: int | None = None) -> list[dict[str, Any]]:
        """Heads sorted by |mean difference|, with their intervals and significance (NaN where :attr:`why` says)."""
        m = self.heads["mean"]
        n_heads = m.shape[1]
        order = torch.argsort(m.abs().flatten(), descending=True).tolist()
        if k is not None:
            order = order[:k]
        return [{"layer": f // n_heads, "head": f % n_heads,
                 **{key: (bool(self.heads[key].flatten()[f]) if key == "significant" else float(self.heads[key].flatten()[f]))
                    for key in ("mean", "ci_low", "ci_high", "p", "q", "significant")},
                 "base_mean": float(self.base_mean.flatten()[f]), "other_mean": float(self.other_mean.flatten()[f])}
                for f in order]

    def n_significant(self) -> int:
        return int(self.heads["significant"].sum())

    def stats_json(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """One row of statistics (a head of :meth:`ranked_heads`, a layer, a span) as JSON, with ``null`` and the
        reason (:func:`~refusal_circuits.io.nullable`) for intervals and p-values that cannot be computed."""
        out: dict[str, Any] = {}
        for key, value in row.items():
            group = "ci" if key in ("ci_low", "ci_high") else "p" if key in ("p", "q") else key
            out.update(nullable(key, value, self.why.get(group)) if isinstance(value, float) else {key: value})
        return out

    def to_json(self, k: int = 20) -> dict[str, Any]:
        return {"base": self.base, "lang": self.lang, "n_pairs": self.n_pairs, "label": self.label,
                "positions": self.positions,
                **nullable("rank_correlation", self.rank_correlation, self.why.get("rank_correlation")),
                **nullable("slope", self.slope, self.why.get("slope")),
                **nullable("pattern", self.pattern, self.pattern_why()),
                "floor": self.floor, "alpha": self.alpha, "method": self.method,
                "n_significant": self.n_significant(), "heads": [self.stats_json(h) for h in self.ranked_heads(k)],
                "layers": [self.stats_json({"layer": i, **{key: float(self.layers[key][i])
                                                           for key in ("mean", "ci_low", "ci_high")}})
                           for i in range(len(self.layers["mean"]))],
                "spans": {SPAN_NAMES[j]: self.stats_json({key: float(self.spans[key][j])
                                                          for key in ("mean", "ci_low", "ci_high")})
                          for j in range(1, len(SPAN_NAMES)) if j != int(Span.PAD)}}

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>L{h['layer']}.H{h['head']}</td><td>{h['base_mean']:+.3f}</td><td>{h['other_mean']:+.3f}</td>"
            f"<td>{h['mean']:+.3f}</td><td>[{_fmt(h['ci_low'], '+.3f')}, {_fmt(h['ci_high'], '+.3f')}]</td>"
            f"<td>{_fmt(h['q'], '.3g')}</td><td>{'✔' if h['significant'] else ''}</td></tr>" for h in self.ranked_heads(10))
        return (f"<table><caption>{html.escape(self.lang)} − {html.escape(self.base)}, {self.n_pairs} {self.label} pairs: "
                f"{html.escape(self.pattern or _fmt(None, why=self.pattern_why()))} (Spearman "
                f"{_fmt(self.rank_correlation)}, slope {_fmt(self.slope)}); {self.n_significant()} significant heads"
                + (f" ({html.escape(self.why['p'])})" if "p" in self.why else "")
                + f"</caption><tr><th>head</th><th>{html.escape(self.base)}</th>"
                f"<th>{html.escape(self.lang)}</th><th>diff</th><th>95% CI</th><th>q</th><th>sig.</th></tr>{rows}</table>")


def pair_rows(attribution: Attribution, base: str, lang: str, label: str | None = "harmful"
              ) -> list[tuple[int, int]]:
    """Row indices ``(base_row, lang_row)`` of prompts sharing an id (and ``label``)."""
    index: dict[tuple[str, str, str], int] = {}
    for i, (pid, a, lab) in enumerate(zip(attribution.ids, attribution.langs, attribution.labels, strict=True)):
        index[(pid, a, lab)] = i
    pairs = []
    for (pid, a, lab), i in index.items():
        if a == base and (label is None or lab == label) and (pid, lang, lab) in index:
            pairs.append((i, index[(pid, lang, lab)]))
    return pairs


def paired_heads(attribution: Attribution, base: str, lang: str, *, label: str = "harmful",
                 positions: str | int = "post", alpha: float = 0.05, rel_floor: float = 0.01, n_boot: int = 2000,
                 n_perm: int = 2000, seed: int = 0) -> PairedHeads:
    """Paired comparison of every head's write onto r̂, ``lang`` minus ``base``, over prompts sharing an id.

    A head is *significant* when its Benjamini-Hochberg q-value (over all heads, from a two-sided sign-flip
    permutation test on the paired differences) is below ``alpha`` **and** its mean difference is at least
    ``rel_floor`` times the largest mean |write| of any head in ``base``: differences smaller than that are float
    noise (different batching, padding) or too small to matter, however consistent.

    One pair gives every difference but no interval, test or significance (NaN, with :data:`ONE_PAIR` in
    :attr:`PairedHeads.why`); none is an error.
    """
    pairs = pair_rows(attribution, base, lang, label)
    if not pairs:
        raise InputError(f"no {label} prompt is present in both {base!r} and {lang!r} (same id): nothing to pair")
    bi = [p[0] for p in pairs]
    oi = [p[1] for p in pairs]
    scores = attribution.head_scores(positions)  # [prompt, layer, head]
    d = scores[oi].double() - scores[bi].double()
    stats = _paired_stats_or_single(d, n_boot=n_boot, n_perm=n_perm, seed=seed)
    base_mean, other_mean = scores[bi].double().mean(0), scores[oi].double().mean(0)
    floor = rel_floor * float(base_mean.abs().max())
    q = benjamini_hochberg(stats["p"])
    significant = (q < alpha) & (stats["mean"].abs() >= floor)
    heads = {**stats, "q": q, "significant": significant}
    # Layers: every head plus the MLP.
    per_layer = scores.double().sum(2) + attribution.mlp_scores(positions).double()
    layers = _paired_stats_or_single(per_layer[oi] - per_layer[bi], n_boot=n_boot, n_perm=n_perm, seed=seed + 1)
    # Spans: heads' writes at the post-instruction tokens, by the span they read from, summed over heads.
    spans_t = attribution.source_spans().double().sum((1, 2))  # [prompt, span]
    spans = _paired_stats_or_single(spans_t[oi] - spans_t[bi], n_boot=n_boot, n_perm=n_perm, seed=seed + 2)
    rho = spearman(base_mean, other_mean)
    power = float(base_mean.flatten() @ base_mean.flatten())
    slope = float(base_mean.flatten() @ other_mean.flatten()) / power if power > 0 else math.nan
    why = {"ci": ONE_PAIR, "p": ONE_PAIR} if len(pairs) == 1 else {}
    rho_why = correlation_why(base_mean, other_mean, "mean head scores")
    if rho_why is not None:
        why["rank_correlation"] = rho_why
    if power == 0:
        why["slope"] = f"no head writes onto r̂ in {base}"
    return PairedHeads(base, lang, len(pairs), label, str(positions), heads, layers, spans, base_mean.float(),
                       other_mean.float(), rho, slope, floor, alpha, why=why)


def trajectory_split_layer(attribution: Attribution, base: str, lang: str, *, label: str = "harmful",
                           position: int | None = None, rel_gap: float = 0.25, n_boot: int = 2000, seed: int = 0
                           ) -> tuple[int | None, dict[str, list[float]]]:
    """The first layer from which the ``lang`` projection on r̂ stays apart from ``base``'s.

    Apart means: the paired bootstrap interval of the difference excludes 0 and the difference is at least
    ``rel_gap`` times the base language's mean projection at that layer, at every layer from there on (up to the
    final residual stream). Returns the layer (or None) and both mean trajectories. One pair has no interval, so
    its layer is None (and :class:`LanguageDivergence` says why).
    """
    pairs = pair_rows(attribution, base, lang, label)
    if not pairs:
        raise InputError(f"no paired {label} prompts in {base!r} and {lang!r}")
    pos = int(attribution.direction.get("position", -1) if position is None else position)
    b = attribution.resid[[p[0] for p in pairs], :, pos].double()
    o = attribution.resid[[p[1] for p in pairs], :, pos].double()
    st = _paired_stats_or_single(o - b, n_boot=n_boot, n_perm=10, seed=seed)
    bm = b.mean(0)
    apart = ((st["ci_low"] > 0) | (st["ci_high"] < 0)) & (st["mean"].abs() >= rel_gap * bm.abs())
    split = None
    for layer in range(len(apart) - 1, -1, -1):
        if not bool(apart[layer]):
            break
        split = layer
    return split, {"base": bm.tolist(), "other": o.mean(0).tolist()}


# --------------------------------------------------------------------------------------------------------------
# Rates and transfer.


@dataclass(frozen=True)
class Rate:
    """``refused`` of ``n`` prompts; the rate of no prompts is NaN (``null`` in JSON, with the reason)."""

    refused: int
    n: int

    @property
    def rate(self) -> float:
        return self.refused / self.n if self.n else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.refused, self.n)

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.ci if self.n else (math.nan, math.nan)
        why = "no prompts"
        return {"refused": self.refused, "n": self.n, **nullable("rate", self.rate, why),
                **nullable("ci_low", lo, why), **nullable("ci_high", hi, why)}


def is_aligned(harmful: Rate, harmless: Rate) -> bool:
    """Safety-aligned in a language: harmful refusal clearly above harmless (the 95% Wilson intervals are apart)."""
    return harmful.ci[0] > harmless.ci[1]


@dataclass(frozen=True)
class TransferMatrix:
    """Refusal rates of each target language under each source language's direction.

    ``ablate[src][tgt]``: harmful prompts of ``tgt`` with ``src``'s direction ablated; ``actadd[src][tgt]``:
    harmless prompts of ``tgt`` with ``src``'s direction added; ``baseline[tgt]``: (harmful, harmless) with none.
    """

    sources: list[str]
    targets: list[str]
    baseline: dict[str, tuple[Rate, Rate]]
    ablate: dict[str, dict[str, Rate]]
    actadd: dict[str, dict[str, Rate]]
    judge: str

    def aligned(self, lang: str) -> bool:
        return is_aligned(*self.baseline[lang])

    def to_json(self) -> dict[str, Any]:
        return {"sources": self.sources, "targets": self.targets, "judge": self.judge,
                "baseline": {t: {"harmful": h.to_json(), "harmless": s.to_json(), "aligned": is_aligned(h, s)}
                             for t, (h, s) in self.baseline.items()},
                "ablate": {a: {b: r.to_json() for b, r in row.items()} for a, row in self.ablate.items()},
                "actadd": {a: {b: r.to_json() for b, r in row.items()} for a, row in self.actadd.items()}}

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(t)}</th>" for t in self.targets)

        def cell(r: Rate | None) -> str:
            if r is None:
                return "<td>–</td>"
            lo, hi = r.ci
            return f"<td title='95% CI {lo:.0%}–{hi:.0%}, n={r.n}'>{r.rate:.0%}</td>"

        rows = ["<tr><th>baseline harmful</th>" + "".join(cell(self.baseline[t][0]) for t in self.targets) + "</tr>",
                "<tr><th>baseline harmless</th>" + "".join(cell(self.baseline[t][1]) for t in self.targets) + "</tr>",
                "<tr><th>aligned</th>" + "".join(f"<td>{'yes' if self.aligned(t) else 'no'}</td>"
                                                   for t in self.targets) + "</tr>"]
        rows += [f"<tr><th>ablate {html.escape(s)}</th>" + "".join(cell(self.ablate[s].get(t)) for t in self.targets)
                 + "</tr>" for s in self.sources]
        rows += [f"<tr><th>add {html.escape(s)} (harmless)</th>" + "".join(cell(self.actadd[s].get(t)) for t in self.targets)
                 + "</tr>" for s in self.sources]
        return (f"<table><caption>Refusal rate by target language (columns; judge: {html.escape(self.judge)})"
                f"</caption><tr><th></th>{head}</tr>{''.join(rows)}</table>")


def first_token_refusals(model: Any, instructions: Sequence[str], refusal_ids: Sequence[int], *,
                         batch_size: int = 32) -> list[bool]:
    """Whether greedy decoding would start with a refusal token, per instruction (hooks on the model apply)."""
    from refusal_circuits.scores import first_token_logits

    if not instructions:
        return []
    top = first_token_logits(model, instructions, batch_size=batch_size).argmax(-1).tolist()
    ids = set(int(t) for t in refusal_ids)
    return [t in ids for t in top]


def _refusals(model: Any, parts: Mapping[str, PromptSet], judge: str, refusal_ids: Mapping[str, Sequence[int]],
              batch_size: int, max_new_tokens: int) -> dict[str, Rate]:
    """The refusal rate of every part (a target language's prompts, none empty), from one length bucketing of all
    parts."""
    joined = PromptSet(tuple(r for part in parts.values() for r in part), "transfer")
    if judge == "first_token":
        from refusal_circuits.scores import first_token_logits

        top = iter(first_token_logits(model, joined.instructions, batch_size=batch_size).argmax(-1).tolist())
        ids = {name: {int(t) for t in refusal_ids[name]} for name in parts}
        got = {name: [next(top) in ids[name] for _ in part] for name, part in parts.items()}
    elif judge == "generate":
        from refusal_circuits.evaluation import evaluate_refusal

        ev = iter(evaluate_refusal(model, joined, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=False).completions)
        got = {name: [next(ev).refused for _ in part] for name, part in parts.items()}
    else:
        raise InputError(f"unknown judge {judge!r}; use first_token or generate")
    return {name: Rate(sum(v), len(v)) for name, v in got.items()}


def transfer_matrix(model: Any, directions: Mapping[str, Direction], prompts: PromptSet, *,
                    targets: Sequence[str] | None = None,
                    refusal_ids: Sequence[int] | Mapping[str, Sequence[int]] = (), judge: str = "first_token",
                    actadd_layer: int | None = None, batch_size: int = 32, max_new_tokens: int = 24,
                    cells: Collection[tuple[str, str]] | None = None,
                    baseline: Mapping[str, tuple[Rate, Rate]] | None = None, progress: bool = True) -> TransferMatrix:
    """Ablate each source direction on every target's harmful prompts; add it on every target's harmless prompts.

    Args:
        directions: source language -> direction (e.g. each language's candidate at the English site).
        prompts: the evaluation prompts (use the test split), harmful and harmless per target language.
        refusal_ids: refusal tokens for ``judge="first_token"`` (greedy first token is one of them): one list for
            every target, or per target language (a model refuses in each language with its own first words).
        judge: ``first_token`` (one forward pass per cell) or ``generate`` (greedy generation + phrase judge).
        actadd_layer: where to add (default: each direction's own layer); the coefficient is the direction's
            calibrated one (``meta["actadd"]``) or its norm.
        cells: the ``(source, target)`` cells to measure (default: all); the others are left out of the record,
            e.g. one source's row plus the diagonal (each language's own direction) costs ``2 x`` the baseline
            instead of ``n_sources x``.
        baseline: the no-intervention (harmful, harmless) rates per target, where they are known already (e.g.
            from the greedy first tokens of an earlier generation, which is what ``first_token`` judges); targets
            missing from it are measured.
    """
    from tqdm.auto import tqdm

    from refusal_circuits.interventions import ablate, actadd

    targets = list(targets or prompts.langs)
    judged = {t: list(refusal_ids.get(t, ()) if isinstance(refusal_ids, Mapping) else refusal_ids) for t in targets}
    if judge == "first_token" and not all(judged.values()):
        raise InputError("the first_token judge needs refusal token ids"
                         + (f" for {', '.join(t for t, v in judged.items() if not v)}"
                            if isinstance(refusal_ids, Mapping) else ""))
    sources = list(directions)
    groups = {t: (prompts.filter(lang=t, label="harmful"), prompts.filter(lang=t, label="harmless")) for t in targets}
    for t, (h, s) in groups.items():
        if not len(h) or not len(s):
            raise InputError(f"target language {t!r} needs harmful and harmless prompts")
    wanted = set(cells) if cells is not None else {(a, b) for a in sources for b in targets}
    known = {t: baseline[t] for t in targets if baseline and t in baseline}
    total = len(targets) - len(known) + sum((a, b) in wanted for a in sources for b in targets)
    bar = tqdm(total=total, desc="transfer", disable=not progress, leave=False)

    def rates(parts: Mapping[str, PromptSet]) -> dict[str, Rate]:
        # Every target of one intervention in one length bucketing: batches of one language's 32 prompts are
        # padded by about half their tokens, one bucketing of them all by a few percent.
        return _refusals(model, parts, judge, judged, batch_size, max_new_tokens)

    base: dict[str, tuple[Rate, Rate]] = dict(known)
    unknown = [t for t in targets if t not in known]
    if unknown:
        harmful, harmless = rates({t: groups[t][0] for t in unknown}), rates({t: groups[t][1] for t in unknown})
        base.update({t: (harmful[t], harmless[t]) for t in unknown})
        bar.update(len(unknown))
    abl: dict[str, dict[str, Rate]] = {}
    add: dict[str, dict[str, Rate]] = {}
    for src in sources:
        d = directions[src]
        mine = [t for t in targets if (src, t) in wanted]
        abl[src], add[src] = {}, {}
        if not mine:
            continue
        with ablate(model, d):
            abl[src] = rates({t: groups[t][0] for t in mine})
        with actadd(model, d, layer=actadd_layer):
            add[src] = rates({t: groups[t][1] for t in mine})
        bar.update(len(mine))
    bar.close()
    base = {t: base[t] for t in targets}
    return TransferMatrix(sources, targets, base, abl, add, judge)


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


# --------------------------------------------------------------------------------------------------------------
# The per-language summary.


#: Why a patched fraction is missing: the two runs agree, so there is no gap to close.
_NO_GAP = {"fraction": "no gap in the r̂ projection between the base language and the translation to close",
           "score_fraction": "no gap in the refusal score between the base language and the translation to close",
           "base_score": "the base run's refusal score was not measured"}


def patch_json(pp: Any) -> dict[str, Any]:
    """A :class:`~refusal_circuits.patching.PairPatch` as JSON, with ``null`` and the reason
    (:func:`~refusal_circuits.io.nullable`) for a fraction of a gap that is not there."""
    out: dict[str, Any] = {}
    for key, value in pp.to_json().items():
        out.update(nullable(key, value, _NO_GAP.get(key)) if isinstance(value, float) else {key: value})
    return out


@dataclass(frozen=True)
class LanguageDivergence:
    """Everything the summary of one language says, with the numbers behind it.

    A number that cannot be computed is NaN (or None for a baseline rate not measured), with the reason in
    ``why`` under the same name (``auroc_at_site``, ``base_auroc_at_site``, ``baseline_harmful``,
    ``baseline_harmless``, ``patched_fraction``, ``patched_score_fraction``); :meth:`to_json` writes them as
    ``null`` with ``<key>_why`` beside them, and :meth:`summary` as "n/a (reason)".
    """

    lang: str
    base: str
    n_pairs: int
    baseline_harmful: Rate | None
    baseline_harmless: Rate | None
    auroc_at_site: float
    base_auroc_at_site: float
    trajectory_split_layer: int | None
    trajectories: dict[str, list[float]]
    paired: PairedHeads
    gap_at_site: float
    patched_fraction: float | None = None
    patched_heads: list[tuple[int, int]] = field(default_factory=list)
    site: tuple[int, int] = (0, -1)
    patched_score_fraction: float | None = None
    why: dict[str, str] = field(default_factory=dict)

    @property
    def aligned(self) -> bool | None:
        if self.baseline_harmful is None or self.baseline_harmless is None:
            return None
        return is_aligned(self.baseline_harmful, self.baseline_harmless)

    def _why(self, key: str) -> str:
        if key == "aligned":
            missing = [k for k in ("baseline_harmful", "baseline_harmless") if getattr(self, k) is None]
            return "; ".join(f"{k.split('_')[1]}: {self._why(k)}" for k in missing)
        if key == "trajectory_split_layer":
            return ONE_PAIR
        if key in ("baseline_harmful", "baseline_harmless"):
            return self.why.get(key, "baseline refusal not measured")
        if key in ("patched_fraction", "patched_score_fraction") and key not in self.why:
            return "not patched"
        return self.why.get(key, "not computed")

    def _baseline_text(self) -> str:
        h, s = self.baseline_harmful, self.baseline_harmless
        if h is None and s is None:
            return f"{self.lang}: baseline refusal not measured."
        if h is not None:
            lo, hi = h.ci
            text = (f"{self.lang}: refuses {h.refused}/{h.n} harmful prompts ({_fmt(h.rate, '.0%', 'no prompts')}, "
                    f"95% CI {lo:.0%}–{hi:.0%})" if h.n else f"{self.lang}: harmful refusal n/a (no prompts)")
        else:
            text = f"{self.lang}: harmful refusal n/a ({self._why('baseline_harmful')})"
        harmless = (_fmt(s.rate, ".0%", "no prompts") if s is not None
                    else _fmt(None, why=self._why("baseline_harmless")))
        verdict = ("safety-aligned" if self.aligned else "not clearly aligned") if self.aligned is not None else \
            "alignment n/a"
        return f"{text} vs {harmless} of harmless ones: {verdict}."

    def summary(self) -> str:
        layer, pos = self.site
        parts = [self._baseline_text()]
        au = self.auroc_at_site
        base_au = _fmt(self.base_auroc_at_site, why=self.why.get("base_auroc_at_site"))
        if math.isnan(au):
            parts.append(f"Whether r̂ at the post-instruction tokens (layer {layer}, position {pos}) separates harmful "
                         f"from harmless prompts cannot be judged: AUROC {_fmt(au, why=self._why('auroc_at_site'))} "
                         f"({self.base}: {base_au}).")
        else:
            present = "present" if au >= 0.75 else "weak" if au >= 0.6 else "absent"
            parts.append(f"r̂ at the post-instruction tokens (layer {layer}, position {pos}) is {present}: AUROC "
                         f"{au:.2f} harmful vs harmless ({self.base}: {base_au}).")
        b, o = self.trajectories["base"][layer], self.trajectories["other"][layer]
        if self.n_pairs < 2:
            parts.append(f"Whether the {self.base} and {self.lang} projections on r̂ (harmful prompts) stay apart is "
                         f"n/a ({ONE_PAIR}) (at layer {layer}: {b:.2f} vs {o:.2f}).")
        elif self.trajectory_split_layer is None:
            parts.append(f"The {self.base} and {self.lang} projections on r̂ (harmful prompts) do not stay apart "
                         f"(at layer {layer}: {b:.2f} vs {o:.2f}).")
        else:
            parts.append(f"The {self.base} and {self.lang} projections on r̂ separate from layer "
                         f"{self.trajectory_split_layer} on (at layer {layer}: {b:.2f} vs {o:.2f}).")
        ph = self.paired
        pattern = ph.pattern or _fmt(None, why=ph.pattern_why())
        numbers = (f"Spearman {_fmt(ph.rank_correlation, why=ph.why.get('rank_correlation'))}, slope "
                   f"{_fmt(ph.slope, why=ph.why.get('slope'))}")
        top = [h for h in ph.ranked_heads(5) if h["significant"]][:3]
        if top:
            heads = ", ".join(f"L{h['layer']}.H{h['head']} ({h['mean']:+.2f})" for h in top)
            parts.append(f"Heads: {pattern} ({numbers}); largest significant differences {heads}; "
                         f"{ph.n_significant()} heads significant.")
        elif "p" in ph.why:
            h = ph.ranked_heads(1)[0]
            parts.append(f"Heads: {pattern} ({numbers}); significance n/a ({ph.why['p']}); the largest difference is "
                         f"L{h['layer']}.H{h['head']} ({h['mean']:+.2f}).")
        else:
            parts.append(f"Heads: {pattern} ({numbers}); no head differs significantly.")
        spans = ph.spans["mean"]
        j = int(torch.argmax(spans.abs()[1:])) + 1
        parts.append(f"By source span the largest change is in what heads read from the {SPAN_NAMES[j]} "
                     f"({float(spans[j]):+.2f}).")
        if self.patched_fraction is not None and self.patched_heads:
            hs = ", ".join(f"L{a}.H{b}" for a, b in self.patched_heads)
            sf = self.patched_score_fraction
            score = "" if sf is None else (f" and {_fmt(sf, '.0%', self._why('patched_score_fraction'))} of the gap "
                                           "in the refusal score")
            parts.append(f"Patching the {len(self.patched_heads)} heads that lose most ({hs}) from the {self.base} run "
                         f"into the {self.lang} run closes {_fmt(self.patched_fraction, '.0%', self._why('patched_fraction'))}"
                         f" of the gap in the r̂ projection at layer {layer}{score}.")
        return " ".join(parts)

    def to_json(self, k: int = 20) -> dict[str, Any]:
        ph = self.paired
        paired = ph.to_json(k)
        baseline: dict[str, Any] = {}
        for label, rate in (("harmful", self.baseline_harmful), ("harmless", self.baseline_harmless)):
            baseline.update(nullable(label, None if rate is None else rate.to_json(),
                                     None if rate is not None else self._why(f"baseline_{label}")))
        none_measured = self.baseline_harmful is None and self.baseline_harmless is None
        return {
            "n_pairs": self.n_pairs, **nullable("aligned", self.aligned, self._why("aligned") or None),
            **nullable("baseline_refusal", None if none_measured else baseline,
                       self._why("baseline_harmful") if none_measured else None),
            **nullable("trajectory_split_layer", self.trajectory_split_layer,
                       ONE_PAIR if self.n_pairs < 2 else None),
            "heads": [ph.stats_json({key: h[key] for key in ("layer", "head", "mean", "ci_low", "ci_high", "significant")}
                                    | {"mean_diff": h["mean"], "q": h["q"], "base_mean": h["base_mean"],
                                       "other_mean": h["other_mean"]})
                      for h in ph.ranked_heads(k)],
            **{key: paired[key] for key in paired if key.startswith(("rank_correlation", "pattern", "slope"))},
            "summary": self.summary(), "n_significant": ph.n_significant(),
            **nullable("auroc_at_site", self.auroc_at_site, self._why("auroc_at_site")),
            "gap_at_site": self.gap_at_site,
            "trajectories": self.trajectories, "layers": paired["layers"], "spans": paired["spans"],
            **nullable("patched_fraction", self.patched_fraction,
                       self._why("patched_fraction") if self.patched_fraction is None or
                       not math.isfinite(self.patched_fraction) else None),
            **nullable("patched_score_fraction", self.patched_score_fraction,
                       self._why("patched_score_fraction") if self.patched_score_fraction is None or
                       not math.isfinite(self.patched_score_fraction) else None),
            "patched_heads": [list(h) for h in self.patched_heads], "floor": ph.floor, "method": ph.method,
        }

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(self.summary())}</p>" + self.paired._repr_html_()


@dataclass(frozen=True)
class Divergence:
    """The divergence summaries of every language against the base language; ``skipped``: the languages that
    could not be compared, with the reason (``null`` under ``languages`` in :meth:`to_json`, the reason under
    ``languages_why``)."""

    base: str
    languages: dict[str, LanguageDivergence]
    model: str
    direction: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"base": self.base, "model": self.model, "direction": self.direction,
                               "languages": {k: v.to_json() for k, v in self.languages.items()}}
        if self.skipped:
            out["languages"].update(dict.fromkeys(self.skipped))
            out["languages_why"] = dict(self.skipped)
        return out

    def _repr_html_(self) -> str:
        return "".join(f"<h4>{html.escape(k)}</h4>" + v._repr_html_() for k, v in self.languages.items()) + "".join(
            f"<h4>{html.escape(k)}</h4><p>n/a ({html.escape(why)})</p>" for k, why in self.skipped.items())


def unpaired_why(attribution: Attribution, base: str, lang: str, label: str = "harmful") -> str | None:
    """Why ``lang`` cannot be compared with ``base`` (no ``label`` prompt shares an id with one of ``base``), or
    None."""
    if pair_rows(attribution, base, lang, label):
        return None
    have = sorted({b for a, b in zip(attribution.langs, attribution.labels, strict=True) if a == lang})
    return (f"no {label} prompt of {lang} shares an id with one of {base} (the paired comparison needs {label} "
            f"translations; {lang} has {', '.join(have) or 'no'} prompts)")


def divergence(attribution: Attribution, base: str = "en", langs: Sequence[str] | None = None, *,
               baseline: Mapping[str, tuple[Rate | None, Rate | None]] | None = None,
               patch: Mapping[str, Any] | None = None,
               alpha: float = 0.05, seed: int = 0) -> Divergence:
    """Per-language divergence summaries from an attribution of paired prompts (and optional baseline rates, where
    one of a language's labels may be None, and :class:`~refusal_circuits.patching.PairPatch` results per
    language). Languages with no pair are skipped, with the reason (:func:`unpaired_why`)."""
    present = list(dict.fromkeys(attribution.langs))
    if base not in present:
        raise InputError(f"the base language {base!r} is not in the attribution (has {', '.join(present)})")
    langs = [x for x in (langs or present) if x != base]
    sep = separation(attribution)
    layer = int(attribution.direction.get("layer") or 0)
    pos = sep.position
    out: dict[str, LanguageDivergence] = {}
    skipped: dict[str, str] = {}
    for lang in langs:
        unpaired = unpaired_why(attribution, base, lang)
        if unpaired is not None:
            skipped[lang] = unpaired
            continue
        paired = paired_heads(attribution, base, lang, alpha=alpha, seed=seed)
        split, traj = trajectory_split_layer(attribution, base, lang, seed=seed)
        i, bi = sep.langs.index(lang), sep.langs.index(base)
        h, s = (baseline or {}).get(lang, (None, None))
        pp = (patch or {}).get(lang)
        frac, sfrac, heads = (pp.fraction, pp.score_fraction, pp.heads) if pp is not None else (None, None, [])
        why = {}
        for key, x in (("auroc_at_site", lang), ("base_auroc_at_site", base)):
            if x in sep.auroc_why:
                why[key] = f"{sep.auroc_why[x]} in {x}"
        for key, rate in (("baseline_harmful", h), ("baseline_harmless", s)):
            if rate is None and baseline is not None and lang in baseline:
                why[key] = f"no {key.split('_')[1]} prompts in {lang}"
        for key, value, gap in (("patched_fraction", frac, "fraction"), ("patched_score_fraction", sfrac, "score_fraction")):
            if value is not None and not math.isfinite(value):
                why[key] = _NO_GAP[gap]
        out[lang] = LanguageDivergence(
            lang, base, paired.n_pairs, h, s, float(sep.auroc[i, layer]), float(sep.auroc[bi, layer]), split, traj,
            paired, traj["base"][layer] - traj["other"][layer], frac, list(heads), (layer, pos), sfrac, why)
    return Divergence(base, out, attribution.model, attribution.direction, skipped)


def losing_heads(paired: PairedHeads, k: int) -> list[tuple[int, int]]:
    """The ``k`` heads with the most negative paired difference (translation minus base), negative ones only."""
    flat = paired.heads["mean"].flatten()
    order = torch.argsort(flat)[:k].tolist()
    n_heads = paired.heads["mean"].shape[1]
    return [(i // n_heads, i % n_heads) for i in order if float(flat[i]) < 0]


def patch_top_heads(model: Any, direction: Direction, attribution: Attribution, prompts: PromptSet, base: str,
                    langs: Sequence[str], k: int, refusal_tokens: Sequence[int], *, alpha: float = 0.05,
                    batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
    """Per language, patch the ``k`` heads where the translation loses most of r̂ (the most negative paired
    differences) from the ``base`` run into the translations (:func:`~refusal_circuits.patching.patch_pairs`);
    returns ``{lang: PairPatch}``.

    Heads where the translation writes *more* r̂ than the base language cannot explain a loss: patching them
    widens the gap, so they are not chosen (an earlier version ranked by ``|difference|`` and got negative
    fractions). ``prompts`` must hold every attributed (id, language, label) of ``base`` and ``langs``.
    """
    from tqdm.auto import tqdm

    from refusal_circuits.patching import patch_pairs, prompt_run

    by_key = {(r.id, r.lang, r.label): r for r in prompts}

    def instruction(row: int, lang: str) -> str:
        try:
            return by_key[(attribution.ids[row], lang, attribution.labels[row])].instruction
        except KeyError as e:
            raise InputError(f"the prompts lack the attributed prompt {e.args[0]}") from None

    plans = {}
    for lang in langs:
        rows = pair_rows(attribution, base, lang)
        plans[lang] = (losing_heads(paired_heads(attribution, base, lang, alpha=alpha), k), rows)
    # The base language runs once, keeping every head output any language's patch will need.
    base_rows = sorted({i for _, rows in plans.values() for i, _ in rows})
    where = {row: n for n, row in enumerate(base_rows)}
    base_run = prompt_run(model, direction, [instruction(i, base) for i in base_rows], refusal_tokens,
                          z_layers=sorted({a for heads, _ in plans.values() for a, _ in heads}), batch_size=batch_size)
    out = {}
    for lang in tqdm(langs, desc="patch from " + base, disable=not progress, leave=False):
        heads, rows = plans[lang]
        out[lang] = patch_pairs(model, direction, [instruction(i, base) for i, _ in rows],
                                [instruction(j, lang) for _, j in rows], heads, refusal_tokens,
                                base_run=base_run.take([where[i] for i, _ in rows]), batch_size=batch_size)
    return out
