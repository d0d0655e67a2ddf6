"""Refusal direction candidates and the chosen direction, with provenance and safe (de)serialisation.

A candidate is one vector per (post-instruction position, layer); the estimator that turns the two groups'
statistics into candidates is a small swappable function (difference in means by default, as in Arditi et al.).
The chosen :class:`Direction` saves as ``direction.safetensors`` + ``direction.json`` (never pickle).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from refusal_circuits._version import __version__
from refusal_circuits.activations import MeanActivations, group_means
from refusal_circuits.chat import chat_format
from refusal_circuits.errors import InputError
from refusal_circuits.io import atomic_paths, json_text, safetensors_bytes
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel, model_id

#: A unit vector in the residual stream.
DirectionVector = Float[Tensor, " d_model"]
#: One candidate per post-instruction position and layer.
Candidates = Float[Tensor, "pos layer d_model"]

#: Turns the harmful and harmless statistics into candidates.
Estimator = Callable[[MeanActivations, MeanActivations], Candidates]


def diff_in_means(harmful: MeanActivations, harmless: MeanActivations) -> Candidates:
    """Arditi et al.'s estimator: mean harmful activation minus mean harmless activation (float64)."""
    return harmful.mean - harmless.mean


ESTIMATORS: dict[str, Estimator] = {"diff_in_means": diff_in_means}


@dataclass(frozen=True)
class DirectionCandidates:
    """Candidate refusal directions at every (post-instruction position, layer) of one language.

    Attributes:
        vectors: float64 ``[n_post, n_layers, d_model]``, not normalised (the norm is the activation-addition
            coefficient Arditi et al. use).
        positions: negative indices into the post-instruction tokens, one per axis-0 entry.
        harmful / harmless: the group means the candidates came from.
    """

    vectors: Candidates
    positions: tuple[int, ...]
    model: str
    lang: str
    n_harmful: int
    n_harmless: int
    prompts_sha256: str
    estimator: str
    harmful: MeanActivations = field(repr=False)
    harmless: MeanActivations = field(repr=False)

    def is_zero(self, position: int, layer: int) -> bool:
        """True where both groups share the mean (layer 0 at the template tokens): no direction to take."""
        scale = max(1.0, float(self.harmful.mean.norm(dim=-1).max()))
        return float(self.vector(position, layer).norm()) < 1e-8 * scale

    def merge(self, other: DirectionCandidates, prompts_sha256: str = "") -> DirectionCandidates:
        """The candidates of both prompt sets together, as if extracted from all of them at once (the group means
        are combined, then the estimator runs again): two halves give the whole and its split-half check."""
        if other.lang != self.lang or other.model != self.model or other.estimator != self.estimator:
            raise InputError("only candidates of one language, model and estimator can be merged")
        if self.estimator not in ESTIMATORS:
            raise InputError(f"cannot merge candidates of the custom estimator {self.estimator!r}")
        h, b = self.harmful.combine(other.harmful), self.harmless.combine(other.harmless)
        return DirectionCandidates(ESTIMATORS[self.estimator](h, b), self.positions, self.model, self.lang, h.n, b.n,
                                   prompts_sha256, self.estimator, h, b)

    def vector(self, position: int, layer: int) -> Tensor:
        """The unnormalised candidate at ``position`` (negative) and ``layer``."""
        if position not in self.positions:
            raise InputError(f"position {position} out of range; candidates cover {list(self.positions)}")
        if not 0 <= layer < self.vectors.shape[1]:
            raise InputError(f"layer {layer} out of range; candidates cover 0..{self.vectors.shape[1] - 1}")
        return self.vectors[self.positions.index(position), layer]

    def direction(self, position: int, layer: int, **meta: Any) -> Direction:
        """The candidate at (position, layer) as a :class:`Direction`."""
        raw = self.vector(position, layer)
        if self.is_zero(position, layer):
            raise InputError(f"the candidate at position {position}, layer {layer} is zero: both groups have the "
                             "same mean there (at layer 0 the template tokens' embeddings are identical)")
        return Direction(
            vector=(raw / raw.norm()).to(torch.float32), norm=float(raw.norm()), layer=layer, position=position,
            model=self.model, lang=self.lang, n_harmful=self.n_harmful, n_harmless=self.n_harmless,
            prompts_sha256=self.prompts_sha256, estimator=self.estimator, candidates=self.vectors.to(torch.float32),
            meta=dict(meta),
        )


