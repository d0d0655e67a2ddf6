"""The whole study as resumable stages: direction → evaluation → languages → attribution → comparison.

Each stage reads the prompts, the model and the outputs of the stages before it, and writes one directory under
``OUT/stages/<name>/`` atomically (a temporary directory renamed into place), with ``stage.json`` holding the
stage's **key**: a hash of everything it depends on (the stage's own settings, the prompts' content, the model
spec, the library version, and the keys of the stages it reads). On a rerun a stage whose directory holds the
same key is skipped; a changed input changes the key of that stage and of every stage after it, which then run
again. An interrupted run therefore keeps every finished stage and resumes at the first unfinished one.

The model is loaded only if some stage has to run: rebuilding the report of a finished study needs no model.

Cost on this project's 2-core CPU is what shapes the defaults (see the measurements in docs/findings.md and docs/benchmark.md): the direction is
chosen on the last two post-instruction tokens, per-language directions are read at the chosen site (the
PolyRefuse comparison) rather than selected one by one, and the transfer matrix is measured with the first-token
judge for the base language's row and each language's own direction (``transfer="all"`` for the full matrix).

Three modules: :mod:`~refusal_circuits.study.config` (the settings, the stages and what each reads),
:mod:`~refusal_circuits.study.stages` (each stage: read, call one workflow of :mod:`refusal_circuits.workflows`,
write) and :mod:`~refusal_circuits.study.runner` (:class:`Study`: keys, caching, running in order).
"""

from __future__ import annotations

from refusal_circuits.study.config import STAGE_FILE, STAGES, StageInfo, StudyConfig
from refusal_circuits.study.runner import _RUNNERS as _RUNNERS  # the stage table (tests replace a stage)
from refusal_circuits.study.runner import Study

__all__ = ["STAGES", "STAGE_FILE", "StageInfo", "Study", "StudyConfig"]
