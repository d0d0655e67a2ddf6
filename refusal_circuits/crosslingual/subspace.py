"""One direction or a subspace per language? Refusal subspaces at r̂'s site, their principal angles, and ablations.

Wollschläger et al. (ICML 2025, "The geometry of refusal") find several refusal directions, a cone, not one.
Everything here is read at r̂'s site (``resid_pre[ℓ]`` at its post-instruction position); for every language ``L``,
from its fit (train) prompts:

* its direction ``r_L``: the difference in means;
* its **k-dimensional refusal subspace** ``S_L``: the top-``k`` right singular vectors of the matrix whose rows are
  the category-wise differences in means, ``mean(harmful of category c) − mean(harmless)``, over the harm categories
  with at least :data:`MIN_PER_CATEGORY` fit prompts (prompts without a category: every harmful prompt is a row).
  The first singular vector is close to ``r_L``; the others are where harm categories move the representation
  differently: the candidates for a cone;
* the **shared subspace** ``S_all``: the top-``k`` right singular vectors of all languages' directions stacked;
* its **residual component** ``ρ_L``: ``r_L``'s part orthogonal to r̂ (``sin θ`` of it, with θ the angle between
  them), what the language has of its own.

**Geometry.** The principal angles between ``S_L`` and ``S_b`` (the base language's), in degrees, with a delete-one
jackknife over fit prompts, paired by id (a percentile bootstrap put the 1.5B's angles at the lower end of their
own intervals: French 19° [19°, 24°]; a resampled subspace carries twice the data's noise); beside them the same angles between disjoint stratified halves, the base language
against itself (the noise floor at half size) and ``L`` against the base language, as means over
:data:`N_SPLITS` seeded splits: an angle is language-specific only where the cross-language angle exceeds the floor.

**Interventions** on held-out harmful test prompts, each as the mean per-prompt change of the refusal score (the
language's own tokens, :func:`~refusal_circuits.crosslingual.sites.own_refusal_tokens`) and as the share of the
language's harmful-minus-harmless score gap it removes: ablating r̂ (one base direction), the base subspace and
the shared one *with r̂* (r̂ and the top ``k − 1`` directions of the subspace's part orthogonal to r̂,
:func:`with_r_hat`: a ``k``-dimensional subspace that removes at least what r̂ removes; ablating ``S_b`` itself,
whose first vector is only close to r̂, left part of r̂ in place and read as "less refusal removed"), ``r_L`` (its
own direction), ``span(r̂, ρ_L)`` and, as the controls, r̂ with as many seeded random dimensions orthogonal to it
(``control``: one, ``control_k``: ``k − 1``; what more ablated dimensions do by themselves). Two paired contrasts
decide: ``subspace_extra = Δ(span(r̂, S_b)) − Δ(span(r̂, U_{k−1}))`` and
``residual_extra = Δ(span(r̂, ρ_L)) − Δ(span(r̂, u))`` (negative: removes more refusal than random dimensions). And whether the residual still *induces* refusal once r̂ is gone: on harmless test prompts
with r̂ ablated, ``α ρ̂_L`` added to ``resid_pre[ℓ]`` at every position (α the norm of ``r_L``'s residual part),
against r̂ ablated alone.

**Verdict** (no learned threshold): "no refusal to carry" where the language's score gap interval includes 0;
"a subspace" where either contrast's interval lies below 0 or the residual's induction interval lies above 0;
otherwise "one direction". Intervals: percentile bootstrap over prompts, paired by id with the base language
(:class:`~refusal_circuits.crosslingual.sites.Resampler`), 95%, except the three contrasts the verdict reads:
simultaneous 95% (Bonferroni, :data:`VERDICT_CI`), so a language is not called "a subspace" by three chances at
5%. ``cos(r_L, r̂)`` gets a delete-one jackknife
(:func:`~refusal_circuits.crosslingual.sites.jackknife_cos`): a bootstrap put the 1.5B's English 0.99 above its own
interval [0.94, 0.98]. A gradient-trained direction (RDO) is not implemented.
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
from refusal_circuits.activations import site_rows
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
from refusal_circuits.interventions import ablate, ablate_subspace
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel, model_id
from refusal_circuits.sampling import stratified_halves
from refusal_circuits.scores import RefusalTokens
from refusal_circuits.stats import fmt_stat as _fmt
from refusal_circuits.stats import jackknife_interval

#: A harm category needs this many fit prompts to give a row of the subspace's matrix.
MIN_PER_CATEGORY = 2
#: Seeded stratified splits behind the principal-angle noise floor.
N_SPLITS = 20
#: The ablations, in the order of the record and the table.
ABLATIONS = ("r_hat", "base_subspace", "shared_subspace", "own", "residual", "control", "control_k")
#: A residual component shorter than this fraction of its direction is none, and a singular value below this
#: fraction of the largest spans nothing (activations and r̂ are float32: below it is rounding).
RESIDUAL_FLOOR = 1e-5
#: The contrasts' intervals: simultaneous 95% over the three the verdict reads (Bonferroni, 1 − 0.05/3).
VERDICT_CI = 1 - 0.05 / 3
VERDICTS = ("one direction", "a subspace", "no refusal to carry", "unmeasured")


def category_rows(harmful: Tensor, categories: Sequence[str | None], harmless_mean: Tensor, k: int = 2) -> Tensor:
    """The rows whose top singular vectors span the refusal subspace: per category with at least
    :data:`MIN_PER_CATEGORY` prompts its harmful mean minus ``harmless_mean``; every prompt alone when fewer than
    ``k`` categories qualify (prompts without categories, or too few of them)."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        if c is not None:
            groups.setdefault(str(c), []).append(i)
    kept = [idx for idx in groups.values() if len(idx) >= MIN_PER_CATEGORY]
    if len(kept) < max(2, k):
        return harmful - harmless_mean
    return torch.stack([harmful[idx].mean(0) for idx in kept]) - harmless_mean


