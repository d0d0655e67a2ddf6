"""How parallel two languages' refusal directions are, against how well each reproduces itself, with intervals.

A difference in means over a few dozen prompts is the refusal direction plus the prompts' content plus noise, so
the cosine of two languages' directions is pulled down by noise and, on translations of the same prompts, pushed
up by their shared content. Everything here is read at one site (r̂'s layer and post-instruction position) from
every prompt's activation there, ``x[lang, label, i]`` (:func:`~refusal_circuits.activations.site_activations`).

**Directions of a set of prompts.** For prompt weights ``w`` (0/1: a half, all prompts, or one left out) the
direction of language ``x`` is the difference of weighted means,

    d_x(w) = Σ_i w_i x[x, harmful, i] / Σ_i w_i  −  Σ_j w_j x[x, harmless, j] / Σ_j w_j ,

each sum over the prompts the language has (translations share ids, so one ``w`` selects the same prompts in every
language: that is what keeps the comparison paired).

**One split.** ``sampling.stratified_halves`` cuts each label's ids into halves A and B holding half of every harm
category (never a block of categories, which would measure topic differences as much as noise), and with ``b``
the base language:

    within[x]    = cos(d_x(A), d_x(B))                                  how well a half reproduces itself
    disjoint[x]  = ½ [cos(d_b(A), d_x(B)) + cos(d_b(B), d_x(A))]        no prompt shared between the two sides
    paired[x]    = ½ [cos(d_b(A), d_x(A)) + cos(d_b(B), d_x(B))]        the same prompts on both sides
    same_prompt[x] = cos(d_b(A ∪ B), d_x(A ∪ B))                        all prompts, as the cosine matrix has it

If ``d_x = r + e_x`` with noise ``e_x`` independent across halves and languages, and ``r_b = r_x`` up to length,
``E cos(d_b(A), d_x(B)) ≈ ρ sqrt(within[b] within[x])`` where ``ρ`` is the cosine of the true directions, so
(Spearman's correction for attenuation)

    corrected[x] = disjoint[x] / sqrt(within[b] · within[x]),           undefined when a within is not positive

estimates ``ρ``: about 1 means as parallel as the noise lets one see, whatever the reliabilities.

**Point estimates.** within, disjoint and paired are means over ``n_splits`` random stratified splits (seeds
``0 .. n_splits − 1``, the same split in every language), which removes the luck of one split; ``corrected`` is
the ratio of those means (a mean of per-split ratios would blow up on a split whose within is near 0);
``same_prompt`` is on all prompts.

**Intervals.** Delete-one jackknife over prompts, paired across languages: leaving out prompt ``k`` (of one label)
removes it from every language that has it (translations share ids), and in each of the ``n_splits`` splits from
the half that holds it; every quantity is recomputed (the split-averaged ones as split means, ``corrected`` as
their ratio, exactly as the point), giving ``θ_(k)``. Per label ``ℓ`` with ``n_ℓ`` prompts, and ``z`` the normal
quantile of ``confidence``,

    se² = Σ_ℓ (n_ℓ − 1)/n_ℓ · Σ_{k ∈ ℓ} (θ_(k) − mean_{k ∈ ℓ} θ_(k))²,     interval = θ ± z·se

(cosines clipped to [−1, 1]). A leave-one-out mean is a rank-one update, ``(c·m − x_k)/(c − 1)``, so this costs
a few ``[n, d_model]`` operations per split and language. Why not a percentile bootstrap with each half resampled:
a resampled half is the half plus resampling noise as large as its own, so every replicate is measured at twice
the noise of the data (planted, 32-prompt halves at within 0.28: the replicates' within ranged over 0.10-0.22,
below the estimate, and so did disjoint and same-prompt; on 12-prompt halves a replicate's within was ≤ 0 in
10-35% of replicates, leaving the corrected interval unbounded); resampling the whole pool
instead puts the shared content of translations back into the "disjoint" halves. The jackknife measures the
spread at the data's own noise. A quantity undefined when some prompt is left out (a within ≤ 0 for
``corrected``) gets a null interval with the reason: it is unbounded. The splits are stratified by category, the
leave-one-out is not: it treats the prompts of a label as one sample (slightly conservative).

A label needs ``MIN_PER_HALF`` prompts in each half (4 in all), else the
language's statistics are null with the reason.

:meth:`SplitHalfReliability.summary` says in one sentence per language what the corrected interval allows: it
includes 1 (no evidence the directions differ beyond noise), lies below 1 (partly distinct), or includes 1 but
reaches below :data:`TOO_WIDE_BELOW` (too wide to tell).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_circuits.data import PromptSet
from refusal_circuits.errors import InputError
from refusal_circuits.io import nullable
from refusal_circuits.markup import esc, table
from refusal_circuits.sampling import stratified_halves
from refusal_circuits.stats import fmt_stat as _fmt
from refusal_circuits.stats import jackknife_interval

#: Prompts a label needs in each half (so a half with one prompt left out still has one, and a spread).
MIN_PER_HALF = 2
#: A corrected interval that includes 1 but reaches below this is "too wide to tell".
TOO_WIDE_BELOW = 0.5
#: The quantities, in the order of the record and the table.
QUANTITIES = ("same_prompt", "paired", "disjoint", "within", "corrected")
LABELS = ("harmful", "harmless")
Weights = Float[Tensor, "split prompt"]


@dataclass(frozen=True)
class SiteGroup:
    """One (language, label) group's activations at the site: one row per prompt, with its id and category."""

    ids: tuple[str, ...]
    categories: tuple[str | None, ...]
    x: Float[Tensor, "prompt d_model"]

    @classmethod
    def of(cls, prompts: PromptSet, x: Float[Tensor, "prompt d_model"]) -> SiteGroup:
        """The group of ``prompts`` (one language and label) with their rows ``x``, in the same order."""
        if len(prompts) != x.shape[0]:
            raise InputError(f"{len(prompts)} prompts but {x.shape[0]} activation rows")
        return cls(tuple(r.id for r in prompts), tuple(r.category for r in prompts), x)


