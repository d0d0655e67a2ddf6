"""The whole study as resumable stages: direction → evaluation → languages → attribution → comparison.

Each stage reads the prompts, the model and the outputs of the stages before it, and writes one directory under
``OUT/stages/<name>/`` atomically (a temporary directory renamed into place), with ``stage.json`` holding the
stage's **key**: a hash of everything it depends on (the stage's own settings, the prompts' content, the model
spec, the library version, and the keys of the stages it reads). On a rerun a stage whose directory holds the
same key is skipped; a changed input changes the key of that stage and of every stage after it, which then run
again. An interrupted run therefore keeps every finished stage and resumes at the first unfinished one.

The model is loaded only if some stage has to run: rebuilding the report of a finished study needs no model.

Cost on this project's 2-core CPU is what shapes the defaults (see the README's measurements): the direction is
chosen on the last two post-instruction tokens, per-language directions are read at the chosen site (the
PolyRefuse comparison) rather than selected one by one, and the transfer matrix is measured with the first-token
judge for the base language's row and each language's own direction (``transfer="all"`` for the full matrix).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_circuits._version import __version__
from refusal_circuits.errors import InputError

#: Stage names in the order they run.
STAGES = ("direction", "evaluate", "languages", "attribute", "compare")
STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study depends on; each stage hashes the fields it reads (:data:`_READS`).

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
    prompts: str = "bundled"
    langs: tuple[str, ...] | None = None
    base: str = "en"
    max_prompts: int | None = None
    train_prompts: int | None = None
    lang_train_prompts: int | None = 64
    positions: tuple[int, ...] | None = (-2, -1)
    filter: str = "polyrefuse"
    kl_max: float | None = None
    max_layer_frac: float | None = None
    refusal_tokens: str | None = None
    compliance_tokens: str | None = None
    max_new_tokens: int = 16
    batch_size: int = 32
    transfer: str = "base"
    total_effects: int = 4
    patch_top_k: int = 3
    alpha: float = 0.05
    device: str = "cpu"
    dtype: str = "float32"
    device_map: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_COMMON = ("model", "prompts", "base", "device", "dtype", "device_map")
_READS: dict[str, tuple[str, ...]] = {
    "direction": (*_COMMON, "train_prompts", "positions", "filter", "kl_max", "max_layer_frac", "refusal_tokens",
                  "batch_size"),
    "evaluate": (*_COMMON, "langs", "max_prompts", "max_new_tokens", "batch_size"),
    "languages": (*_COMMON, "langs", "max_prompts", "train_prompts", "lang_train_prompts", "transfer", "batch_size"),
    "attribute": (*_COMMON, "langs", "max_prompts", "compliance_tokens", "total_effects", "batch_size"),
    "compare": (*_COMMON, "langs", "max_prompts", "patch_top_k", "alpha", "batch_size"),
}
_NEEDS = {"direction": (), "evaluate": ("direction",), "languages": ("direction", "evaluate"),
          "attribute": ("direction", "evaluate"), "compare": ("direction", "evaluate", "attribute")}


@dataclass
class StageInfo:
    name: str
    key: str
    path: Path
    cached: bool = False
    seconds: float = 0.0


@dataclass
class Study:
    """A study's configuration, prompts and output directory; :meth:`run` does the work."""

    config: StudyConfig
    out: Path
    progress: bool = True
    prompts: Any = None  # PromptSet, loaded in __post_init__, every prompt in a split
    split_policy: Any = None  # workflows.SplitPolicy, how they were split
    stages: dict[str, StageInfo] = field(default_factory=dict)
    _model: Any = None
    _model_loader: Callable[[str], Any] | None = None

    def __post_init__(self) -> None:
        from refusal_circuits.models import ModelSpec
        from refusal_circuits.workflows import load_split_prompts

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
        from refusal_circuits.crosslingual import check_language_groups

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
                       "settings": {k: cfg[k] for k in _READS[name]},
                       "needs": {n: self.stages[n].key for n in _NEEDS[name]}}
            key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
            path = self.out / "stages" / name
            self.stages[name] = StageInfo(name, key, path, cached=_stored_key(path) == key)

    def model(self) -> Any:
        if self._model is None:
            from refusal_circuits.forward import check_context
            from refusal_circuits.models import load_model

            if self._model_loader is not None:
                model = self._model_loader(self.config.model)
            else:
                cfg = self.config
                model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map)
            check_context(model, self.prompts)  # a prompt too long for the model stops the study before any stage
            self._model = model
        return self._model

    def test_split(self, langs: Sequence[str] | None = None) -> Any:
        p = self.prompts.filter(lang=list(langs or self.langs), split="test")
        return p.head(self.config.max_prompts) if self.config.max_prompts else p

    # -------------------------------------------------------------------------------------------------- running

    def run(self, stages: Sequence[str] = STAGES, echo: Callable[[str], None] | None = None
            ) -> dict[str, StageInfo]:
        """Run every stage that is not cached (in order); ``echo`` hears one line per stage."""
        from refusal_circuits.io import atomic_dir, write_json

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

    def direction(self) -> Any:
        from refusal_circuits.directions import load_direction

        return load_direction(self.stages["direction"].path)

    def read_json(self, stage: str, name: str) -> Any:
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