def top_subspace(rows: Tensor, k: int, *, allow_fewer: bool = False) -> Tensor:
    """The top-``k`` right singular vectors of ``rows`` ``[n, d]`` as an orthonormal ``[k, d]`` (uncentred, so the
    first one points along the rows' mean); each oriented so that it has a positive dot product with the mean.

    Singular vectors whose singular value is float32 noise (below :data:`RESIDUAL_FLOOR` of the largest) span nothing of the rows; with
    ``allow_fewer`` they are dropped (the span of fewer than ``k`` dimensions), otherwise the call is refused."""
    if rows.shape[0] < k and not allow_fewer:
        raise InputError(f"a {k}-dimensional subspace needs at least {k} rows (categories or prompts); got "
                         f"{rows.shape[0]}")
    _, sv, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    rank = int((sv > RESIDUAL_FLOOR * sv[0]).sum()) if len(sv) else 0
    if rank < k and not allow_fewer:
        raise InputError(f"the rows span only {rank} dimensions, fewer than k = {k}")
    basis = vh[:min(k, rank)]
    sign = torch.sign(basis @ rows.double().mean(0))
    return basis * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles in degrees (smallest first) between the spans of the orthonormal rows of ``a`` and ``b``."""
    s = torch.linalg.svdvals(a.double() @ b.double().T).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(s))


@dataclass(frozen=True)
class LanguageSubspace:
    """One language's geometry and ablations (module docstring); every statistic an :class:`Estimate`."""

    lang: str
    base: str
    k: int
    n: dict[str, dict[str, int]]
    angles: list[Estimate]
    angles_floor: list[float]
    angles_disjoint: list[float]
    cos_own_r_hat: Estimate
    gap: Estimate | None = None
    deltas: dict[str, Estimate] = field(default_factory=dict)
    carried: dict[str, Estimate] = field(default_factory=dict)
    subspace_extra: Estimate | None = None
    residual_extra: Estimate | None = None
    residual_induces: Estimate | None = None
    token_origin: str = "none"

    @property
    def verdict(self) -> str:
        if self.gap is None or self.subspace_extra is None or self.residual_extra is None:
            return "unmeasured"
        if self.gap.why is None and self.gap.low <= 0.0:
            return "no refusal to carry"
        below = [e for e in (self.subspace_extra, self.residual_extra) if e.why is None and e.high < 0.0]
        induces = self.residual_induces is not None and self.residual_induces.why is None and self.residual_induces.low > 0
        return "a subspace" if below or induces else "one direction"

    def sentence(self) -> str:
        if self.verdict == "unmeasured":
            return f"{self.lang}: no refusal tokens of its own, so its ablations are not measured."
        c = self.carried
        text = (f"{self.lang}: ablating r̂({self.base}) removes {c['r_hat'].text('.0%')} of its harmful-harmless refusal-score "
                f"gap ({self.gap.text() if self.gap else 'n/a'}); the {self.k}-dim {self.base} subspace with r̂ changes "
                f"the score {_signed(self.subspace_extra)} more than r̂ with {self.k - 1} random dimensions, its own "
                f"residual component (cos(r_{self.lang}, r̂) {self.cos_own_r_hat.text()}) {_signed(self.residual_extra)} "
                f"more than a random second dimension")
        if self.residual_induces is not None:
            text += f", and added with r̂ gone it moves the harmless score {_signed(self.residual_induces)}"
        return text + f": {self.verdict}."

    def to_json(self) -> dict[str, Any]:
        def opt(e: Estimate | None) -> Any:
            return None if e is None else e.to_json()

        return {"lang": self.lang, "k": self.k, "n": self.n, "verdict": self.verdict, "sentence": self.sentence(),
                "refusal_tokens": self.token_origin, "angles": [a.to_json() for a in self.angles],
                "angles_floor": self.angles_floor, "angles_disjoint": self.angles_disjoint,
                "cos_own_r_hat": self.cos_own_r_hat.to_json(), "gap": opt(self.gap),
                "delta": {k: v.to_json() for k, v in self.deltas.items()},
                "carried": {k: v.to_json() for k, v in self.carried.items()},
                "subspace_extra": opt(self.subspace_extra), "residual_extra": opt(self.residual_extra),
                "residual_induces": opt(self.residual_induces)}


