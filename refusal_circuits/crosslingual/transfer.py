"""Refusal rates under each language's direction: the transfer matrix.

:func:`transfer_matrix`: language A's direction ablated on language B's harmful prompts (and added on B's
harmless prompts), refusal rates with Wilson intervals (:class:`~refusal_circuits.stats.Rate`), next to the
baseline row.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction
from refusal_circuits.errors import InputError
from refusal_circuits.judges import JudgeComparison, compare_judges, kappa_html
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel
from refusal_circuits.stats import Rate


def is_aligned(harmful: Rate, harmless: Rate) -> bool:
    """Safety-aligned in a language: harmful refusal clearly above harmless (the 95% Wilson intervals are apart)."""
    return harmful.ci[0] > harmless.ci[1]


@dataclass(frozen=True)
class TransferMatrix:
    """Refusal rates of each target language under each source language's direction.

    ``ablate[src][tgt]``: harmful prompts of ``tgt`` with ``src``'s direction ablated; ``actadd[src][tgt]``:
    harmless prompts of ``tgt`` with ``src``'s direction added; ``baseline[tgt]``: (harmful, harmless) with none.
    """

    sources: list[str]
    targets: list[str]
    baseline: dict[str, tuple[Rate, Rate]]
    ablate: dict[str, dict[str, Rate]]
    actadd: dict[str, dict[str, Rate]]
    judge: str

    def aligned(self, lang: str) -> bool:
        return is_aligned(*self.baseline[lang])

    def to_json(self) -> dict[str, Any]:
        return {"sources": self.sources, "targets": self.targets, "judge": self.judge,
                "baseline": {t: {"harmful": h.to_json(), "harmless": s.to_json(), "aligned": is_aligned(h, s)}
                             for t, (h, s) in self.baseline.items()},
                "ablate": {a: {b: r.to_json() for b, r in row.items()} for a, row in self.ablate.items()},
                "actadd": {a: {b: r.to_json() for b, r in row.items()} for a, row in self.actadd.items()}}

    def _repr_html_(self) -> str:
        def cell(r: Rate | None) -> str:
            if r is None:
                return "<td>–</td>"
            lo, hi = r.ci
            return f"<td title='95% CI {lo:.0%}–{hi:.0%}, n={r.n}'>{r.rate:.0%}</td>"

        rows = ["<tr><th>baseline harmful</th>" + "".join(cell(self.baseline[t][0]) for t in self.targets) + "</tr>",
                "<tr><th>baseline harmless</th>" + "".join(cell(self.baseline[t][1]) for t in self.targets) + "</tr>",
                "<tr><th>aligned</th>" + "".join(f"<td>{'yes' if self.aligned(t) else 'no'}</td>"
                                                   for t in self.targets) + "</tr>"]
        rows += [f"<tr><th>ablate {esc(s)}</th>" + "".join(cell(self.ablate[s].get(t)) for t in self.targets)
                 + "</tr>" for s in self.sources]
        rows += [f"<tr><th>add {esc(s)} (harmless)</th>" + "".join(cell(self.actadd[s].get(t)) for t in self.targets)
                 + "</tr>" for s in self.sources]
        return table(f"Refusal rate by target language (columns; judge: {esc(self.judge)})", ["", *self.targets],
                     rows)


def first_token_refusals(model: HookedModel, instructions: Sequence[str], refusal_ids: Sequence[int], *,
                         batch_size: int = 32) -> list[bool]:
    """Whether greedy decoding would start with a refusal token, per instruction (hooks on the model apply)."""
    from refusal_circuits.scores import first_token_logits

    if not instructions:
        return []
    top = first_token_logits(model, instructions, batch_size=batch_size).argmax(-1).tolist()
    ids = set(int(t) for t in refusal_ids)
    return [t in ids for t in top]


def _refusals(model: HookedModel, parts: Mapping[str, PromptSet], judge: str, refusal_ids: Mapping[str, Sequence[int]],
              batch_size: int, max_new_tokens: int) -> dict[str, Rate]:
    """The refusal rate of every part (a target language's prompts, none empty), from one length bucketing of all
    parts."""
    joined = PromptSet(tuple(r for part in parts.values() for r in part), "transfer")
    if judge == "first_token":
        from refusal_circuits.scores import first_token_logits

        top = iter(first_token_logits(model, joined.instructions, batch_size=batch_size).argmax(-1).tolist())
        ids = {name: {int(t) for t in refusal_ids[name]} for name in parts}
        got = {name: [next(top) in ids[name] for _ in part] for name, part in parts.items()}
    elif judge == "generate":
        from refusal_circuits.evaluation import evaluate_refusal

        ev = iter(evaluate_refusal(model, joined, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=False).completions)
        got = {name: [next(ev).refused for _ in part] for name, part in parts.items()}
    else:
        raise InputError(f"unknown judge {judge!r}; use first_token or generate")
    return {name: Rate(sum(v), len(v)) for name, v in got.items()}


def transfer_matrix(model: HookedModel, directions: Mapping[str, Direction], prompts: PromptSet, *,
                    targets: Sequence[str] | None = None,
                    refusal_ids: Sequence[int] | Mapping[str, Sequence[int]] = (), judge: str = "first_token",
                    actadd_layer: int | None = None, batch_size: int = 32, max_new_tokens: int = 24,
                    cells: Collection[tuple[str, str]] | None = None,
                    baseline: Mapping[str, tuple[Rate, Rate]] | None = None, progress: bool = True) -> TransferMatrix:
    """Ablate each source direction on every target's harmful prompts; add it on every target's harmless prompts.

    Args:
        directions: source language -> direction (e.g. each language's candidate at the English site).
        prompts: the evaluation prompts (use the test split), harmful and harmless per target language.
        refusal_ids: refusal tokens for ``judge="first_token"`` (greedy first token is one of them): one list for
            every target, or per target language (a model refuses in each language with its own first words).
        judge: ``first_token`` (one forward pass per cell) or ``generate`` (greedy generation + phrase judge).
        actadd_layer: where to add (default: each direction's own layer); the coefficient is the direction's
            calibrated one (``meta["actadd"]``) or its norm.
        cells: the ``(source, target)`` cells to measure (default: all); the others are left out of the record,
            e.g. one source's row plus the diagonal (each language's own direction) costs ``2 x`` the baseline
            instead of ``n_sources x``.
        baseline: the no-intervention (harmful, harmless) rates per target, where they are known already (e.g.
            from the greedy first tokens of an earlier generation, which is what ``first_token`` judges); targets
            missing from it are measured.
    """
    from tqdm.auto import tqdm

    from refusal_circuits.interventions import ablate, actadd

    targets = list(targets or prompts.langs)
    judged = {t: list(refusal_ids.get(t, ()) if isinstance(refusal_ids, Mapping) else refusal_ids) for t in targets}
    if judge == "first_token" and not all(judged.values()):
        raise InputError("the first_token judge needs refusal token ids"
                         + (f" for {', '.join(t for t, v in judged.items() if not v)}"
                            if isinstance(refusal_ids, Mapping) else ""))
    sources = list(directions)
    groups = {t: (prompts.filter(lang=t, label="harmful"), prompts.filter(lang=t, label="harmless")) for t in targets}
    for t, (h, s) in groups.items():
        if not len(h) or not len(s):
            raise InputError(f"target language {t!r} needs harmful and harmless prompts")
    wanted = set(cells) if cells is not None else {(a, b) for a in sources for b in targets}
    known = {t: baseline[t] for t in targets if baseline and t in baseline}
    total = len(targets) - len(known) + sum((a, b) in wanted for a in sources for b in targets)
    bar = tqdm(total=total, desc="transfer", disable=not progress, leave=False)

    def rates(parts: Mapping[str, PromptSet]) -> dict[str, Rate]:
        # Every target of one intervention in one length bucketing: batches of one language's 32 prompts are
        # padded by about half their tokens, one bucketing of them all by a few percent.
        return _refusals(model, parts, judge, judged, batch_size, max_new_tokens)

    base: dict[str, tuple[Rate, Rate]] = dict(known)
    unknown = [t for t in targets if t not in known]
    if unknown:
        harmful, harmless = rates({t: groups[t][0] for t in unknown}), rates({t: groups[t][1] for t in unknown})
        base.update({t: (harmful[t], harmless[t]) for t in unknown})
        bar.update(len(unknown))
    abl: dict[str, dict[str, Rate]] = {}
    add: dict[str, dict[str, Rate]] = {}
    for src in sources:
        d = directions[src]
        mine = [t for t in targets if (src, t) in wanted]
        abl[src], add[src] = {}, {}
        if not mine:
            continue
        with ablate(model, d):
            abl[src] = rates({t: groups[t][0] for t in mine})
        with actadd(model, d, layer=actadd_layer):
            add[src] = rates({t: groups[t][1] for t in mine})
        bar.update(len(mine))
    bar.close()
    base = {t: base[t] for t in targets}
    return TransferMatrix(sources, targets, base, abl, add, judge)


@dataclass(frozen=True)
class TransferCheck:
    """The transfer matrix's first-token judge against generation + the phrase judge, on the same completions.

    ``cells[name]`` is a :class:`~refusal_circuits.judges.JudgeComparison` (per target language and ``"all"``):
    ``baseline harmful`` / ``baseline harmless`` over every evaluated test prompt (no intervention), ``ablate SRC``
    on a stratified sample of each target's harmful prompts with ``SRC``'s direction ablated, ``actadd SRC`` on a
    sample of the harmless ones with it added. The first-token verdict is read off the same greedy generation
    (its first token is one of the target's refusal tokens), so the two judges see one completion each.
    """

    source: str
    per_lang: int
    max_new_tokens: int
    cells: dict[str, JudgeComparison]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "per_lang": self.per_lang, "max_new_tokens": self.max_new_tokens,
                "judges": ["first_token", "phrases"],
                "cells": {k: v.to_json() for k, v in self.cells.items()}}

    def _repr_html_(self) -> str:
        return transfer_check_html(self.to_json())


def transfer_check_html(check: Mapping[str, Any]) -> str:
    """A language per row, a checked cell per column: Cohen's kappa of the first-token judge with the phrase judge
    (95% bootstrap interval), raw agreement and n beneath (``check``: :meth:`TransferCheck.to_json`)."""
    cells = check["cells"]
    langs = list(dict.fromkeys(lang for comp in cells.values() for lang in comp["languages"]))

    def cell(v: Mapping[str, Any] | None) -> str:
        if not v or not v["n"]:
            return "<td>–</td>"
        return f"<td>{kappa_html(v)}<br><small>agree {v['agreement']['rate']:.0%} of {v['n']}</small></td>"

    rows = ["<tr><th>" + esc(lang) + "</th>" + "".join(cell(comp["languages"].get(lang)) for comp in cells.values())
            + "</tr>" for lang in langs]
    return table("First-token judge vs generation + phrase judge: Cohen's kappa (95% interval)",
                 ["lang", *cells], rows)


def check_transfer(model: HookedModel, direction: Direction, prompts: PromptSet,
                   refusal_ids: Mapping[str, Sequence[int]], *, completions: Sequence[Mapping[str, Any]] = (),
                   per_lang: int = 8, seed: int = 0, actadd_layer: int | None = None, max_new_tokens: int = 16,
                   batch_size: int = 32, n_boot: int = 1000, progress: bool = True) -> TransferCheck:
    """How far the transfer matrix's first-token judge agrees with generation + the phrase judge, per target
    language and intervention (Cohen's kappa with a bootstrap interval).

    Args:
        direction: the source direction whose cells are checked (the study checks the base language's row).
        prompts: the transfer matrix's evaluation prompts (the test split), per target language.
        refusal_ids: each target language's refusal tokens (what the first-token judge counts).
        completions: an evaluation's baseline completions of ``prompts`` (the ``completions`` JSON, with
            ``first_token`` and ``refused``): the baseline cells are read off them at no cost; without them they
            are generated on the same sample as the intervention cells.
        per_lang: harmful (ablate) and harmless (actadd) prompts per target language, a stratified sample seeded
            with ``seed``; each costs one greedy generation of ``max_new_tokens``.
    """
    from refusal_circuits.evaluation import evaluate_refusal
    from refusal_circuits.interventions import ablate, actadd

    if per_lang < 1:
        raise InputError(f"per_lang must be at least 1, got {per_lang}")
    targets = [t for t in prompts.langs if t in refusal_ids]
    if not targets:
        raise InputError("check_transfer needs refusal token ids for at least one language of the prompts")
    ids = {t: {int(x) for x in refusal_ids[t]} for t in targets}
    sample = prompts.filter(lang=targets).sample(per_lang, seed=seed)
    names = ("first_token", "phrases")

    def judged(rows: Sequence[tuple[str, int | None, bool]]) -> JudgeComparison:
        # rows: (lang, first_token, refused); a completion without a first token (a generator backend) is left out
        kept = [(lang, tok, ref) for lang, tok, ref in rows if tok is not None]
        return compare_judges([r[0] for r in kept], [r[1] in ids[r[0]] for r in kept], [bool(r[2]) for r in kept],
                              names=names, n_boot=n_boot, seed=seed)

    def generated(part: PromptSet) -> list[tuple[str, int | None, bool]]:
        ev = evaluate_refusal(model, part, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        return [(c.lang, c.first_token, c.refused) for c in ev.completions]

    cells: dict[str, JudgeComparison] = {}
    by_key = {(c["lang"], c["id"]): c for c in completions}
    for label in ("harmful", "harmless"):
        part = prompts.filter(lang=targets, label=label)
        if by_key and all((r.lang, r.id) in by_key for r in part):
            given = [by_key[(r.lang, r.id)] for r in part]
            rows = [(r.lang, c.get("first_token"), c["refused"]) for r, c in zip(part, given, strict=True)]
        else:
            rows = generated(sample.filter(label=label))
        cells[f"baseline {label}"] = judged(rows)
    with ablate(model, direction):
        cells[f"ablate {direction.lang}"] = judged(generated(sample.filter(label="harmful")))
    with actadd(model, direction, layer=actadd_layer):
        cells[f"actadd {direction.lang}"] = judged(generated(sample.filter(label="harmless")))
    return TransferCheck(direction.lang, per_lang, max_new_tokens, cells)
