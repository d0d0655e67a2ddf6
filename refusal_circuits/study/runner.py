"""Running a study: prompts and cache keys up front, then every stage that is not finished, in order."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_circuits._version import __version__
from refusal_circuits.crosslingual import check_language_groups
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction, load_direction
from refusal_circuits.errors import InputError
from refusal_circuits.forward import check_context
from refusal_circuits.io import atomic_dir, write_json
from refusal_circuits.models import HookedModel, ModelSpec, load_model
from refusal_circuits.study.config import NEEDS, READS, STAGE_FILE, STAGES, StageInfo, StudyConfig
from refusal_circuits.study.stages import RUNNERS
from refusal_circuits.workflows.splits import SplitPolicy, load_split_prompts, split_and_cap

#: The stage functions the runner calls, by name (the same dict as :data:`refusal_circuits.study.stages.RUNNERS`).
_RUNNERS = RUNNERS


@dataclass
class Study:
    """A study's configuration, prompts and output directory; :meth:`run` does the work.

    Creating one checks everything that needs no model (the model spec, the prompts, the languages, that every
    language has both labels in train and test) and computes every stage's key, so bad input fails before any
    stage and :attr:`stages` says which are finished.
    """

    config: StudyConfig
    out: Path
    progress: bool = True
    prompts: PromptSet = field(init=False)  # every prompt of the study's languages, each in a split
    split_policy: SplitPolicy = field(init=False)  # how they were split (refusal_circuits.workflows)
    langs: list[str] = field(init=False)  # the base language first
    stages: dict[str, StageInfo] = field(default_factory=dict)
    _model: HookedModel | None = None
    _model_loader: Callable[[str], HookedModel] | None = None

    def __post_init__(self) -> None:
        ModelSpec.parse(self.config.model)  # a bad spec fails before anything slow
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"--out {self.out} exists and is not a directory")
        if self.config.transfer not in ("base", "all"):
            raise InputError(f"transfer must be 'base' or 'all', not {self.config.transfer!r}")
        wanted = list(self.config.langs) if self.config.langs else None
        if wanted and self.config.base not in wanted:
            wanted = [self.config.base, *wanted]
        # names an unknown language or file line; every prompt gets a split (refusal_circuits.workflows)
        everything, self.split_policy = load_split_prompts(self.config.prompts, langs=wanted)
        if self.config.base not in everything.langs:
            raise InputError(f"--base {self.config.base}: not in {self.config.prompts} "
                             f"(it has {', '.join(everything.langs)})")
        self.langs = [self.config.base, *[x for x in (wanted or everything.langs) if x != self.config.base]]
        self.prompts = everything.filter(lang=self.langs)
        # Every language's direction (train split) and its refusal with and without it (test split) need both
        # labels: a one-label file fails here, before any stage, rather than after the first ones.
        for split in ("train", "test"):
            check_language_groups(self.prompts, self.langs, split=split, what=str(self.config.prompts))
        self._keys()

    # ---------------------------------------------------------------------------------------------- bookkeeping

    def _keys(self) -> None:
        cfg = self.config.to_json()
        cfg["langs"] = self.langs
        for name in STAGES:
            payload = {"stage": name, "version": __version__, "prompts_sha256": self.prompts.sha256,
                       "model_files": _model_fingerprint(self.config.model),
                       "settings": {k: cfg[k] for k in READS[name]},
                       "needs": {n: self.stages[n].key for n in NEEDS[name]}}
            key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
            path = self.out / "stages" / name
            self.stages[name] = StageInfo(name, key, path, cached=_stored_key(path) == key)

    def model(self) -> HookedModel:
        """The model, loaded on first use (a study whose stages are all finished never loads it)."""
        if self._model is None:
            if self._model_loader is not None:
                model = self._model_loader(self.config.model)
            else:
                cfg = self.config
                model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map)
            check_context(model, self.prompts)  # a prompt too long for the model stops the study before any stage
            self._model = model
        return self._model

    def test_split(self, langs: Sequence[str] | None = None) -> PromptSet:
        """The test prompts of ``langs`` (default: every language), at most ``max_prompts`` per language and label."""
        return split_and_cap(self.prompts.filter(lang=list(langs or self.langs)), "test", self.config.max_prompts,
                             what=str(self.config.prompts))

    # -------------------------------------------------------------------------------------------------- running

    def run(self, stages: Sequence[str] = STAGES, echo: Callable[[str], None] | None = None
            ) -> dict[str, StageInfo]:
        """Run every stage that is not cached (in order); ``echo`` hears one line per stage."""
        for name in stages:
            info = self.stages[name]
            if info.cached:
                info.seconds = float(json.loads((info.path / STAGE_FILE).read_text()).get("seconds", 0.0))
                if echo:
                    echo(f"stage {name}: cached ({info.path})")
                continue
            t0 = time.perf_counter()
            with atomic_dir(info.path) as tmp:
                _RUNNERS[name](self, tmp)
                info.seconds = round(time.perf_counter() - t0, 1)
                write_json(tmp / STAGE_FILE, {"stage": name, "key": info.key, "seconds": info.seconds,
                                              "version": __version__})
            info.cached = True
            if echo:
                echo(f"stage {name}: done in {info.seconds:.0f} s")
        return self.stages

    # ------------------------------------------------------------------------------------------------ readers

    def direction(self) -> Direction:
        """The direction stage's direction."""
        return load_direction(self.stages["direction"].path)

    def read_json(self, stage: str, name: str) -> Any:
        """A JSON file a finished stage wrote."""
        return json.loads((self.stages[stage].path / name).read_text(encoding="utf-8"))


def _stored_key(path: Path) -> str | None:
    try:
        return str(json.loads((path / STAGE_FILE).read_text(encoding="utf-8"))["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _model_fingerprint(spec: str) -> list[Any]:
    """For a local model (directory or file), the names, sizes and modification times of its files."""
    p = Path(spec)
    if not p.exists():
        return []
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    return [[str(x.relative_to(p) if p.is_dir() else x.name), x.stat().st_size, int(x.stat().st_mtime)]
            for x in files]
