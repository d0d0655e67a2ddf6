"""Choosing the refusal direction without refusal tokens: COSMIC (Siu et al., ACL Findings 2025).

Arditi-style selection (:mod:`refusal_circuits.selection`) scores candidates by the refusal score, which needs the
tokens a refusal begins with; in a language the model never refuses in there are none to discover. COSMIC scores a
candidate r by what it does to the representation instead, read at the last token of a few layers:

1. **Readout layers**: with the harmful and harmless validation means ``μ_h[l]``, ``μ_b[l]`` of ``resid_pre[l]``
   at the last token, the ``⌈layer_frac · n_layers⌉`` layers (of ``1 .. n_layers − 1``) where
   ``cos(μ_h[l], μ_b[l])`` is lowest: where the two groups are represented most differently.
2. **Scores**: ablating r on the harmful prompts should make them look harmless there, and adding r (its
   difference-in-means norm, at its layer) on the harmless prompts should make them look harmful:

       ablation = mean_l cos(μ_h^{−r}[l], μ_b[l]),   induction = mean_l cos(μ_b^{+r}[l], μ_h[l]),
       score = (ablation + induction) / 2,

   each pass stopped after the deepest readout layer.
3. **Filters**, as Arditi's and PolyRefuse's (no refusal tokens needed): KL(clean ‖ r ablated) of the next-token
   distribution on the harmless prompts below ``kl_max``, and the layer below ``max_layer_frac · n_layers``.
   The highest score passing them is chosen.

:func:`selection_agreement` compares a COSMIC choice with an Arditi-style one on the same candidates: the same
site or not, the cosine of the two directions, and the Spearman correlation between COSMIC's score and minus the
bypass score over the candidates both scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from refusal_circuits import interventions
from refusal_circuits.activations import group_means
from refusal_circuits.directions import Direction, DirectionCandidates
from refusal_circuits.errors import InputError
from refusal_circuits.io import nullable
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel
from refusal_circuits.scores import first_token_logits, kl_divergence
from refusal_circuits.selection import Selection
from refusal_circuits.stats import spearman

#: Fraction of the layers read out (COSMIC's "low-similarity" layers).
LAYER_FRAC = 0.1
#: PolyRefuse's KL threshold, which COSMIC's filter shares by default.
KL_MAX = 0.2
MAX_LAYER_FRAC = 0.8


@dataclass(frozen=True)
class CosmicScore:
    """One candidate's COSMIC scores (the module docstring defines them)."""

    position: int
    layer: int
    ablation: float
    induction: float
    kl: float

    @property
    def score(self) -> float:
        return (self.ablation + self.induction) / 2


@dataclass(frozen=True)
class CosmicSelection:
    """The direction COSMIC chose, every candidate's scores, and the readout layers."""

    direction: Direction
    scores: tuple[CosmicScore, ...]
    readout_layers: tuple[int, ...]
    baseline_similarity: float
    kl_max: float | None
    max_layer: int

    def passing(self) -> list[CosmicScore]:
        return [s for s in self.scores if (self.kl_max is None or s.kl < self.kl_max) and s.layer < self.max_layer]

    def top(self, k: int = 10) -> list[CosmicScore]:
        return sorted(self.passing(), key=lambda s: -s.score)[:k]

    def to_json(self, top_k: int = 10) -> dict[str, Any]:
        return {"strategy": "cosmic", "chosen": {"position": self.direction.position, "layer": self.direction.layer},
                "readout_layers": list(self.readout_layers), "baseline_similarity": self.baseline_similarity,
                "kl_max": self.kl_max, "eligible_layers": f"0..{self.max_layer - 1}",
                "top": [{**asdict(s), "score": s.score} for s in self.top(top_k)],
                "candidates": [{**asdict(s), "score": s.score} for s in self.scores]}

    def _repr_html_(self) -> str:
        d = self.direction
        rows = (f"<tr><td>{s.position}</td><td>{s.layer}</td><td>{s.score:.3f}</td><td>{s.ablation:.3f}</td>"
                f"<td>{s.induction:.3f}</td><td>{s.kl:.3f}</td></tr>" for s in self.top(10))
        return (f"<b>COSMIC selection</b> · {esc(d.lang)} · layer {d.layer}, position {d.position} · readout layers "
                f"{esc(', '.join(map(str, self.readout_layers)))} (harmful-harmless cosine {self.baseline_similarity:.3f})"
                + table("", ["pos", "layer", "score", "ablation", "induction", "kl"], rows))


def _last_means(model: HookedModel, groups: dict[str, Sequence[str]], layers: Sequence[int], batch_size: int
                ) -> dict[str, torch.Tensor]:
    """Each group's mean ``resid_pre`` at the last token of ``layers``: ``[len(layers), d_model]`` float64."""
    means = group_means(model, groups, layers=layers, batch_size=batch_size, progress=False)
    return {name: m.mean[-1] for name, m in means.items()}


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-30)


