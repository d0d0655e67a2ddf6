"""refusal_circuits: find, remove and explain the refusal direction of chat LLMs, per head, position and language.

The public API is small; everything else lives in the submodules (``refusal_circuits.chat``,
``refusal_circuits.hooks``, ...). Heavy imports (torch, transformers, TransformerLens) happen on first use.

>>> import refusal_circuits as rc
>>> prompts = rc.load_prompts("bundled", langs=["en", "de"])
>>> len(prompts), prompts.langs
(768, ('en', 'de'))
"""

from __future__ import annotations

import importlib
from typing import Any

from refusal_circuits._version import __version__

_EXPORTS = {
    "load_model": "refusal_circuits.models",
    "DEFAULT_MODEL": "refusal_circuits.models",
    "HookedModel": "refusal_circuits.models",
    "load_prompts": "refusal_circuits.data",
    "PromptSet": "refusal_circuits.data",
    "PromptRecord": "refusal_circuits.data",
    "chat_format": "refusal_circuits.chat",
    "tokenize_chat": "refusal_circuits.chat",
    "generate": "refusal_circuits.evaluation",
    "evaluate_refusal": "refusal_circuits.evaluation",
    "PhraseJudge": "refusal_circuits.judges",
    "add_hooks": "refusal_circuits.hooks",
    "extract_candidates": "refusal_circuits.directions",
    "select_direction": "refusal_circuits.selection",
    "discover_refusal_tokens": "refusal_circuits.scores",
    "Direction": "refusal_circuits.directions",
    "load_direction": "refusal_circuits.directions",
    "ablate": "refusal_circuits.interventions",
    "actadd": "refusal_circuits.interventions",
    "orthogonalize": "refusal_circuits.interventions",
    "export_hf": "refusal_circuits.interventions",
    "refusal_tokens_from_strings": "refusal_circuits.scores",
    "attribute": "refusal_circuits.attribution",
    "Attribution": "refusal_circuits.attribution",
    "load_attribution": "refusal_circuits.attribution",
    "source_matrix": "refusal_circuits.attribution",
    "top_k_heads": "refusal_circuits.attribution",
    "ablate_heads": "refusal_circuits.patching",
    "total_effects": "refusal_circuits.patching",
    "InputError": "refusal_circuits.errors",
    "RefusalCircuitsError": "refusal_circuits.errors",
    "ExactnessError": "refusal_circuits.exactness",
    "FastPathWarning": "refusal_circuits.fastpaths",
    "check": "refusal_circuits.selfcheck",
    "CheckReport": "refusal_circuits.selfcheck",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'refusal_circuits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