def _signed(e: Estimate | None) -> str:
    if e is None or e.why is not None:
        return "n/a"
    return f"{e.value:+.2f} [{e.low:+.2f}, {e.high:+.2f}]"


@dataclass(frozen=True)
class RefusalSubspaces:
    """Refusal subspaces per language (module docstring).

    Attributes:
        langs: per language, its :class:`LanguageSubspace` (the base language first).
        subspaces: per language, its ``[k, d_model]`` orthonormal subspace; ``shared``: ``S_all``.
        residuals: per language, its unit residual component (zero for the base language).
    """

    model: str
    base: str
    layer: int
    position: int
    k: int
    langs: dict[str, LanguageSubspace] = field(repr=False)
    subspaces: dict[str, Tensor] = field(repr=False)
    shared: Float[Tensor, "k d_model"] = field(repr=False)
    residuals: dict[str, Tensor] = field(repr=False)
    n_boot: int = 1000
    seed: int = 0

    def summary(self) -> list[str]:
        return [rec.sentence() for rec in self.langs.values()]

    def tensors(self) -> dict[str, Tensor]:
        out = {"shared": self.shared.float().contiguous()}
        out.update({f"subspace.{lang}": v.float().contiguous() for lang, v in self.subspaces.items()})
        out.update({f"residual.{lang}": v.float().contiguous() for lang, v in self.residuals.items()})
        return out

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "base": self.base, "layer": self.layer, "position": self.position, "k": self.k,
                "n_boot": self.n_boot, "seed": self.seed, "n_splits": N_SPLITS, "ablations": list(ABLATIONS),
                "langs": {lang: rec.to_json() for lang, rec in self.langs.items()}}

    def _repr_html_(self) -> str:
        return subspace_table(self.to_json())

    def __repr__(self) -> str:
        return "\n".join([f"RefusalSubspaces({self.model}, k={self.k} at layer {self.layer}, position "
                          f"{self.position}):", *self.summary()])


