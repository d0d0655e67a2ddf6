"""Does a translation fail to recognise harm, or fail to refuse? Harmfulness and refusal read apart, per language.

Zhao et al. (NeurIPS 2025, "LLMs encode harmfulness and refusal separately") read two directions: harmfulness at
the instruction's last token ``t_inst`` and refusal at the post-instruction tokens. Here, for every language
``L`` and its fit split (train: the prompts the directions were extracted from),

    ĥ_L = mean harmful − mean harmless of resid_pre[ℓ_h] at t_inst          (harm; ℓ_h = r̂'s layer by default)
    r_L = mean harmful − mean harmless of resid_pre[ℓ_r] at r̂'s position   (refusal; ℓ_r = r̂'s layer)

and the yardsticks are the base language's harm direction ``ĥ_b`` and the study's r̂. On held-out prompts (the
test split; never the fit prompts), per language:

* **separation**: AUROC of harmful above harmless for the projections ``x · ĥ_b`` at t_inst and ``x · r̂`` at r̂'s
  site, and for the language's own directions (fitted on its train prompts, scored on its test prompts);
* **retention**: ``gap_L / gap_b`` with ``gap = mean projection of harmful − of harmless`` on the base directions:
  1 where the language separates as the base language does, 0 where not at all. ``harm retention`` says whether
  the translation is *recognised* as harmful where the base language's harm is represented; ``refusal retention``
  whether that becomes refusal where the base language's refusal is;
* **cosines** (fit prompts): ``cos(ĥ_L, r_L)``, ``cos(ĥ_L, ĥ_b)`` and ``cos(r_L, r̂)``;
* **transfer** (the refusal score, log-odds of the language's own refusal tokens at the first generated token):
  adding ``α ĥ_b`` at t_inst and layer ℓ_h on harmless prompts (``α = ‖gap vector of the base language‖``, as
  activation addition uses the difference-in-means norm), and ablating r̂ from every residual write on harmful
  prompts; each as the mean change per prompt;
* **heads** (optional): each head's direct write onto ĥ_b at t_inst and onto r̂ at its site
  (:func:`~refusal_circuits.attribution.attribute`), harmful − harmless on the test prompts, only heads below the
  site's layer (the others do not write into it), and the rank correlation of those contrasts with the base
  language's.

**Intervals**: percentile bootstrap over the test prompts (``n_boot`` replicates, seeded), resampled per label and
paired by id across a language and the base language where both have the same ids (translations), so a retention's
interval carries the sampling noise of both. Cosines (of fit-prompt differences in means) get a delete-one
jackknife over the fit prompts, paired the same way (:func:`~refusal_circuits.crosslingual.sites.jackknife_cos`):
a bootstrap replicate carries twice the data's noise, which put the 1.5B's English cos(ĥ, r) of 0.99 above its own
interval, [0.94, 0.98].

**Verdict** (:data:`LEVELS`): a retention interval at or above 1 with its lower end at least :data:`KEPT_FROM`
is ``as base``; one wholly between 0 and 1 ``weaker``; one that reaches 0 and stays below :data:`KEPT_FROM`
``absent``; anything else ``unclear``. No threshold is learned from the data. :meth:`LanguageHarm.sentence` turns
the two levels into one sentence ("German recognises harm as English does but converts less of it into
refusal"), with the numbers; its "but" (refusal lost more than harm) needs the paired difference
``retention_gap = harm retention − refusal retention`` (the same test resamples for both) to have its interval
above 0, not merely two different levels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from refusal_circuits import hooks
from refusal_circuits.activations import last_instruction, site_rows
from refusal_circuits.attribution import attribute
from refusal_circuits.chat import chat_format
from refusal_circuits.crosslingual.sites import (
    LABELS,
    Estimate,
    Resampler,
    index_plan,
    jackknife_cos,
    mean_estimate,
    own_refusal_tokens,
    refusal_scores,
    split_groups,
    unit,
)
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction, check_compatible
from refusal_circuits.errors import InputError
from refusal_circuits.forward import batches, last_logits
from refusal_circuits.interventions import ablate
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel, model_id
from refusal_circuits.scores import RefusalTokens, refusal_score
from refusal_circuits.stats import auroc, spearman
from refusal_circuits.stats import fmt_stat as _fmt

#: A retention interval whose lower end is at least this, and whose upper end reaches 1, is "as base".
KEPT_FROM = 0.5
#: The verdict levels of a retention, from its interval (module docstring).
LEVELS = ("as base", "weaker", "absent", "unclear")
#: Heads listed per direction and language in the record's JSON and the report.
TOP_HEADS = 8


def level(est: Estimate) -> str:
    """The verdict level of a retention estimate (module docstring)."""
    if est.why is not None:
        return "unclear"
    if est.high >= 1.0 and est.low >= KEPT_FROM:
        return "as base"
    if est.low > 0.0 and est.high < 1.0:
        return "weaker"
    if est.low <= 0.0 and est.high < KEPT_FROM:
        return "absent"
    return "unclear"


@dataclass(frozen=True)
class HeadContrasts:
    """Per head, the harmful − harmless mean direct write onto one direction, with intervals, on one language.

    ``mean / low / high``: ``[layer, head]``; NaN at layers at or above the site's (they do not write into it).
    ``agreement``: Spearman of these contrasts with the base language's over the heads that write into the site.
    """

    target: str
    layer: int
    mean: Float[Tensor, "layer head"]
    low: Float[Tensor, "layer head"]
    high: Float[Tensor, "layer head"]
    agreement: Estimate

    def top(self, k: int = TOP_HEADS) -> list[dict[str, Any]]:
        flat = self.mean.flatten()
        n_heads = self.mean.shape[1]
        writes = torch.isfinite(flat).nonzero().flatten()  # the heads below the site's layer
        out = []
        for i in writes[flat[writes].abs().argsort(descending=True)[:k]].tolist():
            layer, head = divmod(i, n_heads)
            out.append({"head": f"L{layer}.H{head}", "mean": float(self.mean[layer, head]),
                        "ci_low": float(self.low[layer, head]), "ci_high": float(self.high[layer, head])})
        return out

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "layer": self.layer, "agreement_with_base": self.agreement.to_json(),
                "top": self.top()}


@dataclass(frozen=True)
class LanguageHarm:
    """One language's harmfulness and refusal readings (module docstring); every statistic an :class:`Estimate`."""

    lang: str
    base: str
    n: dict[str, dict[str, int]]
    harm_auroc: Estimate
    refusal_auroc: Estimate
    harm_auroc_own: Estimate
    refusal_auroc_own: Estimate
    harm_retention: Estimate
    refusal_retention: Estimate
    cos_harm_refusal: Estimate
    cos_harm_base: Estimate
    cos_refusal_base: Estimate
    #: harm retention − refusal retention on the same resamples: above 0, the language loses more refusal than harm
    retention_gap: Estimate | None = None
    score_harmful: Estimate | None = None
    score_harmless: Estimate | None = None
    steer_harm: Estimate | None = None
    ablate_refusal: Estimate | None = None
    heads: dict[str, HeadContrasts] = field(default_factory=dict)
    #: where the refusal score's tokens come from: its own discovered ones, its native phrases, or none
    token_origin: str = "none"

    @property
    def harm_level(self) -> str:
        return level(self.harm_retention)

    @property
    def refusal_level(self) -> str:
        return level(self.refusal_retention)

    def sentence(self) -> str:
        """What the two retentions allow one to say, in one sentence with their numbers."""
        b, lang = self.base, self.lang
        if lang == b:
            return (f"{lang} is the base language: harm separates at AUROC {self.harm_auroc.text()} and refusal at "
                    f"{self.refusal_auroc.text()}; cos(harm, refusal) {self.cos_harm_refusal.text()}.")
        harm = {"as base": f"recognises harm as {b} does", "weaker": f"recognises harm more weakly than {b}",
                "absent": f"does not recognise harm along {b}'s harm direction",
                "unclear": "recognises harm to an extent these prompts cannot pin down"}[self.harm_level]
        rank = {"as base": 0, "weaker": 1, "absent": 2, "unclear": -1}
        d = self.retention_gap
        if d is not None and d.why is None:  # the paired difference decides, where there is one
            worse = d.low > 0 and self.harm_level != "absent"
        else:
            worse = rank[self.refusal_level] > rank[self.harm_level] >= 0  # refusal lost more than harm
        joint = " but" if worse else " and"
        refusal = {"as base": f"converts it into refusal as {b} does",
                   "weaker": "carries less refusal along r̂" if not worse else "converts less of it into refusal",
                   "absent": f"does not convert it into refusal along r̂({b})",
                   "unclear": "converts an unclear share of it into refusal"}[self.refusal_level]
        if self.harm_level == "absent":
            refusal = {"as base": f"still refuses along r̂({b}) as {b} does", "weaker": "refuses weakly",
                       "absent": "does not refuse", "unclear": "refuses to an unclear extent"}[self.refusal_level]
        own = ""
        if self.harm_level in ("absent", "unclear") and self.harm_auroc_own.why is None and self.harm_auroc_own.low > 0.5:
            own = f"; its own harm direction separates its prompts (AUROC {self.harm_auroc_own.text()})"
        diff = f", difference {d.text()}" if d is not None and d.why is None else ""
        return (f"{lang} {harm}{joint} {refusal} (harm retention {self.harm_retention.text()}, refusal retention "
                f"{self.refusal_retention.text()}{diff}{own}).")

    def to_json(self) -> dict[str, Any]:
        stats = {k: getattr(self, k) for k in ("harm_auroc", "refusal_auroc", "harm_auroc_own", "refusal_auroc_own",
                                                "harm_retention", "refusal_retention", "retention_gap",
                                                "cos_harm_refusal",
                                                "cos_harm_base", "cos_refusal_base", "score_harmful",
                                                "score_harmless", "steer_harm", "ablate_refusal")}
        return {"lang": self.lang, "n": self.n, "harm_level": self.harm_level, "refusal_level": self.refusal_level,
                "sentence": self.sentence(), "refusal_tokens": self.token_origin,
                **{k: v.to_json() for k, v in stats.items() if v is not None},
                **{k: None for k, v in stats.items() if v is None},
                **{f"{k}_why": (f"{self.lang} is the base language: both its retentions are 1 by definition"
                                if k == "retention_gap" else
                                f"{self.lang} has no refusal tokens of its own (none given or discovered, no native "
                                "phrases)") for k, v in stats.items() if v is None},
                "heads": {k: v.to_json() for k, v in self.heads.items()}}


