"""The study's seven stages. Each reads its inputs (the settings, the prompts, the model, the stages before it),
calls one workflow of :mod:`refusal_circuits.workflows` (the same ones the commands call) and writes what it returns
into the stage's temporary directory, which the runner renames into place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from safetensors.torch import save_file

from refusal_circuits.attribution import load_attribution
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction
from refusal_circuits.io import atomic_path, nullable, write_json
from refusal_circuits.models import HookedModel
from refusal_circuits.study.config import StageInfo, StudyConfig
from refusal_circuits.workflows.compare import (
    attention_views,
    baseline_from_results,
    compare_languages,
    paired_languages,
    paired_tensors,
)
from refusal_circuits.workflows.direction import find_direction, plan_direction
from refusal_circuits.workflows.effects import attribute_with_effects
from refusal_circuits.workflows.evaluate import study_refusal
from refusal_circuits.workflows.harm import study_harm
from refusal_circuits.workflows.languages import study_languages, transfer_cells
from refusal_circuits.workflows.splits import SplitPolicy
from refusal_circuits.workflows.subspace import study_subspaces
from refusal_circuits.workflows.tokens import (
    compliance_from_completions,
    compliance_token_ids,
    required_refusal_tokens,
)


@runtime_checkable
class StudyState(Protocol):
    """What a stage reads from the study (:class:`refusal_circuits.study.Study` provides it; runtime-checkable, so
    the type checks of the test suite can check it too)."""

    config: StudyConfig
    progress: bool
    prompts: PromptSet
    split_policy: SplitPolicy
    langs: list[str]
    stages: dict[str, StageInfo]

    def model(self) -> HookedModel: ...

    def direction(self) -> Direction: ...

    def test_split(self) -> PromptSet: ...

    def read_json(self, stage: str, name: str) -> Any: ...


def _baseline_completions(study: StudyState) -> list[dict[str, Any]]:
    completions: list[dict[str, Any]] = study.read_json("evaluate", "baseline.json")["completions"]
    return completions


def stage_direction(study: StudyState, out: Path) -> None:
    """The base language's direction: the same workflow as the ``directions`` command."""
    cfg = study.config
    plan = plan_direction(study.prompts, study.split_policy, cfg.base, max_prompts=cfg.train_prompts,
                          filter_name=cfg.filter, kl_max=cfg.kl_max, max_layer_frac=cfg.max_layer_frac,
                          what=str(cfg.prompts))
    selection = find_direction(study.model(), plan, source=cfg.prompts, refusal_tokens=cfg.refusal_tokens,
                               token_langs=study.langs, positions=cfg.positions, refusal_filter=cfg.refusal_filter,
                               batch_size=cfg.batch_size, progress=study.progress)
    selection.direction.save(out)


def stage_evaluate(study: StudyState, out: Path) -> None:
    """Generation + phrase judge: baseline on every language; ablation of r̂ on the base language's harmful
    prompts and activation addition on its harmless ones (:func:`~refusal_circuits.workflows.evaluate.study_refusal`)."""
    cfg, direction = study.config, study.direction()
    found = study_refusal(study.model(), direction, study.test_split(), cfg.base,
                          required_refusal_tokens(direction, "the direction stage"), max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.batch_size, second_judge=cfg.second_judge,
                          second_judge_sample=cfg.second_judge_sample, progress=study.progress)
    baseline = found.baseline.to_dict()
    if found.second_judge_why:
        baseline.update(nullable("second_judge", None, found.second_judge_why))
    write_json(out / "baseline.json", baseline)
    write_json(out / "ablate.json", found.ablated.to_dict())
    write_json(out / "actadd.json", {**found.added.to_dict(), "alpha": found.alpha, "layer": found.layer})


def stage_languages(study: StudyState, out: Path) -> None:
    """Per-language directions at r̂'s site (train split): cosines, the split-half reliability with intervals, shared
    PCA, transfer matrix."""
    cfg = study.config
    found = study_languages(study.model(), study.direction(), study.prompts, study.test_split(), study.langs,
                            _baseline_completions(study), max_prompts=cfg.lang_cap,
                            cells=transfer_cells(cfg.transfer, cfg.base, study.langs),
                            check_per_lang=cfg.transfer_check, max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.batch_size, progress=study.progress)
    with atomic_path(out / "directions.safetensors") as tmp:
        save_file(found.found.tensors(), str(tmp))
    write_json(out / "languages.json", found.to_json())


def stage_attribute(study: StudyState, out: Path) -> None:
    """Attribution of every language's test prompts, DLA, and the total effects of the base language's top heads."""
    cfg, model, direction = study.config, study.model(), study.direction()
    tokens = required_refusal_tokens(direction, "the direction stage")
    test = study.test_split()
    compliance: list[int] | dict[str, tuple[int, ...]] | None
    if cfg.compliance_tokens:
        compliance = compliance_token_ids(model.tokenizer, cfg.compliance_tokens)
    else:  # the evaluate stage's greedy first tokens on the harmless prompts are what discovery would compute
        compliance = compliance_from_completions(_baseline_completions(study), test, tokens, study.langs)
    run = attribute_with_effects(model, direction, test, refusal_tokens=tokens, compliance_tokens=compliance,
                                 total_effects_k=cfg.total_effects, effects_lang=cfg.base, batch_size=cfg.batch_size,
                                 progress=study.progress)
    run.attribution.save(out / "attribution", extra={"prompts": cfg.prompts, "split": "test"})
    if run.effects is not None:
        write_json(out / "effects.json", run.effects.to_json())