@dataclass(frozen=True)
class SplitHalfReliability:
    """The split-half check with jackknife intervals (the module docstring derives every quantity).

    ``values[q][lang]`` is the point estimate of quantity ``q`` (:data:`QUANTITIES`), ``intervals[q][lang]`` its
    ``(low, high)``; NaN where it cannot be computed, with the reason in ``why[q][lang]`` (intervals under
    ``q + "_ci"``). ``n[lang][label]``: the prompts of each group.
    """

    base: str
    layer: int
    position: int
    langs: list[str]
    values: dict[str, dict[str, float]]
    intervals: dict[str, dict[str, tuple[float, float]]]
    why: dict[str, dict[str, str]] = field(default_factory=dict)
    n: dict[str, dict[str, int]] = field(default_factory=dict)
    n_splits: int = 0
    confidence: float = 0.95

    def corrected(self, lang: str) -> float:
        return self.values["corrected"][lang]

    def summary(self, lang: str) -> str:
        """What the intervals allow one to conclude about ``lang``'s direction against the base language's."""
        def ci(q: str) -> str:
            lo, hi = self.intervals[q][lang]
            return f"{_fmt(self.values[q][lang])} [{_fmt(lo)}, {_fmt(hi)}]"

        if lang == self.base:
            if math.isnan(self.values["within"][lang]):
                return f"{lang}: the base language; no within-language cosine ({self.why.get('within', {}).get(lang, '')})."
            return (f"{lang}: the base language; within-language cosine {ci('within')}, the reliability every "
                    "corrected cosine is scaled by.")
        lo, hi = self.intervals["corrected"][lang]
        if math.isnan(lo) or math.isnan(hi):
            reason = self.why.get("corrected_ci", {}).get(lang) or self.why.get("corrected", {}).get(lang, "")
            return f"{lang}: cannot tell ({reason})."
        measured = (f"the noise-corrected cosine with {self.base} is {ci('corrected')} (disjoint prompts "
                    f"{ci('disjoint')}, same prompts {ci('same_prompt')})")
        if hi < 1:
            kind = "largely distinct" if self.values["corrected"][lang] < TOO_WIDE_BELOW else "partly distinct"
            return f"{lang}: {measured}; the interval lies below 1: the directions are {kind} beyond noise."
        if lo > 1:
            return (f"{lang}: {measured}; the interval lies above 1 (the within-language cosines understate the "
                    "halves' agreement): no evidence the directions differ.")
        if lo < TOO_WIDE_BELOW:
            return (f"{lang}: {measured}; the interval includes 1 but reaches {_fmt(lo)}: too wide to tell one "
                    "shared direction from partly distinct ones (more prompts would).")
        return f"{lang}: {measured}; the interval includes 1: no evidence the directions differ beyond noise."

    def to_json(self) -> dict[str, Any]:
        """The old split-half keys (``within``, ``disjoint``, ``paired``, ``corrected``) plus ``same_prompt``,
        ``KEY_ci: {lang: [low, high]}``, ``n``, the settings and one ``summary`` sentence per language."""
        out: dict[str, Any] = {"base": self.base, "layer": self.layer, "position": self.position,
                               "langs": self.langs, "n": self.n, "n_splits": self.n_splits,
                               "interval": "delete-one jackknife over prompts, paired across languages",
                               "confidence": self.confidence}
        for q in QUANTITIES:
            out.update(nullable(q, self.values[q], self.why.get(q, {})))
        for q in QUANTITIES:
            out.update(nullable(f"{q}_ci", {x: list(v) for x, v in self.intervals[q].items()},
                                self.why.get(f"{q}_ci", {})))
        out["summary"] = {x: self.summary(x) for x in self.langs}
        return out

    def _repr_html_(self) -> str:
        def cell(q: str, x: str) -> str:
            lo, hi = self.intervals[q][x]
            why = self.why.get(q, {}).get(x)
            return f"<td>{esc(_fmt(self.values[q][x], why=why))} [{esc(_fmt(lo))}, {esc(_fmt(hi))}]</td>"

        rows = (f"<tr><td>{esc(x)}</td>" + "".join(cell(q, x) for q in QUANTITIES) + "</tr>" for x in self.langs)
        notes = "".join(f"<li>{esc(self.summary(x))}</li>" for x in self.langs)
        return (f"<b>Split-half reliability with {esc(self.base)}</b> (layer {self.layer}, position {self.position}; "
                f"{self.n_splits} stratified splits, {self.confidence:.0%} jackknife intervals)"
                + table("", ["lang", "same prompts", "paired halves", "disjoint prompts", "within language",
                             "corrected"], rows) + f"<ul>{notes}</ul>")


