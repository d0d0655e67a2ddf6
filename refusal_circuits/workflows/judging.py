"""Which second judge a command runs: none, the packaged 1.5B when it is installed (``auto``), or a model by spec.

The second judge (:class:`~refusal_circuits.llm_judge.LLMJudge`) checks the phrase judge on a stratified sample of
the baseline completions, and the record reports their agreement per language. ``auto`` never fails a run: when
the packaged 1.5B is not installed the comparison is ``null`` with the reason and the pip command. A spec that is
asked for by name must load (a wrong path is the library's one-line error).
"""

from __future__ import annotations

from refusal_circuits.errors import MissingExtraError
from refusal_circuits.judges import Judge
from refusal_circuits.llm_judge import DEFAULT_JUDGE_MODEL, LLMJudge

#: ``--second-judge`` values that are not a model spec.
NONE, AUTO = "none", "auto"


def second_judge(spec: str | None) -> tuple[Judge | None, str | None]:
    """``(judge, None)``, or ``(None, why there is none)`` for ``none`` and for ``auto`` without the 1.5B."""
    if spec is None or spec == NONE:
        return None, "no second judge was asked for (--second-judge none)"
    if spec == AUTO:
        try:
            return LLMJudge.load(DEFAULT_JUDGE_MODEL), None
        except MissingExtraError as e:
            return None, f"the default second judge is not installed: {e}"
    return LLMJudge.load(spec), None