def stage_compare(study: StudyState, out: Path) -> None:
    """Paired English-vs-translation comparison, patching of the top heads, and one attention view pair."""
    cfg, direction = study.config, study.direction()
    attribution = load_attribution(study.stages["attribute"].path / "attribution")
    baseline = baseline_from_results(study.read_json("evaluate", "baseline.json")["results"])
    others = study.langs[1:]
    # Languages without a paired harmful prompt are kept in divergence.json as null, with the reason; with none
    # paired there is nothing to patch or show, and the model is not needed.
    paired = paired_languages(attribution, cfg.base, others)
    model = study.model() if paired else None
    comparison = compare_languages(attribution, cfg.base, others, baseline=baseline, model=model, direction=direction,
                                   prompts=study.prompts, patch_top_k=cfg.patch_top_k, alpha=cfg.alpha,
                                   totals=cfg.compare_totals, batch_size=cfg.batch_size, progress=study.progress)
    write_json(out / "divergence.json", comparison.to_json())
    if model is None:
        return
    if comparison.totals is not None:
        with atomic_path(out / "totals.safetensors") as tmp:
            save_file(comparison.totals.tensors(), str(tmp))
    with atomic_path(out / "paired.safetensors") as tmp:
        save_file(paired_tensors(comparison.divergence), str(tmp))
    views, meta = attention_views(model, direction, attribution, study.prompts, cfg.base, paired, baseline)
    with atomic_path(out / "views.safetensors") as tmp:
        save_file(views, str(tmp))
    write_json(out / "views.json", meta)


def stage_harm(study: StudyState, out: Path) -> None:
    """Does each language recognise harm, and turn it into refusal? Harm at the last instruction token and refusal at
    r̂'s site per language (:func:`~refusal_circuits.workflows.harm.study_harm`); nothing but the reason with
    ``harm = "none"``."""
    cfg = study.config
    few = sorted({lang for lang in study.langs for split in ("train", "test") for label in ("harmful", "harmless")
                  if len(study.prompts.filter(lang=lang, split=split, label=label)) < 2})
    if cfg.harm == "none" or few:
        why = ("not run (run --harm none)" if cfg.harm == "none" else
               f"not run: harm vs refusal needs at least 2 harmful and 2 harmless train and test prompts per language, "
               f"and {', '.join(few)} ha{'s' if len(few) == 1 else 've'} fewer")
        write_json(out / "harm.json", nullable("harm", None, why))
        return
    direction = study.direction()
    found = study_harm(study.model(), direction, study.prompts, study.langs,
                       tokens=required_refusal_tokens(direction, "the direction stage"), max_fit=cfg.lang_cap,
                       max_test=cfg.max_prompts, heads=cfg.harm == "full", batch_size=cfg.batch_size,
                       progress=study.progress)
    with atomic_path(out / "harm.safetensors") as tmp:
        save_file(found.tensors(), str(tmp))
    write_json(out / "harm.json", {"harm": found.to_json()})


def stage_subspace(study: StudyState, out: Path) -> None:
    """One refusal direction or a subspace, per language (:func:`~refusal_circuits.workflows.subspace.study_subspaces`);
    nothing but the reason with ``subspace_k = 0``."""
    cfg = study.config
    few = [lang for lang in study.langs
           if len(study.prompts.filter(lang=lang, split="train", label="harmful")) < cfg.subspace_k]
    if cfg.subspace_k == 0 or few:
        why = ("not run (run --subspace-k 0)" if cfg.subspace_k == 0 else
               f"not run: {cfg.subspace_k}-dimensional subspaces need at least {cfg.subspace_k} harmful train prompts "
               f"per language, and {', '.join(few)} ha{'s' if len(few) == 1 else 've'} fewer (--subspace-k)")
        write_json(out / "subspace.json", nullable("subspace", None, why))
        return
    direction = study.direction()
    found = study_subspaces(study.model(), direction, study.prompts, study.langs,
                            tokens=required_refusal_tokens(direction, "the direction stage"), k=cfg.subspace_k,
                            max_fit=cfg.lang_cap, max_test=cfg.max_prompts, batch_size=cfg.batch_size,
                            progress=study.progress)
    with atomic_path(out / "subspace.safetensors") as tmp:
        save_file(found.tensors(), str(tmp))
    write_json(out / "subspace.json", {"subspace": found.to_json()})


#: The stage functions by name, in order (the runner calls them; tests replace one to simulate Ctrl-C).
RUNNERS: dict[str, Callable[[Any, Path], None]] = {
    "direction": stage_direction, "evaluate": stage_evaluate, "languages": stage_languages,
    "attribute": stage_attribute, "compare": stage_compare, "harm": stage_harm,
    "subspace": stage_subspace}
