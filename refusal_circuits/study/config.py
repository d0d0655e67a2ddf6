"""What a study depends on: its settings (:class:`StudyConfig`, the one home of the study's defaults), its stages in
order, and what each stage reads (the settings its cache key hashes, and the stages before it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_circuits.workflows.defaults import ALPHA, BASE_LANG, BATCH_SIZE, DEVICE, DTYPE, PROMPTS

#: Stage names in the order they run.
STAGES = ("direction", "evaluate", "languages", "attribute", "compare", "harm", "subspace")
STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study depends on; each stage hashes the fields it reads (:data:`READS`). The command line's
    ``run`` flags take their defaults from these fields.

    Attributes:
        max_prompts: at most this many test prompts per language and label (evaluation, attribution, comparison).
        train_prompts: at most this many train (and val) prompts per label for the base direction.
        lang_train_prompts: at most this many train prompts per label for every language's own direction (the
            cosines, PCA and transfer sources; also capped by ``train_prompts``). Each language costs one forward
            pass per prompt: the whole bundled train split of 14 languages is the study's largest single cost.
        filter: the selection filter. ``polyrefuse`` by default: the multilingual study follows Wang et al., and
            on the packaged 0.5B Arditi's KL < 0.1 rejects every template-token candidate anyway (``auto`` then
            falls back to the same choice after scoring KL for every candidate instead of the few best).
        positions: post-instruction positions of the selection grid (None: all).
        device, dtype, device_map: where the model runs (:func:`~refusal_circuits.models.load_model`); part of
            every stage's key, since a dtype or a device changes the numbers.
        transfer: ``"base"`` (the base language's direction on every language, and each language's own
            direction on itself) or ``"all"`` (every source on every target).
    """

    model: str
    prompts: str = PROMPTS
    langs: tuple[str, ...] | None = None
    base: str = BASE_LANG
    max_prompts: int | None = None
    train_prompts: int | None = None
    lang_train_prompts: int | None = 64
    positions: tuple[int, ...] | None = (-2, -1)
    filter: str = "polyrefuse"
    kl_max: float | None = None
    max_layer_frac: float | None = None
    refusal_tokens: str | None = None
    #: set aside harmful train/val prompts the model does not refuse, harmless ones it refuses (workflows.filtering)
    refusal_filter: str = "none"
    compliance_tokens: str | None = None
    max_new_tokens: int = 16
    #: the second, independent judge of the baseline (``auto``: the packaged 1.5B when installed; ``none``; a spec)
    second_judge: str = "none"
    #: completions per language and label the second judge reads (a stratified sample)
    second_judge_sample: int = 12
    batch_size: int = BATCH_SIZE
    transfer: str = "base"
    #: harmful (ablated) and harmless (added) test prompts per language on which the transfer matrix's first-token
    #: judge is checked against generation + the phrase judge (0: no check; the baseline cells cost nothing)
    transfer_check: int = 8
    #: the harm-vs-refusal stage: "full", "no-heads" (without the per-head attribution) or "none"
    harm: str = "full"
    #: the subspace stage's dimension k (0, the default until it is measured on a packaged model: no subspace stage)
    subspace_k: int = 0
    total_effects: int = 4
    patch_top_k: int = 3
    #: the compare stage's paired total effects by attribution patching, validated on this many largest and as
    #: many random nodes per language (0, the default until measured on a whole study: not run)
    compare_totals: int = 0
    alpha: float = ALPHA
    device: str = DEVICE
    dtype: str = DTYPE
    device_map: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default (the ``run`` flags show them)."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    @property
    def lang_cap(self) -> int | None:
        """Train prompts per label for each language's own direction: the smaller of the two caps."""
        return min([n for n in (self.train_prompts, self.lang_train_prompts) if n], default=None)


_COMMON = ("model", "prompts", "base", "device", "dtype", "device_map")
#: The settings each stage's cache key hashes.
READS: dict[str, tuple[str, ...]] = {
    "direction": (*_COMMON, "train_prompts", "positions", "filter", "kl_max", "max_layer_frac", "refusal_tokens",
                  "refusal_filter", "batch_size"),
    "evaluate": (*_COMMON, "langs", "max_prompts", "max_new_tokens", "batch_size", "second_judge",
                 "second_judge_sample"),
    "languages": (*_COMMON, "langs", "max_prompts", "train_prompts", "lang_train_prompts", "transfer", "transfer_check",
                  "max_new_tokens", "batch_size"),
    "attribute": (*_COMMON, "langs", "max_prompts", "compliance_tokens", "total_effects", "batch_size"),
    "compare": (*_COMMON, "langs", "max_prompts", "patch_top_k", "alpha", "compare_totals", "batch_size"),
    "harm": (*_COMMON, "langs", "max_prompts", "train_prompts", "lang_train_prompts", "harm", "batch_size"),
    "subspace": (*_COMMON, "langs", "max_prompts", "train_prompts", "lang_train_prompts", "subspace_k", "batch_size"),
}
#: The stages each stage reads (their keys are part of its key).
NEEDS: dict[str, tuple[str, ...]] = {
    "direction": (), "evaluate": ("direction",), "languages": ("direction", "evaluate"),
    "attribute": ("direction", "evaluate"), "compare": ("direction", "evaluate", "attribute"),
    "harm": ("direction",), "subspace": ("direction",)}


@dataclass
class StageInfo:
    """One stage of a study: its cache key, its directory, whether it is finished, and how long it took."""

    name: str
    key: str
    path: Path
    cached: bool = False
    seconds: float = 0.0
