"""Norms with their scale frozen per token, and how a sublayer's raw output becomes its residual write.

With ``scale(x)`` frozen an RMSNorm or LayerNorm is linear in ``x`` (:class:`FrozenNorm`), so a post-normed write
``m * norm(x)`` (:class:`ResidualWrite`) projects onto any vector as ``factor(x) * (x . v) + const``; see
:mod:`refusal_circuits.geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_circuits.errors import InputError
from refusal_circuits.exactness import rel_tolerance


@dataclass(frozen=True)
class FrozenNorm:
    """An RMSNorm or LayerNorm: ``w * (x - mean(x)) / scale(x) + b``; with ``scale`` frozen it is linear.

    ``weight`` is the effective weight (Gemma's ``1 + weight`` already added).
    """

    weight: Tensor
    bias: Tensor | None
    eps: float
    centered: bool  # LayerNorm subtracts the mean; RMSNorm does not

    def scale(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        """``sqrt(mean((x - mean x)^2) + eps)`` per token, float64."""
        x = x.to(torch.float64)
        if self.centered:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1) + self.eps).sqrt()

    def readout(self, u: Float[Tensor, "k d_model"]) -> tuple[Float[Tensor, "k d_model"], Float[Tensor, " k"]]:
        """``(v, const)`` with ``norm(x) . u = (x . v) / scale(x) + const`` for each row ``u``."""
        u = u.to(torch.float64)
        v = u * self.weight.to(torch.float64).to(u.device)
        if self.centered:
            v = v - v.mean(-1, keepdim=True)
        const = (u @ self.bias.to(torch.float64).to(u.device) if self.bias is not None
                 else torch.zeros(len(u), dtype=torch.float64, device=u.device))
        return v, const

    def apply(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The norm's output in float64."""
        x = x.to(torch.float64)
        s = self.scale(x)[..., None]
        if self.centered:
            x = x - x.mean(-1, keepdim=True)
        out = x / s * self.weight.to(torch.float64).to(x.device)
        return out + self.bias.to(torch.float64).to(x.device) if self.bias is not None else out


def _eps_of(module: Any) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon", "layer_norm_eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def frozen_norm(module: Any, *, offset_hint: bool = False, what: str = "norm", arch: str = "this model"
                ) -> FrozenNorm:
    """Describe a Hugging Face norm module as a :class:`FrozenNorm`, proven on a probe input.

    Whether it centres (LayerNorm) and whether it multiplies by ``weight`` or ``1 + weight`` (Gemma) is decided by
    running the module on a fixed random input and keeping the description that reproduces its output; a norm
    matching none of them is refused with :class:`InputError`.
    """
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    eps = _eps_of(module)
    if weight is None or not isinstance(weight, Tensor) or weight.ndim != 1 or eps is None:
        raise InputError(f"{arch}: the {what} ({type(module).__name__}) is not an RMSNorm or LayerNorm with a "
                         "per-channel weight and an epsilon; its scale cannot be frozen")
    weight = weight.detach()
    bias = bias.detach() if isinstance(bias, Tensor) else None
    d = int(weight.shape[0])
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, d, generator=g, dtype=torch.float64) * 2.0 + 0.7).to(weight.device, weight.dtype)
    with torch.no_grad():
        y = module(x).to(torch.float64)
    best: tuple[float, FrozenNorm] | None = None
    for offset in (offset_hint, not offset_hint):
        for centered in (bias is not None, bias is None):
            cand = FrozenNorm(weight.to(torch.float64) + (1.0 if offset else 0.0), bias, eps, centered)
            err = float((cand.apply(x) - y).abs().max())
            if best is None or err < best[0]:
                best = (err, cand)
    assert best is not None
    if not best[0] <= rel_tolerance(weight.dtype, d) * (1.0 + float(y.abs().max())):
        raise InputError(f"{arch}: the {what} ({type(module).__name__}) computes neither an RMSNorm nor a LayerNorm "
                         f"(with weight or 1 + weight) on a probe input (closest differs by {best[0]:.3g}); its "
                         "scale cannot be frozen")
    return best[1]


@dataclass(frozen=True)
class ResidualWrite:
    """How a sublayer's raw output ``x`` becomes what is added to the residual stream: ``m * norm(x)``.

    Attributes:
        norm: the post-norm, or None (the write is ``m * x``).
        multiplier: the residual multiplier ``m`` (Granite's ``residual_multiplier``; 1 elsewhere).
        norm_name: the Hugging Face name of the post-norm (for messages), or None.
    """

    norm: FrozenNorm | None = None
    multiplier: float = 1.0
    norm_name: str | None = None

    @property
    def is_identity(self) -> bool:
        return self.norm is None and self.multiplier == 1.0

    def factor(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        """``m / scale(x)`` per token (``m`` without a post-norm), float64."""
        if self.norm is None:
            return torch.full(x.shape[:-1], self.multiplier, dtype=torch.float64, device=x.device)
        return self.multiplier / self.norm.scale(x)

    def readout(self, u: Float[Tensor, "k d_model"]) -> tuple[Float[Tensor, "k d_model"], Float[Tensor, " k"]]:
        """``(v, const)`` with ``write(x) . u = factor(x) * (x . v) + const`` for each row ``u``."""
        u = u.to(torch.float64)
        if self.norm is None:
            return u, torch.zeros(len(u), dtype=torch.float64, device=u.device)
        v, const = self.norm.readout(u)
        return v, self.multiplier * const

    def apply(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The write itself, float64."""
        out = x.to(torch.float64) if self.norm is None else self.norm.apply(x)
        return out * self.multiplier if self.multiplier != 1.0 else out