# --------------------------------------------------------------------------------------------------------------
# The estimator.


def half_weights(categories: Mapping[str, str | None], seeds: Sequence[int]) -> tuple[Weights, Weights]:
    """0/1 weights ``[len(seeds), n]`` of the ids (in the order of ``categories``) in halves A and B of the
    stratified split of each seed.

    >>> a, b = half_weights({f"p{i}": "xy"[i % 2] for i in range(6)}, [0, 1])
    >>> a.sum(1).tolist(), (a * b).sum().item()
    ([3.0, 3.0], 0.0)
    """
    index = {prompt_id: k for k, prompt_id in enumerate(categories)}
    wa = torch.zeros(len(seeds), len(index), dtype=torch.float64)
    wb = torch.zeros_like(wa)
    for r, s in enumerate(seeds):
        for w, half in zip((wa, wb), stratified_halves(categories, seed=s), strict=True):
            w[r, sorted(index[i] for i in half)] = 1.0
    return wa, wb


def _cos(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise cosine; NaN where a row is zero (or NaN: a half without prompts)."""
    nu, nv = u.norm(dim=-1), v.norm(dim=-1)
    out = (u * v).sum(-1) / (nu * nv)
    return torch.where((nu > 0) & (nv > 0), out, torch.full_like(out, math.nan))


@dataclass(frozen=True)
class _Label:
    """One label over the union of the languages' ids: each language's rows (zero where absent) and presence."""

    ids: list[str]
    categories: dict[str, str | None]
    x: dict[str, Tensor]
    present: dict[str, Tensor]


def _label(groups: Mapping[str, SiteGroup]) -> _Label:
    categories: dict[str, str | None] = {}
    for g in groups.values():
        for i, c in zip(g.ids, g.categories, strict=True):
            categories.setdefault(i, c)
    ids = list(categories)
    index = {i: k for k, i in enumerate(ids)}
    x, present = {}, {}
    for lang, g in groups.items():
        rows = torch.tensor([index[i] for i in g.ids], dtype=torch.long)
        x[lang] = torch.zeros(len(ids), g.x.shape[1], dtype=torch.float64).index_copy_(0, rows, g.x.double())
        present[lang] = torch.zeros(len(ids), dtype=torch.float64).index_fill_(0, rows, 1.0)
    return _Label(ids, categories, x, present)


def _left_out(labels: Mapping[str, _Label], lang: str, weights: Mapping[str, Tensor]) -> Tensor:
    """``d_lang(w)`` (row 0) and with each prompt left out (then the harmful ids, then the harmless ones, in the
    order of ``labels``): ``[1 + n_harmful + n_harmless, d_model]``; a prompt outside ``w`` changes nothing."""
    means, loo = [], []
    for label in LABELS:
        w = weights[label] * labels[label].present[lang]
        c, x = w.sum(), labels[label].x[lang]
        mean = (w @ x) / c
        out = (c * mean - x) / (c - 1) if c > 1 else torch.full_like(x, math.nan)
        means.append(mean)
        loo.append(torch.where(w[:, None] > 0, out, mean))
    harmful, harmless = means
    return torch.cat([(harmful - harmless)[None], loo[0] - harmless, harmful - loo[1]])


def _quantities(d: Mapping[str, Mapping[str, Tensor]], base: str, x: str) -> dict[str, Tensor]:
    """within, disjoint, paired, same_prompt of ``x`` from the directions ``d[half][lang]`` (rows: left out)."""
    return {"within": _cos(d["a"][x], d["b"][x]),
            "disjoint": (_cos(d["a"][base], d["b"][x]) + _cos(d["b"][base], d["a"][x])) / 2,
            "paired": (_cos(d["a"][base], d["a"][x]) + _cos(d["b"][base], d["b"][x])) / 2,
            "same_prompt": _cos(d["all"][base], d["all"][x])}


def _jackknife(labels: Mapping[str, _Label], base: str, langs: Sequence[str], n_splits: int
               ) -> dict[str, dict[str, Tensor]]:
    """Every quantity of every language, row 0 on all prompts and row ``1 + k`` with prompt ``k`` left out, the
    split-dependent ones averaged over the splits (``corrected``: the ratio of the averages)."""
    halves = {label: half_weights(labels[label].categories, range(n_splits)) for label in LABELS}
    everything = {label: torch.ones(len(labels[label].ids), dtype=torch.float64) for label in LABELS}
    every = dict.fromkeys([base, *langs])
    whole = {x: _left_out(labels, x, everything) for x in every}  # the same in every split
    total: dict[str, dict[str, Tensor]] = {q: {} for q in QUANTITIES}
    for s in range(n_splits):
        d = {h: {x: _left_out(labels, x, {label: w[k][s] for label, w in halves.items()}) for x in every}
             for k, h in enumerate("ab")}
        d["all"] = whole
        for x in langs:
            for q, v in _quantities(d, base, x).items():
                total[q][x] = total[q].get(x, 0) + v / n_splits
    for x in langs:
        ok = (total["within"][base] > 0) & (total["within"][x] > 0)
        ratio = total["disjoint"][x] / (total["within"][base] * total["within"][x]).sqrt()
        total["corrected"][x] = torch.where(ok, ratio, torch.full_like(ratio, math.nan))
    return total


def too_few(n_harmful: int, n_harmless: int, what: str = "train prompts") -> str | None:
    """Why a language with these group sizes cannot be split (None when it can)."""
    need = 2 * MIN_PER_HALF
    short = [f"{n} {name}" for name, n in (("harmful", n_harmful), ("harmless", n_harmless)) if n < need]
    if not short:
        return None
    return (f"too few {what} to split in halves ({' and '.join(short)}; needs {need} of each, {MIN_PER_HALF} per "
            "half)")


def split_half_reliability(site: Mapping[tuple[str, str], SiteGroup], base: str, *, layer: int, position: int,
                           langs: Sequence[str] | None = None, n_splits: int = 20, confidence: float = 0.95,
                           what: str = "train prompts") -> SplitHalfReliability:
    """The split-half check of the module docstring from every prompt's activation at the site.

    Args:
        site: ``(lang, label) -> SiteGroup``; ``label`` is harmful or harmless.
        base: the language every other one is compared with.
        layer, position: the site (provenance only: the rows are already read there).
        langs: the languages and their order (default: as in ``site``); one without both groups, or with fewer
            than ``2 * MIN_PER_HALF`` prompts in one, has null statistics with the reason.
        n_splits: random stratified splits averaged (seeds ``0 .. n_splits - 1``, the same in every language).
        what: how the reasons name the prompts (``"train prompts"``).
    """
    if n_splits < 1:
        raise InputError(f"n_splits must be at least 1 (got {n_splits})")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must lie in (0, 1), got {confidence}")
    order = list(langs or dict.fromkeys(lang for lang, _ in site))
    if base not in order:
        order.insert(0, base)
    n = {x: {label: len(site[x, label].ids) if (x, label) in site else 0 for label in LABELS} for x in order}
    unusable = {x: r for x in order if (r := too_few(n[x]["harmful"], n[x]["harmless"], what)) is not None}
    usable = [x for x in order if x not in unusable]
    nan = math.nan
    values = {q: dict.fromkeys(order, nan) for q in QUANTITIES}
    intervals = {q: dict.fromkeys(order, (nan, nan)) for q in QUANTITIES}
    why: dict[str, dict[str, str]] = {}

    def missing(q: str, x: str, reason: str) -> None:
        why.setdefault(q, {})[x] = reason
        why.setdefault(q + "_ci", {})[x] = reason

    for x, reason in unusable.items():
        for q in QUANTITIES:
            missing(q, x, reason if (q == "within" or x == base) else
                    "; ".join(f"{y}: {unusable[y]}" for y in dict.fromkeys([base, x]) if y in unusable))
    if base in unusable:  # every cross-language quantity needs the base language's halves
        for x in usable:
            for q in ("same_prompt", "paired", "disjoint", "corrected"):
                missing(q, x, f"{base}: {unusable[base]}")
    if usable:
        dims = {site[x, label].x.shape[1] for x in usable for label in LABELS}
        if len(dims) != 1:
            raise InputError(f"site activations of different widths: {sorted(dims)}")
        labels = {label: _label({x: site[x, label] for x in usable}) for label in LABELS}
        ref = base if base in usable else usable[0]
        rows = _jackknife(labels, ref, usable, n_splits)
        sizes = [len(labels[label].ids) for label in LABELS]
        for x in usable:
            for q in QUANTITIES:
                if base not in usable and q != "within":
                    continue
                values[q][x] = float(rows[q][x][0])
                if math.isnan(values[q][x]):
                    missing(q, x, _undefined(q, x, ref, values))
                    continue
                intervals[q][x], gap = _interval(rows[q][x], sizes, confidence, q)
                if gap:
                    why.setdefault(q + "_ci", {})[x] = gap
    return SplitHalfReliability(base, layer, position, order, values, intervals, why, n, n_splits, confidence)


def _undefined(q: str, x: str, base: str, values: Mapping[str, Mapping[str, float]]) -> str:
    if q == "corrected" and not math.isnan(values["disjoint"][x]):
        return (f"a within-language cosine is not positive (within {base} {_fmt(values['within'][base])}, "
                f"within {x} {_fmt(values['within'][x])}): the halves do not reproduce each other")
    return "zero direction (the harmful and harmless means are equal) in every split"


def _interval(rows: Tensor, sizes: Sequence[int], confidence: float, q: str
              ) -> tuple[tuple[float, float], str | None]:
    """``θ ± z·se`` from the point (row 0) and the leave-one-out rows (one block per label, of ``sizes``)."""
    left_out = rows[1:]
    if not torch.isfinite(left_out).all():
        bad = int((~torch.isfinite(left_out)).sum())
        cause = "a within-language cosine is not positive" if q == "corrected" else "a direction is zero"
        return (math.nan, math.nan), (f"undefined with one prompt left out ({bad} of {left_out.numel()} prompts: "
                                      f"{cause}): the interval is unbounded")
    bounds = None if q == "corrected" else (-1.0, 1.0)  # a cosine stays in [-1, 1]
    lo, hi = jackknife_interval(float(rows[0]), torch.split(left_out, list(sizes)), confidence, bounds)
    return (lo, hi), None
