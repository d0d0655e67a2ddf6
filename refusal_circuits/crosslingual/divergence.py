"""The per-language divergence summary, in words and numbers.

:func:`divergence` puts together, per translation, what the other modules of :mod:`refusal_circuits.crosslingual`
measure: whether the language is safety-aligned (its baseline rates), whether r̂ separates its prompts
(:func:`~refusal_circuits.crosslingual.directions.separation`), where its projection on r̂ leaves the base
language's (:func:`~refusal_circuits.crosslingual.paired.trajectory_split_layer`), which heads differ
(:func:`~refusal_circuits.crosslingual.paired.paired_heads`) and how much of the gap patching them closes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from refusal_circuits.attribution import Attribution
from refusal_circuits.chat import SPAN_NAMES
from refusal_circuits.crosslingual.directions import separation
from refusal_circuits.crosslingual.paired import (
    NO_GAP,
    PairedHeads,
    paired_heads,
    trajectory_split_layer,
    unpaired_why,
)
from refusal_circuits.crosslingual.transfer import is_aligned
from refusal_circuits.errors import InputError
from refusal_circuits.io import nullable
from refusal_circuits.markup import esc
from refusal_circuits.stats import ONE_PAIR, Rate
from refusal_circuits.stats import fmt_stat as _fmt

# --------------------------------------------------------------------------------------------------------------
# The per-language summary.


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
    crossfit: Any | None = None  # a CrossFitPatch (crosslingual.crossfit), or None (reason in why["crossfit"])

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
        parts.extend(self._controls_text())
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
                         f" of the gap in the r̂ projection at layer {layer}{score} (in-sample: chosen on the "
                         "pairs measured).")
        parts.extend(self._crossfit_text())
        return " ".join(parts)

    def _controls_text(self) -> list[str]:
        c = self.paired.controls
        if c is None:
            return []
        out = []
        if "did" in c.why:
            out.append(f"After the harmless control (difference in differences) significance is n/a ({c.why['did']}).")
        else:
            top = [(a, b) for a, b in c.ranked_did(5) if bool(c.did["significant"][a, b])][:3]
            heads = "; largest " + ", ".join(
                f"L{a}.H{b} ({float(c.did['mean'][a, b]):+.2f}, 95% CI {_fmt(float(c.did['ci_low'][a, b]), '+.2f')}"
                f"–{_fmt(float(c.did['ci_high'][a, b]), '+.2f')})" for a, b in top) if top else ""
            out.append(f"After the harmless control (difference in differences, {c.n_harmful} harmful and "
                       f"{c.n_harmless} harmless pairs) {c.n_did_significant()} heads differ significantly{heads}.")
        r = c.correlations

        def stat(key: str) -> str:
            why = c.why.get(key) or c.why.get("correlations")
            text = _fmt(r[key], why=why)
            if math.isfinite(r[key]) and math.isfinite(r[f"{key}_ci_low"]):
                text += f" [{r[f'{key}_ci_low']:.2f}, {r[f'{key}_ci_high']:.2f}]"
            return text

        out.append(f"On the harmful − harmless contrasts per head: Spearman {stat('rank_correlation')}, slope "
                   f"{stat('slope')} (raw writes: Spearman {stat('raw_rank_correlation')}); on halves of the pairs, "
                   f"{self.base} vs {self.base} {stat('null_rank_correlation')} (the ceiling), {self.base} vs "
                   f"{self.lang} {stat('halves_rank_correlation')}.")
        return out

    def _crossfit_text(self) -> list[str]:
        cf = self.crossfit
        if cf is None:
            why = self.why.get("crossfit", "not patched")
            return [] if why == "not patched" else [f"Cross-fitted patching n/a ({why})."]
        s = cf.stats

        def frac(key: str) -> str:
            text = _fmt(s[key], ".0%", cf.why.get(key))
            if math.isfinite(s[key]) and math.isfinite(s[f"{key}_ci_low"]):
                text += f" [{s[f'{key}_ci_low']:.0%}, {s[f'{key}_ci_high']:.0%}]"
            return text

        return [f"Cross-fitted (heads chosen on one half of the pairs, measured on the other): patching closes "
                f"{frac('fraction')} of the gap in the r̂ projection (halves {frac('fold_a_fraction')} and "
                f"{frac('fold_b_fraction')}) and {frac('score_fraction')} of the gap in the refusal score."]

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
            "heads": [ph.head_row_json({key: h[key] for key in ("layer", "head", "mean", "ci_low", "ci_high",
                                                                "significant")}
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
            **{key: paired[key] for key in ("controls", "n_did_significant", "spans_without_value_bias",
                                            "spans_without_value_bias_why") if key in paired},
            **({"patch_crossfit": self.crossfit.to_json()} if self.crossfit is not None else
               nullable("patch_crossfit", None, self.why.get("crossfit"))),
        }

    def _repr_html_(self) -> str:
        return f"<p>{esc(self.summary())}</p>" + self.paired._repr_html_()


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
        return "".join(f"<h4>{esc(k)}</h4>" + v._repr_html_() for k, v in self.languages.items()) + "".join(
            f"<h4>{esc(k)}</h4><p>n/a ({esc(why)})</p>" for k, why in self.skipped.items())

def divergence(attribution: Attribution, base: str = "en", langs: Sequence[str] | None = None, *,
               baseline: Mapping[str, tuple[Rate | None, Rate | None]] | None = None,
               patch: Mapping[str, Any] | None = None,
               alpha: float = 0.05, seed: int = 0, categories: Mapping[str, str | None] | None = None,
               value_bias: Tensor | None = None, value_bias_why: str | None = None,
               crossfit: Mapping[str, Any] | None = None, crossfit_why: Mapping[str, str] | None = None
               ) -> Divergence:
    """Per-language divergence summaries from an attribution of paired prompts (and optional baseline rates, where
    one of a language's labels may be None, and :class:`~refusal_circuits.patching.PairPatch` results per
    language). Languages with no pair are skipped, with the reason (:func:`unpaired_why`).

    The controls (:mod:`~refusal_circuits.crosslingual.controls`) take ``categories`` (id to harm category, for
    the stratified halves) and ``value_bias`` (``[layer, head]``, or None with ``value_bias_why``); ``crossfit``
    holds :class:`~refusal_circuits.crosslingual.crossfit.CrossFitPatch` results per language (``crossfit_why``:
    why a language has none)."""
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
        paired = paired_heads(attribution, base, lang, alpha=alpha, seed=seed, categories=categories,
                              value_bias=value_bias, value_bias_why=value_bias_why)
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
                why[key] = NO_GAP[gap]
        cf = (crossfit or {}).get(lang)
        if cf is None:
            why["crossfit"] = (crossfit_why or {}).get(lang, "not patched")
        out[lang] = LanguageDivergence(
            lang, base, paired.n_pairs, h, s, float(sep.auroc[i, layer]), float(sep.auroc[bi, layer]), split, traj,
            paired, traj["base"][layer] - traj["other"][layer], frac, list(heads), (layer, pos), sfrac, why, cf)
    return Divergence(base, out, attribution.model, attribution.direction, skipped)
