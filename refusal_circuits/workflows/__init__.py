"""The one science path that the command line and the study share.

Every step that both ``refusal-circuits COMMAND`` and a stage of ``refusal-circuits run`` perform is written once,
here, and both call it; they only read their inputs (flags, or the stages before) and write what it returns. One
module per step, each importing only the steps below it:

* :mod:`~refusal_circuits.workflows.defaults`: the commands' defaults, named once (the study's are
  :class:`~refusal_circuits.study.StudyConfig`'s fields).
* :mod:`~refusal_circuits.workflows.splits`: which prompts each step may see (the split policy, re-exported here:
  it is light, the other modules load the model's science).
* :mod:`~refusal_circuits.workflows.tokens`: refusal and compliance tokens (given, stored with a direction,
  discovered, or read off a generation).
* :mod:`~refusal_circuits.workflows.direction`: one language's direction (extraction on train, selection on val).
* :mod:`~refusal_circuits.workflows.evaluate`: refusal with and without the direction.
* :mod:`~refusal_circuits.workflows.languages`: every language's direction at r̂'s site, cosines, transfer.
* :mod:`~refusal_circuits.workflows.effects`: attribution and the total effects of the top heads.
* :mod:`~refusal_circuits.workflows.compare`: each language against the base language, patching, attention views.

Like the rest of the library they compute and return records; only the command line and the study write files.
"""

from __future__ import annotations

from refusal_circuits.workflows.splits import (
    HASH_BUCKETS,
    HASH_RULE,
    SplitPolicy,
    direction_splits,
    evaluation_split,
    hash_split,
    load_split_prompts,
    split_and_cap,
    with_splits,
)

__all__ = ["HASH_BUCKETS", "HASH_RULE", "SplitPolicy", "direction_splits", "evaluation_split", "hash_split",
           "load_split_prompts", "split_and_cap", "with_splits"]
