"""Total effects in the paired comparison: which heads and MLPs, patched from English into the translation, would
give the translation English's refusal? By attribution patching (:mod:`refusal_circuits.atp`), every one at once.

The paired comparison (:mod:`~refusal_circuits.crosslingual.paired`) compares each head's *direct* write onto r̂
in English and in the translation. A head can also lose refusal indirectly, through the heads and MLPs it feeds.
Here, per language ``L`` and pair ``i`` (an English prompt and its translation, the same id), the translation is
the clean run and English the reference: for every head and MLP the first-order estimate of

    Δ_i(node) = metric(translation_i with node's output at every post-instruction token set to English_i's)
                − metric(translation_i),

summed over the post-instruction tokens (patching them all, to first order; only those: they are the same template
tokens in both languages, where the instructions' own tokens differ in number and meaning), for two metrics: r̂'s projection at
its site and the refusal score with ``L``'s own refusal tokens (never English's: a language without its own or
native ones gets the projection only, and the reason). One forward and two backward passes per batch give every
node (:func:`~refusal_circuits.atp.attribution_patching` with ``paired=True``).

**Statistics**, the paired comparison's own: over the harmful pairs, the mean ``Δ`` per node with a percentile
bootstrap interval and a sign-flip permutation p-value (:func:`~refusal_circuits.stats.paired_stats`), and, the
control, the same on the harmless pairs and their difference in differences
(:func:`~refusal_circuits.stats.did_stats`): a node whose English value raises r̂ in harmful and harmless
translations alike carries a language-wide offset, not refusal. Benjamini-Hochberg across nodes, per metric;
a node counts where ``q < alpha``. The projection's *gap* (English − translation, harmful pairs, with its
interval) says how much there is to recover.

**Exact or refused**: every call runs :func:`~refusal_circuits.atp.attribution_patching`'s run-time checks on the
user's model (a linear node exactly, a head by central differences) and, per language, exact patching of the
``validate`` nodes with the largest estimates of each metric and as many random others
(:func:`~refusal_circuits.atp.validate_atp`), whose correlation and worst error are part of the record, and a
metric whose worst error exceeds :data:`FAITHFUL_ERROR` of its largest exact change is withheld (null with the
numbers, and an :class:`AtPWarning`): on the packaged 0.5B the refusal score failed this for every language (paired
patching moves late MLPs far from where their gradient was taken; Chinese's validated nodes correlated at −0.41),
while r̂'s projection passed (worst error 8–23% of the largest change).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from refusal_circuits.atp import METRICS, AtPEstimates, AtPValidation, attribution_patching, validate_atp
from refusal_circuits.crosslingual.sites import Estimate, own_refusal_tokens, split_groups
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction, check_compatible
from refusal_circuits.errors import InputError
from refusal_circuits.io import nullable
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel, model_id
from refusal_circuits.patching import prompt_run
from refusal_circuits.scores import RefusalTokens
from refusal_circuits.stats import benjamini_hochberg, did_stats, paired_stats

#: The nodes listed per language and metric in the record and its table.
TOP_NODES = 10
#: A metric's estimates are reported only where the validation's worst |AtP − exact| is at most this share of the
#: largest exact change among the validated nodes (else withheld, with the numbers).
FAITHFUL_ERROR = 0.25
#: The statistics kept per node.
_KEYS = ("mean", "ci_low", "ci_high", "p", "q")


class AtPWarning(UserWarning):
    """A metric's attribution-patching estimates failed their validation and are withheld."""


def unfaithful_why(val: AtPValidation, metric: str) -> str | None:
    """Why ``metric``'s estimates cannot be read (validated on its own largest nodes), or None:
    the worst error must be at most :data:`FAITHFUL_ERROR` of the largest exact change."""
    worst, scale = val.worst_error(metric), val.scale(metric)
    if scale == 0.0 or worst <= FAITHFUL_ERROR * scale:
        return None
    return (f"attribution patching is not faithful here: against exact patching of its {len(val.nodes)} validated "
            f"nodes the worst error is {worst:.3g}, {worst / scale:.0%} of the largest exact change {scale:.3g} (the "
            f"bound is {FAITHFUL_ERROR:.0%}; Pearson {val.pearson(metric):.2f}); patch these nodes exactly instead")


