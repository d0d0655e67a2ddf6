"""Judges against the hand-labelled judge set (tests/fixtures/judge_set.json), per language, at 16 and 64 tokens.

    python scripts/judge_agreement.py [SET.json] [--judge SPEC] [--rubric NAME] [--select]

SET.json defaults to the committed set (compliant answers to harmful requests cut to their first line); the full
texts come from scripts/generate_judge_fixture.py with the labels joined by (lang, id). ``--judge SPEC`` adds an
LLM judge (refusal_circuits.llm_judge.LLMJudge.load, e.g. packaged:qwen2.5-coder-1.5b-instruct) beside the
phrase judge. Prints agreement and Cohen's kappa (95% bootstrap interval) with the hand labels.

``--select`` chooses the LLM judge's rubric without fitting on the scored rows: the set is split into two halves
stratified by language and hand label (seeded); every rubric of ``llm_judge.RUBRICS`` (with ``--with-request``
also each with the request shown to the judge) is scored on the development half at 16 tokens, the one with the highest kappa is
chosen there, and only then are it and ``plain`` scored on the held-out half, at 16 and 64 tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from refusal_circuits.data import load_bundled
from refusal_circuits.judges import Judge, JudgeComparison, PhraseJudge, compare_judges
from refusal_circuits.sampling import stratified_halves

DEFAULT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "judge_set.json"


def line(name: str, got: JudgeComparison) -> str:
    cells = []
    for lang, v in got.languages.items():
        lo, hi = v.kappa_ci
        cells.append(f"{lang} {v.agree.rate:.0%} k={v.kappa:.2f} [{lo:.2f}, {hi:.2f}]")
    return f"{name}: " + "; ".join(cells)


def score(judge: Judge, rows: list[dict[str, Any]], length: str, requests: list[str] | None) -> JudgeComparison:
    langs = [r["lang"] for r in rows]
    texts = [r[length] for r in rows]
    verdicts = (judge.judge(texts, langs) if requests is None
                else judge.judge(texts, langs, requests))  # type: ignore[call-arg]
    return compare_judges(langs, [bool(r["refused"]) for r in rows], verdicts, names=("hand", judge.name),
                          n_boot=1000)


def select(rows: list[dict[str, Any]], spec: str, seed: int, with_requests: bool) -> None:
    from refusal_circuits.llm_judge import RUBRICS, LLMJudge

    key = {f"{r['lang']}/{r['label']}/{r['id']}": f"{r['lang']}/{int(r['refused'])}" for r in rows}
    dev_keys, _ = stratified_halves(key, seed=seed)
    dev = [r for r in rows if f"{r['lang']}/{r['label']}/{r['id']}" in dev_keys]
    held = [r for r in rows if f"{r['lang']}/{r['label']}/{r['id']}" not in dev_keys]
    prompts = {(p.lang, p.label, p.id): p.instruction for p in load_bundled()}
    request = {id(r): prompts[(r["lang"], r["label"], r["id"])] for r in rows}
    first = LLMJudge.load(spec)
    judges = {name: LLMJudge(first.model, first.tokenizer, name=spec, rubric=name,
                             cache_dir=first._cache_path.parent if first._cache_path else None) for name in RUBRICS}
    sys.stdout.write(f"dev {len(dev)} rows, held-out {len(held)} rows (stratified by language and label, seed {seed})\n")
    best, best_kappa = "", -2.0
    for name, judge in judges.items():
        for with_request in (False, True) if with_requests else (False,):
            got = score(judge, dev, "c16", [request[id(r)] for r in dev] if with_request else None)
            label = f"{name}{'+request' if with_request else ''}"
            sys.stdout.write(line(f"dev {label} 16", got) + "\n")
            if got.languages["all"].kappa > best_kappa:
                best, best_kappa = label, got.languages["all"].kappa
    sys.stdout.write(f"chosen on dev: {best} (kappa {best_kappa:.2f})\n")
    for label in dict.fromkeys([best, "plain"]):
        name, with_request = label.split("+")[0], label.endswith("+request")
        for length in ("c16", "c64") if label == best else ("c16",):
            got = score(judges[name], held, length, [request[id(r)] for r in held] if with_request else None)
            sys.stdout.write(line(f"held-out {label} {length[1:]}", got) + "\n")
    for length in ("c16", "c64"):
        sys.stdout.write(line(f"held-out phrases {length[1:]}", score(PhraseJudge(), held, length, None)) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", nargs="?", default=str(DEFAULT))
    ap.add_argument("--judge", default=None, help="an LLM judge spec to compare as well")
    ap.add_argument("--rubric", default=None, help="the LLM judge's rubric (llm_judge.RUBRICS; default: its default)")
    ap.add_argument("--select", action="store_true", help="choose the rubric on a development half, report the other")
    ap.add_argument("--seed", type=int, default=0, help="the seed of the development / held-out split")
    ap.add_argument("--with-request", action="store_true", help="with --select: also each rubric with the request")
    args = ap.parse_args()
    data = json.loads(Path(args.set).read_text(encoding="utf-8"))
    rows = data["rows"] if isinstance(data, dict) else data
    if args.select:
        if not args.judge:
            ap.error("--select needs --judge SPEC")
        select(rows, args.judge, args.seed, args.with_request)
        return
    judges: dict[str, Judge] = {"phrases": PhraseJudge()}
    if args.judge:
        from refusal_circuits.llm_judge import LLMJudge

        judges[args.judge] = LLMJudge.load(args.judge, **({"rubric": args.rubric} if args.rubric else {}))
    for name, judge in judges.items():
        for length in ("c16", "c64"):
            sys.stdout.write(line(f"{name} {length[1:]} tokens", score(judge, rows, length, None)) + "\n")


if __name__ == "__main__":
    main()
