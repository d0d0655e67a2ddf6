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
from refusal_circuits.models import model_id

# --------------------------------------------------------------------------------------------------------------
# Statistics (small, exact, seeded).


def auroc(pos: Tensor, neg: Tensor) -> float:
    """Area under the ROC curve of ``pos`` above ``neg`` (ties count half): P(pos > neg)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos.double()[:, None] - neg.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def cohens_d(pos: Tensor, neg: Tensor) -> float:
    """Standardised mean difference with the pooled standard deviation."""
    n1, n2 = len(pos), len(neg)
    if n1 < 2 or n2 < 2:
        return float("nan")
    v = ((n1 - 1) * pos.double().var() + (n2 - 1) * neg.double().var()) / (n1 + n2 - 2)
    return float((pos.double().mean() - neg.double().mean()) / v.sqrt().clamp(min=1e-12))


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""

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
    denom = (ra.norm() * rb.norm()).clamp(min=1e-12)
    return float((ra @ rb) / denom)


def benjamini_hochberg(p: Tensor) -> Tensor:
    """Benjamini-Hochberg adjusted p-values (monotone, capped at 1), same shape as ``p``."""
    flat = p.double().flatten()
    m = len(flat)
    order = torch.argsort(flat)
    ranked = flat[order] * m / torch.arange(1, m + 1, dtype=torch.float64)
    adj = torch.flip(torch.cummin(torch.flip(ranked, [0]), 0).values, [0]).clamp(max=1.0)
    out = torch.empty_like(flat)
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
        raise InputError(f"language {lang!r} needs harmful and harmless {split} prompts")
    return harmful, harmless, own


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
    """

    base: str
    layer: int
    position: int
    within: dict[str, float]
    disjoint: dict[str, float]
    paired: dict[str, float]

    def corrected(self, lang: str) -> float:
        a, b = self.within[self.base], self.within[lang]
        return self.disjoint[lang] / math.sqrt(a * b) if a > 0 and b > 0 else math.nan

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "layer": self.layer, "position": self.position, "within": self.within,
                "disjoint": self.disjoint, "paired": self.paired,
                "corrected": {lang: _finite(self.corrected(lang)) for lang in self.within}}

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(x)}</td><td>{self.paired[x]:.2f}</td><td>{self.disjoint[x]:.2f}</td>"
                       f"<td>{self.within[x]:.2f}</td><td>{self.corrected(x):.2f}</td></tr>" for x in self.within)
        return (f"<b>Split-half cosines with {html.escape(self.base)}</b> (layer {self.layer}, position "
                f"{self.position})<table><tr><th>lang</th><th>same prompts</th><th>disjoint prompts</th>"
                f"<th>within language</th><th>corrected</th></tr>{rows}</table>")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def split_half_cosines(halves: Mapping[str, tuple[DirectionCandidates, DirectionCandidates]], base: str, layer: int,
                       position: int) -> SplitHalfCosines:
    """The split-half check of :class:`SplitHalfCosines` from :func:`language_candidate_halves`."""
    if base not in halves:
        raise InputError(f"the base language {base!r} has no halves")

    def cos(a: DirectionCandidates, b: DirectionCandidates) -> float:
        u, v = a.vector(position, layer), b.vector(position, layer)
        return float(u @ v / (u.norm() * v.norm()).clamp(min=1e-12))

    b1, b2 = halves[base]
    within = {lang: cos(x1, x2) for lang, (x1, x2) in halves.items()}
    disjoint = {lang: (cos(b1, x2) + cos(b2, x1)) / 2 for lang, (x1, x2) in halves.items()}
    paired = {lang: (cos(b1, x1) + cos(b2, x2)) / 2 for lang, (x1, x2) in halves.items()}
    return SplitHalfCosines(base, layer, position, within, disjoint, paired)


