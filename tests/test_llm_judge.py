"""The LLM judge: batched verdicts equal one-by-one verdicts, the cache, and the sign rule (tiny model)."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_circuits.judges import Judge
from refusal_circuits.llm_judge import RUBRIC, LLMJudge

pytestmark = pytest.mark.tiny

TEXTS = ["I'm sorry, but I can't help with that.", "Sure! Here is a poem about autumn.", "Nie mogę pomóc.",
         "抱歉，我无法提供帮助。", "Um zu Hause eine", "x"]


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from refusal_circuits.models import load_hf

    model, tokenizer, _ = load_hf(str(tiny_dir))
    return model, tokenizer


def test_batched_margins_equal_one_by_one_and_the_verdict_is_their_sign(hf, tmp_path):
    batched = LLMJudge(*hf, name="tiny", batch_size=4, cache_dir=None)
    single = LLMJudge(*hf, name="tiny", batch_size=1, cache_dir=None)
    a, b = batched.margins(TEXTS), single.margins(TEXTS)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4), (a, b)
    assert batched.judge(TEXTS, ["en"] * len(TEXTS)) == [m > 0 for m in a]
    assert isinstance(batched, Judge) and batched.name == "llm:tiny"


def test_the_request_changes_the_prompt_and_lengths_must_match(hf):
    judge = LLMJudge(*hf, name="tiny", cache_dir=None)
    assert judge._prompt("ok", "Write a poem") != judge._prompt("ok", None)
    assert RUBRIC in judge._prompt("ok", None)
    with pytest.raises(ValueError, match="languages"):
        judge.judge(["a", "b"], ["en"])
    with pytest.raises(ValueError, match="instructions"):
        judge.margins(["a"], ["x", "y"])


def test_verdicts_are_cached_on_disk_as_json_and_reused(hf, tmp_path, monkeypatch):
    first = LLMJudge(*hf, name="tiny", cache_dir=tmp_path)
    margins = first.margins(TEXTS[:3])
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())) == 3
    again = LLMJudge(*hf, name="tiny", cache_dir=tmp_path)
    monkeypatch.setattr(again, "_margins", lambda texts: pytest.fail("judged again"))
    assert again.margins(TEXTS[:3]) == margins
    other = LLMJudge(*hf, name="another", cache_dir=tmp_path)  # another judge identity: its own file
    other.margins(TEXTS[:1])
    assert len(list(tmp_path.glob("*.json"))) == 2
    files[0].write_text("{not json")  # a damaged cache is re-judged, never trusted
    assert LLMJudge(*hf, name="tiny", cache_dir=tmp_path).margins(TEXTS[:1]) == pytest.approx(margins[:1], abs=1e-5)


def test_rubrics_are_named_part_of_the_identity_and_an_unknown_one_is_refused(hf):
    from refusal_circuits.errors import InputError
    from refusal_circuits.llm_judge import RUBRICS

    plain = LLMJudge(*hf, name="tiny", rubric="plain", cache_dir=None)
    examples = LLMJudge(*hf, name="tiny", rubric="examples", cache_dir=None)
    assert RUBRICS["examples"] in examples._prompt("ok", None) and RUBRICS["plain"] not in examples._prompt("ok", None)
    assert plain._identity != examples._identity  # verdicts of one rubric never answer for another
    with pytest.raises(InputError, match="unknown judge rubric 'strict'.*plain"):
        LLMJudge(*hf, name="tiny", rubric="strict", cache_dir=None)


def test_a_padded_batch_that_disagrees_with_the_prompt_judged_alone_is_refused(hf, monkeypatch):
    """The run-time check: the most padded prompt of the first batch is judged again alone."""
    from refusal_circuits.exactness import ExactnessError

    judge = LLMJudge(*hf, name="tiny", batch_size=4, cache_dir=None)
    calls: list[int] = []
    real = judge._batched

    def wrong_alone(encoded, batch_size):
        calls.append(len(encoded))
        out = real(encoded, batch_size)
        return [m + 1.0 for m in out] if len(encoded) == 1 else out  # as if padding leaked into the margin

    monkeypatch.setattr(judge, "_batched", wrong_alone)
    with pytest.raises(ExactnessError, match="judged alone"):
        judge.margins(TEXTS)
    assert calls == [len(TEXTS), 1]
    monkeypatch.setattr(judge, "_batched", real)
    assert len(judge.margins(TEXTS)) == len(TEXTS)  # the true model passes its own check
