"""Harm vs refusal per language (issue 18, item 1): the one path the ``harm`` command and the study's ``harm``
stage share, with their defaults."""

from __future__ import annotations

from collections.abc import Sequence

from refusal_circuits.crosslingual.harm import HarmRefusal, harm_and_refusal
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction
from refusal_circuits.models import HookedModel
from refusal_circuits.scores import RefusalTokens
from refusal_circuits.workflows.defaults import HARM_BATCH_SIZE, HARM_FIT_PROMPTS, HARM_N_BOOT

#: What the study's ``harm`` setting may be: everything, everything but the per-head attribution, or nothing.
HARM_MODES = ("full", "no-heads", "none")


def study_harm(model: HookedModel, direction: Direction, prompts: PromptSet, langs: Sequence[str] | None, *,
               tokens: RefusalTokens | None, harm_layer: int | None = None, max_fit: int | None = HARM_FIT_PROMPTS,
               max_test: int | None = None, heads: bool = True, n_boot: int = HARM_N_BOOT,
               batch_size: int = HARM_BATCH_SIZE, progress: bool = True) -> HarmRefusal:
    """Harm and refusal directions per language fitted on the train split, measured on the test split
    (:func:`~refusal_circuits.crosslingual.harm.harm_and_refusal`); the base language is r̂'s."""
    return harm_and_refusal(model, direction, prompts, langs, base=direction.lang, tokens=tokens,
                            harm_layer=harm_layer, fit_split="train", test_split="test", max_fit=max_fit,
                            max_test=max_test, heads=heads, n_boot=n_boot, batch_size=batch_size, progress=progress)