@torch.inference_mode()
def cosmic_select(
    model: HookedModel,
    candidates: DirectionCandidates,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    layer_frac: float = LAYER_FRAC,
    kl_max: float | None = KL_MAX,
    max_layer_frac: float = MAX_LAYER_FRAC,
    batch_size: int = 32,
    progress: bool = True,
) -> CosmicSelection:
    """Score the candidates by COSMIC and choose one (module docstring); no refusal token is read.

    Args:
        candidates: from :func:`~refusal_circuits.directions.extract_candidates` (train prompts).
        harmful, harmless: validation instructions (not the ones the candidates came from).
        positions, layers: restrict the grid (default: every position, every layer below the layer cap).
    """
    if not harmful or not harmless:
        raise InputError("COSMIC selection needs harmful and harmless validation prompts")
    if not 0 < layer_frac <= 1:
        raise InputError(f"layer_frac must be in (0, 1], got {layer_frac}")
    n_layers = candidates.vectors.shape[1]
    if n_layers < 2:
        raise InputError("COSMIC needs a model with at least 2 layers (it reads layers after the first)")
    cap = math.ceil(max_layer_frac * n_layers)
    eligible = [layer for layer in (layers if layers is not None else range(n_layers)) if layer < cap]
    grid = [(p, layer) for p in (positions or candidates.positions) for layer in eligible
            if not candidates.is_zero(p, layer)]
    if not grid:
        raise InputError(f"no eligible candidate: every requested layer is at or above {cap} or zero")
    groups = {"harmful": harmful, "harmless": harmless}
    every = list(range(1, n_layers))
    base = _last_means(model, groups, every, batch_size)
    sims = _cos_rows(base["harmful"], base["harmless"])
    n_read = max(1, math.ceil(layer_frac * n_layers))
    pick = sorted(sims.argsort()[:n_read].tolist())
    readout = tuple(every[i] for i in pick)
    mu_h, mu_b = base["harmful"][pick], base["harmless"][pick]
    clean = first_token_logits(model, harmless, batch_size=batch_size)
    scores = []
    for p, layer in tqdm(grid, desc=f"cosmic {candidates.lang}", disable=not progress, leave=False):
        direction = candidates.direction(p, layer)
        with interventions.ablate(model, direction):
            ablated = _last_means(model, {"harmful": harmful}, readout, batch_size)["harmful"]
            kl = float(kl_divergence(clean, first_token_logits(model, harmless, batch_size=batch_size)).mean())
        with interventions.actadd(model, direction):
            added = _last_means(model, {"harmless": harmless}, readout, batch_size)["harmless"]
        scores.append(CosmicScore(p, layer, float(_cos_rows(ablated, mu_b).mean()),
                                  float(_cos_rows(added, mu_h).mean()), kl))
    passing = [s for s in scores if (kl_max is None or s.kl < kl_max) and s.layer < cap]
    if not passing:
        leaders = sorted(scores, key=lambda s: -s.score)[:5]
        raise InputError("no candidate passes COSMIC's KL filter (kl < " + f"{kl_max}); best: "
                         + "; ".join(f"pos {s.position} layer {s.layer} score {s.score:.3f} kl {s.kl:.3f}"
                                     for s in leaders))
    best = max(passing, key=lambda s: s.score)
    meta = {"selection": {"strategy": "cosmic", "score": best.score, "ablation": best.ablation,
                          "induction": best.induction, "kl": best.kl, "readout_layers": list(readout),
                          "n_val_harmful": len(harmful), "n_val_harmless": len(harmless)}}
    chosen = candidates.direction(best.position, best.layer, **meta)
    return CosmicSelection(chosen, tuple(scores), readout, float(sims[pick].mean()), kl_max, cap)


@dataclass(frozen=True)
class SelectionAgreement:
    """A COSMIC choice against an Arditi-style one on the same candidates (module docstring)."""

    lang: str
    cosmic: tuple[int, int]
    arditi: tuple[int, int]
    cosine: float
    rank_correlation: float
    n_common: int
    why: dict[str, str] = field(default_factory=dict)

    @property
    def same_site(self) -> bool:
        return self.cosmic == self.arditi

    def to_json(self) -> dict[str, Any]:
        return {"lang": self.lang, "cosmic": {"position": self.cosmic[0], "layer": self.cosmic[1]},
                "arditi": {"position": self.arditi[0], "layer": self.arditi[1]}, "same_site": self.same_site,
                "cosine": self.cosine, "n_common": self.n_common,
                **nullable("rank_correlation", self.rank_correlation, self.why.get("rank_correlation"))}


def selection_agreement(cosmic: CosmicSelection, arditi: Selection) -> SelectionAgreement:
    """How far a COSMIC choice agrees with an Arditi-style one (same language's candidates)."""
    a, c = arditi.direction, cosmic.direction
    by_site = {(s.position, s.layer): s for s in arditi.scores}
    common = [(s.score, -by_site[(s.position, s.layer)].bypass) for s in cosmic.scores
              if (s.position, s.layer) in by_site]
    rho = spearman(torch.tensor([x for x, _ in common]), torch.tensor([y for _, y in common])) if common else math.nan
    why = {} if math.isfinite(rho) else {"rank_correlation": "fewer than 3 common candidates or constant scores"}
    return SelectionAgreement(c.lang, (c.position, c.layer), (a.position, a.layer),
                              float(c.vector.double() @ a.vector.double()), rho, len(common), why)