def extract_candidates(
    model: HookedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    lang: str = "",
    prompts_sha256: str = "",
    estimator: str | Estimator = "diff_in_means",
    batch_size: int = 32,
    progress: bool = True,
) -> DirectionCandidates:
    """Mean activations of both groups (streamed) and the estimator's candidates.

    Args:
        model: a :class:`~refusal_circuits.models.HookedModel`.
        harmful, harmless: instructions of the two groups (typically the train split of one language).
        lang, prompts_sha256: provenance carried into the record.
        estimator: a name in :data:`ESTIMATORS` or a function of the two :class:`MeanActivations`.
    """
    _estimator(estimator)  # an unknown name fails before any forward pass
    means = group_means(model, {"harmful": harmful, "harmless": harmless}, batch_size=batch_size,
                        progress=progress, desc=f"activations {lang}".rstrip())
    return candidates_from_means(means["harmful"], means["harmless"], model=model_id(model), lang=lang,
                                 prompts_sha256=prompts_sha256, estimator=estimator)


def _estimator(estimator: str | Estimator) -> tuple[str, Estimator]:
    if isinstance(estimator, str):
        if estimator not in ESTIMATORS:
            raise InputError(f"unknown estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")
        return estimator, ESTIMATORS[estimator]
    return getattr(estimator, "__name__", "custom"), estimator


def candidates_from_means(harmful: MeanActivations, harmless: MeanActivations, *, model: str, lang: str = "",
                          prompts_sha256: str = "", estimator: str | Estimator = "diff_in_means"
                          ) -> DirectionCandidates:
    """The estimator's candidates from the two groups' means (see :func:`extract_candidates`; use this with
    :func:`~refusal_circuits.activations.group_means` to collect several languages' groups at once)."""
    name, fn = _estimator(estimator)
    vectors = fn(harmful, harmless)
    if not torch.isfinite(vectors).all():
        raise FloatingPointError("the estimator returned non-finite candidates")
    return DirectionCandidates(vectors, harmful.positions, model, lang, harmful.n, harmless.n, prompts_sha256, name,
                               harmful, harmless)