# ------------------------------------------------------------------------------------------------------ stages


def _stage_direction(study: Study, out: Path) -> None:
    from refusal_circuits.chat import check_positions
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.scores import discover_refusal_tokens, refusal_tokens_from_strings
    from refusal_circuits.selection import filter_configs, select_direction
    from refusal_circuits.workflows import direction_splits

    cfg, base = study.config, study.config.base
    own = study.prompts.filter(lang=base)
    train, val = direction_splits(study.prompts, base, study.split_policy, max_prompts=cfg.train_prompts,
                                  what=str(cfg.prompts))
    model = study.model()
    if cfg.refusal_tokens:
        tokens = refusal_tokens_from_strings(model.tokenizer, [t for t in cfg.refusal_tokens.split(",") if t.strip()],
                                             langs=study.langs)
    else:
        tokens = discover_refusal_tokens(model, train.head(32), progress=study.progress)
    config, fallback = filter_configs(cfg.filter, kl_max=cfg.kl_max, max_layer_frac=cfg.max_layer_frac)
    check_positions(model.tokenizer, cfg.positions)
    candidates = extract_candidates(
        model, train.filter(label="harmful").instructions, train.filter(label="harmless").instructions, lang=base,
        prompts_sha256=own.sha256, batch_size=cfg.batch_size, progress=study.progress)
    positions = list(cfg.positions) if cfg.positions else None
    selection = select_direction(
        model, candidates, val.filter(label="harmful").instructions, val.filter(label="harmless").instructions,
        tokens, config=config, fallback=fallback, positions=positions, batch_size=cfg.batch_size,
        progress=study.progress)
    direction = selection.direction
    direction.meta["prompts"] = cfg.prompts
    direction.meta["split_policy"] = study.split_policy.to_json()
    direction.meta["selection_scores"] = selection.to_json()
    direction.save(out)


def _stage_evaluate(study: Study, out: Path) -> None:
    """Generation + phrase judge: baseline on every language; ablation of r̂ on the base language's harmful
    prompts and activation addition on its harmless ones. (Ablation in the other languages is measured with the
    first-token judge in the ``languages`` stage's transfer matrix: generation is the study's largest cost.)"""
    from refusal_circuits import interventions
    from refusal_circuits.evaluation import evaluate_refusal
    from refusal_circuits.io import write_json
    from refusal_circuits.scores import RefusalTokens

    cfg, model, direction = study.config, study.model(), study.direction()
    tokens = RefusalTokens.from_json(direction.meta["refusal_tokens"], source="direction")
    test = study.test_split()
    kw: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "progress": study.progress,
          "refusal_tokens": tokens}
    baseline = evaluate_refusal(model, test, intervention="none", **kw)
    write_json(out / "baseline.json", baseline.to_dict())
    with interventions.ablate(model, direction):
        ablated = evaluate_refusal(model, test.filter(lang=cfg.base, label="harmful"), intervention="ablate", **kw)
    write_json(out / "ablate.json", ablated.to_dict())
    with interventions.actadd(model, direction):
        added = evaluate_refusal(model, test.filter(lang=cfg.base, label="harmless"), intervention="actadd", **kw)
    write_json(out / "actadd.json", {**added.to_dict(), "alpha": interventions.default_alpha(direction),
                                     "layer": direction.layer})