@dataclass(frozen=True)
class NodeStats:
    """One metric's per-node statistics for one language: ``harmful`` (paired stats over the harmful pairs) and
    ``did`` (harmful − harmless), each ``{"mean", "ci_low", "ci_high", "p", "q"}`` over ``[layer, head]`` for
    heads and ``[layer]`` for MLPs; None where the harmless pairs are too few for the control."""

    heads: dict[str, Tensor]
    mlps: dict[str, Tensor]
    heads_did: dict[str, Tensor] | None
    mlps_did: dict[str, Tensor] | None

    def _at(self, name: str) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, tuple[int, ...]]:
        """A node's statistics, its control's and its index, by name (``L3.H5`` or ``MLP7``)."""
        if name.startswith("MLP"):
            return self.mlps, self.mlps_did, (int(name[3:]),)
        layer, head = name[1:].split(".H")
        return self.heads, self.heads_did, (int(layer), int(head))

    def node(self, name: str, alpha: float = 0.05, control: bool = False) -> dict[str, Any]:
        """One node's harmful statistics by name (``L3.H5`` or ``MLP7``), with the control's where ``control``."""
        st, did, at = self._at(name)
        rec: dict[str, Any] = {**{key: float(st[key][at]) for key in _KEYS}, "significant": bool(st["q"][at] < alpha)}
        if control and did is not None:
            rec["did"] = {key: float(did[key][at]) for key in _KEYS}
            rec["did_significant"] = bool(did["q"][at] < alpha)
        return rec

    def top(self, k: int = TOP_NODES, alpha: float = 0.05) -> list[dict[str, Any]]:
        """The ``k`` nodes with the largest mean harmful ``Δ`` (English's value recovers most), with intervals and
        the control."""
        h, m = self.heads["mean"], self.mlps["mean"]
        means = [(float(h[a, b]), f"L{a}.H{b}") for a in range(h.shape[0]) for b in range(h.shape[1])]
        means += [(float(m[a]), f"MLP{a}") for a in range(m.shape[0])]
        return [{"node": name, **self.node(name, alpha, control=True)}
                for _, name in sorted(means, key=lambda t: -t[0])[:k]]

    def n_significant(self, alpha: float = 0.05, control: bool = False) -> int | None:
        h, m = (self.heads_did, self.mlps_did) if control else (self.heads, self.mlps)
        if h is None or m is None:
            return None
        return int((h["q"] < alpha).sum() + (m["q"] < alpha).sum())


@dataclass(frozen=True)
class LanguageTotals:
    """One language's paired total effects (module docstring)."""

    lang: str
    base: str
    n_pairs: dict[str, int]
    gap: Estimate
    stats: dict[str, NodeStats]
    #: per metric, AtP against exact patching of that metric's largest estimates and random nodes
    validation: dict[str, AtPValidation]
    linear_check: float | None
    token_origin: str
    #: metrics whose estimates are not reported, with the reason (no own refusal tokens; not faithful here)
    withheld: dict[str, str] = field(default_factory=dict)

    def sentence(self, alpha: float = 0.05) -> str:
        checks = "; ".join(f"{m}: Pearson {v.pearson(m):.2f}, worst error {v.worst_error(m):.3g} (largest exact "
                           f"{v.scale(m):.3g})" for m, v in self.validation.items())
        held = "".join(f" The {m} estimates are withheld: {why}." for m, why in self.withheld.items())
        head = f"{self.lang}: r̂'s projection, {self.base} minus {self.lang} (harmful pairs), {self.gap.text()}"
        if "projection" not in self.stats:
            return f"{head}. AtP vs exact on each metric's largest and random nodes, {checks}.{held}"
        st = self.stats["projection"]
        top = st.top(3, alpha)
        names = ", ".join(f"{t['node']} {t['mean']:+.2f} [{t['ci_low']:+.2f}, {t['ci_high']:+.2f}]" for t in top)
        ctrl = st.n_significant(alpha, control=True)
        ctrl_text = ("" if ctrl is None else f", {ctrl} beyond the harmless control")
        return (f"{head}; patching {self.base}'s value into the translation, the largest recoveries are {names}; "
                f"{st.n_significant(alpha)} nodes significant (q < {alpha}){ctrl_text}. AtP vs exact on each "
                f"metric's largest and random nodes, {checks}.{held}")

    def to_json(self, alpha: float = 0.05) -> dict[str, Any]:
        out: dict[str, Any] = {"base": self.base, "n_pairs": self.n_pairs, "gap_projection": self.gap.to_json(),
                               "token_origin": self.token_origin, "linear_check": self.linear_check,
                               "validation": {m: v.to_json() for m, v in self.validation.items()},
                               "sentence": self.sentence(alpha)}
        for metric, why in self.withheld.items():
            out[metric] = None
            out[f"{metric}_why"] = why
        for metric, st in self.stats.items():
            ctrl = st.n_significant(alpha, control=True)
            out[metric] = {"top": st.top(TOP_NODES, alpha), "n_significant": st.n_significant(alpha),
                           **nullable("n_did_significant", ctrl, "too few harmless pairs for the control")}
        return out


