"""English vs each translation, paired by prompt id: per head, per layer, per source span, and along the layers.

* :func:`paired_heads`: for every prompt id, each head's write in English vs in the translation; mean paired
  difference with bootstrap intervals and sign-flip permutation p-values, Benjamini-Hochberg across heads, plus
  a floor of practical size so float noise never counts; rank correlation tells "the same heads, weaker" from
  "different heads".
* :func:`trajectory_split_layer`: the first layer from which the two languages' projections on r̂ stay apart.
* :func:`patch_top_heads`: the heads where the translation loses most, patched from the base run into the
  translation (:mod:`refusal_circuits.patching`), and :func:`patch_json` for its record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from refusal_circuits.attribution import Attribution
from refusal_circuits.chat import SPAN_NAMES, Span
from refusal_circuits.crosslingual.controls import PairedControls, paired_controls
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction
from refusal_circuits.errors import InputError
from refusal_circuits.io import nullable
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel
from refusal_circuits.stats import ONE_PAIR, benjamini_hochberg, correlation_why, spearman
from refusal_circuits.stats import fmt_stat as _fmt
from refusal_circuits.stats import paired_stats_or_single as _paired_stats_or_single

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
            or test (:data:`~refusal_circuits.stats.ONE_PAIR`).
        controls: the harmless control (difference in differences), the contrast correlations with their null
            and the value-bias terms (:class:`~refusal_circuits.crosslingual.controls.PairedControls`), or None
            where not computed.
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
    controls: PairedControls | None = None

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

    def head_row_json(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`stats_json` of a head row, with its difference in differences beside it (where computed)."""
        out = self.stats_json(row)
        if self.controls is not None:
            out.update(self.controls.head_json(int(row["layer"]), int(row["head"])))
        return out

    def controls_json(self, k: int = 20) -> dict[str, Any]:
        """The controls' keys of :meth:`to_json` (``controls``, ``n_did_significant``, the spans without value
        biases); empty without controls."""
        c = self.controls
        if c is None:
            return {}
        out: dict[str, Any] = {"controls": c.to_json(k),
                               **nullable("n_did_significant", None if "did" in c.why else c.n_did_significant(),
                                          c.why.get("did"))}
        sp = c.spans_without_bias
        out.update(nullable("spans_without_value_bias", None if sp is None else {
            SPAN_NAMES[j]: self.stats_json({key: float(sp[key][j]) for key in ("mean", "ci_low", "ci_high")})
            for j in range(1, len(SPAN_NAMES)) if j != int(Span.PAD)}, c.why.get("value_bias")))
        return out

    def to_json(self, k: int = 20) -> dict[str, Any]:
        return {"base": self.base, "lang": self.lang, "n_pairs": self.n_pairs, "label": self.label,
                "positions": self.positions,
                **nullable("rank_correlation", self.rank_correlation, self.why.get("rank_correlation")),
                **nullable("slope", self.slope, self.why.get("slope")),
                **nullable("pattern", self.pattern, self.pattern_why()),
                "floor": self.floor, "alpha": self.alpha, "method": self.method,
                "n_significant": self.n_significant(), "heads": [self.head_row_json(h) for h in self.ranked_heads(k)],
                "layers": [self.stats_json({"layer": i, **{key: float(self.layers[key][i])
                                                           for key in ("mean", "ci_low", "ci_high")}})
                           for i in range(len(self.layers["mean"]))],
                "spans": {SPAN_NAMES[j]: self.stats_json({key: float(self.spans[key][j])
                                                          for key in ("mean", "ci_low", "ci_high")})
                          for j in range(1, len(SPAN_NAMES)) if j != int(Span.PAD)},
                **self.controls_json(k)}

    def _repr_html_(self) -> str:
        rows = (
            f"<tr><td>L{h['layer']}.H{h['head']}</td><td>{h['base_mean']:+.3f}</td><td>{h['other_mean']:+.3f}</td>"
            f"<td>{h['mean']:+.3f}</td><td>[{_fmt(h['ci_low'], '+.3f')}, {_fmt(h['ci_high'], '+.3f')}]</td>"
            f"<td>{_fmt(h['q'], '.3g')}</td><td>{'✔' if h['significant'] else ''}</td></tr>" for h in self.ranked_heads(10))
        caption = (f"{esc(self.lang)} − {esc(self.base)}, {self.n_pairs} {esc(self.label)} pairs: "
                   f"{esc(self.pattern or _fmt(None, why=self.pattern_why()))} (Spearman "
                   f"{_fmt(self.rank_correlation)}, slope {_fmt(self.slope)}); {self.n_significant()} significant heads"
                   + (f" ({esc(self.why['p'])})" if "p" in self.why else "")
                   + (f"; {self.controls.n_did_significant()} after the harmless control (difference in differences)"
                      if self.controls is not None else ""))
        return table(caption, ["head", self.base, self.lang, "diff", "95% CI", "q", "sig."], rows)


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
                 n_perm: int = 2000, seed: int = 0, controls: bool = True,
                 categories: Mapping[str, str | None] | None = None, value_bias: Tensor | None = None,
                 value_bias_why: str | None = None) -> PairedHeads:
    """Paired comparison of every head's write onto r̂, ``lang`` minus ``base``, over prompts sharing an id.

    A head is *significant* when its Benjamini-Hochberg q-value (over all heads, from a two-sided sign-flip
    permutation test on the paired differences) is below ``alpha`` **and** its mean difference is at least
    ``rel_floor`` times the largest mean |write| of any head in ``base``: differences smaller than that are float
    noise (different batching, padding) or too small to matter, however consistent.

    One pair gives every difference but no interval, test or significance (NaN, with
    :data:`~refusal_circuits.stats.ONE_PAIR` in :attr:`PairedHeads.why`); none is an error.

    With ``controls`` (and ``label="harmful"``) the record also carries
    :class:`~refusal_circuits.crosslingual.controls.PairedControls`: the difference in differences against the
    harmless pairs, the contrast correlations with the English-vs-English null on halves (stratified by
    ``categories``, id to harm category, where given) and, given ``value_bias`` (``[layer, head]``,
    :func:`~refusal_circuits.crosslingual.controls.value_bias_writes`), the spans without it.
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
    ctl = None
    if controls and label == "harmful":
        ctl = paired_controls(attribution, pairs, pair_rows(attribution, base, lang, "harmless"), positions=positions,
                              floor=floor, alpha=alpha, categories=categories, value_bias=value_bias,
                              value_bias_why=value_bias_why, n_boot=n_boot, n_perm=n_perm, seed=seed)
    return PairedHeads(base, lang, len(pairs), label, str(positions), heads, layers, spans, base_mean.float(),
                       other_mean.float(), rho, slope, floor, alpha, why=why, controls=ctl)


def trajectory_split_layer(attribution: Attribution, base: str, lang: str, *, label: str = "harmful",
                           position: int | None = None, rel_gap: float = 0.25, n_boot: int = 2000, seed: int = 0
                           ) -> tuple[int | None, dict[str, list[float]]]:
    """The first layer from which the ``lang`` projection on r̂ stays apart from ``base``'s.

    Apart means: the paired bootstrap interval of the difference excludes 0 and the difference is at least
    ``rel_gap`` times the base language's mean projection at that layer, at every layer from there on (up to the
    final residual stream). Returns the layer (or None) and both mean trajectories. One pair has no interval, so
    its layer is None (and :class:`~refusal_circuits.crosslingual.divergence.LanguageDivergence` says why).
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