def _stage_languages(study: Study, out: Path) -> None:
    """Per-language directions at r̂'s site (train split): cosines, shared PCA, transfer matrix (first token)."""
    from safetensors.torch import save_file

    from refusal_circuits.crosslingual import (
        direction_cosines,
        halves_why,
        language_candidate_halves,
        language_candidates,
        shared_pca,
        site_directions,
        split_half_cosines,
        transfer_matrix,
    )
    from refusal_circuits.io import atomic_path, write_json

    cfg, model, direction = study.config, study.model(), study.direction()
    caps = [n for n in (cfg.train_prompts, cfg.lang_train_prompts) if n]
    cap = min(caps, default=None)
    # Halves of each language's train prompts: merged they are its candidates, apart they say how much of a
    # cross-lingual cosine is shared prompt content rather than a shared direction (same forward passes). A
    # language with a single prompt of a label cannot be split: its direction comes whole, its split-half
    # cosines are null with the reason.
    unsplit = halves_why(study.prompts, study.langs, split="train", max_prompts=cap)
    splittable = [x for x in study.langs if x not in unsplit]
    halves = language_candidate_halves(model, study.prompts, splittable, split="train", max_prompts=cap,
                                       batch_size=cfg.batch_size, progress=study.progress) if splittable else {}
    whole = {lang: a.merge(b, prompts_sha256=a.prompts_sha256) for lang, (a, b) in halves.items()}
    if unsplit:
        whole |= language_candidates(model, study.prompts, list(unsplit), split="train", max_prompts=cap,
                                     batch_size=cfg.batch_size, progress=study.progress)
    cands = {lang: whole[lang] for lang in study.langs}
    halved = split_half_cosines(halves, cfg.base, direction.layer, direction.position, unsplit=unsplit,
                                langs=study.langs)
    cos = direction_cosines(cands, direction.layer, direction.position)
    pca = shared_pca(cands, direction.layer, direction.position)
    dirs = site_directions(cands, direction)
    dirs[cfg.base] = direction
    with atomic_path(out / "directions.safetensors") as tmp:
        save_file({lang: d.vector.contiguous() for lang, d in dirs.items()}, str(tmp))
    ids = direction.meta.get("refusal_tokens", {}).get("ids", {})
    completions = study.read_json("evaluate", "baseline.json")["completions"]
    judged = _judge_tokens(study, completions, model.tokenizer, sorted({int(t) for v in ids.values() for t in v}))
    cells = None if cfg.transfer == "all" else (
        {(cfg.base, t) for t in study.langs} | {(t, t) for t in study.langs})
    test = study.test_split()
    transfer = transfer_matrix(model, dirs, test, targets=study.langs, refusal_ids=judged, cells=cells,
                               baseline=_first_token_baseline(study, completions, test, judged),
                               batch_size=cfg.batch_size, progress=study.progress)
    write_json(out / "languages.json", {
        "cosines": cos.to_json(), "split_half": halved.to_json(), "pca": pca.to_json(),
        "norms": {k: d.norm for k, d in dirs.items()},
        "transfer": {**transfer.to_json(), "judge_tokens": {
            lang: {"ids": v, "strings": [model.tokenizer.decode([t]) for t in v]} for lang, v in judged.items()}}})


def _judge_tokens(study: Study, completions: list[dict[str, Any]], tokenizer: Any, refusal_ids: Sequence[int]
                  ) -> dict[str, list[int]]:
    """Per language, what the transfer matrix's first-token judge counts as the start of a refusal: the
    direction's refusal tokens (discovered in the base language) plus the first tokens that begin that language's
    refusals in the evaluate stage's generation (phrase judge; :func:`refusal_tokens_from_completions`). A model
    refuses in each language with its own first words ("Je", "Lo", "申し訳"); counting only the base language's
    would call nearly every translated refusal a compliance. ``completions``: the evaluate stage's baseline."""
    from refusal_circuits.scores import refusal_tokens_from_completions

    found = refusal_tokens_from_completions(tokenizer, [c["lang"] for c in completions],
                                            [c.get("first_token") for c in completions],
                                            [bool(c["refused"]) for c in completions], report=study.langs)
    return {lang: list(dict.fromkeys([*(int(t) for t in refusal_ids), *found.by_lang.get(lang, ())]))
            for lang in study.langs}