def subspace_table(obj: Mapping[str, Any]) -> str:
    """The HTML table of a :meth:`RefusalSubspaces.to_json` (the report and the Jupyter view share it)."""
    def cell(s: Mapping[str, Any] | None, pct: bool = False) -> str:
        if not s or s.get("value") is None or s.get("ci_low") is None:
            return "–"
        f = (lambda x: f"{x:.0%}") if pct else _fmt
        return f"{f(s['value'])} [{f(s['ci_low'])}, {f(s['ci_high'])}]"

    rows = []
    for lang, rec in obj["langs"].items():
        angles = ", ".join(f"{a['value']:.0f}°" if a.get("value") is not None else "–" for a in rec["angles"])
        floor = ", ".join(f"{a:.0f}°" for a in rec["angles_floor"])
        cross = ", ".join(f"{a:.0f}°" for a in rec["angles_disjoint"])
        rows.append(f"<tr><td>{esc(lang)}</td><td>{esc(rec['verdict'])}</td><td>{esc(angles)}</td>"
                    f"<td>{esc(cross)} <span class='muted'>(floor {esc(floor)})</span></td>"
                    + "".join(f"<td>{cell(rec['carried'].get(k), pct=True)}</td>" for k in ABLATIONS)
                    + f"<td>{cell(rec['subspace_extra'])}</td><td>{cell(rec['residual_extra'])}</td>"
                      f"<td>{cell(rec['residual_induces'])}</td></tr>")
    head = ["lang", "verdict", f"angles to {obj['base']}'s subspace", "disjoint halves", "r̂ removes",
            f"{obj['base']} subspace with r̂", "shared subspace with r̂", "own r", "r̂ + own residual",
            "r̂ + 1 random", "r̂ + k−1 random", "subspace − random (Δscore)", "residual − random (Δscore)",
            "residual induces (Δscore)"]
    caption = (f"k = {obj['k']} at layer {obj['layer']}, position {obj['position']}. Share of each language's "
               f"harmful-minus-harmless refusal-score gap removed by each ablation (harmful test prompts), and the "
               f"paired contrasts; 95% bootstrap intervals ({obj['n_boot']} resamples), simultaneous over the three "
               f"contrasts (Bonferroni). Disjoint halves: mean "
               f"principal angles between this language's and {obj['base']}'s subspaces from disjoint stratified "
               f"halves, beside {obj['base']} against itself (the floor), over {obj['n_splits']} splits.")
    return "<b>One direction or a subspace?</b>" + table(caption, head, rows)


# --------------------------------------------------------------------------------------------------------------
# Computation.


def _half_angles(rows_h: Tensor, cats: Sequence[str | None], rows_b: Tensor, ids_h: Sequence[str],
                 ids_b: Sequence[str], base_rows_h: Tensor, base_cats: Sequence[str | None], base_rows_b: Tensor,
                 base_ids_h: Sequence[str], base_ids_b: Sequence[str], k: int) -> tuple[list[float], list[float]]:
    """Mean principal angles over :data:`N_SPLITS` stratified splits: base half A vs base half B (the floor) and
    this language's half A vs the base language's half B (disjoint prompts)."""
    floor, cross = [], []
    for seed in range(N_SPLITS):
        ha, _ = stratified_halves(dict(zip(base_ids_h, base_cats, strict=True)), seed=seed)
        ba, _ = stratified_halves({i: None for i in base_ids_b}, seed=seed)

        def sub(x_h: Tensor, c: Sequence[str | None], x_b: Tensor, i_h: Sequence[str], i_b: Sequence[str],
                half: bool, ha: set[str] = ha, ba: set[str] = ba) -> Tensor | None:
            mh = [j for j, i in enumerate(i_h) if (i in ha) == half]
            mb = [j for j, i in enumerate(i_b) if (i in ba) == half]
            if len(mh) < k or not mb:
                return None
            rows = category_rows(x_h[mh], [c[j] for j in mh], x_b[mb].mean(0), k)
            return top_subspace(rows, k) if rows.shape[0] >= k else None

        base_b = sub(base_rows_h, base_cats, base_rows_b, base_ids_h, base_ids_b, False)
        base_a = sub(base_rows_h, base_cats, base_rows_b, base_ids_h, base_ids_b, True)
        own_a = sub(rows_h, cats, rows_b, ids_h, ids_b, True)
        if base_a is None or base_b is None or own_a is None:
            continue
        floor.append(principal_angles(base_a, base_b))
        cross.append(principal_angles(own_a, base_b))
    if not floor:
        return [], []
    return (torch.stack(floor).mean(0).tolist(), torch.stack(cross).mean(0).tolist())


