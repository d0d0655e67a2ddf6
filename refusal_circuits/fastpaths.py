"""Run-time proof that each fast path computes what the plain forward pass computes, on the user's model.

The library's forward passes take three shortcuts (see :mod:`refusal_circuits.forward`): the chat template's
shared prefix runs once and every row continues from its key-value cache; first-token logits come from prompts
packed end to end under a block-diagonal mask; generation decodes from Hugging Face's key-value cache, prefilled
from the shared prefix's. Each depends on
how the installed transformers and TransformerLens pass caches, masks and positions, which changes between
releases without an error (transformers 5.24 renamed the cache argument, and TransformerLens 4.3's attention
bridges then ignored the cache: every cached forward computed garbage, silently).

So the first time a fast path runs on a model in a process, it is also run the plain way on a small part of the
same work (the first few prompts, under the same hooks; for generation, greedy decoding with a full forward pass
per step and no cache at all), and the two are compared within the dtype-aware tolerance
of :mod:`refusal_circuits.exactness`. On agreement the fast path stays on for that model; on a mismatch it is
switched off for that model with one :class:`FastPathWarning` naming the path, the model, the error and the
package versions, and the work goes on by the plain path: correct, only slower. :func:`status` reports what was
checked (``refusal-circuits check`` prints it).
"""

from __future__ import annotations

import importlib.metadata as md
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from refusal_circuits import exactness
from refusal_circuits.models import HookedModel, model_id

PREFIX = "shared template prefix"
PACK = "packed first-token logits"
GENERATE = "cached generation"
#: Every fast path, in the order the library uses them.
PATHS = (PREFIX, PACK, GENERATE)

_STATE = "_refusal_circuits_fast_paths"


class FastPathWarning(UserWarning):
    """A fast path disagreed with the plain forward pass on a model and was switched off for it."""


@dataclass
class Verdict:
    """The outcome of one fast path's check on one model."""

    path: str
    ok: bool
    error: float
    allowed: float
    n_prompts: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "error": self.error, "allowed": self.allowed,
                "n_prompts": self.n_prompts}


@dataclass
class FastPathState:
    """What has been checked on one model: a :class:`Verdict` per fast path."""

    verdicts: dict[str, Verdict] = field(default_factory=dict)


def state(model: HookedModel) -> FastPathState:
    """The model's fast-path state (created on first use; lives as long as the model)."""
    st = getattr(model, _STATE, None)
    if not isinstance(st, FastPathState):
        st = FastPathState()
        object.__setattr__(model, _STATE, st)  # nn.Module.__setattr__ would be fine too; this skips its checks
    return st


def status(model: HookedModel) -> dict[str, Verdict]:
    """The verdicts so far, by path (a path not yet used on this model has none)."""
    return dict(state(model).verdicts)


def reset(model: HookedModel, path: str | None = None) -> None:
    """Forget the verdict of ``path`` (every path when None): the next use checks it again."""
    verdicts = state(model).verdicts
    if path is None:
        verdicts.clear()
    else:
        verdicts.pop(path, None)


def allowed(model: HookedModel, path: str) -> bool | None:
    """True when ``path`` was checked and holds on ``model``, False when it was switched off, None if unchecked."""
    verdict = state(model).verdicts.get(path)
    return None if verdict is None else verdict.ok


def versions() -> str:
    """The versions of the packages the fast paths depend on, for messages and records."""
    out = []
    for name in ("transformers", "transformer-lens", "torch"):
        try:
            out.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def record(model: HookedModel, path: str, fast: Tensor, plain: Tensor, *, n_terms: int, n_prompts: int) -> bool:
    """Compare ``fast`` with ``plain``, store the verdict, warn on a mismatch; return whether the path holds."""
    dtype = exactness.compute_dtype(model)
    ok, err, tol = exactness.holds(fast, plain, dtype, n_terms)
    if fast.shape != plain.shape:
        ok, err = False, float("inf")
    state(model).verdicts[path] = Verdict(path, ok, err, tol, n_prompts)
    if not ok:
        warnings.warn(FastPathWarning(
            f"the {path} fast path disagrees with the plain forward pass on {model_id(model)} (error {err:.3g}, "
            f"allowed {tol:.3g} in {dtype}; {versions()}): switched off for this model, results stay exact but "
            "slower. Please report it."), stacklevel=3)
    return ok


def check(model: HookedModel, path: str, fast: Callable[[], Tensor], plain: Callable[[], Tensor], *, n_terms: int,
          n_prompts: int) -> bool:
    """Whether ``path`` may be used on ``model``: its verdict, computed by running ``fast`` and ``plain`` once."""
    known = allowed(model, path)
    if known is not None:
        return known
    return record(model, path, fast(), plain(), n_terms=n_terms, n_prompts=n_prompts)


def n_terms(model: HookedModel) -> int:
    """Rounded additions in a residual stream through the whole model (embedding + two writes per layer)."""
    return 2 * int(model.cfg.n_layers) + 1


def generation_error(fast: tuple[Tensor, Sequence[Tensor]], plain: tuple[Tensor, Sequence[Tensor]]
                     ) -> tuple[Tensor, Tensor]:
    """The step logits of two greedy generations that can be compared: every step up to and including the first
    at which any row's token differs (after it the two runs condition on different text).

    Each argument is ``(new_tokens [batch, steps], logits per step [batch, vocab])``; returns the stacked fast
    and plain logits of the comparable steps (a different number of steps or rows makes them unequal in shape).
    """
    f_tokens, f_logits = fast
    p_tokens, p_logits = plain
    steps = min(f_tokens.shape[1], p_tokens.shape[1], len(f_logits), len(p_logits))
    if f_tokens.shape[0] != p_tokens.shape[0] or steps == 0:
        return torch.zeros(1), torch.ones(2)
    upto = steps
    for t in range(steps):
        if bool((f_tokens[:, t] != p_tokens[:, t]).any()):
            upto = t + 1
            break
    return (torch.stack([x.float() for x in f_logits[:upto]]), torch.stack([x.float() for x in p_logits[:upto]]))
