"""What every attribution pass (:func:`~refusal_circuits.attribution.compute.attribute`,
:func:`~refusal_circuits.attribution.sources.source_matrix`) checks of the model and reads of the direction."""

from __future__ import annotations

import torch
from torch import Tensor

from refusal_circuits.directions import Direction
from refusal_circuits.errors import InputError
from refusal_circuits.models import HookedModel


def _check_one_device(model: HookedModel | torch.nn.Module) -> None:
    """Attribution keeps its per-layer read-outs and buffers on the model's first device."""
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise InputError(f"attribution needs the model on one device; it is split across "
                         f"{', '.join(sorted(str(d) for d in devices))} (load it with device= instead of device_map=)")


def _unit_vector(direction: Direction | Tensor, model: HookedModel) -> Tensor:
    """r̂ in float64, in the raw coordinates it was extracted in (a one-line error where it does not fit)."""
    from refusal_circuits.interventions import _unit

    return _unit(direction, model, torch.float64)
