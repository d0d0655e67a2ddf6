"""Tolerances of the identities this library checks at run time, and the error raised when one fails.

Every number the library prints rests on an identity (the parts of an attribution add up to the residual
stream, a fast path equals the plain forward pass, orthogonalised weights equal hook ablation). Each is checked
where it runs, on the user's model, against a tolerance that scales with the dtype the model computes in:

    |a - b| <= rel(dtype, n_terms) * (1 + max |b|)

``rel`` is ``1e-4`` in float32 (float64: ``1e-9``); in half precision it is ``2 eps sqrt(n_terms)``, with ``eps`` the
dtype's machine epsilon and ``n_terms`` the number of rounded terms a sum holds (a residual stream after ``L``
layers is ``2L + 1`` rounded additions, whose rounding errors grow like a random walk). In bfloat16 (epsilon
``2^-7``) through 24 layers that is ``2 * 2^-7 * 7 = 0.11`` of the largest value. Measured with
``refusal-circuits check --dtype bfloat16`` on the packaged 0.5B: every identity's error was 5-10% of what the
bfloat16 rule with twice this factor allowed (so 10-20% of this one), and the errors a missing term or a broken
cache leaves are of the size of the term itself (57-100% of the largest value for the architectures and the
transformers upgrade these checks were written for). In half precision the checks are therefore coarse: they
catch a wrong computation, not a small bias.
"""

from __future__ import annotations

import math

import torch

from refusal_circuits.errors import RefusalCircuitsError

#: The float32 (and wider) relative tolerance: what "exact" means in this library's docs and tests.
FLOAT32_REL = 1e-4


class ExactnessError(RefusalCircuitsError, RuntimeError):
    """An identity the library relies on does not hold on this model: the numbers would have been wrong.

    The message names the identity, the model, the size of the error and the tolerance.
    """


def rel_tolerance(dtype: torch.dtype, n_terms: int = 1) -> float:
    """Relative tolerance for a quantity computed in ``dtype`` as a sum of ``n_terms`` rounded terms."""
    if dtype == torch.float64:
        return 1e-9
    if not dtype.is_floating_point:
        raise TypeError(f"no tolerance for the non-float dtype {dtype}")
    if dtype == torch.float32:
        return FLOAT32_REL
    eps = torch.finfo(dtype).eps
    return max(FLOAT32_REL, 2.0 * eps * math.sqrt(max(1, n_terms)))


def max_error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(max |a - b|, max |b|)`` in float64."""
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).abs().max()) if a64.numel() else 0.0, float(b64.abs().max()) if b64.numel() else 0.0


def holds(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, n_terms: int = 1) -> tuple[bool, float, float]:
    """Whether ``a`` equals ``b`` within the tolerance; returns ``(ok, error, allowed)``."""
    err, scale = max_error(a, b)
    allowed = rel_tolerance(dtype, n_terms) * (1.0 + scale)
    return bool(err <= allowed) and math.isfinite(err), err, allowed


def require(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str, *, n_terms: int = 1,
            hint: str = "") -> float:
    """Raise :class:`ExactnessError` naming ``what`` unless ``a`` equals ``b`` within the tolerance; return the error."""
    ok, err, allowed = holds(a, b, dtype, n_terms)
    if not ok:
        raise ExactnessError(f"{what}: error {err:.3g} exceeds the {dtype} tolerance {allowed:.3g}"
                             + (f"; {hint}" if hint else ""))
    return err


def compute_dtype(model: object) -> torch.dtype:
    """The dtype a model computes in (that of its first floating-point parameter; float32 if it has none)."""
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            if p.is_floating_point():
                return p.dtype
    return torch.float32
