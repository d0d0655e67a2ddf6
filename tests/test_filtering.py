"""Refusal-based filtering of the direction's train/val prompts (tiny model; the rules themselves by stand-ins)."""

from __future__ import annotations

import pytest

from refusal_circuits.data import PromptRecord, PromptSet
from refusal_circuits.errors import InputError
from refusal_circuits.scores import refusal_tokens_from_strings
from refusal_circuits.workflows import filtering

pytestmark = pytest.mark.tiny


def _set(n: int) -> PromptSet:
    return PromptSet([PromptRecord(f"{label}{i}", "en", label, f"{label} request {i}")
                      for label in ("harmful", "harmless") for i in range(n)], "t")


def test_the_rule_keeps_refused_harmful_and_answered_harmless(tiny_model, monkeypatch):
    tokens = refusal_tokens_from_strings(tiny_model.tokenizer, ["I"], ["en"])
    part = _set(4)
    verdicts = {"harmful0": True, "harmful1": True, "harmful2": False, "harmful3": True,
                "harmless0": False, "harmless1": True, "harmless2": False, "harmless3": False}
    monkeypatch.setattr(filtering, "_refuses", lambda model, p, *a: [verdicts[r.id] for r in p])
    kept, record = filtering.refusal_filter(tiny_model, {"train": part, "val": part}, "score", tokens)
    assert {r.id for r in kept["train"]} == {"harmful0", "harmful1", "harmful3", "harmless0", "harmless2", "harmless3"}
    assert record.to_json()["train"] == {"harmful": {"kept": 3, "n": 4}, "harmless": {"kept": 3, "n": 4}}
    none, plain = filtering.refusal_filter(tiny_model, {"train": part}, "none", tokens)
    assert none["train"] is part and plain.counts["train"]["harmful"] == (4, 4)


def test_a_rule_that_keeps_too_few_is_refused_with_the_counts(tiny_model, monkeypatch):
    tokens = refusal_tokens_from_strings(tiny_model.tokenizer, ["I"], ["en"])
    monkeypatch.setattr(filtering, "_refuses", lambda model, p, *a: [False for _ in p])
    with pytest.raises(InputError, match="keeps 0 of 3 harmful, 3 of 3 harmless train prompts"):
        filtering.refusal_filter(tiny_model, {"train": _set(3)}, "verdict", tokens)
    with pytest.raises(InputError, match="unknown refusal filter"):
        filtering.refusal_filter(tiny_model, {"train": _set(3)}, "vibes", tokens)


@pytest.mark.parametrize("rule", ["score", "verdict"])
def test_both_rules_run_on_a_real_model(tiny_model, rule):
    """The score rule agrees with refusal_score's sign; the verdict rule with the phrase judge on a generation."""
    from refusal_circuits.generation import generate
    from refusal_circuits.judges import PhraseJudge
    from refusal_circuits.scores import first_token_logits, refusal_score

    tokens = refusal_tokens_from_strings(tiny_model.tokenizer, ["I"], ["en"])
    part = _set(3)
    got = filtering._refuses(tiny_model, part, rule, tokens, 8, False)
    if rule == "score":
        expect = (refusal_score(first_token_logits(tiny_model, part.instructions), tokens.for_lang("en")) > 0).tolist()
    else:
        texts = generate(tiny_model, part.instructions, max_new_tokens=filtering.VERDICT_TOKENS, progress=False)
        expect = PhraseJudge().judge(texts, ["en"] * len(part))
    assert got == expect