def _evaluated_first_tokens(study: Study, completions: list[dict[str, Any]], test: Any, label: str
                            ) -> dict[str, list[int]]:
    """The greedy first tokens of the evaluate stage's generation (``completions``, its baseline) on ``test``'s
    ``label`` prompts, per language (languages with a prompt the record lacks, or whose record has no first
    tokens, are left out)."""
    first = {(c["lang"], c["id"]): c.get("first_token") for c in completions}
    out: dict[str, list[int]] = {}
    for lang in study.langs:
        toks = [first.get((lang, r.id)) for r in test.filter(lang=lang, label=label)]
        known = [int(t) for t in toks if t is not None]
        if known and len(known) == len(toks):
            out[lang] = known
    return out


def _first_token_baseline(study: Study, completions: list[dict[str, Any]], test: Any,
                          refusal_ids: Mapping[str, Sequence[int]]) -> dict[str, tuple[Any, Any]]:
    """The transfer matrix's baseline row from the evaluate stage's generation: its greedy first tokens are
    what the first-token judge looks at (``refusal_ids`` per language), so the row costs no forward pass
    (languages whose records lack them, or whose prompts differ, are measured again by
    :func:`~refusal_circuits.crosslingual.transfer_matrix`)."""
    from refusal_circuits.crosslingual import Rate

    harmful, harmless = (_evaluated_first_tokens(study, completions, test, label) for label in ("harmful", "harmless"))
    out = {}
    for lang in study.langs:
        if lang in harmful and lang in harmless:
            refusal = set(int(t) for t in refusal_ids[lang])
            out[lang] = (Rate(sum(t in refusal for t in harmful[lang]), len(harmful[lang])),
                         Rate(sum(t in refusal for t in harmless[lang]), len(harmless[lang])))
    return out


def _stage_attribute(study: Study, out: Path) -> None:
    from refusal_circuits.attribution import attribute, compliance_tokens_by_lang, top_k_heads
    from refusal_circuits.io import write_json
    from refusal_circuits.patching import total_effects
    from refusal_circuits.scores import RefusalTokens, first_token_ids

    cfg, model, direction = study.config, study.model(), study.direction()
    tokens = RefusalTokens.from_json(direction.meta["refusal_tokens"], source="direction")
    test = study.test_split()
    compliance: list[int] | dict[str, tuple[int, ...]] | None = None
    if cfg.compliance_tokens:
        strings = [t for t in cfg.compliance_tokens.split(",") if t.strip()]
        compliance = list(first_token_ids(model.tokenizer, strings, "compliance token")[0])
    else:
        # The evaluate stage's greedy first tokens on the harmless prompts are what discovery would compute.
        completions = study.read_json("evaluate", "baseline.json")["completions"]
        first = _evaluated_first_tokens(study, completions, test, "harmless")
        if set(first) == set(test.filter(label="harmless").langs):
            compliance = compliance_tokens_by_lang(first, {lang: tokens.for_lang(lang) for lang in first})
    result = attribute(model, direction, test, refusal_tokens=tokens, compliance_tokens=compliance,
                       batch_size=cfg.batch_size, progress=study.progress)
    result.save(out / "attribution", extra={"prompts": cfg.prompts, "split": "test"})
    own = result.select(lang=cfg.base)
    if cfg.total_effects and {"harmful", "harmless"} <= set(own.labels):
        gap = own.select(label="harmful").head_scores().mean(0) - own.select(label="harmless").head_scores().mean(0)
        effects = total_effects(model, direction, test.filter(lang=cfg.base, label="harmful").instructions,
                                test.filter(lang=cfg.base, label="harmless").instructions,
                                top_k_heads(gap, cfg.total_effects), tokens.for_lang(cfg.base),
                                batch_size=cfg.batch_size, progress=study.progress)
        write_json(out / "effects.json", effects.to_json())


