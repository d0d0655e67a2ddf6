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
from typing import TYPE_CHECKING, Any

from refusal_circuits._version import __version__

if TYPE_CHECKING:
    # What type checkers and IDEs see: the real objects. At run time the names below are imported lazily by
    # ``__getattr__`` (so ``import refusal_circuits`` stays free of torch); tests/test_api.py checks that this block
    # and ``_EXPORTS`` name the same objects.
    from refusal_circuits.attribution import (
        Attribution,
        attribute,
        load_attribution,
        source_matrix,
        top_k_heads,
    )
    from refusal_circuits.chat import chat_format, tokenize_chat
    from refusal_circuits.crosslingual.harm import HarmRefusal, harm_and_refusal
    from refusal_circuits.crosslingual.totals import PairedTotals, paired_totals
    from refusal_circuits.data import PromptRecord, PromptSet, load_prompts
    from refusal_circuits.directions import Direction, extract_candidates, load_direction
    from refusal_circuits.errors import InputError, RefusalCircuitsError
    from refusal_circuits.evaluation import evaluate_refusal, generate
    from refusal_circuits.exactness import ExactnessError
    from refusal_circuits.fastpaths import FastPathWarning
    from refusal_circuits.hooks import add_hooks
    from refusal_circuits.interventions import ablate, actadd, export_hf, orthogonalize
    from refusal_circuits.judges import PhraseJudge
    from refusal_circuits.models import DEFAULT_MODEL, HookedModel, load_model
    from refusal_circuits.patching import ablate_heads, total_effects
    from refusal_circuits.scores import discover_refusal_tokens, refusal_tokens_from_strings
    from refusal_circuits.selection import select_direction
    from refusal_circuits.selfcheck import CheckReport, check

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
    "harm_and_refusal": "refusal_circuits.crosslingual.harm",
    "HarmRefusal": "refusal_circuits.crosslingual.harm",
    "paired_totals": "refusal_circuits.crosslingual.totals",
    "PairedTotals": "refusal_circuits.crosslingual.totals",
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
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'refusal_circuits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
