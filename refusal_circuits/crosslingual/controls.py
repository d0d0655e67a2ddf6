"""Controls of the paired English-vs-translation comparison: what a language-wide offset, prompt-invariant parts of
the writes and the value biases would otherwise be read as.

* **Difference in differences** (:func:`~refusal_circuits.stats.did_stats`): per head, (translation − English) on
  the harmful pairs minus the same on the harmless pairs, so an offset of every translated write is not read as
  lost refusal.
* **Contrast correlation**: Spearman and slope of the per-head harmful − harmless contrasts of the two languages
  (a prompt-invariant part of the writes, shared by every prompt, lifts the raw correlation without saying
  anything about refusal), with bootstrap intervals, and an English-vs-English null on two stratified halves of
  the English prompts (:func:`~refusal_circuits.sampling.stratified_halves`): the ceiling a translation that used
  exactly the English heads would reach on half-size samples, beside the same statistic English half vs
  translation half.
* **Value biases** (:func:`value_bias_writes`): in raw coordinates a head's ``z`` holds its value bias
  ``b_V``, and since attention sums to 1 over the sources, its write holds ``b_V . (W_O[h]^T r̂)`` at every token,
  whatever the prompt. The source split spreads it over the spans by attention mass; here it is reported apart
  and removed from the spans.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_circuits.attribution import Attribution
from refusal_circuits.directions import Direction
from refusal_circuits.io import nullable
from refusal_circuits.models import HookedModel, hf_model_of
from refusal_circuits.sampling import stratified_halves
from refusal_circuits.stats import (
    benjamini_hochberg,
    correlation_why,
    did_stats_or_nan,
    did_why,
    percentile_interval,
)
from refusal_circuits.stats import spearman as _spearman

#: Why the value-bias terms are missing when no model was given.
NO_MODEL_BIAS = "needs the model's weights: the attribution keeps each value bias inside its head's z"
#: How exact the value-bias term is.
BIAS_EXACT = "exact, from the weights (no prompt enters, so no sampling interval)"


def value_bias_writes(model: HookedModel, direction: Direction | Tensor) -> tuple[Tensor | None, str | None]:
    """Each head's value-bias write onto r̂, ``[layer, head]``, exactly: ``m * b_V[kv(h)] . (W_O[h]^T r̂)``.

    Head ``h``'s output is ``z_h = sum_s A[p, s] v_s`` with ``v_s = W_V x_s + b_V``; the attention weights sum to 1
    over the sources, so ``z_h = sum_s A[p, s] W_V x_s + b_V`` and the bias writes the same at every token of every
    prompt (times the residual multiplier ``m``). Returns ``(tensor, None)``, or ``(None, why)`` where that is not
    exact from the weights alone: a post-norm scales the write per token (the scale is in no record), or the
    architecture has no separate value projection this reads.
    """
    from refusal_circuits.geometry import head_geometry

    geo = head_geometry(model)
    if geo.has_post_norm:
        return None, ("a post-norm scales each token's write, and the attribution does not keep that scale: the "
                      "value-bias term is not exact from the weights")
    hf = hf_model_of(model)
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if layers is None or len(layers) != geo.n_layers:
        return None, f"{geo.architecture}: no per-layer value projection (model.layers[l].self_attn.v_proj) to read"
    r = direction.vector if isinstance(direction, Direction) else direction
    r = r.to(torch.float64)
    r = (r / r.norm())[None]
    kv = geo.kv_of_head()
    out = torch.zeros(geo.n_layers, geo.n_heads, dtype=torch.float64)
    for layer, block in enumerate(layers):
        v_proj = getattr(getattr(block, "self_attn", None), "v_proj", None)
        if v_proj is None:
            return None, f"{geo.architecture}: no self_attn.v_proj in layer {layer} to read the value bias from"
        bias = getattr(v_proj, "bias", None)
        if bias is None:
            continue  # no value bias: the term is 0
        b = bias.detach().to(torch.float64).cpu().view(geo.n_kv_heads, geo.d_head)[kv]  # [head, d_head]
        read = geo.head_readout(layer, r.to(geo.w_o[layer].device))[0].cpu()  # [head, d_head]
        out[layer] = geo.attn[layer].multiplier * (b * read).sum(-1)
    return out.float(), None


def _slope(x: Tensor, y: Tensor) -> float:
    power = float(x.flatten() @ x.flatten())
    return float(x.flatten() @ y.flatten()) / power if power > 0 else math.nan


def _rho_slope(x: Tensor, y: Tensor) -> tuple[float, float]:
    return _spearman(x, y), _slope(x, y)


def _resample_means(x: Tensor, counts: Tensor) -> Tensor:
    """Bootstrap means ``[n_boot, features]`` from per-replicate counts ``[n_boot, n]`` of the rows of ``x``."""
    return counts @ x.reshape(len(x), -1) / len(x)


def _counts(n: int, n_boot: int, g: torch.Generator) -> Tensor:
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))


def _stat(key: str, value: float, boots: Sequence[float], why: str | None, ci: float = 0.95) -> dict[str, float]:
    lo, hi = percentile_interval(torch.tensor(list(boots), dtype=torch.float64), ci) if why is None else (math.nan,
                                                                                                         math.nan)
    return {key: value, f"{key}_ci_low": lo, f"{key}_ci_high": hi}


@dataclass(frozen=True)
class PairedControls:
    """The controls of one paired comparison (English vs one translation); see the module docstring.

    Attributes:
        did: per head ``mean`` (difference in differences), ``ci_low``, ``ci_high``, ``p``, ``q``, ``significant``,
            ``harmful_mean`` (the harmful-only paired difference) and ``harmless_mean``, each ``[layer, head]``.
        correlations: ``rank_correlation`` / ``slope`` of the contrasts, ``raw_rank_correlation`` / ``raw_slope``
            (harmful mean writes, as :class:`~refusal_circuits.crosslingual.paired.PairedHeads` has them), the
            null ``null_rank_correlation`` / ``null_slope`` (English half vs English half) and the same on halves
            ``halves_rank_correlation`` / ``halves_slope`` (English half vs the other half's translations, mean of
            both ways), each with ``_ci_low`` / ``_ci_high`` (percentile bootstrap, prompts resampled).
        value_bias: ``[layer, head]`` each head's value-bias write onto r̂ (:func:`value_bias_writes`), or None.
        spans_without_bias: the per-span paired statistics with the value bias taken out of every span, or None.
        why: reasons for what is NaN or None, under ``did``, ``correlations`` (and each correlation's key),
            ``null``, ``value_bias``.
    """

    n_harmful: int
    n_harmless: int
    did: dict[str, Tensor]
    correlations: dict[str, float]
    halves: str
    value_bias: Tensor | None = None
    spans_without_bias: dict[str, Tensor] | None = None
    why: dict[str, str] = field(default_factory=dict)

    def n_did_significant(self) -> int:
        return int(self.did["significant"].sum())

    def head_json(self, layer: int, head: int) -> dict[str, Any]:
        """One head's difference in differences, with the harmful-only and harmless differences beside it."""
        why = self.why.get("did")
        out: dict[str, Any] = {"did_significant": bool(self.did["significant"][layer, head])}
        for key, name in (("mean", "did"), ("ci_low", "did_ci_low"), ("ci_high", "did_ci_high"), ("p", "did_p"),
                          ("q", "did_q"), ("harmful_mean", "harmful_diff"), ("harmless_mean", "harmless_diff")):
            reason = self.why.get("did_harmless") if key in ("mean", "harmless_mean") else why
            out.update(nullable(name, float(self.did[key][layer, head]), reason))
        if self.value_bias is not None:
            out["value_bias"] = float(self.value_bias[layer, head])
        return out

    def ranked_did(self, k: int | None = None) -> list[tuple[int, int]]:
        """Heads by |difference in differences| (NaN last)."""
        m = self.did["mean"].nan_to_num(0.0).abs().flatten()
        n_heads = int(self.did["mean"].shape[1])
        order = torch.argsort(m, descending=True).tolist()[:k]
        return [divmod(int(f), n_heads) for f in order]

    def to_json(self, k: int = 20) -> dict[str, Any]:
        corr: dict[str, Any] = {}
        for key, value in self.correlations.items():
            base = key.removesuffix("_ci_low").removesuffix("_ci_high")
            reason = self.why.get(base) or self.why.get("correlations")
            if key != base:
                reason = reason or self.why.get("correlations_ci") or "not defined on any bootstrap resample"
            corr.update(nullable(key, value, reason))
        out: dict[str, Any] = {
            "n_harmful_pairs": self.n_harmful, "n_harmless_pairs": self.n_harmless,
            "did_method": ("(translation - base) on harmful pairs minus the same on harmless pairs; percentile "
                           "bootstrap resampling harmful and harmless pairs independently; label-permutation test "
                           "of the Welch statistic; Benjamini-Hochberg across heads"),
            # with too few pairs no head can be tested: the count is missing, not zero
            **nullable("n_did_significant", None if "did" in self.why else self.n_did_significant(),
                       self.why.get("did")),
            "did_heads": [{"layer": a, "head": b, **self.head_json(a, b)} for a, b in self.ranked_did(k)],
            "correlations": corr, "halves": self.halves,
            **nullable("value_bias", None if self.value_bias is None else self.value_bias.tolist(),
                       self.why.get("value_bias")),
        }
        if self.value_bias is not None:
            out["value_bias_interval"] = BIAS_EXACT
        return out


def _halves(ids: Sequence[str], categories: Mapping[str, str | None] | None, seed: int) -> tuple[list[int], list[int]]:
    """Positions in ``ids`` of two stratified halves (by category where known, else a seeded random split)."""
    cats = {i: (categories or {}).get(i) for i in ids}
    a, _ = stratified_halves(cats, seed=seed)
    first = [n for n, i in enumerate(ids) if i in a]
    return first, [n for n in range(len(ids)) if n not in set(first)]


def paired_controls(attribution: Attribution, harmful: Sequence[tuple[int, int]], harmless: Sequence[tuple[int, int]],
                    *, positions: str | int = "post", floor: float, alpha: float = 0.05,
                    categories: Mapping[str, str | None] | None = None,
                    value_bias: Float[Tensor, "layer head"] | None = None, value_bias_why: str | None = None,
                    n_boot: int = 2000, n_perm: int = 2000, seed: int = 0) -> PairedControls:
    """The controls for the ``harmful`` and ``harmless`` pairs ``(base_row, lang_row)`` of ``attribution``.

    ``floor`` and ``alpha`` are the per-head comparison's (:func:`~refusal_circuits.crosslingual.paired_heads`),
    so a head counts as significant by the same rule. ``categories`` (id to harm category) stratifies the
    halves of the null; without it they are a seeded random split.
    """
    scores = attribution.head_scores(positions).double()  # [prompt, layer, head]
    hb, ho = [p[0] for p in harmful], [p[1] for p in harmful]
    sb, so = [p[0] for p in harmless], [p[1] for p in harmless]
    why: dict[str, str] = {}
    did = did_stats_or_nan(scores[ho] - scores[hb], scores[so] - scores[sb], n_boot=n_boot, n_perm=n_perm,
                           seed=seed + 3)
    reason = did_why(len(harmful), len(harmless))
    if reason is not None:
        why["did"] = reason
    if not harmless:
        why["did_harmless"] = "no harmless prompt is paired (same id) with one of the base language"
    q = benjamini_hochberg(did["p"])
    significant = (q < alpha) & (did["mean"].abs() >= floor)
    did = {**did, "q": q, "significant": significant}
    halves_text = ("stratified by harm category" if categories and any(categories.get(attribution.ids[i]) is not None
                                                                      for i in hb) else "seeded random (no categories)")
    correlations, corr_why = _correlations(scores, hb, ho, sb, so, [attribution.ids[i] for i in hb],
                                           [attribution.ids[i] for i in sb], categories, n_boot, seed)
    why.update(corr_why)
    if min(len(harmful), len(harmless)) < 2:
        correlations = {k: math.nan if k.endswith(("_ci_low", "_ci_high")) else v for k, v in correlations.items()}
        why["correlations_ci"] = "fewer than 2 harmful or harmless pairs: no interval"
    spans = None
    if value_bias is not None:
        vb = value_bias.double()
        src = attribution.sources.double() - attribution.attn_mass.double() * vb[None, :, :, None, None]
        spans_t = src.mean(3).sum((1, 2))  # [prompt, span]
        from refusal_circuits.stats import paired_stats_or_single

        spans = paired_stats_or_single(spans_t[ho] - spans_t[hb], n_boot=n_boot, n_perm=n_perm, seed=seed + 2)
    else:
        why["value_bias"] = value_bias_why or NO_MODEL_BIAS
    return PairedControls(len(harmful), len(harmless), did, correlations, halves_text,
                          None if value_bias is None else value_bias.float(), spans, why)


def _rho_slope_stats(out: dict[str, float], why: dict[str, str], prefix: str, base: Tensor, other: Tensor,
                     boot_base: Tensor, boot_other: Tensor, what: str, no_slope: str) -> None:
    """Rank correlation and slope of ``other`` on ``base`` (per head), with bootstrap intervals from the resampled
    ``boot_*`` rows, into ``out`` as ``{prefix}rank_correlation`` / ``{prefix}slope``; reasons where undefined into
    ``why``."""
    pairs = [_rho_slope(boot_base[b], boot_other[b]) for b in range(boot_base.shape[0])]
    rho, slope = _rho_slope(base, other)
    rho_why = correlation_why(base, other, what)
    out |= _stat(f"{prefix}rank_correlation", rho, [p[0] for p in pairs], rho_why)
    out |= _stat(f"{prefix}slope", slope, [p[1] for p in pairs], None if math.isfinite(slope) else no_slope)
    if rho_why is not None:
        why[f"{prefix}rank_correlation"] = rho_why
    if not math.isfinite(slope):
        why[f"{prefix}slope"] = no_slope


def _correlations(scores: Tensor, hb: list[int], ho: list[int], sb: list[int], so: list[int], h_ids: list[str],
                  s_ids: list[str], categories: Mapping[str, str | None] | None, n_boot: int, seed: int
                  ) -> tuple[dict[str, float], dict[str, str]]:
    """Contrast, raw, null and halves correlations with their bootstrap intervals (prompts resampled: harmful
    pairs and harmless pairs independently, each pair one unit).

    The intervals are percentile intervals. A resample's means are noisier than the sample's, so a correlation
    of means is biased downwards under resampling and, near the ceiling, the interval can sit below the
    estimate; the null and the halves statistic are resampled alike, which is what makes them comparable."""
    g = torch.Generator().manual_seed(seed + 4)
    f = scores[0].numel()
    eh, th, es, ts = (scores[i].reshape(len(i), f) for i in (hb, ho, sb, so))
    why: dict[str, str] = {}
    out: dict[str, float] = {}
    # Raw: the harmful mean writes (what PairedHeads correlates).
    ch, cb = _counts(len(hb), n_boot, g), _counts(max(len(sb), 1), n_boot, g)
    boot_e, boot_t = _resample_means(eh, ch), _resample_means(th, ch)
    _rho_slope_stats(out, why, "raw_", eh.mean(0), th.mean(0), boot_e, boot_t, "mean head scores",
                     "no head writes onto r̂ in the base language")
    # Contrasts: harmful minus harmless, per language.
    nan_keys = ("rank_correlation", "slope", "null_rank_correlation", "null_slope", "halves_rank_correlation",
                "halves_slope")
    if not sb:
        for key in nan_keys:
            out |= {key: math.nan, f"{key}_ci_low": math.nan, f"{key}_ci_high": math.nan}
        why["correlations"] = "no harmless pairs: no harmful - harmless contrast"
        return out, why
    _rho_slope_stats(out, why, "", eh.mean(0) - es.mean(0), th.mean(0) - ts.mean(0),
                     boot_e - _resample_means(es, cb), boot_t - _resample_means(ts, cb), "head contrasts",
                     "no head's harmful - harmless contrast in the base language")
    # Halves: English vs English (the null, the ceiling) and English vs translation on the same half sizes.
    ha, hb2 = _halves(h_ids, categories, seed)
    sa, sb2 = _halves(s_ids, categories, seed)
    if min(len(ha), len(hb2), len(sa), len(sb2)) < 1:
        for key in nan_keys[2:]:
            out |= {key: math.nan, f"{key}_ci_low": math.nan, f"{key}_ci_high": math.nan}
        why["null"] = why["halves"] = "fewer than 2 harmful or harmless pairs: no two halves to compare"
        for key in nan_keys[2:]:
            why[key] = why["null"]
        return out, why

    def contrast(x_h: Tensor, x_s: Tensor, rows_h: list[int], rows_s: list[int], boot: bool) -> Tensor:
        if not boot:
            return x_h[rows_h].mean(0) - x_s[rows_s].mean(0)
        return (_resample_means(x_h[rows_h], _counts(len(rows_h), n_boot, g))
                - _resample_means(x_s[rows_s], _counts(len(rows_s), n_boot, g)))

    def both(boot: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (contrast(eh, es, ha, sa, boot), contrast(eh, es, hb2, sb2, boot), contrast(th, ts, ha, sa, boot),
                contrast(th, ts, hb2, sb2, boot))

    ea, eb, ta, tb = both(False)
    bea, beb, bta, btb = both(True)
    null = _rho_slope(ea, eb)
    cross = tuple((x + y) / 2 for x, y in zip(_rho_slope(ea, tb), _rho_slope(eb, ta), strict=True))
    boots_null = [_rho_slope(bea[b], beb[b]) for b in range(n_boot)]
    boots_cross = [tuple((x + y) / 2 for x, y in zip(_rho_slope(bea[b], btb[b]), _rho_slope(beb[b], bta[b]),
                                                      strict=True)) for b in range(n_boot)]
    n_why = correlation_why(ea, eb, "half contrasts")
    x_why = correlation_why(ea, tb, "half contrasts") or correlation_why(eb, ta, "half contrasts")
    out |= _stat("null_rank_correlation", null[0], [p[0] for p in boots_null], n_why)
    out |= _stat("null_slope", null[1], [p[1] for p in boots_null], None if math.isfinite(null[1]) else "none")
    out |= _stat("halves_rank_correlation", cross[0], [p[0] for p in boots_cross], x_why)
    out |= _stat("halves_slope", cross[1], [p[1] for p in boots_cross], None if math.isfinite(cross[1]) else "none")
    for key, reason in (("null_rank_correlation", n_why), ("halves_rank_correlation", x_why)):
        if reason is not None:
            why[key] = reason
    for key in ("null_slope", "halves_slope"):
        if not math.isfinite(out[key]):
            why[key] = "no head's harmful - harmless contrast in an English half"
    return out, why