def _random_orthogonal(r_hat: Tensor, seed: int, n: int = 1) -> Tensor:
    """``n`` seeded random orthonormal vectors orthogonal to r̂, ``[n, d]``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, r_hat.shape[0], generator=g, dtype=torch.float64)
    u = u - (u @ r_hat)[:, None] * r_hat[None]
    return torch.linalg.qr(u.T).Q.T


def with_r_hat(subspace: Tensor, r_hat: Tensor, k: int) -> Tensor:
    """A ``k``-dimensional subspace containing r̂: r̂ and the top ``k − 1`` directions of ``subspace``'s part
    orthogonal to r̂ (fewer where that part spans fewer), ``[≤ k, d]``. Ablating it removes at least what ablating
    r̂ removes, so comparing the two (against r̂ plus random dimensions) asks what the subspace adds."""
    rest = subspace - (subspace @ r_hat)[:, None] * r_hat[None]
    return torch.cat([r_hat[None], top_subspace(rest, k - 1, allow_fewer=True)]) if float(rest.norm()) > 0 else r_hat[None]


def _add_everywhere(model: HookedModel, vector: Tensor, layer: int) -> hooks.HookHandle:
    def fn(x: Tensor, _name: str) -> Tensor:
        return x + vector.to(device=x.device, dtype=x.dtype)

    return hooks.add_hooks(model, [(hooks.resid_pre(layer), fn)])


def refusal_subspaces(
    model: HookedModel,
    direction: Direction,
    prompts: PromptSet,
    langs: Sequence[str] | None = None,
    *,
    base: str | None = None,
    tokens: RefusalTokens | None = None,
    k: int = 3,
    fit_split: str = "train",
    test_split: str = "test",
    max_fit: int | None = None,
    max_test: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> RefusalSubspaces:
    """Refusal subspaces per language at r̂'s site, their principal angles and ablations (module docstring).

    Args:
        direction: r̂; its layer and position are the site, its language the base (unless ``base`` says otherwise).
        prompts: harmful and harmless prompts of every language with ``fit_split`` and ``test_split``.
        tokens: refusal tokens per language (own, else native phrases, else the ablations are not measured).
        k: the subspaces' dimension (at least 2: one dimension is r̂ itself).
        max_fit / max_test: at most this many fit / test prompts per language and label (stratified, seeded).
    """
    check_compatible(direction, model, "the refusal direction")
    if k < 2:
        raise InputError(f"k must be at least 2 (a 1-dimensional subspace is the direction itself), got {k}")
    if n_boot < 10:
        raise InputError(f"n_boot must be at least 10, got {n_boot}")
    base = base or direction.lang
    order = list(dict.fromkeys([base, *(langs or prompts.langs)]))
    site = (direction.layer, direction.position)
    caps = {fit_split: max_fit, test_split: max_test}
    parts = {(lang, split): split_groups(prompts, lang, split, caps[split], seed, "refusal subspaces")
             for lang in order for split in (fit_split, test_split)}
    few = [lang for lang in order if len(parts[lang, fit_split]["harmful"]) < k]
    if few:
        raise InputError(f"a {k}-dimensional refusal subspace needs at least {k} harmful {fit_split} prompts per "
                         f"language; {', '.join(few)} ha{'s' if len(few) == 1 else 've'} fewer")
    X = site_rows(model, {(lang, split, label): g.instructions for (lang, split), gs in parts.items()
                          for label, g in gs.items()}, [site], batch_size=batch_size, progress=progress,
                  desc="refusal subspaces: activations")[site]
    r_hat = direction.vector.double()
    res = Resampler(n_boot, seed)
    ids = {key: {label: [r.id for r in g] for label, g in gs.items()} for key, gs in parts.items()}
    cats = {key: [r.category for r in gs["harmful"]] for key, gs in parts.items()}

    def boot_idx(lang: str, split: str, label: str) -> Tensor:
        return res.for_group(split, label, ids[base, split][label], ids[lang, split][label],
                             salt=order.index(lang) * 10 + LABELS.index(label) + (5 if split == test_split else 0))

    def subspace(lang: str, ih: Tensor | None = None, ib: Tensor | None = None) -> Tensor:
        xh, xb = X[lang, fit_split, "harmful"], X[lang, fit_split, "harmless"]
        c = cats[lang, fit_split]
        if ih is not None and ib is not None:
            xh, xb, c = xh[ih], xb[ib], [c[i] for i in ih.tolist()]
        return top_subspace(category_rows(xh, c, xb.mean(0), k), k)

    own = {lang: X[lang, fit_split, "harmful"].mean(0) - X[lang, fit_split, "harmless"].mean(0) for lang in order}
    subs = {lang: subspace(lang) for lang in order}
    shared = top_subspace(torch.stack([unit(v) for v in own.values()]), k, allow_fewer=True)
    residual_raw = {lang: own[lang] - (own[lang] @ r_hat) * r_hat for lang in order}
    # r̂ is float32: a residual below float32's resolution of r_L is none (its unit vector would be noise)
    residuals = {lang: (unit(v) if lang != base and float(v.norm()) > RESIDUAL_FLOOR * float(own[lang].norm())
                        else torch.zeros_like(v)) for lang, v in residual_raw.items()}
    # the controls: r̂ plus random dimensions orthogonal to it, as many as the residual (1) or a subspace adds
    control_k = _random_orthogonal(r_hat, seed + 1, k - 1)
    control = control_k[0]

    def left_out(lang: str, label: str, k_out: int) -> Tensor | None:
        """``lang``'s subspace with fit prompt ``k_out`` of ``label`` left out (None where fewer than k rows)."""
        n_h, n_b = len(ids[lang, fit_split]["harmful"]), len(ids[lang, fit_split]["harmless"])
        keep = {lab: torch.tensor([i for i in range(n) if not (lab == label and i == k_out)])
                for lab, n in (("harmful", n_h), ("harmless", n_b))}
        try:
            return subspace(lang, keep["harmful"], keep["harmless"])
        except InputError:
            return None

    base_out = {label: [left_out(base, label, i) for i in range(len(ids[base, fit_split][label]))] for label in LABELS}

    def jackknife_angles(lang: str, point: Tensor) -> list[Estimate]:
        """Each principal angle with its delete-one jackknife interval, paired by id with the base language where
        both have the same fit ids (leaving a prompt out of both), else each left out in turn."""
        blocks: list[list[Tensor]] = []
        for label in LABELS:
            mine = (base_out[label] if lang == base else
                    [left_out(lang, label, i) for i in range(len(ids[lang, fit_split][label]))])
            plan = index_plan(ids[base, fit_split][label], ids[lang, fit_split][label])
            if plan is not None:
                pairs = [(mine[plan[i]], base_out[label][i]) for i in range(len(plan))]
                blocks.append([principal_angles(a, b) if a is not None and b is not None
                               else torch.full((k,), math.nan) for a, b in pairs])
            else:
                blocks.append([principal_angles(a, subs[base]) if a is not None else torch.full((k,), math.nan)
                               for a in mine])
                blocks.append([principal_angles(subs[lang], b) if b is not None else torch.full((k,), math.nan)
                               for b in base_out[label]])
        out = []
        for j in range(k):
            lo, hi = jackknife_interval(float(point[j]), [torch.stack(b)[:, j] for b in blocks], 0.95, (0.0, 90.0))
            why = None if math.isfinite(lo) else "undefined with one fit prompt left out (fewer than k rows)"
            out.append(Estimate(float(point[j]), lo, hi, why))
        return out

    out: dict[str, LanguageSubspace] = {}
    for lang in tqdm(order, desc="refusal subspaces: per language", disable=not progress, leave=False):
        ti = {label: boot_idx(lang, test_split, label) for label in LABELS}
        angles = jackknife_angles(lang, principal_angles(subs[lang], subs[base]))
        floor, cross = _half_angles(
            X[lang, fit_split, "harmful"], cats[lang, fit_split], X[lang, fit_split, "harmless"],
            ids[lang, fit_split]["harmful"], ids[lang, fit_split]["harmless"], X[base, fit_split, "harmful"],
            cats[base, fit_split], X[base, fit_split, "harmless"], ids[base, fit_split]["harmful"],
            ids[base, fit_split]["harmless"], k)
        cos_own = jackknife_cos({label: X[lang, fit_split, label] for label in LABELS}, r_hat)
        n = {split: {label: len(parts[lang, split][label]) for label in LABELS} for split in (fit_split, test_split)}
        token_ids, origin = own_refusal_tokens(tokens, model.tokenizer, lang)
        rec = LanguageSubspace(lang, base, k, n, angles, floor, cross, cos_own, token_origin=origin)
        if token_ids:
            rec = _ablations(model, direction, parts[lang, test_split], token_ids, ti, rec, r_hat,
                             with_r_hat(subs[base], r_hat, k), with_r_hat(shared, r_hat, k), own[lang],
                             residuals[lang], float(residual_raw[lang].norm()), control, control_k, batch_size)
        out[lang] = rec
    return RefusalSubspaces(model_id(model), base, direction.layer, direction.position, k, out,
                            {lang: s.float() for lang, s in subs.items()}, shared.float(),
                            {lang: v.float() for lang, v in residuals.items()}, n_boot, seed)


