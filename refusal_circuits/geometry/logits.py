"""What lies between the last residual stream and the logits: the final norm and the logit map.

DLA freezes the final norm's scale per token (:func:`final_norm`, a :class:`~refusal_circuits.geometry.FrozenNorm`)
and folds what follows the unembedding into its records (:class:`LogitMap`: Granite's ``logits_scaling``, Gemma-2's
soft cap, which is not linear and so is named rather than explained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from refusal_circuits.errors import InputError
from refusal_circuits.geometry.heads import architecture_of, original_component
from refusal_circuits.geometry.norms import FrozenNorm, frozen_norm
from refusal_circuits.models import HookedModel, hf_model_of


def final_norm(model: HookedModel) -> FrozenNorm:
    """The final norm (before the unembedding) as a :class:`FrozenNorm`."""
    # ln_final is no member of the HookedModel protocol: TransformerBridge and HookedTransformer both have it.
    return frozen_norm(original_component(model.ln_final),  # type: ignore[attr-defined]
                       offset_hint=bool(getattr(model.cfg, "rmsnorm_uses_offset", False)),
                       what="final norm", arch=architecture_of(model))


@dataclass(frozen=True)
class LogitMap:
    """What lies between the final norm's output ``h`` and the logits: ``logits = cap((h W_U^T + b_U) / s)``.

    Attributes:
        scaling: Granite's ``logits_scaling`` ``s`` (1 elsewhere): linear, folded into DLA.
        softcap: Gemma-2's ``final_logit_softcapping`` ``c`` (``cap(x) = c tanh(x / c)``), or None: not linear, so
            DLA explains the logit difference *before* the cap and says so.
    """

    scaling: float = 1.0
    softcap: float | None = None

    def describe(self) -> str:
        """One line for records: which logits DLA's parts add up to."""
        if self.softcap is not None:
            return (f"pre-soft-cap logits: the model's logits are {self.softcap:g} * tanh(x / {self.softcap:g}) of "
                    "these (final_logit_softcapping, not linear); the parts add up to the logit difference before "
                    "the cap")
        if self.scaling != 1.0:
            return f"logits (lm_head output divided by logits_scaling {self.scaling:g})"
        return "logits"


def logit_map(model: HookedModel) -> LogitMap:
    """The model's :class:`LogitMap`, read from its Hugging Face config (InputError for a scaling of 0 or inf)."""
    hf_cfg = getattr(hf_model_of(model), "config", None)
    scaling = float(getattr(hf_cfg, "logits_scaling", None) or 1.0)
    cap = getattr(hf_cfg, "final_logit_softcapping", None)
    if scaling == 0.0 or not math.isfinite(scaling):
        raise InputError(f"{architecture_of(model)}: logits_scaling {scaling} cannot be divided by")
    return LogitMap(scaling, float(cap) if cap else None)
