"""The few places where transformers' public API changed across the versions this library supports.

transformers 5.24 renamed the key-value cache argument of every model's ``forward`` from ``past_key_values`` to
``cache`` (the old name still works, with a deprecation warning, until 5.40), and model outputs carry it as
``.cache``. TransformerLens 4.3's attention bridges, which replace the Hugging Face attention modules inside a
``TransformerBridge``, still read only ``past_key_values`` (and ``layer_past``) from their keyword arguments: under
5.24 a decoder layer hands them ``cache=`` and they silently attend to the current tokens alone, so every cached
forward (the shared template prefix, generation) computes garbage. :func:`adapt_bridge` mends that on each
bridge this library loads; :func:`cache_kwargs` and :func:`output_cache` let our own calls use whichever name the
installed transformers defines, so no path passes a deprecated keyword.

The run-time self-checks (:mod:`refusal_circuits.selfcheck`) compare every fast path with the plain forward pass on
the user's model, so a future rename of this kind is caught there, not in a user's numbers.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

_ADAPTED = "_refusal_circuits_cache_adapter"


@functools.lru_cache(maxsize=64)
def _cache_name_of(forward: Any) -> str:
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_name(module: nn.Module) -> str:
    """The name of the key-value cache argument of ``module.forward`` in the installed transformers.

    ``generate`` takes the cache under the same name as the model's ``forward`` (both were renamed in 5.24).
    """
    return _cache_name_of(type(module).forward)


def cache_kwargs(module: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the cache argument's current name for ``module`` (a Hugging Face model), for its
    ``forward`` and for ``generate``."""
    return {cache_name(module): cache}


def output_cache(output: Any) -> Any:
    """The key-value cache of a model output (``.cache`` from transformers 5.24, ``.past_key_values`` before)."""
    cache = getattr(output, "cache", None) if "cache" in getattr(output, "keys", lambda: ())() else None
    if cache is None and "past_key_values" in getattr(output, "keys", lambda: ())():
        cache = output["past_key_values"]
    return cache


def _cache_to_legacy_name(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                          ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = kwargs["cache"]
        return args, kwargs
    return None


def adapt_bridge(hf_model: nn.Module) -> int:
    """Let TransformerLens's attention bridges inside ``hf_model`` see the cache under transformers' new name.

    Registers one forward pre-hook per attention bridge (idempotent: a bridge adapted once is left alone) that
    copies a ``cache=`` keyword to ``past_key_values=``, the name the bridge reads. Returns how many it adapted.
    """
    try:
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    except ImportError:  # pragma: no cover - TransformerLens without the bridge
        return 0
    n = 0
    for module in hf_model.modules():
        if isinstance(module, AttentionBridge) and not getattr(module, _ADAPTED, False):
            module.register_forward_pre_hook(_cache_to_legacy_name, with_kwargs=True)
            setattr(module, _ADAPTED, True)
            n += 1
    return n