def _stage_compare(study: Study, out: Path) -> None:
    """Paired English-vs-translation comparison, patching of the top heads, and one attention view pair."""
    import torch
    from safetensors.torch import save_file

    from refusal_circuits.attribution import load_attribution, source_matrix, top_k_heads
    from refusal_circuits.crosslingual import (
        Rate,
        divergence,
        pair_rows,
        patch_json,
        patch_top_heads,
        separation,
        unpaired_why,
    )
    from refusal_circuits.io import atomic_path, write_json

    cfg, direction = study.config, study.direction()
    attribution = load_attribution(study.stages["attribute"].path / "attribution")
    baseline_json = study.read_json("evaluate", "baseline.json")["results"]

    def rate(g: dict[str, Any], label: str) -> Rate | None:
        return Rate(round(g[label]["refusal_rate"] * g[label]["n"]), g[label]["n"]) if label in g else None

    baseline = {lang: (rate(g, "harmful"), rate(g, "harmless")) for lang, g in baseline_json.items()}
    # Languages without a paired harmful prompt are kept in divergence.json as null, with the reason.
    langs = [x for x in study.langs[1:] if unpaired_why(attribution, cfg.base, x) is None]
    tokens = direction.meta.get("refusal_tokens", {}).get("ids", {}).get(direction.lang)
    patches = {}
    if langs and cfg.patch_top_k and tokens:
        patches = patch_top_heads(study.model(), direction, attribution, study.prompts, cfg.base, langs,
                                  cfg.patch_top_k, tokens, alpha=cfg.alpha, batch_size=cfg.batch_size,
                                  progress=study.progress)
    result = divergence(attribution, cfg.base, study.langs[1:], baseline=baseline, patch=patches, alpha=cfg.alpha)
    obj = result.to_json()
    obj["separation"] = separation(attribution).to_json()
    for lang, pp in patches.items():
        obj["languages"][lang]["patch"] = patch_json(pp)
    write_json(out / "divergence.json", obj)
    if not langs:
        return
    model = study.model()
    paired = {f"{cfg.base}.mean": next(iter(result.languages.values())).paired.base_mean.float().contiguous()}
    for lang, d in result.languages.items():
        paired[f"{lang}.mean"] = d.paired.other_mean.float().contiguous()
        paired[f"{lang}.diff"] = d.paired.heads["mean"].float().contiguous()
        paired[f"{lang}.significant"] = d.paired.heads["significant"].to(torch.uint8).contiguous()
    with atomic_path(out / "paired.safetensors") as tmp:
        save_file(paired, str(tmp))
    # Attention views: the base language's top heads on its first harmful prompt and the same prompt translated
    # into the language whose refusal drops most (by baseline).
    base_heads = attribution.select(lang=cfg.base, label="harmful").head_scores().mean(0)
    heads = top_k_heads(base_heads, 4)
    def harmful_rate(lang: str) -> float:
        h = baseline.get(lang, (None, None))[0]
        return h.rate if h is not None and h.n else 1.0

    worst = min(langs, key=harmful_rate)
    i, j = pair_rows(attribution, cfg.base, worst)[0]
    by_key = {(r.id, r.lang, r.label): r for r in study.prompts}
    views: dict[str, Any] = {}
    meta: dict[str, Any] = {"heads": [list(h) for h in heads], "prompts": {}}
    for lang, row in ((cfg.base, i), (worst, j)):
        rec = by_key[(attribution.ids[row], lang, attribution.labels[row])]
        sm = source_matrix(model, direction, rec.instruction, heads)
        views[f"{lang}.pattern"] = sm.pattern.contiguous()
        views[f"{lang}.contributions"] = sm.contributions.contiguous()
        meta["prompts"][lang] = {"id": rec.id, "row": row, "instruction": rec.instruction, "tokens": sm.tokens,
                                 "spans": sm.spans}
    with atomic_path(out / "views.safetensors") as tmp:
        save_file(views, str(tmp))
    meta["pair"] = [cfg.base, worst]
    write_json(out / "views.json", meta)


_RUNNERS: dict[str, Callable[[Study, Path], None]] = {
    "direction": _stage_direction, "evaluate": _stage_evaluate, "languages": _stage_languages,
    "attribute": _stage_attribute, "compare": _stage_compare}