@dataclass(frozen=True)
class HarmRefusal:
    """Harm vs refusal in every language (module docstring).

    Attributes:
        langs: per language, its :class:`LanguageHarm` (the base language first).
        harm_layer / refusal_layer / refusal_position: the sites (t_inst is :func:`last_instruction`).
        harm_direction: ĥ_b, float32 unit ``[d_model]``; ``alpha``: the steering coefficient.
        directions: per language, its unit ``harm`` and ``refusal`` directions (fit split), float32.
    """

    model: str
    base: str
    harm_layer: int
    refusal_layer: int
    refusal_position: int
    harm_position: int
    alpha: float
    harm_direction: Float[Tensor, " d_model"] = field(repr=False)
    directions: dict[str, dict[str, Tensor]] = field(repr=False)
    langs: dict[str, LanguageHarm] = field(repr=False)
    n_boot: int = 1000
    seed: int = 0

    def summary(self) -> list[str]:
        return [self.langs[lang].sentence() for lang in self.langs]

    def tensors(self) -> dict[str, Tensor]:
        out = {"harm_direction": self.harm_direction.float().contiguous()}
        for lang, d in self.directions.items():
            out.update({f"{kind}.{lang}": v.float().contiguous() for kind, v in d.items()})
        return out

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "base": self.base, "harm_layer": self.harm_layer,
                "harm_position": self.harm_position, "refusal_layer": self.refusal_layer,
                "refusal_position": self.refusal_position, "alpha": self.alpha, "n_boot": self.n_boot,
                "seed": self.seed, "levels": list(LEVELS), "kept_from": KEPT_FROM,
                "langs": {lang: rec.to_json() for lang, rec in self.langs.items()}}

    def _repr_html_(self) -> str:
        return harm_table(self.to_json())

    def __repr__(self) -> str:
        return "\n".join([f"HarmRefusal({self.model}, harm at layer {self.harm_layer} t_inst, refusal at layer "
                          f"{self.refusal_layer} position {self.refusal_position}):", *self.summary()])


