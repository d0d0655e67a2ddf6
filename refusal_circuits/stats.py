"""Small, exact, seeded statistics: intervals, two-group separation, rank correlation, false-discovery control,
paired resampling tests, and the one record of a refusal rate.

Nothing here knows about models or prompts: every function takes counts or tensors, so the same numbers back the
evaluation, the transfer matrix and the paired per-head comparison. A statistic that cannot be computed on the
given data is NaN, and a ``*_why`` function beside it says why (the JSON writes ``null`` and that reason,
:func:`~refusal_circuits.io.nullable`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_circuits.errors import InputError
from refusal_circuits.io import nullable

# --------------------------------------------------------------------------------------------------------------
# Binomial proportions.


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0, 1) when n == 0.

    The interval is every ``p`` that the score test accepts, ``|k/n - p| <= z sqrt(p (1 - p) / n)``. Squaring
    gives a quadratic in ``p`` whose roots are ``centre ± half`` with ``centre = (p̂ + z²/2n) / (1 + z²/n)`` and
    ``half = z sqrt(p̂ (1 - p̂) / n + z²/4n²) / (1 + z²/n)``: unlike the normal interval it stays inside [0, 1] and
    is not empty at ``k = 0`` or ``k = n``.

    >>> tuple(round(x, 4) for x in wilson_interval(0, 10))
    (0.0, 0.2775)
    """
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


#: Why the rate of no prompts (and its interval) is missing.
NO_PROMPTS = "no prompts"


@dataclass(frozen=True)
class Rate:
    """``k`` refusals of ``n`` prompts: the counts, the rate ``k / n`` and its Wilson interval.

    The one record of a refusal rate: a group of the evaluation (which also carries the group's mean first-token
    ``refusal_score``, where measured), a baseline or a cell of the transfer matrix. The rate of no prompts is
    NaN. It is written in two shapes, both kept as they were before the record was shared:

    * :meth:`to_json` (baselines, the transfer matrix): ``refused``, ``n``, ``rate``, ``ci_low``, ``ci_high``,
      ``null`` with the reason for no prompts;
    * :meth:`to_dict` (the ``evaluate`` command's ``results``): ``n``, ``refusal_rate``, ``ci_low``, ``ci_high``
      and ``refusal_score`` where measured.

    >>> r = Rate(3, 4)
    >>> r.rate, r.refused
    (0.75, 3)
    >>> Rate(0, 0).to_json()["rate_why"]
    'no prompts'
    """

    k: int
    n: int
    refusal_score: float | None = None

    @property
    def refused(self) -> int:
        """The number of refusals (``k``, under the name the JSON uses)."""
        return self.k

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def refusal_rate(self) -> float:
        """:attr:`rate`, under the name the evaluation's JSON uses."""
        return self.rate

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.ci if self.n else (math.nan, math.nan)
        out: dict[str, Any] = {"refused": self.k, "n": self.n, **nullable("rate", self.rate, NO_PROMPTS),
               **nullable("ci_low", lo, NO_PROMPTS), **nullable("ci_high", hi, NO_PROMPTS)}
        if self.refusal_score is not None:
            out["refusal_score"] = self.refusal_score
        return out

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.ci
        out: dict[str, Any] = {"n": self.n, "refusal_rate": self.rate, "ci_low": lo, "ci_high": hi}
        if self.refusal_score is not None:
            out["refusal_score"] = self.refusal_score
        return out


def fmt_stat(x: float | None, spec: str = ".2f", why: str | None = None) -> str:
    """``x`` formatted, or ``n/a`` (with ``why`` in brackets) when it is None or not finite: the text twin of
    :func:`~refusal_circuits.io.nullable`.

    >>> fmt_stat(0.123), fmt_stat(float("nan"), why="one pair")
    ('0.12', 'n/a (one pair)')
    """
    if x is None or not math.isfinite(x):
        return f"n/a ({why})" if why else "n/a"
    return format(x, spec)


# --------------------------------------------------------------------------------------------------------------
# Two groups, rank correlation, false-discovery control, paired resampling.


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


def paired_stats_or_single(diffs: Tensor, **kw: Any) -> dict[str, Tensor]:
    """:func:`paired_stats`, or for a single pair its difference as the mean and NaN for everything else."""
    if diffs.shape[0] != 1:
        return paired_stats(diffs, **kw)
    mean = diffs[0].double()
    nan = torch.full_like(mean, float("nan"))
    return {"mean": mean, "ci_low": nan, "ci_high": nan.clone(), "p": nan.clone(), "std": nan.clone()}