@dataclass(frozen=True)
class Direction:
    """A refusal direction r̂ in raw Hugging Face coordinates, with where it came from.

    Attributes:
        vector: the unit vector, float32 ``[d_model]``.
        norm: the norm of the unnormalised candidate (the default activation-addition coefficient).
        layer / position: where it was read: ``resid_pre[layer]`` at post-instruction position ``position``.
        candidates: every candidate of its language, ``[n_post, n_layers, d_model]`` (float32).
        meta: anything else worth keeping (selection scores, filter used, refusal tokens ...), JSON-able.
    """

    vector: DirectionVector
    norm: float
    layer: int
    position: int
    model: str
    lang: str
    n_harmful: int
    n_harmless: int
    prompts_sha256: str
    estimator: str = "diff_in_means"
    candidates: Candidates | None = field(default=None, repr=False)
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    version: str = __version__

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "lang": self.lang, "layer": self.layer, "position": self.position,
                "norm": self.norm, "d_model": self.d_model, "n_harmful": self.n_harmful,
                "n_harmless": self.n_harmless, "n_prompts": self.n_harmful + self.n_harmless,
                "prompts_sha256": self.prompts_sha256, "estimator": self.estimator, "version": self.version,
                **self.meta}

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``direction.safetensors`` and ``direction.json`` into ``out_dir``, together and atomically.

        Both files are written before either replaces an older pair, so an interrupted save never leaves the
        tensors of one direction beside the metadata (layer, position) of another.
        """
        out = Path(out_dir)
        tensors = {"direction": self.vector.detach().to(torch.float32).contiguous()}
        if self.candidates is not None:
            tensors["candidates"] = self.candidates.detach().to(torch.float32).contiguous()
        metadata = {"format": "refusal_circuits.direction", "version": __version__}
        with atomic_paths(out / "direction.safetensors", out / "direction.json") as (st_tmp, json_tmp):
            st_tmp.write_bytes(safetensors_bytes(tensors, metadata))
            json_tmp.write_text(json_text(self.to_json()), encoding="utf-8")
        return out

    def _repr_html_(self) -> str:
        rows = (f"<tr><td>{esc(k)}</td><td>{esc(_short(v))}</td></tr>" for k, v in self.to_json().items())
        return "<b>Refusal direction</b>" + table("", [], rows)


def _short(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
    return s if len(s) <= 120 else s[:117] + "..."


_REQUIRED_JSON = ("model", "lang", "layer", "position")


def load_direction(path: str | os.PathLike[str]) -> Direction:
    """Load a direction saved by :meth:`Direction.save`: a directory, or its ``.safetensors``/``.json`` file.

    Only safetensors and JSON are read, never pickle; every problem raises :class:`InputError` naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory (a direction is a directory written by `directions`)")
    folder = p if p.is_dir() else p.parent
    st_path, json_path = folder / "direction.safetensors", folder / "direction.json"
    for f in (st_path, json_path):
        if not f.is_file():
            raise InputError(f"{f}: no such file (a direction is a directory with direction.safetensors and "
                             "direction.json)")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or any(k not in meta for k in _REQUIRED_JSON):
        raise InputError(f"{json_path}: needs the keys {', '.join(_REQUIRED_JSON)}")
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{st_path}: not a readable safetensors file ({e})") from None
    if "direction" not in tensors or tensors["direction"].ndim != 1:
        raise InputError(f"{st_path}: needs a 1-d tensor named 'direction'")
    vector = tensors["direction"].to(torch.float32)
    if not torch.isfinite(vector).all() or float(vector.norm()) == 0.0:
        raise InputError(f"{st_path}: the direction is zero or not finite")
    if abs(float(vector.norm()) - 1.0) > 1e-5:  # a hand-made file; ours are unit vectors already
        vector = vector / vector.norm()
    known = {"model", "lang", "layer", "position", "norm", "d_model", "n_harmful", "n_harmless", "n_prompts",
             "prompts_sha256", "estimator", "version"}

    def number(value: Any, what: str, whole: bool = False) -> Any:
        # json reads NaN, Infinity and 1.5 as numbers; caught here, not after an hour of generation.
        ok = isinstance(value, int) if whole else isinstance(value, (int, float)) and math.isfinite(value)
        if isinstance(value, bool) or not ok:
            raise InputError(f"{json_path}: {what} must be a {'whole' if whole else 'finite'} number, got {value!r}")
        return value

    actadd = meta.get("actadd")
    if isinstance(actadd, dict) and actadd.get("alpha") is not None:
        number(actadd["alpha"], "actadd alpha")
    norm = float(number(meta.get("norm", 1.0), "norm"))
    layer, position = number(meta["layer"], "layer", whole=True), number(meta["position"], "position", whole=True)
    try:
        return Direction(
            vector=vector, norm=norm, layer=layer, position=position, model=str(meta["model"]), lang=str(meta["lang"]),
            n_harmful=int(meta.get("n_harmful", 0)), n_harmless=int(meta.get("n_harmless", 0)),
            prompts_sha256=str(meta.get("prompts_sha256", "")), estimator=str(meta.get("estimator", "")),
            candidates=tensors.get("candidates"), meta={k: v for k, v in meta.items() if k not in known},
            version=str(meta.get("version", "")),
        )
    except (TypeError, ValueError) as e:
        raise InputError(f"{json_path}: bad value ({e})") from None


def check_compatible(direction: Direction, model: HookedModel, where: str = "the direction") -> None:
    """Raise :class:`InputError` if ``direction`` cannot apply to ``model``: another width, or a layer or
    post-instruction position the model does not have."""
    d_model, n_layers = int(model.cfg.d_model), int(model.cfg.n_layers)
    if direction.d_model != d_model:
        raise InputError(f"{where} has d_model {direction.d_model} (from {direction.model}) but the model has "
                         f"{d_model}: it comes from another model")
    if not 0 <= direction.layer < n_layers:
        raise InputError(f"{where} is at layer {direction.layer}, out of range for a model with {n_layers} layers")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        n_post = chat_format(tokenizer).n_post
        if not -n_post <= direction.position < 0:
            raise InputError(f"{where} is at position {direction.position}, out of range for this model's chat "
                             f"template: its {n_post} post-instruction tokens are positions -{n_post}..-1")