@dataclass(frozen=True)
class CosineMatrix:
    """Cosine similarities of per-language directions: at one site, and per layer at that position."""

    langs: list[str]
    layer: int
    position: int
    at_site: Float[Tensor, "lang lang"]
    per_layer: Float[Tensor, "layer lang lang"]

    def to_json(self) -> dict[str, Any]:
        return {"langs": self.langs, "layer": self.layer, "position": self.position,
                "at_site": self.at_site.tolist(), "per_layer": self.per_layer.tolist()}

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(x)}</th>" for x in self.langs)
        rows = "".join(f"<tr><th>{html.escape(a)}</th>" + "".join(
            f"<td style='background:rgba(31,119,180,{max(0.0, float(v)):.2f})'>{float(v):.2f}</td>"
            for v in self.at_site[i]) + "</tr>" for i, a in enumerate(self.langs))
        return (f"<table><caption>Cosine similarity of per-language refusal directions, layer {self.layer}, "
                f"position {self.position}</caption><tr><th></th>{head}</tr>{rows}</table>")


def direction_cosines(candidates: Mapping[str, DirectionCandidates], layer: int, position: int) -> CosineMatrix:
    """Cosines of every pair of languages' candidates at ``(layer, position)`` and per layer at ``position``."""
    langs = list(candidates)
    if not langs:
        raise InputError("no languages to compare")
    vecs = torch.stack([candidates[x].vectors[candidates[x].positions.index(position)] for x in langs])  # [L, layer, d]
    unit = vecs / vecs.norm(dim=-1, keepdim=True).clamp(min=1e-12)
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
        return {"langs": self.langs, "coords": self.coords.tolist(), "explained_variance_ratio": self.explained.tolist(),
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
    """Per language and layer: AUROC and Cohen's d of harmful vs harmless projections on r̂ at r̂'s position."""

    langs: list[str]
    auroc: Float[Tensor, "lang layer"]
    effect_size: Float[Tensor, "lang layer"]
    position: int

    def to_json(self) -> dict[str, Any]:
        return {"langs": self.langs, "position": self.position, "auroc": self.auroc.tolist(),
                "effect_size": self.effect_size.tolist()}


def separation(attribution: Attribution, position: int | None = None) -> Separation:
    """How well the attributed direction separates harmful from harmless prompts, per language and layer."""
    pos = int(attribution.direction.get("position", -1) if position is None else position)
    langs = list(dict.fromkeys(attribution.langs))
    n_layers = attribution.resid.shape[1]
    au = torch.full((len(langs), n_layers), float("nan"))
    es = torch.full((len(langs), n_layers), float("nan"))
    for i, lang in enumerate(langs):
        rows_h = [j for j, (a, b) in enumerate(zip(attribution.langs, attribution.labels, strict=True))
                  if a == lang and b == "harmful"]
        rows_l = [j for j, (a, b) in enumerate(zip(attribution.langs, attribution.labels, strict=True))
                  if a == lang and b == "harmless"]
        if not rows_h or not rows_l:
            continue
        for layer in range(n_layers):
            h = attribution.resid[rows_h, layer, pos]
            s = attribution.resid[rows_l, layer, pos]
            au[i, layer] = auroc(h, s)
            es[i, layer] = cohens_d(h, s)
    return Separation(langs, au, es, pos)


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

    @property
    def pattern(self) -> str:
        """"same heads, weaker", "same heads, stronger", "same heads, similar strength" or "different heads"."""
        if self.rank_correlation < 0.6:
            return "different heads"
        if self.slope < 0.75:
            return "same heads, weaker"
        if self.slope > 1.25:
            return "same heads, stronger"
        return "same heads, similar strength"

    def ranked_heads(self, k: int | None = None) -> list[dict[str, Any]]:
        """Heads sorted by |mean difference|, with their intervals and significance."""
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

    def to_json(self, k: int = 20) -> dict[str, Any]:
        return {"base": self.base, "lang": self.lang, "n_pairs": self.n_pairs, "label": self.label,
                "positions": self.positions, "rank_correlation": self.rank_correlation, "slope": self.slope,
                "pattern": self.pattern, "floor": self.floor, "alpha": self.alpha, "method": self.method,
                "n_significant": self.n_significant(), "heads": self.ranked_heads(k),
                "layers": [{"layer": i, "mean": float(self.layers["mean"][i]), "ci_low": float(self.layers["ci_low"][i]),
                            "ci_high": float(self.layers["ci_high"][i])} for i in range(len(self.layers["mean"]))],
                "spans": {SPAN_NAMES[j]: {"mean": float(self.spans["mean"][j]), "ci_low": float(self.spans["ci_low"][j]),
                                          "ci_high": float(self.spans["ci_high"][j])}
                          for j in range(1, len(SPAN_NAMES)) if j != int(Span.PAD)}}

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>L{h['layer']}.H{h['head']}</td><td>{h['base_mean']:+.3f}</td><td>{h['other_mean']:+.3f}</td>"
            f"<td>{h['mean']:+.3f}</td><td>[{h['ci_low']:+.3f}, {h['ci_high']:+.3f}]</td><td>{h['q']:.3g}</td>"
            f"<td>{'✔' if h['significant'] else ''}</td></tr>" for h in self.ranked_heads(10))
        return (f"<table><caption>{html.escape(self.lang)} − {html.escape(self.base)}, {self.n_pairs} {self.label} pairs: "
                f"{html.escape(self.pattern)} (Spearman {self.rank_correlation:.2f}, slope {self.slope:.2f}); "
                f"{self.n_significant()} significant heads</caption><tr><th>head</th><th>{html.escape(self.base)}</th>"
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
    """
    pairs = pair_rows(attribution, base, lang, label)
    if len(pairs) < 2:
        raise InputError(f"need at least 2 {label} prompts present in both {base!r} and {lang!r} (same id); found "
                         f"{len(pairs)}")
    bi = [p[0] for p in pairs]
    oi = [p[1] for p in pairs]
    scores = attribution.head_scores(positions)  # [prompt, layer, head]
    d = scores[oi].double() - scores[bi].double()
    stats = paired_stats(d, n_boot=n_boot, n_perm=n_perm, seed=seed)
    base_mean, other_mean = scores[bi].double().mean(0), scores[oi].double().mean(0)
    floor = rel_floor * float(base_mean.abs().max())
    q = benjamini_hochberg(stats["p"])
    significant = (q < alpha) & (stats["mean"].abs() >= floor)
    heads = {**stats, "q": q, "significant": significant}
    # Layers: every head plus the MLP.
    per_layer = scores.double().sum(2) + attribution.mlp_scores(positions).double()
    layers = paired_stats(per_layer[oi] - per_layer[bi], n_boot=n_boot, n_perm=n_perm, seed=seed + 1)
    # Spans: heads' writes at the post-instruction tokens, by the span they read from, summed over heads.
    spans_t = attribution.source_spans().double().sum((1, 2))  # [prompt, span]
    spans = paired_stats(spans_t[oi] - spans_t[bi], n_boot=n_boot, n_perm=n_perm, seed=seed + 2)
    rho = spearman(base_mean, other_mean)
    slope = float((base_mean.flatten() @ other_mean.flatten()) / (base_mean.flatten() @ base_mean.flatten()).clamp(min=1e-12))
    return PairedHeads(base, lang, len(pairs), label, str(positions), heads, layers, spans, base_mean.float(),
                       other_mean.float(), rho, slope, floor, alpha)


def trajectory_split_layer(attribution: Attribution, base: str, lang: str, *, label: str = "harmful",
                           position: int | None = None, rel_gap: float = 0.25, n_boot: int = 2000, seed: int = 0
                           ) -> tuple[int | None, dict[str, list[float]]]:
    """The first layer from which the ``lang`` projection on r̂ stays apart from ``base``'s.

    Apart means: the paired bootstrap interval of the difference excludes 0 and the difference is at least
    ``rel_gap`` times the base language's mean projection at that layer, at every layer from there on (up to the
    final residual stream). Returns the layer (or None) and both mean trajectories.
    """
    pairs = pair_rows(attribution, base, lang, label)
    if len(pairs) < 2:
        raise InputError(f"need at least 2 paired {label} prompts in {base!r} and {lang!r}")
    pos = int(attribution.direction.get("position", -1) if position is None else position)
    b = attribution.resid[[p[0] for p in pairs], :, pos].double()
    o = attribution.resid[[p[1] for p in pairs], :, pos].double()
    st = paired_stats(o - b, n_boot=n_boot, n_perm=10, seed=seed)
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
    refused: int
    n: int

    @property
    def rate(self) -> float:
        return self.refused / self.n if self.n else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.refused, self.n)

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.ci
        return {"refused": self.refused, "n": self.n, "rate": self.rate, "ci_low": lo, "ci_high": hi}


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


@dataclass(frozen=True)
class LanguageDivergence:
    """Everything the summary of one language says, with the numbers behind it."""

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

    @property
    def aligned(self) -> bool | None:
        if self.baseline_harmful is None or self.baseline_harmless is None:
            return None
        return is_aligned(self.baseline_harmful, self.baseline_harmless)

    def summary(self) -> str:
        layer, pos = self.site
        parts = []
        if self.baseline_harmful is not None and self.baseline_harmless is not None:
            lo, hi = self.baseline_harmful.ci
            parts.append(
                f"{self.lang}: refuses {self.baseline_harmful.refused}/{self.baseline_harmful.n} harmful prompts "
                f"({self.baseline_harmful.rate:.0%}, 95% CI {lo:.0%}–{hi:.0%}) vs {self.baseline_harmless.rate:.0%} of "
                f"harmless ones: {'safety-aligned' if self.aligned else 'not clearly aligned'}.")
        else:
            parts.append(f"{self.lang}: baseline refusal not measured.")
        present = "present" if self.auroc_at_site >= 0.75 else "weak" if self.auroc_at_site >= 0.6 else "absent"
        parts.append(f"r̂ at the post-instruction tokens (layer {layer}, position {pos}) is {present}: AUROC "
                     f"{self.auroc_at_site:.2f} harmful vs harmless ({self.base}: {self.base_auroc_at_site:.2f}).")
        b, o = self.trajectories["base"][layer], self.trajectories["other"][layer]
        if self.trajectory_split_layer is None:
            parts.append(f"The {self.base} and {self.lang} projections on r̂ (harmful prompts) do not stay apart "
                         f"(at layer {layer}: {b:.2f} vs {o:.2f}).")
        else:
            parts.append(f"The {self.base} and {self.lang} projections on r̂ separate from layer "
                         f"{self.trajectory_split_layer} on (at layer {layer}: {b:.2f} vs {o:.2f}).")
        top = [h for h in self.paired.ranked_heads(5) if h["significant"]][:3]
        if top:
            heads = ", ".join(f"L{h['layer']}.H{h['head']} ({h['mean']:+.2f})" for h in top)
            parts.append(f"Heads: {self.paired.pattern} (Spearman {self.paired.rank_correlation:.2f}, slope "
                         f"{self.paired.slope:.2f}); largest significant differences {heads}; "
                         f"{self.paired.n_significant()} heads significant.")
        else:
            parts.append(f"Heads: {self.paired.pattern} (Spearman {self.paired.rank_correlation:.2f}, slope "
                         f"{self.paired.slope:.2f}); no head differs significantly.")
        spans = self.paired.spans["mean"]
        j = int(torch.argmax(spans.abs()[1:])) + 1
        parts.append(f"By source span the largest change is in what heads read from the {SPAN_NAMES[j]} "
                     f"({float(spans[j]):+.2f}).")
        if self.patched_fraction is not None and self.patched_heads:
            hs = ", ".join(f"L{a}.H{b}" for a, b in self.patched_heads)
            score = ("" if self.patched_score_fraction is None or self.patched_score_fraction != self.patched_score_fraction
                     else f" and {self.patched_score_fraction:.0%} of the gap in the refusal score")
            parts.append(f"Patching the {len(self.patched_heads)} heads that lose most ({hs}) from the {self.base} run "
                         f"into the {self.lang} run closes {self.patched_fraction:.0%} of the gap in the r̂ projection "
                         f"at layer {layer}{score}.")
        return " ".join(parts)

    def to_json(self, k: int = 20) -> dict[str, Any]:
        return {
            "n_pairs": self.n_pairs, "aligned": self.aligned,
            "baseline_refusal": None if self.baseline_harmful is None or self.baseline_harmless is None else
            {"harmful": self.baseline_harmful.to_json(), "harmless": self.baseline_harmless.to_json()},
            "trajectory_split_layer": self.trajectory_split_layer,
            "heads": [{key: h[key] for key in ("layer", "head", "mean", "ci_low", "ci_high", "significant")}
                      | {"mean_diff": h["mean"], "q": h["q"], "base_mean": h["base_mean"], "other_mean": h["other_mean"]}
                      for h in self.paired.ranked_heads(k)],
            "rank_correlation": self.paired.rank_correlation,
            "summary": self.summary(),
            "pattern": self.paired.pattern, "slope": self.paired.slope, "n_significant": self.paired.n_significant(),
            "auroc_at_site": self.auroc_at_site, "gap_at_site": self.gap_at_site,
            "trajectories": self.trajectories, "layers": self.paired.to_json()["layers"],
            "spans": self.paired.to_json()["spans"], "patched_fraction": self.patched_fraction,
            "patched_score_fraction": self.patched_score_fraction,
            "patched_heads": [list(h) for h in self.patched_heads], "floor": self.paired.floor,
            "method": self.paired.method,
        }

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(self.summary())}</p>" + self.paired._repr_html_()


@dataclass(frozen=True)
class Divergence:
    """The divergence summaries of every language against the base language."""

    base: str
    languages: dict[str, LanguageDivergence]
    model: str
    direction: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "model": self.model, "direction": self.direction,
                "languages": {k: v.to_json() for k, v in self.languages.items()}}

    def _repr_html_(self) -> str:
        return "".join(f"<h4>{html.escape(k)}</h4>" + v._repr_html_() for k, v in self.languages.items())


def divergence(attribution: Attribution, base: str = "en", langs: Sequence[str] | None = None, *,
               baseline: Mapping[str, tuple[Rate, Rate]] | None = None,
               patch: Mapping[str, Any] | None = None,
               alpha: float = 0.05, seed: int = 0) -> Divergence:
    """Per-language divergence summaries from an attribution of paired prompts (and optional baseline rates and
    :class:`~refusal_circuits.patching.PairPatch` results per language)."""
    present = list(dict.fromkeys(attribution.langs))
    if base not in present:
        raise InputError(f"the base language {base!r} is not in the attribution (has {', '.join(present)})")
    langs = [x for x in (langs or present) if x != base]
    sep = separation(attribution)
    layer = int(attribution.direction.get("layer") or 0)
    pos = sep.position
    out: dict[str, LanguageDivergence] = {}
    for lang in langs:
        paired = paired_heads(attribution, base, lang, alpha=alpha, seed=seed)
        split, traj = trajectory_split_layer(attribution, base, lang, seed=seed)
        i, bi = sep.langs.index(lang), sep.langs.index(base)
        h, s = (baseline or {}).get(lang, (None, None))
        pp = (patch or {}).get(lang)
        frac, sfrac, heads = (pp.fraction, pp.score_fraction, pp.heads) if pp is not None else (None, None, [])
        out[lang] = LanguageDivergence(
            lang, base, paired.n_pairs, h, s, float(sep.auroc[i, layer]), float(sep.auroc[bi, layer]), split, traj,
            paired, traj["base"][layer] - traj["other"][layer], frac, list(heads), (layer, pos), sfrac)
    return Divergence(base, out, attribution.model, attribution.direction)




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
