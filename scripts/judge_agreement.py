"""Judges against the hand-labelled judge set (tests/fixtures/judge_set.json), per language, at 16 and 64 tokens.

    python scripts/judge_agreement.py [SET.json] [--judge SPEC]

SET.json defaults to the committed set (compliant answers to harmful requests cut to their first line); the full
texts come from scripts/generate_judge_fixture.py with the labels joined by (lang, id). ``--judge SPEC`` adds an
LLM judge (refusal_circuits.llm_judge.LLMJudge.load, e.g. packaged:qwen2.5-coder-1.5b-instruct) beside the
phrase judge. Prints agreement and Cohen's kappa (95% bootstrap interval) with the hand labels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from refusal_circuits.judges import Judge, PhraseJudge, compare_judges

DEFAULT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "judge_set.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", nargs="?", default=str(DEFAULT))
    ap.add_argument("--judge", default=None, help="an LLM judge spec to compare as well")
    args = ap.parse_args()
    data = json.loads(Path(args.set).read_text(encoding="utf-8"))
    rows = data["rows"] if isinstance(data, dict) else data
    judges: dict[str, Judge] = {"phrases": PhraseJudge()}
    if args.judge:
        from refusal_circuits.llm_judge import LLMJudge

        judges[args.judge] = LLMJudge.load(args.judge)
    langs = [r["lang"] for r in rows]
    truth = [bool(r["refused"]) for r in rows]
    for name, judge in judges.items():
        for length in ("c16", "c64"):
            got = compare_judges(langs, truth, judge.judge([r[length] for r in rows], langs),
                                 names=("hand", name), n_boot=1000)
            cells = []
            for lang, v in got.languages.items():
                lo, hi = v.kappa_ci
                cells.append(f"{lang} {v.agree.rate:.0%} k={v.kappa:.2f} [{lo:.2f}, {hi:.2f}]")
            sys.stdout.write(f"{name} {length[1:]} tokens: " + "; ".join(cells) + "\n")


if __name__ == "__main__":
    main()