# --------------------------------------------------------------------------------------------------------------
# Difference in differences of two independent sets of paired differences.


def did_why(n_harmful: int, n_harmless: int) -> str | None:
    """Why :func:`did_stats` has no interval or test on groups of these sizes (fewer than 2 pairs in one), or
    None when it has."""
    short = [f"fewer than 2 {name} pairs" for name, n in (("harmful", n_harmful), ("harmless", n_harmless)) if n < 2]
    return " and ".join(short) if short else None


def _welch_t(mean_diff: Tensor, var_a: Tensor, n_a: int, var_b: Tensor, n_b: int) -> Tensor:
    """``mean_diff / sqrt(var_a / n_a + var_b / n_b)``; 0 where both the difference and its error are 0, ±inf where
    only the error is."""
    se = (var_a / n_a + var_b / n_b).sqrt()
    t = mean_diff / se.where(se > 0, torch.ones_like(se))
    return t.where(se > 0, torch.where(mean_diff == 0, torch.zeros_like(t), mean_diff.sign() * math.inf))


def did_stats(harmful: Float[Tensor, "pair_h ..."], harmless: Float[Tensor, "pair_b ..."], *, n_boot: int = 2000,
              n_perm: int = 2000, seed: int = 0, ci: float = 0.95, chunk: int = 250) -> dict[str, Tensor]:
    """Difference in differences per feature: the mean of the ``harmful`` paired differences minus the mean of
    the ``harmless`` ones, with a percentile-bootstrap interval and a permutation p-value.

    The derivation. Write ``T`` and ``E`` for a head's write in the translation and in English. Per harmful pair
    ``i`` the paired difference is ``d_i = T_i - E_i``, per harmless pair ``j`` it is ``e_j = T_j - E_j``. A
    language-wide offset ``delta`` (every translated write shifted, whatever the label) enters both as
    ``d_i = a_i + delta`` and ``e_j = b_j + delta``, so the harmful-only mean ``mean(d)`` reads it as lost (or
    gained) refusal; the quantity of interest is what the translation changes *in the harmful-minus-harmless
    contrast*,

        theta = E[T - E | harmful] - E[T - E | harmless] = E[d] - E[e],

    in which ``delta`` cancels. Harmful and harmless prompts have different ids, so no harmful pair has a harmless
    partner and ``d_i - e_i`` is meaningless: ``theta`` is estimated by ``mean(d) - mean(e)``, unbiased, with
    ``Var = Var(d) / n_h + Var(e) / n_b`` because the two sets of pairs are different prompts (independent). Each
    pair (English and its translation) stays one unit, as in :func:`paired_stats`; the bootstrap therefore
    resamples the harmful pairs and the harmless pairs *independently* (``n_h`` of the ``d`` and ``n_b`` of the
    ``e``, with replacement) and takes percentiles of ``mean(d*) - mean(e*)``. The test of ``theta = 0`` permutes
    the labels harmful / harmless over the pooled differences and compares the Welch statistic
    ``(mean(d) - mean(e)) / sqrt(s_d^2 / n_h + s_e^2 / n_b)``: studentising keeps the permutation test valid for
    the difference of means when the two groups' spreads differ (Janssen 1997), where the raw difference would
    test equal distributions. ``p = (exceed + 1) / (n_perm + 1)``. Both resamplings use one seeded generator;
    permutations run ``chunk`` at a time so memory stays ``chunk x pairs x features``.

    Returns ``mean`` (``theta``), ``ci_low``, ``ci_high``, ``p``, ``harmful_mean`` and ``harmless_mean``, each of
    the trailing shape. Raises :class:`~refusal_circuits.errors.InputError` with fewer than 2 pairs in a group
    (:func:`did_why`).

    >>> g = torch.Generator().manual_seed(0)
    >>> d = torch.randn(30, 2, generator=g) * 0.1 + torch.tensor([1.0, 1.5])   # offset 1, plus 0.5 in feature 1
    >>> e = torch.randn(30, 2, generator=g) * 0.1 + 1.0                        # the same offset, harmless
    >>> st = did_stats(d, e)
    >>> [round(float(x), 1) + 0.0 for x in st["mean"]], bool(st["p"][0] > 0.01), bool(st["p"][1] < 0.001)
    ([0.0, 0.5], True, True)
    """
    n_h, n_b = int(harmful.shape[0]), int(harmless.shape[0])
    why = did_why(n_h, n_b)
    if why is not None:
        raise InputError(f"a difference in differences needs at least 2 pairs in each group: {why}")
    if harmful.shape[1:] != harmless.shape[1:]:
        raise InputError(f"harmful and harmless differences differ in shape: {tuple(harmful.shape[1:])} vs "
                         f"{tuple(harmless.shape[1:])}")
    shape = harmful.shape[1:]
    d = harmful.double().reshape(n_h, -1)
    e = harmless.double().reshape(n_b, -1)
    g = torch.Generator().manual_seed(seed)
    mean_d, mean_e = d.mean(0), e.mean(0)
    theta = mean_d - mean_e
    boots = (d[torch.randint(0, n_h, (n_boot, n_h), generator=g)].mean(1)
             - e[torch.randint(0, n_b, (n_boot, n_b), generator=g)].mean(1))  # [n_boot, features]
    lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2
    lo, hi = torch.quantile(boots, lo_q, dim=0), torch.quantile(boots, hi_q, dim=0)
    t_obs = _welch_t(theta, d.var(0), n_h, e.var(0), n_b).abs()
    pooled = torch.cat([d, e])
    n = n_h + n_b
    exceed = torch.zeros_like(theta)
    for start in range(0, n_perm, chunk):
        m = min(chunk, n_perm - start)
        order = torch.argsort(torch.rand(m, n, generator=g), dim=1)
        x = pooled[order]  # [m, n, features]
        a, b = x[:, :n_h], x[:, n_h:]
        t = _welch_t(a.mean(1) - b.mean(1), a.var(1), n_h, b.var(1), n_b).abs()
        exceed += (t >= t_obs[None] * (1 - 1e-12)).double().sum(0)
    p = (exceed + 1) / (n_perm + 1)
    return {"mean": theta.view(shape), "ci_low": lo.view(shape), "ci_high": hi.view(shape), "p": p.view(shape),
            "harmful_mean": mean_d.view(shape), "harmless_mean": mean_e.view(shape)}


