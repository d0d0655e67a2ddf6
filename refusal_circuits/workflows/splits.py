"""Which prompts each step may see: the split policy of every command and of the study.

One split policy for every command. A direction is extracted on ``train`` prompts, selected on ``val`` prompts and
evaluated, attributed and compared on ``test`` prompts, so no step ever selects or evaluates on the prompts a
direction came from:

* a prompt file with a ``split`` key keeps its own splits (``policy.source == "file"``; a row without one belongs
  to no split, as before);
* a file without one is split by a stable hash of each prompt's id (``policy.source == "hash"``): ``sha256(id) mod
  5`` is 0 for ``val``, 1 for ``test``, anything else ``train`` (3 : 1 : 1). The id, not the text, decides, so the
  translations of one prompt (same id, other languages) always share a split and stay paired; the same file
  always splits the same way, on any machine.

:func:`with_splits` applies the policy once, where a command or a study loads its prompts; everything after it
filters by split without asking whether there is one. The policy is recorded in every output
(:meth:`SplitPolicy.to_json`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

from refusal_circuits.data import LABELS, SPLITS, PromptRecord, PromptSet, load_prompts
from refusal_circuits.errors import InputError
from refusal_circuits.workflows.defaults import SAMPLE_SEED

#: ``sha256(id) mod HASH_BUCKETS``: bucket 0 is val, bucket 1 is test, the rest train.
HASH_BUCKETS = 5
HASH_RULE = "sha256(id) mod 5: 0 val, 1 test, else train (translations share their id, hence their split)"


def hash_split(prompt_id: str) -> str:
    """The split a prompt without one gets: ``val``, ``test`` or ``train``, from its id alone."""
    bucket = int(hashlib.sha256(prompt_id.encode("utf-8")).hexdigest(), 16) % HASH_BUCKETS
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


@dataclass(frozen=True)
class SplitPolicy:
    """How a prompt set was split, and how many prompts each split holds per label."""

    source: str  # "file" (the prompts' own split key) or "hash" (see :func:`hash_split`)
    counts: dict[str, dict[str, int]]  # {split: {label: n}} over every language
    unsplit: int = 0  # prompts of a file with splits that name none (they belong to no split)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "counts": self.counts}
        if self.source == "hash":
            out["rule"] = HASH_RULE
        if self.unsplit:
            out["unsplit"] = self.unsplit
        return out


def with_splits(prompts: PromptSet) -> tuple[PromptSet, SplitPolicy]:
    """``prompts`` with every record in a split (the policy of this module) and the policy that was applied."""
    if any(r.split is not None for r in prompts):
        out, source = prompts, "file"
    else:
        def split_of(r: PromptRecord) -> PromptRecord:
            return dataclasses.replace(r, extra={**r.extra, "split": hash_split(r.id)})

        out, source = PromptSet(tuple(split_of(r) for r in prompts), prompts.source), "hash"
    counts = {s: {label: sum(1 for r in out if r.split == s and r.label == label) for label in LABELS} for s in SPLITS}
    return out, SplitPolicy(source, counts, sum(1 for r in out if r.split is None))


def direction_splits(prompts: PromptSet, lang: str, policy: SplitPolicy, *, max_prompts: int | None = None,
                     what: str = "the prompts") -> tuple[PromptSet, PromptSet]:
    """``(train, val)`` of ``lang`` for extracting and selecting its direction, at most ``max_prompts`` per label
    (a sample stratified by category, :meth:`~refusal_circuits.data.PromptSet.sample`).

    Raises :class:`InputError` naming the split and what it lacks when either has no harmful or no harmless prompt.
    """
    own = prompts.filter(lang=lang)
    if not len(own):
        raise InputError(f"no prompts in language {lang!r}; {what} have {', '.join(prompts.langs)}")
    train, val = own.filter(split="train"), own.filter(split="val")
    if max_prompts:
        train, val = train.sample(max_prompts, seed=SAMPLE_SEED), val.sample(max_prompts, seed=SAMPLE_SEED)
    for name, part in (("train", train), ("val", val)):
        counts = part.counts().get(lang, {})
        if not counts.get("harmful") or not counts.get("harmless"):
            have = ", ".join(f"{counts.get(label, 0)} {label}" for label in LABELS)
            how = (" (the prompts have no 'split' key, so they were split by a hash of each id: about 1 in 5 of "
                   "each label goes to val and 1 in 5 to test)" if policy.source == "hash" else "")
            raise InputError(f"the {name} split of {lang!r} needs harmful and harmless prompts (has {have}){how}")
    return train, val


def evaluation_split(requested: str | None, prompts: PromptSet, direction_sha256: str | None, lang: str | None
                     ) -> str:
    """The split that ``evaluate`` / ``attribute`` use: ``requested`` when given; else ``test`` when a direction
    came from these prompts (or there is none), and ``all`` when it came from another prompt set, which is then
    held out as a whole."""
    if requested is not None:
        return requested
    if direction_sha256 is None or lang is None:
        return "test"
    own = prompts.filter(lang=lang)
    return "test" if own.sha256 == direction_sha256 or not len(own) else "all"


def load_split_prompts(source: str, langs: list[str] | None = None) -> tuple[PromptSet, SplitPolicy]:
    """Load prompts (see :func:`~refusal_circuits.data.load_prompts`) and apply the split policy to them."""
    return with_splits(load_prompts(source, langs=langs))


def split_and_cap(prompts: PromptSet, split: str, max_prompts: int | None = None, *, what: str = "the prompts"
                  ) -> PromptSet:
    """The prompts of ``split`` (every one for ``all``; the policy has given every prompt a split) and at most
    ``max_prompts`` of each language and label (stratified by category and seeded, the same prompts in every
    language). Raises :class:`InputError` naming ``what`` when the split is empty."""
    if split != "all":
        prompts = prompts.filter(split=split)
        if not len(prompts):
            raise InputError(f"{what} has no prompts in split {split!r}")
    return prompts.sample(max_prompts, seed=SAMPLE_SEED) if max_prompts else prompts