@dataclass(frozen=True)
class PairedTotals:
    """Paired total effects per language, by attribution patching (module docstring)."""

    model: str
    base: str
    direction: dict[str, Any]
    langs: dict[str, LanguageTotals]
    skipped: dict[str, str]
    alpha: float = 0.05

    def summary(self) -> list[str]:
        return [rec.sentence(self.alpha) for rec in self.langs.values()] + [
            f"{lang}: skipped ({why})" for lang, why in self.skipped.items()]

    def tensors(self) -> dict[str, Tensor]:
        """Per language and metric, the harmful mean ``Δ`` and its q-values per head and per MLP (and the
        control's), for ``totals.safetensors``."""
        out: dict[str, Tensor] = {}
        for lang, rec in self.langs.items():
            for metric, st in rec.stats.items():
                for kind, d in (("heads", st.heads), ("mlps", st.mlps), ("heads_did", st.heads_did),
                                ("mlps_did", st.mlps_did)):
                    if d is not None:
                        for key in ("mean", "ci_low", "ci_high", "q"):
                            out[f"{lang}.{metric}.{kind}.{key}"] = d[key].float().contiguous()
        return out

    def figure_nodes(self, k: int = 3) -> list[str]:
        """The union of every language's ``k`` largest projection recoveries, in order of first appearance."""
        names = [t["node"] for rec in self.langs.values() if "projection" in rec.stats
                 for t in rec.stats["projection"].top(k, self.alpha)]
        return list(dict.fromkeys(names))

    def to_json(self) -> dict[str, Any]:
        shown = self.figure_nodes()
        langs = {}
        for lang, rec in self.langs.items():
            langs[lang] = rec.to_json(self.alpha)
            if "projection" in rec.stats:
                langs[lang]["nodes"] = {name: rec.stats["projection"].node(name, self.alpha) for name in shown}
        return {"model": self.model, "base": self.base, "direction": self.direction, "alpha": self.alpha,
                "reference": "paired: each translation patched with its own English original's values",
                "figure_nodes": shown, "langs": langs, "skipped": self.skipped}

    def _repr_html_(self) -> str:
        return totals_table(self.to_json())

    def __repr__(self) -> str:
        return f"PairedTotals({self.model}, base {self.base}: " + "; ".join(self.summary()) + ")"


