"""One direction or a subspace per language (issue 18, item 3): the one path the ``subspace`` command and the
study's ``subspace`` stage share, with their defaults."""

from __future__ import annotations

from collections.abc import Sequence

from refusal_circuits.crosslingual.subspace import RefusalSubspaces, refusal_subspaces
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction
from refusal_circuits.models import HookedModel
from refusal_circuits.scores import RefusalTokens
from refusal_circuits.workflows.defaults import HARM_BATCH_SIZE, HARM_FIT_PROMPTS, HARM_N_BOOT, SUBSPACE_K


def study_subspaces(model: HookedModel, direction: Direction, prompts: PromptSet, langs: Sequence[str] | None, *,
                    tokens: RefusalTokens | None, k: int = SUBSPACE_K, max_fit: int | None = HARM_FIT_PROMPTS,
                    max_test: int | None = None, n_boot: int = HARM_N_BOOT, batch_size: int = HARM_BATCH_SIZE,
                    progress: bool = True) -> RefusalSubspaces:
    """Refusal subspaces per language fitted on the train split, ablated on the test split
    (:func:`~refusal_circuits.crosslingual.subspace.refusal_subspaces`); the base language is r̂'s."""
    return refusal_subspaces(model, direction, prompts, langs, base=direction.lang, tokens=tokens, k=k,
                             fit_split="train", test_split="test", max_fit=max_fit, max_test=max_test, n_boot=n_boot,
                             batch_size=batch_size, progress=progress)