def did_stats_or_nan(harmful: Tensor, harmless: Tensor, **kw: Any) -> dict[str, Tensor]:
    """:func:`did_stats`, or with fewer than 2 pairs in a group (:func:`did_why`) the difference of the means that
    exist as ``mean`` (NaN where a group is empty) and NaN for the interval and test."""
    if did_why(int(harmful.shape[0]), int(harmless.shape[0])) is None:
        return did_stats(harmful, harmless, **kw)
    shape = harmful.shape[1:]

    def mean(x: Tensor) -> Tensor:
        return x.double().mean(0) if x.shape[0] else torch.full(shape, math.nan, dtype=torch.float64)

    md, me = mean(harmful), mean(harmless)
    nan = torch.full(shape, math.nan, dtype=torch.float64)
    return {"mean": md - me, "ci_low": nan, "ci_high": nan.clone(), "p": nan.clone(), "harmful_mean": md,
            "harmless_mean": me}


def percentile_interval(boots: Tensor, ci: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates of one statistic, ignoring replicates where it is not
    defined (NaN: a resample with a constant side of a correlation); NaN when none is."""
    ok = boots.double()[torch.isfinite(boots.double())]
    if ok.numel() == 0:
        return math.nan, math.nan
    lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2
    return float(torch.quantile(ok, lo_q)), float(torch.quantile(ok, hi_q))


def jackknife_interval(point: float, left_out: Sequence[Tensor], ci: float = 0.95,
                       bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """``point ± z·se`` from delete-one replicates, one block per independent sample (a label's prompts):
    ``se² = Σ_blocks (n − 1)/n · Σ_k (θ_(k) − mean θ_(k))²``, ``z`` the normal quantile of ``ci``, clipped to
    ``bounds`` (a cosine's [−1, 1]).

    For a statistic of means near a bound (a cosine near 1) this is the interval to use: a percentile bootstrap
    measures every replicate at twice the data's noise, which pulls a cosine's replicates, and so its interval,
    below the estimate. NaN where a replicate is undefined (the interval is then unbounded)."""
    var = 0.0
    for block in left_out:
        block = block.double().flatten()
        if not bool(torch.isfinite(block).all()):
            return math.nan, math.nan
        k = block.numel()
        var += (k - 1) / k * float(((block - block.mean()) ** 2).sum()) if k > 1 else 0.0
    half = NormalDist().inv_cdf(0.5 + ci / 2) * math.sqrt(var)
    lo, hi = point - half, point + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return lo, hi
