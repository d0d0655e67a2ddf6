"""What the per-language analyses at one or two residual sites share: each language's fit and test groups, bootstrap
resampling paired by id with the base language, refusal scores with each language's own tokens, and the
:class:`Estimate` record (a statistic with its interval) they all report."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from refusal_circuits.data import PromptSet
from refusal_circuits.errors import InputError
from refusal_circuits.io import nullable
from refusal_circuits.models import HookedModel
from refusal_circuits.scores import RefusalTokens, first_token_logits, native_refusal_tokens, refusal_score
from refusal_circuits.stats import jackknife_interval, percentile_interval

LABELS = ("harmful", "harmless")


@dataclass(frozen=True)
class Estimate:
    """A statistic with its interval (percentile bootstrap; a cosine's is a delete-one jackknife,
    :func:`jackknife_cos`); NaN with the reason in ``why`` where undefined."""

    value: float
    low: float
    high: float
    why: str | None = None

    @classmethod
    def of(cls, value: float, boots: Tensor, why: str | None = None, ci: float = 0.95) -> Estimate:
        if why is not None or not math.isfinite(value):
            return cls(math.nan, math.nan, math.nan, why or "not defined on these prompts")
        lo, hi = percentile_interval(boots, ci)
        return cls(value, lo, hi, None if math.isfinite(lo) else "not defined on any resample")

    def text(self, spec: str = ".2f") -> str:
        if self.why is not None:
            return f"n/a ({self.why})"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    def to_json(self) -> dict[str, Any]:
        why = self.why or "not defined on these prompts"
        return {**nullable("value", self.value, why), **nullable("ci_low", self.low, why),
                **nullable("ci_high", self.high, why)}


def split_groups(prompts: PromptSet, lang: str, split: str | None, cap: int | None, seed: int,
                 what: str = "the analysis") -> dict[str, PromptSet]:
    """``lang``'s harmful and harmless prompts of ``split`` (all of them where no prompt has a split, or ``split`` is
    None), at most ``cap`` per label (stratified, seeded); at least 2 of each, else an :class:`InputError` naming
    ``what``."""
    own = prompts.filter(lang=lang)
    if split is not None and any(r.split is not None for r in own):
        own = own.filter(split=split)
    out = {label: own.filter(label=label) for label in LABELS}
    if cap:
        out = {label: part.sample(cap, seed=seed) for label, part in out.items()}
    short = [label for label, part in out.items() if len(part) < 2]
    if short:
        raise InputError(f"{what}: language {lang!r} needs at least 2 harmful and 2 harmless {split} "
                         f"prompts (has {len(out['harmful'])} harmful, {len(out['harmless'])} harmless)")
    return out


def index_plan(base: Sequence[str], other: Sequence[str]) -> list[int] | None:
    """Where each of the base group's ids sits in the other group, when both hold the same ids (paired), else None."""
    if sorted(base) != sorted(other):
        return None
    where = {i: k for k, i in enumerate(other)}
    return [where[i] for i in base]


class Resampler:
    """Seeded bootstrap indices per (split, label), shared by every language whose ids match the base language's."""

    def __init__(self, n_boot: int, seed: int) -> None:
        self.n_boot, self.seed = n_boot, seed
        self._base: dict[tuple[str, str], Tensor] = {}

    def base(self, split: str, label: str, n: int) -> Tensor:
        key = (split, label)
        if key not in self._base:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(f"{split}/{label}".encode()))
            self._base[key] = torch.randint(0, n, (self.n_boot, n), generator=g)
        return self._base[key]

    def for_group(self, split: str, label: str, base_ids: Sequence[str], ids: Sequence[str], salt: int) -> Tensor:
        plan = index_plan(base_ids, ids)
        if plan is not None:
            return torch.tensor(plan)[self.base(split, label, len(base_ids))]
        g = torch.Generator().manual_seed(self.seed * 104729 + salt)
        return torch.randint(0, len(ids), (self.n_boot, len(ids)), generator=g)


def unit(v: Tensor) -> Tensor:
    """``v`` over its norm (a zero vector stays zero)."""
    return v / v.norm().clamp(min=1e-30)