def harm_table(obj: Mapping[str, Any]) -> str:
    """The HTML table of a :meth:`HarmRefusal.to_json` (the report and the Jupyter view share it)."""
    def cell(rec: Mapping[str, Any], key: str) -> str:
        s = rec.get(key)
        if not s:
            return "–"
        if s.get("value") is None or s.get("ci_low") is None:
            return f"<span class='muted'>n/a ({esc(s.get('value_why') or s.get('ci_low_why', ''))})</span>"
        return f"{_fmt(s['value'])} [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]"

    cols = [("harm_retention", "harm retention"), ("refusal_retention", "refusal retention"),
            ("retention_gap", "harm − refusal retention"),
            ("harm_auroc", "harm AUROC (base ĥ)"), ("refusal_auroc", "refusal AUROC (r̂)"),
            ("harm_auroc_own", "harm AUROC (own)"), ("cos_harm_refusal", "cos(ĥ, r) own"),
            ("cos_harm_base", "cos(ĥ, ĥ_base)"), ("score_harmful", "refusal score, harmful"),
            ("steer_harm", "Δscore: +ĥ on harmless"), ("ablate_refusal", "Δscore: −r̂ on harmful")]
    rows = [f"<tr><td>{esc(lang)}</td><td>{esc(rec['harm_level'])}</td><td>{esc(rec['refusal_level'])}</td>"
            + "".join(f"<td>{cell(rec, k)}</td>" for k, _ in cols) + "</tr>"
            for lang, rec in obj["langs"].items()]
    head = ["lang", "harm", "refusal", *(name for _, name in cols)]
    caption = (f"Harm read at layer {obj['harm_layer']}, the last instruction token; refusal at layer "
               f"{obj['refusal_layer']}, post-instruction position {obj['refusal_position']}. 95% intervals: "
               f"bootstrap over prompts ({obj['n_boot']} resamples); cosines, a delete-one jackknife over the fit "
               "prompts.")
    return "<b>Harm vs refusal per language</b>" + table(caption, head, rows)