def totals_table(obj: Mapping[str, Any]) -> str:
    """The record's table (``totals.json``'s object): per language the projection gap, the three largest
    recoveries and the validation against exact patching."""
    rows = []
    for lang, rec in obj["langs"].items():
        gap = rec["gap_projection"]
        val = rec["validation"]["projection"]["summary"]["projection"]
        proj = rec.get("projection")
        cells = (f"<td>{esc(_nodes(proj['top'][:3]))}</td><td>{proj['n_significant']}</td>"
                 f"<td>{_num(proj.get('n_did_significant'), 'd')}</td>" if proj else
                 f"<td colspan=3>withheld: {esc(rec.get('projection_why', ''))}</td>")
        rows.append(f"<tr><td>{esc(lang)}</td><td>{rec['n_pairs']['harmful']}</td>"
                    f"<td>{_num(gap.get('value'))} [{_num(gap.get('ci_low'))}, {_num(gap.get('ci_high'))}]</td>"
                    f"{cells}<td>{_num(val.get('pearson'))}</td><td>{_num(val.get('worst_error'), '.3g')}</td></tr>")
    rows += [f"<tr><td>{esc(lang)}</td><td colspan=7>skipped: {esc(why)}</td></tr>"
             for lang, why in obj.get("skipped", {}).items()]
    caption = (f"Total effects of patching {esc(obj['base'])}'s head and MLP outputs into each translation (attribution "
               f"patching, paired by id; r̂ at layer {obj['direction']['layer']}, position "
               f"{obj['direction']['position']}). Significant: Benjamini-Hochberg q < {obj['alpha']}; control: "
               "harmful − harmless pairs. Validation: AtP against exact patching of the largest and random nodes.")
    head = ["lang", "pairs", f"r̂ gap ({obj['base']} − lang)", "largest recoveries (Δ projection)", "significant",
            "beyond control", "AtP vs exact: Pearson", "worst |error|"]
    return "<b>Paired total effects</b>" + table(caption, head, rows)


def _nodes(top: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"{t['node']} {t['mean']:+.2f}" for t in top)


def _num(x: Any, spec: str = ".2f") -> str:
    return "n/a" if x is None else (f"{x:{spec}}" if spec != "d" else str(int(x)))


def _stats(x: Tensor, seed: int, n_boot: int) -> dict[str, Tensor]:
    st = paired_stats(x, n_boot=n_boot, n_perm=n_boot, seed=seed)
    st["q"] = benjamini_hochberg(st["p"])
    return st


def _did(h: Tensor, b: Tensor, seed: int, n_boot: int) -> dict[str, Tensor]:
    st = did_stats(h, b, n_boot=n_boot, n_perm=n_boot, seed=seed)
    st["q"] = benjamini_hochberg(st["p"])
    return st