def cos(a: Tensor, b: Tensor) -> Tensor:
    """Cosine along the last axis (works on replicate stacks)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-30)


def _left_out(pos: Tensor, neg: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The difference in means ``mean(pos) − mean(neg)``, and the same with each harmful, then each harmless, row
    left out (a leave-one-out mean is the rank-one update ``(n·m − x_k)/(n − 1)``)."""
    pos, neg = pos.double(), neg.double()
    mp, mn = pos.mean(0), neg.mean(0)
    n, m = len(pos), len(neg)
    return mp - mn, {"harmful": (n * mp - pos) / (n - 1) - mn, "harmless": mp - (m * mn - neg) / (m - 1)}


def jackknife_cos(a: Mapping[str, Tensor], b: Mapping[str, Tensor] | Tensor,
                  pairing: Mapping[str, Sequence[int] | None] | None = None, ci: float = 0.95) -> Estimate:
    """The cosine of two differences in means (harmful rows' mean − harmless rows'), or of one and a fixed vector
    ``b``, with its delete-one jackknife interval (:func:`~refusal_circuits.stats.jackknife_interval`).

    ``a`` and ``b`` map each label to its rows ``[n, d_model]`` (each label needs at least 2). ``pairing[label]``
    says where each of ``b``'s rows sits among ``a``'s when they are the same prompts (the same instructions at
    two sites, or translations sharing ids): leaving a prompt out then removes it from both. Without a pairing the
    two are independent samples and each is left out in turn. Why not the bootstrap: a resampled difference in
    means carries twice the data's noise, so a cosine near 1 gets an interval below its estimate (the 1.5B's
    English harm-vs-refusal cosine, 0.99, had [0.94, 0.98]). The interval is about the estimate at this many
    prompts; noise attenuates a cosine of differences in means below its population value, which is what
    :mod:`~refusal_circuits.crosslingual.reliability`'s noise-corrected cosine corrects."""
    da, la = _left_out(a["harmful"], a["harmless"])
    blocks: list[Tensor] = []
    if isinstance(b, Tensor):
        db = b.double()
        blocks = [cos(la[label], db[None]) for label in LABELS]
    else:
        db, lb = _left_out(b["harmful"], b["harmless"])
        for label in LABELS:
            plan = (pairing or {}).get(label)
            if plan is not None:
                blocks.append(cos(la[label][list(plan)], lb[label]))
            else:
                blocks += [cos(la[label], db[None]), cos(da[None], lb[label])]
    if float(da.norm()) == 0.0 or float(db.norm()) == 0.0:
        return Estimate(math.nan, math.nan, math.nan, "a direction is zero (equal harmful and harmless means)")
    value = float(cos(da, db))
    lo, hi = jackknife_interval(value, blocks, ci, bounds=(-1.0, 1.0))
    return Estimate(value, lo, hi, None if math.isfinite(lo) else "undefined with one prompt left out")


@torch.inference_mode()
def refusal_scores(model: HookedModel, instructions: Sequence[str], token_ids: Sequence[int], batch_size: int) -> Tensor:
    """The refusal score (log-odds of ``token_ids`` at the first generated token) of every instruction, under the
    hooks registered on the model."""
    return refusal_score(first_token_logits(model, instructions, batch_size=batch_size), token_ids)


def mean_estimate(x: Tensor, idx: Tensor, ci: float = 0.95) -> Estimate:
    """The mean of ``x`` with the ``ci`` percentile interval of its means over the resamples ``idx``
    ``[n_boot, n]``."""
    return Estimate.of(float(x.double().mean()), x.double()[idx].mean(1), ci=ci)


def own_refusal_tokens(tokens: RefusalTokens | None, tokenizer: Any, lang: str) -> tuple[tuple[int, ...], str]:
    """``lang``'s own refusal tokens: those given or discovered for it, else the first tokens of its native refusal
    phrases (known before any completion), else none; never another language's (English "I" would measure
    "answers in English" as much as refusal)."""
    own = tokens.by_lang.get(lang, ()) if tokens is not None else ()
    if own:
        assert tokens is not None
        return own, tokens.origin.get(lang, tokens.source)
    native = native_refusal_tokens(tokenizer, lang)
    return (native, "native phrases") if native else ((), "none")