def _ablations(model: HookedModel, direction: Direction, group: Mapping[str, PromptSet], token_ids: Sequence[int],
               ti: Mapping[str, Tensor], rec: LanguageSubspace, r_hat: Tensor, base_sub: Tensor, shared: Tensor,
               own: Tensor, residual: Tensor, residual_norm: float, control: Tensor, control_k: Tensor,
               batch_size: int) -> LanguageSubspace:
    """The ablations and contrasts of one language on its harmful (and, for the induction, harmless) test prompts.
    ``base_sub`` and ``shared`` contain r̂ (:func:`with_r_hat`); ``control_k`` spans as many random dimensions
    orthogonal to r̂ as ``base_sub`` adds to it."""
    harmful, harmless = group["harmful"].instructions, group["harmless"].instructions
    s_h = refusal_scores(model, harmful, token_ids, batch_size).double()
    s_b = refusal_scores(model, harmless, token_ids, batch_size).double()
    is_base = float(residual.norm()) == 0.0
    spans = {"r_hat": r_hat[None], "base_subspace": base_sub, "shared_subspace": shared, "own": own[None],
             "residual": torch.stack([r_hat, residual if not is_base else control]), "control":
             torch.stack([r_hat, control]), "control_k": torch.cat([r_hat[None], control_k[:len(base_sub) - 1]])}
    ablated = {}
    for name, vectors in spans.items():
        with ablate_subspace(model, vectors.float()):
            ablated[name] = refusal_scores(model, harmful, token_ids, batch_size).double()
    ih, ib = ti["harmful"], ti["harmless"]
    gap_boot = s_h[ih].mean(1) - s_b[ib].mean(1)
    gap = Estimate.of(float(s_h.mean() - s_b.mean()), gap_boot)
    deltas = {name: mean_estimate(a - s_h, ih) for name, a in ablated.items()}
    carried = {name: Estimate.of(float(-(a - s_h).mean() / (s_h.mean() - s_b.mean())),
                                 -(a - s_h)[ih].mean(1) / gap_boot) for name, a in ablated.items()}
    sub_extra = mean_estimate(ablated["base_subspace"] - ablated["control_k"], ih, VERDICT_CI)
    res_extra = mean_estimate(ablated["residual"] - ablated["control"], ih, VERDICT_CI)
    induces = None
    if not is_base:
        with ablate(model, direction):
            gone = refusal_scores(model, harmless, token_ids, batch_size).double()
            with _add_everywhere(model, (residual_norm * residual).float(), direction.layer):
                added = refusal_scores(model, harmless, token_ids, batch_size).double()
        induces = mean_estimate(added - gone, ib, VERDICT_CI)
    return LanguageSubspace(rec.lang, rec.base, rec.k, rec.n, rec.angles, rec.angles_floor, rec.angles_disjoint,
                            rec.cos_own_r_hat, gap, deltas, carried, sub_extra, res_extra, induces, rec.token_origin)