# --------------------------------------------------------------------------------------------------------------
# Computation.


def _auroc_boot(pos: Tensor, neg: Tensor, ip: Tensor, ineg: Tensor) -> Tensor:
    """AUROC of every resample: ``pos[ip[k]]`` above ``neg[ineg[k]]``."""
    p, q = pos[ip], neg[ineg]  # [n_boot, n]
    diff = p[:, :, None] - q[:, None, :]
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean((1, 2))


def _steer_scores(model: HookedModel, instructions: Sequence[str], unit: Tensor, alpha: float, layer: int,
                  position: int, token_ids: Sequence[int], batch_size: int) -> Tensor:
    """Refusal scores with ``alpha * unit`` added to resid_pre[layer] at one position (t_inst) of every prompt."""
    add = (alpha * unit)

    def steer(x: Tensor, _name: str) -> Tensor:
        x = x.clone()
        x[:, position] += add.to(x.dtype).to(x.device)
        return x

    out = torch.empty(len(instructions))
    with torch.inference_mode():
        for idx, batch in batches(model, instructions, batch_size):
            logits = last_logits(model, batch, [(hooks.resid_pre(layer), steer)])
            out[idx] = refusal_score(logits, token_ids).float().cpu()
    return out


def harm_and_refusal(
    model: HookedModel,
    direction: Direction,
    prompts: PromptSet,
    langs: Sequence[str] | None = None,
    *,
    base: str | None = None,
    tokens: RefusalTokens | None = None,
    harm_layer: int | None = None,
    fit_split: str = "train",
    test_split: str = "test",
    max_fit: int | None = None,
    max_test: int | None = None,
    heads: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> HarmRefusal:
    """Harmfulness and refusal per language, with intervals (module docstring).

    Args:
        model: the model r̂ belongs to.
        direction: r̂ (its layer and position are the refusal site).
        prompts: harmful and harmless prompts of every language, with ``fit_split`` and ``test_split`` (prompts
            without a split are used for both, which a referee would not accept: give splits).
        langs: the languages (default: all in ``prompts``); ``base`` (default: r̂'s language) is measured first.
        tokens: refusal tokens per language for the refusal score; a language without its own gets the first tokens
            of its native refusal phrases, and without those its score rows are skipped (never English's).
        harm_layer: the layer of ĥ (default: r̂'s).
        max_fit / max_test: at most this many fit / test prompts per language and label (a seeded sample
            stratified by category, the same ids in every language).
        heads: also the per-head contrasts (two attribution passes over the test prompts).
    """
    check_compatible(direction, model, "the refusal direction")
    base = base or direction.lang
    order = list(dict.fromkeys([base, *(langs or prompts.langs)]))
    n_layers = int(model.cfg.n_layers)
    h_layer = direction.layer if harm_layer is None else int(harm_layer)
    if not 0 <= h_layer < n_layers:
        raise InputError(f"harm layer {h_layer} out of range for a model with {n_layers} layers")
    if n_boot < 10:
        raise InputError(f"n_boot must be at least 10, got {n_boot}")
    fmt = chat_format(model.tokenizer)
    t_inst = last_instruction(fmt)
    harm_site, ref_site = (h_layer, t_inst), (direction.layer, direction.position)
    caps = {fit_split: max_fit, test_split: max_test}
    parts = {(lang, split): split_groups(prompts, lang, split, caps[split], seed, "harm vs refusal")
             for lang in order for split in (fit_split, test_split)}
    rows = site_rows(model, {(lang, split, label): g.instructions for (lang, split), gs in parts.items()
                             for label, g in gs.items()}, [harm_site, ref_site], batch_size=batch_size,
                     progress=progress, desc="harm vs refusal: activations")
    H, R = rows[harm_site], rows[ref_site]

    def diff(site_rows_: Mapping[Any, Tensor], lang: str, split: str) -> Tensor:
        return site_rows_[lang, split, "harmful"].mean(0) - site_rows_[lang, split, "harmless"].mean(0)

    gap_vec = diff(H, base, fit_split)
    h_base, r_hat = unit(gap_vec), direction.vector.double()
    alpha = float(gap_vec.norm())
    res = Resampler(n_boot, seed)
    ids = {key: {label: [r.id for r in g] for label, g in gs.items()} for key, gs in parts.items()}

    def boot_idx(lang: str, split: str, label: str) -> Tensor:
        return res.for_group(split, label, ids[base, split][label], ids[lang, split][label],
                             salt=order.index(lang) * 10 + LABELS.index(label) + (5 if split == test_split else 0))

    def fit(site: Mapping[Any, Tensor], lang: str) -> dict[str, Tensor]:
        return {label: site[lang, fit_split, label] for label in LABELS}

    def gap(p: Mapping[str, Tensor], idx: Mapping[str, Tensor]) -> tuple[float, Tensor]:
        """Mean harmful minus mean harmless projection, and the same on every resample."""
        return (float(p["harmful"].mean() - p["harmless"].mean()),
                p["harmful"][idx["harmful"]].mean(1) - p["harmless"][idx["harmless"]].mean(1))

    test_idx = {lang: {label: boot_idx(lang, test_split, label) for label in LABELS} for lang in order}
    on_base = {lang: ({label: H[lang, test_split, label] @ h_base for label in LABELS},
                      {label: R[lang, test_split, label] @ r_hat for label in LABELS}) for lang in order}
    g_bh, g_bh_boot = gap(on_base[base][0], test_idx[base])
    g_br, g_br_boot = gap(on_base[base][1], test_idx[base])

    def retention(g: float, boots: Tensor, g_b: float, b_boots: Tensor, what: str) -> Estimate:
        if g_b <= 0:
            return Estimate.of(math.nan, b_boots, f"{base}'s harmful test prompts do not project above its "
                                                  f"harmless ones on {what}")
        return Estimate.of(g / g_b, boots / b_boots)

    def retention_gap(h: Estimate, r: Estimate, boots: tuple[Tensor, Tensor, Tensor, Tensor]) -> Estimate:
        """harm − refusal retention, on the same test resamples (paired)."""
        if h.why is not None or r.why is not None:
            return Estimate(math.nan, math.nan, math.nan, h.why or r.why)
        gh, gbh, gr, gbr = boots
        return Estimate.of(h.value - r.value, gh / gbh - gr / gbr)

    def auroc_est(p: Mapping[str, Tensor], idx: Mapping[str, Tensor]) -> Estimate:
        return Estimate.of(auroc(p["harmful"], p["harmless"]),
                           _auroc_boot(p["harmful"], p["harmless"], idx["harmful"], idx["harmless"]))

    directions: dict[str, dict[str, Tensor]] = {}
    head_base: dict[str, tuple[Tensor, Tensor]] = {}
    out: dict[str, LanguageHarm] = {}
    for lang in tqdm(order, desc="harm vs refusal: per language", disable=not progress, leave=False):
        ti = test_idx[lang]
        h_own, r_own = diff(H, lang, fit_split), diff(R, lang, fit_split)
        directions[lang] = {"harm": unit(h_own).float(), "refusal": unit(r_own).float()}
        same = {label: range(len(parts[lang, fit_split][label])) for label in LABELS}
        ph, pr = on_base[lang]
        own_h = {label: H[lang, test_split, label] @ unit(h_own) for label in LABELS}
        own_r = {label: R[lang, test_split, label] @ unit(r_own) for label in LABELS}
        g_h, g_h_boot = gap(ph, ti)
        g_r, g_r_boot = gap(pr, ti)
        extra: dict[str, Any] = {}
        own_tokens, origin = own_refusal_tokens(tokens, model.tokenizer, lang)
        if own_tokens:
            extra = _transfer(model, direction, parts[lang, test_split], own_tokens, ti, h_base.float(), alpha,
                              h_layer, t_inst, batch_size)
        contrasts: dict[str, HeadContrasts] = {}
        if heads:
            group = parts[lang, test_split]
            test_set = PromptSet([*group["harmful"], *group["harmless"]])
            n_h = len(group["harmful"])
            base_idx = {label: res.base(test_split, label, len(ids[base, test_split][label])) for label in LABELS}
            for target, vec, layer, pos in (("harm", h_base.float(), h_layer, t_inst),
                                            ("refusal", direction.vector, direction.layer, direction.position)):
                att = attribute(model, vec, test_set, dla=False, batch_size=batch_size, progress=progress)
                per = att.head_scores(pos).double()  # [prompt, layer, head]
                if lang == base:
                    head_base[target] = (per[:n_h], per[n_h:])
                contrasts[target] = _head_contrasts(target, layer, per[:n_h], per[n_h:], ti, head_base[target],
                                                    base_idx)
        out[lang] = LanguageHarm(
            lang, base, {split: {label: len(parts[lang, split][label]) for label in LABELS}
                         for split in (fit_split, test_split)},
            harm_auroc=auroc_est(ph, ti), refusal_auroc=auroc_est(pr, ti),
            harm_auroc_own=auroc_est(own_h, ti), refusal_auroc_own=auroc_est(own_r, ti),
            harm_retention=(h_ret := retention(g_h, g_h_boot, g_bh, g_bh_boot, f"ĥ({base})")),
            refusal_retention=(r_ret := retention(g_r, g_r_boot, g_br, g_br_boot, "r̂")),
            retention_gap=(retention_gap(h_ret, r_ret, (g_h_boot, g_bh_boot, g_r_boot, g_br_boot))
                           if lang != base else None),
            cos_harm_refusal=jackknife_cos(fit(H, lang), fit(R, lang), same),
            cos_harm_base=jackknife_cos(fit(H, lang), fit(H, base), {
                label: index_plan(ids[base, fit_split][label], ids[lang, fit_split][label]) for label in LABELS}),
            cos_refusal_base=jackknife_cos(fit(R, lang), r_hat),
            heads=contrasts, token_origin=origin, **extra)
    return HarmRefusal(model_id(model), base, h_layer, direction.layer, direction.position, t_inst, alpha,
                       h_base.float(), directions, out, n_boot, seed)


def _transfer(model: HookedModel, direction: Direction, group: Mapping[str, PromptSet], token_ids: Sequence[int],
              ti: Mapping[str, Tensor], h_unit: Tensor, alpha: float, h_layer: int, t_inst: int, batch_size: int
              ) -> dict[str, Estimate]:
    """Baseline refusal scores, and their change under +α ĥ at t_inst (harmless) and under r̂ ablated (harmful)."""
    harmful, harmless = group["harmful"].instructions, group["harmless"].instructions
    s_h, s_b = refusal_scores(model, harmful, token_ids, batch_size), refusal_scores(model, harmless, token_ids, batch_size)
    steered = _steer_scores(model, harmless, h_unit, alpha, h_layer, t_inst, token_ids, batch_size)
    with ablate(model, direction):
        ablated = refusal_scores(model, harmful, token_ids, batch_size)
    return {"score_harmful": mean_estimate(s_h, ti["harmful"]), "score_harmless": mean_estimate(s_b, ti["harmless"]),
            "steer_harm": mean_estimate(steered - s_b, ti["harmless"]),
            "ablate_refusal": mean_estimate(ablated - s_h, ti["harmful"])}


def _head_contrasts(target: str, layer: int, harmful: Tensor, harmless: Tensor, ti: Mapping[str, Tensor],
                    base: tuple[Tensor, Tensor], base_idx: Mapping[str, Tensor]) -> HeadContrasts:
    """Per-head harmful − harmless contrasts with percentile intervals, and their Spearman with the base
    language's over the heads below ``layer`` (resampled with the base language's indices, paired by id)."""
    below = torch.arange(harmful.shape[1]) < layer
    mean = harmful.mean(0) - harmless.mean(0)
    boots = harmful[ti["harmful"]].mean(1) - harmless[ti["harmless"]].mean(1)  # [n_boot, layer, head]
    lo = torch.quantile(boots.flatten(1), 0.025, dim=0).view_as(mean)
    hi = torch.quantile(boots.flatten(1), 0.975, dim=0).view_as(mean)
    b_mean = base[0].mean(0) - base[1].mean(0)
    b_boots = base[0][base_idx["harmful"]].mean(1) - base[1][base_idx["harmless"]].mean(1)
    agree = torch.tensor([spearman(boots[k][below].flatten(), b_boots[k][below].flatten())
                          for k in range(len(boots))])
    agreement = Estimate.of(spearman(mean[below].flatten(), b_mean[below].flatten()), agree)
    nan = torch.tensor(math.nan, dtype=mean.dtype)
    mean, lo, hi = (torch.where(below[:, None], t, nan) for t in (mean, lo, hi))
    return HeadContrasts(target, layer, mean.float(), lo.float(), hi.float(), agreement)