def _node_stats(est_h: AtPEstimates, est_b: AtPEstimates | None, metric: str, seed: int, n_boot: int) -> NodeStats:
    """Per node, summed over the post-instruction tokens: paired stats on harmful pairs, and the control. BH runs
    over heads and MLPs together (one family per metric)."""
    def flat(est: AtPEstimates) -> Tensor:
        return torch.cat([est.heads[metric].sum(-1).flatten(1), est.mlps[metric].sum(-1)], 1)

    n_layers, n_heads = est_h.heads[metric].shape[1:3]
    n_h = n_layers * n_heads

    def split(st: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return ({k: v[:n_h].view(n_layers, n_heads) for k, v in st.items() if k in _KEYS},
                {k: v[n_h:] for k, v in st.items() if k in _KEYS})

    heads, mlps = split(_stats(flat(est_h), seed, n_boot))
    if est_b is None:
        return NodeStats(heads, mlps, None, None)
    hd, md = split(_did(flat(est_h), flat(est_b), seed, n_boot))
    return NodeStats(heads, mlps, hd, md)


def paired_totals(
    model: HookedModel,
    direction: Direction,
    prompts: PromptSet,
    langs: Sequence[str],
    *,
    base: str | None = None,
    tokens: RefusalTokens | None = None,
    split: str | None = "test",
    max_pairs: int | None = None,
    validate: int = 4,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> PairedTotals:
    """Per language of ``langs`` (not ``base``), the total effect of every head and MLP of the base language on
    its translation, by paired attribution patching, with the paired comparison's statistics and a validation
    against exact patching (module docstring).

    Args:
        prompts: harmful and harmless prompts of ``base`` and ``langs`` with shared ids (translations); the
            ``split`` is used (all prompts where none has a split, or ``split`` is None).
        tokens: refusal tokens per language for the score (a language without its own gets its native phrases'
            first tokens, and without those the projection only).
        max_pairs: at most this many pairs per label and language (a seeded sample stratified by category).
        validate: exact patching of this many largest and this many random nodes per language and metric
            (each metric's own largest): ``4`` costs 16 patched passes over a language's harmful pairs.
    """
    check_compatible(direction, model, "the refusal direction")
    base = base or direction.lang
    if validate < 1:
        raise InputError(f"validate must be at least 1 (the estimates are read within the measured error), got "
                         f"{validate}")
    base_groups = split_groups(prompts, base, split, None, seed, "paired total effects")
    english = {label: {r.id: r.instruction for r in group} for label, group in base_groups.items()}
    base_tokens, _ = own_refusal_tokens(tokens, model.tokenizer, base)
    # r̂'s projection on each base harmful prompt, run once whichever languages pair with it (it reads no token)
    base_projection: dict[str, float] = {}
    out: dict[str, LanguageTotals] = {}
    skipped: dict[str, str] = {}
    for lang in [x for x in dict.fromkeys(langs) if x != base]:
        groups = split_groups(prompts, lang, split, max_pairs, seed, "paired total effects")
        pairs: dict[str, tuple[list[str], list[str]]] = {}
        kept_ids: dict[str, list[str]] = {}
        for label, group in groups.items():
            kept = [r for r in group if r.id in english[label]]
            kept_ids[label] = [r.id for r in kept]
            pairs[label] = ([r.instruction for r in kept], [english[label][r.id] for r in kept])
        if len(pairs["harmful"][0]) < 2:
            skipped[lang] = (f"{len(pairs['harmful'][0])} harmful {split} prompts share an id with {base}'s (needs 2 "
                             "pairs)")
            continue
        own, origin = own_refusal_tokens(tokens, model.tokenizer, lang)
        withheld = {} if own else {"score": f"{lang} has no refusal tokens of its own and no native refusal "
                                            f"phrases (never {base}'s)"}
        used = own or base_tokens
        if not used:
            skipped[lang] = f"neither {lang} nor {base} has refusal tokens (attribution patching needs a score)"
            continue
        clean_h, ref_h = pairs["harmful"]
        est_h = attribution_patching(model, direction, clean_h, ref_h, used, paired=True, batch_size=batch_size,
                                     progress=progress)
        est_b = None
        if len(pairs["harmless"][0]) >= 2:
            est_b = attribution_patching(model, direction, *pairs["harmless"], used, paired=True,
                                         batch_size=batch_size, progress=progress)
        new = [i for i in dict.fromkeys(kept_ids["harmful"]) if i not in base_projection]
        if new:
            with torch.inference_mode():
                run = prompt_run(model, direction, [english["harmful"][i] for i in new], used, batch_size=batch_size)
            base_projection.update(zip(new, run.projections.tolist(), strict=True))
        base_proj = torch.tensor([base_projection[i] for i in kept_ids["harmful"]], dtype=torch.float64)
        gap = paired_stats(base_proj - est_h.baseline["projection"], n_boot=n_boot, n_perm=n_boot, seed=seed)
        metrics = [m for m in METRICS if m not in withheld]
        # each metric checked on its own largest estimates (the score's are late MLPs, where AtP is weakest)
        val = {m: validate_atp(model, direction, clean_h, ref_h, used, est_h, n_top=validate, n_random=validate,
                               metric=m, seed=seed, batch_size=batch_size, progress=progress) for m in metrics}
        stats = {}
        for m in metrics:
            why = unfaithful_why(val[m], m)
            if why is None:
                stats[m] = _node_stats(est_h, est_b, m, seed, n_boot)
            else:
                withheld[m] = why
                warnings.warn(f"paired totals, {lang}: the {m} estimates are withheld: {why}", AtPWarning, stacklevel=2)
        checks = [c for c in (est_h.linear_check, est_b.linear_check if est_b else None) if c is not None]
        out[lang] = LanguageTotals(
            lang, base, {label: len(p[0]) for label, p in pairs.items()},
            Estimate(float(gap["mean"]), float(gap["ci_low"]), float(gap["ci_high"])), stats, val,
            max(checks) if checks else None, origin if own else "none", withheld)
    return PairedTotals(model_id(model), base, {"lang": direction.lang, "layer": direction.layer,
                                                "position": direction.position}, out, skipped, alpha)
