"""Choosing the refusal direction among the (position, layer) candidates, as Arditi et al. do.

For every candidate r̂ (one per post-instruction position and layer below ``max_layer_frac * n_layers``):

* **bypass** = mean refusal score on harmful validation prompts with r̂ ablated everywhere (lower is better);
* **induce** = mean refusal score on harmless validation prompts with r̂ added at its layer;
* **kl** = mean KL(clean || ablated) of the next-token distribution on harmless validation prompts.

Arditi et al. keep candidates with induce > 0 and KL < 0.1 and choose the lowest bypass score; PolyRefuse
(Wang et al.) uses KL < 0.2 and no induce filter. Both are presets of :class:`SelectionConfig`. Every
candidate's scores are kept in the :class:`Selection` record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from refusal_circuits import interventions
from refusal_circuits.directions import Direction, DirectionCandidates
from refusal_circuits.errors import InputError
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel
from refusal_circuits.scores import RefusalTokens, first_token_logits, kl_divergence, refusal_score


@dataclass(frozen=True)
class SelectionConfig:
    """Filters of the selection. ``None`` switches a filter off."""

    name: str = "arditi"
    kl_max: float | None = 0.1
    induce_min: float | None = 0.0
    max_layer_frac: float = 0.8

    def max_layer(self, n_layers: int) -> int:
        """Candidates at layers strictly below this are eligible."""
        return math.ceil(self.max_layer_frac * n_layers)


ARDITI = SelectionConfig("arditi", kl_max=0.1, induce_min=0.0, max_layer_frac=0.8)
POLYREFUSE = SelectionConfig("polyrefuse", kl_max=0.2, induce_min=None, max_layer_frac=0.8)
PRESETS = {"arditi": ARDITI, "polyrefuse": POLYREFUSE}


def filter_configs(name: str, *, kl_max: float | None = None, max_layer_frac: float | None = None
                   ) -> tuple[SelectionConfig, SelectionConfig | None]:
    """The filter and its fallback for a ``--filter`` name (``auto``: Arditi, falling back to PolyRefuse), with
    the KL threshold and layer cap overridden where given (the filter's name then ends in ``+custom``)."""
    if max_layer_frac is not None and not 0 < max_layer_frac <= 1:
        raise InputError("--max-layer-frac must be in (0, 1]")
    config = ARDITI if name == "auto" else PRESETS[name]
    fallback = POLYREFUSE if name == "auto" else None
    overrides: dict[str, Any] = {k: v for k, v in (("kl_max", kl_max), ("max_layer_frac", max_layer_frac))
                                 if v is not None}
    if overrides:
        config = replace(config, name=f"{config.name}+custom", **overrides)
        fallback = replace(fallback, **overrides) if fallback else None
    return config, fallback


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's scores; ``induce`` and ``kl`` are None where a lazy scan never needed them."""

    position: int
    layer: int
    bypass: float
    induce: float | None = None
    kl: float | None = None

    @property
    def scored(self) -> bool:
        return self.kl is not None

    def failures(self, config: SelectionConfig) -> list[str]:
        """Why ``config`` rejects this candidate (empty if it passes)."""
        if self.kl is None:
            return ["not scored (its bypass score ranks below the chosen candidates)"]
        out = []
        if not math.isfinite(self.bypass):
            out.append("bypass not finite")
        if config.kl_max is not None and not self.kl < config.kl_max:
            out.append(f"kl {self.kl:.3f} >= {config.kl_max}")
        if config.induce_min is not None:
            if self.induce is None:
                if not out:  # induce is skipped only when KL already fails; say so if that ever changes
                    out.append("induce not scored")
            elif not self.induce > config.induce_min:
                out.append(f"induce {self.induce:.2f} <= {config.induce_min}")
        return out

    def describe(self) -> str:
        out = f"pos {self.position} layer {self.layer}: bypass {self.bypass:.2f}"
        if self.induce is not None:
            out += f", induce {self.induce:.2f}"
        return out + (f", kl {self.kl:.3f}" if self.kl is not None else "")


def _fmt(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


class SelectionError(InputError):
    """No candidate passes the filters; the message lists the best candidates."""


@dataclass(frozen=True)
class Selection:
    """The chosen direction and every candidate's scores.

    Attributes:
        direction: the chosen :class:`Direction` (its ``meta`` carries the scores and the filter used).
        scores: every scored candidate.
        config: the filter that chose it; ``fallback_from`` names a stricter one that rejected every candidate.
        baseline_harmful / baseline_harmless: mean refusal scores without intervention.
    """

    direction: Direction
    scores: tuple[CandidateScore, ...]
    config: SelectionConfig
    baseline_harmful: float
    baseline_harmless: float
    refusal_tokens: RefusalTokens
    n_val_harmful: int
    n_val_harmless: int
    fallback_from: str | None = None
    max_layer: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def top(self, k: int = 10) -> list[CandidateScore]:
        """The ``k`` candidates passing the filter with the lowest bypass score."""
        passing = [s for s in self.scores if not s.failures(self.config)]
        return sorted(passing, key=lambda s: s.bypass)[:k]

    def to_json(self, top_k: int = 10) -> dict[str, Any]:
        return {
            "filter": asdict(self.config), "fallback_from": self.fallback_from,
            "chosen": {"position": self.direction.position, "layer": self.direction.layer},
            "baseline_refusal_score": {"harmful": self.baseline_harmful, "harmless": self.baseline_harmless},
            "n_val": {"harmful": self.n_val_harmful, "harmless": self.n_val_harmless},
            "eligible_layers": f"0..{self.max_layer - 1}",
            "n_scored": sum(s.scored for s in self.scores),
            "top": [asdict(s) for s in self.top(top_k)],
            "candidates": [asdict(s) for s in self.scores],
        }

    def _repr_html_(self) -> str:
        d = self.direction
        head = (f"<b>Selected direction</b> · {esc(d.model)} · {esc(d.lang)} · layer {d.layer}, "
                f"position {d.position} · filter {esc(self.config.name)}"
                + (f" (fallback: no candidate passed {esc(self.fallback_from)})" if self.fallback_from else "")
                + f"<br>baseline refusal score: harmful {self.baseline_harmful:.2f}, harmless "
                  f"{self.baseline_harmless:.2f}")
        rows = (f"<tr><td>{s.position}</td><td>{s.layer}</td><td>{s.bypass:.2f}</td><td>{_fmt(s.induce, 2)}</td>"
                f"<td>{_fmt(s.kl, 3)}</td></tr>" for s in self.top(10))
        return head + table("", ["pos", "layer", "bypass", "induce", "kl"], rows)


@torch.inference_mode()
def score_candidates(
    model: HookedModel,
    candidates: DirectionCandidates,
    harmful: Sequence[str],
    harmless: Sequence[str],
    tokens: Sequence[int],
    *,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    enough: Callable[[list[CandidateScore]], bool] | None = None,
    induce_needed: Callable[[float], bool] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[list[CandidateScore], float, float]:
    """Score candidates; returns them (grid order) with the baseline refusal scores of both groups.

    Every candidate gets its bypass score. KL and induce, which cost twice as much, are computed in order of
    increasing bypass score until ``enough(scored_so_far)`` is true (all of them when ``enough`` is None).
    The lowest-bypass candidate that passes a filter is therefore the same as with exhaustive scoring.
    ``induce_needed(kl)`` (default: always) says whether a candidate with that KL needs its induce score: a
    candidate whose KL already fails every filter that looks at induce is left with ``induce=None``.
    """
    base_harmful = first_token_logits(model, harmful, batch_size=batch_size)
    base_harmless = first_token_logits(model, harmless, batch_size=batch_size)
    grid = [(p, layer) for p in (positions or candidates.positions)
            for layer in (layers if layers is not None else range(candidates.vectors.shape[1]))
            if not candidates.is_zero(p, layer)]
    bypass: dict[tuple[int, int], float] = {}
    for key in tqdm(grid, desc=f"select {candidates.lang}: bypass", disable=not progress, leave=False):
        with interventions.ablate(model, candidates.direction(*key)):
            bypass[key] = float(refusal_score(first_token_logits(model, harmful, batch_size=batch_size), tokens).mean())
    done: dict[tuple[int, int], CandidateScore] = {}
    order = sorted(grid, key=lambda k: bypass[k])
    for key in tqdm(order, desc=f"select {candidates.lang}: kl, induce", disable=not progress, leave=False):
        direction = candidates.direction(*key)
        with interventions.ablate(model, direction):
            ablated = first_token_logits(model, harmless, batch_size=batch_size)
        kl = float(kl_divergence(base_harmless, ablated).mean())
        induce = None
        if induce_needed is None or induce_needed(kl):
            with interventions.actadd(model, direction):
                induce = float(refusal_score(first_token_logits(model, harmless, batch_size=batch_size), tokens).mean())
        done[key] = CandidateScore(key[0], key[1], bypass[key], induce=induce, kl=kl)
        if enough is not None and enough(list(done.values())):
            break
    out = [done.get(key, CandidateScore(key[0], key[1], bypass[key])) for key in grid]
    return (out, float(refusal_score(base_harmful, tokens).mean()),
            float(refusal_score(base_harmless, tokens).mean()))


def select_direction(
    model: HookedModel,
    candidates: DirectionCandidates,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_tokens: RefusalTokens,
    *,
    config: SelectionConfig = ARDITI,
    fallback: SelectionConfig | None = None,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    exhaustive: bool = False,
    top_k: int = 5,
    batch_size: int = 32,
    progress: bool = True,
) -> Selection:
    """Score the eligible candidates on validation prompts and choose the direction.

    Args:
        candidates: from :func:`~refusal_circuits.directions.extract_candidates`.
        harmful, harmless: validation instructions (not the ones the candidates came from).
        refusal_tokens: what the refusal score counts (the candidates' language's tokens are used).
        config: the filter (:data:`ARDITI` by default).
        fallback: a looser filter to use, and record, if ``config`` rejects every candidate.
        positions, layers: restrict the grid (default: every position, every layer below the layer cap).
        exhaustive: score induce and KL of every candidate. By default they are scored in order of increasing
            bypass score until ``top_k`` candidates pass ``config``, which chooses the same direction at a
            fraction of the cost; unscored candidates keep their bypass score.

    Raises:
        SelectionError: nothing passes; the message lists the best candidates by bypass score.
    """
    if not harmful or not harmless:
        raise InputError("selection needs harmful and harmless validation prompts")
    n_layers = candidates.vectors.shape[1]
    cap = min(config.max_layer(n_layers), fallback.max_layer(n_layers) if fallback else n_layers)
    eligible = [layer for layer in (layers if layers is not None else range(n_layers)) if layer < cap]
    if not eligible:
        raise InputError(f"no eligible layer: every requested layer is at or above {cap}")
    tokens = refusal_tokens.for_lang(candidates.lang)
    def enough(scored: list[CandidateScore]) -> bool:
        return sum(not s.failures(config) and s.layer < config.max_layer(n_layers) for s in scored) >= top_k

    def induce_needed(kl: float) -> bool:
        """Only a filter with an induce threshold whose KL threshold this candidate meets needs induce."""
        return exhaustive or any(c.induce_min is not None and (c.kl_max is None or kl < c.kl_max)
                                 for c in (config, fallback) if c is not None)

    scores, base_h, base_s = score_candidates(model, candidates, harmful, harmless, tokens, positions=positions,
                                              layers=eligible, enough=None if exhaustive else enough,
                                              induce_needed=induce_needed, batch_size=batch_size, progress=progress)
    chosen_config, fallback_from = config, None
    passing = [s for s in scores if not s.failures(config) and s.layer < config.max_layer(n_layers)]
    if not passing and fallback is not None:
        chosen_config, fallback_from = fallback, config.name
        passing = [s for s in scores if not s.failures(fallback) and s.layer < fallback.max_layer(n_layers)]
    if not passing:
        leaders = sorted(scores, key=lambda s: s.bypass)[:5]
        raise SelectionError(
            f"no candidate passes the {config.name} filter; best by bypass: "
            + "; ".join(f"{s.describe()} ({', '.join(s.failures(config))})" for s in leaders)
            + ". Try a looser filter (--filter polyrefuse) or more validation prompts")
    best = min(passing, key=lambda s: s.bypass)
    if best.induce is None:  # chosen by a filter without induce: still report it
        with interventions.actadd(model, candidates.direction(best.position, best.layer)):
            induce = float(refusal_score(first_token_logits(model, harmless, batch_size=batch_size), tokens).mean())
        best = CandidateScore(best.position, best.layer, best.bypass, induce=induce, kl=best.kl)
        scores = [best if (s.position, s.layer) == (best.position, best.layer) else s for s in scores]
    top = sorted(passing, key=lambda s: s.bypass)[:10]
    meta = {"selection": {"filter": chosen_config.name, "fallback_from": fallback_from,
                          "bypass": best.bypass, "induce": best.induce, "kl": best.kl,
                          "baseline_harmful": base_h, "baseline_harmless": base_s,
                          "n_val_harmful": len(harmful), "n_val_harmless": len(harmless)},
            "refusal_tokens": refusal_tokens.to_json(),
            "top": [asdict(s) for s in top]}
    direction = candidates.direction(best.position, best.layer, **meta)
    direction.meta["actadd"] = calibrate_actadd(model, direction, harmless, tokens, batch_size=batch_size)
    return Selection(direction, tuple(scores), chosen_config, base_h, base_s, refusal_tokens, len(harmful),
                     len(harmless), fallback_from, cap)


#: Multiples of the direction's norm tried, in order, by :func:`calibrate_actadd`.
ACTADD_SCALES = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)


@torch.inference_mode()
def calibrate_actadd(model: HookedModel, direction: Direction, harmless: Sequence[str], tokens: Sequence[int], *,
                     scales: Sequence[float] = ACTADD_SCALES, target: float = 0.8, batch_size: int = 32
                     ) -> dict[str, Any]:
    """The smallest activation-addition coefficient that makes harmless validation prompts refuse.

    Arditi et al. add the unnormalised difference in means (``alpha = norm``). On a weakly aligned model that
    falls short: it moves the harmless mean only to the harmful mean, and the harmful prompts themselves are
    refused only part of the time. We take the first multiple of the norm in ``scales`` under which greedy
    decoding starts a refusal (a refusal token is the most likely first token) on at least ``target`` of the
    harmless validation prompts. Returns ``{"alpha", "scale", "fraction", "induce", "target", "tried"}``; when
    no multiple reaches the target, the one with the highest fraction is used.
    """
    refusal = torch.tensor(list(tokens))
    tried = []
    for scale in scales:
        with interventions.actadd(model, direction, alpha=scale * direction.norm):
            logits = first_token_logits(model, harmless, batch_size=batch_size)
        starts = torch.isin(logits.argmax(-1), refusal)
        entry = {"scale": scale, "induce": float(refusal_score(logits, tokens).mean()),
                 "fraction": float(starts.float().mean())}
        tried.append(entry)
        if entry["fraction"] >= target:
            break
    best = next((t for t in tried if t["fraction"] >= target), None) or max(tried, key=lambda t: t["fraction"])
    return {"alpha": best["scale"] * direction.norm, **best, "target": target, "reached": best["fraction"] >= target,
            "tried": tried}