def unpaired_why(attribution: Attribution, base: str, lang: str, label: str = "harmful") -> str | None:
    """Why ``lang`` cannot be compared with ``base`` (no ``label`` prompt shares an id with one of ``base``), or
    None."""
    if pair_rows(attribution, base, lang, label):
        return None
    have = sorted({b for a, b in zip(attribution.langs, attribution.labels, strict=True) if a == lang})
    return (f"no {label} prompt of {lang} shares an id with one of {base} (the paired comparison needs {label} "
            f"translations; {lang} has {', '.join(have) or 'no'} prompts)")


# --------------------------------------------------------------------------------------------------------------
# Patching the heads that differ.


#: Why a patched fraction is missing: the two runs agree, so there is no gap to close.
NO_GAP = {"fraction": "no gap in the r̂ projection between the base language and the translation to close",
           "score_fraction": "no gap in the refusal score between the base language and the translation to close",
           "base_score": "the base run's refusal score was not measured"}


def patch_json(pp: Any) -> dict[str, Any]:
    """A :class:`~refusal_circuits.patching.PairPatch` as JSON, with ``null`` and the reason
    (:func:`~refusal_circuits.io.nullable`) for a fraction of a gap that is not there."""
    out: dict[str, Any] = {}
    for key, value in pp.to_json().items():
        out.update(nullable(key, value, NO_GAP.get(key)) if isinstance(value, float) else {key: value})
    return out


def attributed_instruction(attribution: Attribution, prompts: PromptSet) -> Callable[[int, str], str]:
    """``(row, lang) -> instruction``: the text of the attributed prompt of ``row`` in ``lang`` (its translation),
    from ``prompts``; a prompt they lack is an :class:`~refusal_circuits.errors.InputError` naming it."""
    by_key = {(r.id, r.lang, r.label): r for r in prompts}

    def instruction(row: int, lang: str) -> str:
        try:
            return by_key[(attribution.ids[row], lang, attribution.labels[row])].instruction
        except KeyError as e:
            raise InputError(f"the prompts lack the attributed prompt {e.args[0]}") from None

    return instruction


def losing_heads(paired: PairedHeads, k: int) -> list[tuple[int, int]]:
    """The ``k`` heads with the most negative paired difference (translation minus base), negative ones only."""
    flat = paired.heads["mean"].flatten()
    order = torch.argsort(flat)[:k].tolist()
    n_heads = paired.heads["mean"].shape[1]
    return [(i // n_heads, i % n_heads) for i in order if float(flat[i]) < 0]


def patch_top_heads(model: HookedModel, direction: Direction, attribution: Attribution, prompts: PromptSet, base: str,
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

    instruction = attributed_instruction(attribution, prompts)
    plans = {}
    for lang in langs:
        rows = pair_rows(attribution, base, lang)
        plans[lang] = (losing_heads(paired_heads(attribution, base, lang, alpha=alpha, controls=False), k),
                       rows)
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
