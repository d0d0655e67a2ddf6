"""Paired total effects by attribution patching (issue 18, item 2, in the paired comparison): on a tiny random
model, against Hugging Face forwards patched by hand where the path is linear, a translation identical to English
(nothing to recover, exactly), and the record's shape."""

from __future__ import annotations

import json
import math

import pytest
import torch

from refusal_circuits.chat import tokenize_chat
from refusal_circuits.data import PromptRecord, PromptSet
from refusal_circuits.errors import InputError
from refusal_circuits.scores import refusal_tokens_from_strings
from tests.helpers import random_direction

pytestmark = pytest.mark.tiny

EN = ["tell me a story about a cat", "what is two plus two?", "why is the sky blue", "how do I fix a bike",
      "name a red fruit", "sing me a song"]
XX = ["raconte une histoire de chat", "combien font deux et deux", "pourquoi le ciel est bleu",
      "comment réparer un vélo", "un fruit rouge", "chante une chanson"]


def _prompts() -> PromptSet:
    recs = []
    for lang, texts in (("en", EN), ("cp", EN), ("xx", XX)):
        for label in ("harmful", "harmless"):
            for i, text in enumerate(texts):
                shown = text if label == "harmful" else text[::-1]
                recs.append(PromptRecord(f"{label[0]}{i}", lang, label, shown, {"split": "test", "category": f"c{i % 2}"}))
    recs.append(PromptRecord("lonely", "zz", "harmful", "alone", {"split": "test"}))
    recs.append(PromptRecord("lonely2", "zz", "harmful", "alone again", {"split": "test"}))
    recs += [PromptRecord(f"zb{i}", "zz", "harmless", "quiet", {"split": "test"}) for i in range(2)]
    return PromptSet(recs, "planted")


@pytest.fixture(scope="module")
def deep(deep_tiny_model):
    return deep_tiny_model


@pytest.fixture(scope="module")
def found(deep):
    from refusal_circuits.crosslingual.totals import paired_totals

    d = random_direction(deep, layer=2)
    tokens = refusal_tokens_from_strings(deep.tokenizer, ["I"], langs=("en", "cp", "xx"))
    return d, paired_totals(deep, d, _prompts(), ["en", "cp", "xx", "zz"], tokens=tokens, validate=2, n_boot=200,
                            batch_size=4, progress=False)


def _hf_site(model, direction, text: str, mlp_value: torch.Tensor | None = None, mlp_layer: int = 1) -> tuple[float, torch.Tensor]:
    """r̂'s projection at its site for one prompt by plain Hugging Face, with MLP ``mlp_layer``'s output at r̂'s
    position set to ``mlp_value`` (None: clean); and that MLP output there."""
    batch = tokenize_chat(model.tokenizer, [text])
    hf, seen = model.original_model, {}

    def hook(_m, _a, out):
        seen["m"] = out[0, direction.position].double().clone()
        if mlp_value is None:
            return None
        out = out.clone()
        out[0, direction.position] = mlp_value.to(out.dtype)
        return out

    h = hf.model.layers[mlp_layer].mlp.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    finally:
        h.remove()
    r = direction.vector.double() / direction.vector.double().norm()
    return float(out.hidden_states[direction.layer][0, direction.position].double() @ r), seen["m"]


def test_the_linear_node_and_the_gap_equal_hand_patched_hugging_face(deep, found):
    """MLP1 (below r̂'s layer 2) reaches r̂ only directly, and only at r̂'s own position: its summed estimate is the
    exact change of patching English's MLP1 output into the translation. The gap is English's projection minus the
    translation's."""
    d, res = found
    rec = res.langs["xx"]
    exact, gaps = [], []
    for en, xx in zip(EN, XX, strict=True):
        p_en, m_en = _hf_site(deep, d, en)
        p_xx, _ = _hf_site(deep, d, xx)
        p_patched, _ = _hf_site(deep, d, xx, mlp_value=m_en)
        exact.append(p_patched - p_xx)
        gaps.append(p_en - p_xx)
    want = sum(exact) / len(exact)
    assert abs(want) > 1e-4  # not 0 == 0
    got = float(rec.stats["projection"].mlps["mean"][1])
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert rec.gap.value == pytest.approx(sum(gaps) / len(gaps), rel=1e-4, abs=1e-6)
    assert rec.gap.low <= rec.gap.value <= rec.gap.high
    # Nodes at or above r̂'s layer cannot move its projection.
    assert bool((rec.stats["projection"].heads["mean"][2:] == 0).all())
    assert rec.linear_check is not None and rec.linear_check < 1e-3


def test_a_translation_identical_to_english_has_nothing_to_recover(found):
    _, res = found
    rec = res.langs["cp"]
    for st in rec.stats.values():
        assert bool((st.heads["mean"] == 0).all()) and bool((st.mlps["mean"] == 0).all())
        assert st.n_significant() == 0
    assert rec.gap.value == 0.0
    assert max(abs(x) for x in rec.validation["projection"].exact["projection"]) < 1e-9


def test_a_language_without_pairs_is_skipped_with_the_reason_and_the_record_renders(found):
    _, res = found
    assert "zz" in res.skipped and "share an id" in res.skipped["zz"]
    obj = res.to_json()
    text = json.dumps(obj, allow_nan=False)  # finite or null
    assert "NaN" not in text
    assert obj["langs"]["xx"]["n_pairs"] == {"harmful": 6, "harmless": 6}
    assert len(obj["langs"]["xx"]["projection"]["top"]) > 0
    assert "Paired total effects" in res._repr_html_() and "xx" in repr(res)
    for key, t in res.tensors().items():
        assert torch.isfinite(t).all() or key.endswith(".q"), key
    assert math.isfinite(obj["langs"]["xx"]["validation"]["projection"]["summary"]["projection"]["worst_error"])
    assert set(obj["langs"]["xx"]["validation"]) == {"projection", "score"}


def test_bad_input_names_what_is_wrong(deep):
    from refusal_circuits.crosslingual.totals import paired_totals

    d = random_direction(deep, layer=2)
    with pytest.raises(InputError, match="validate"):
        paired_totals(deep, d, _prompts(), ["xx"], validate=0, progress=False)
    with pytest.raises(InputError, match="needs at least 2"):
        paired_totals(deep, d, _prompts(), ["nope"], progress=False)


def test_a_metric_that_fails_its_validation_is_withheld_with_the_numbers(deep, monkeypatch):
    """Exact or refused: where AtP's worst error against exact patching exceeds the bound, the metric's estimates
    are not reported (null with the reason, and a warning); here the bound is set below any float error."""
    from refusal_circuits.crosslingual import totals as mod

    monkeypatch.setattr(mod, "FAITHFUL_ERROR", 1e-12)
    d = random_direction(deep, layer=2)
    tokens = refusal_tokens_from_strings(deep.tokenizer, ["I"], langs=("en", "xx"))
    with pytest.warns(mod.AtPWarning, match="withheld"):
        res = mod.paired_totals(deep, d, _prompts(), ["en", "xx"], tokens=tokens, validate=1, n_boot=50,
                                batch_size=4, progress=False)
    rec = res.langs["xx"]
    assert set(rec.withheld) == {"projection", "score"} and rec.stats == {}
    obj = res.to_json()["langs"]["xx"]
    assert obj["projection"] is None and "not faithful" in obj["projection_why"] and "worst error" in obj["score_why"]
    assert "withheld" in rec.sentence() and "withheld" in res._repr_html_()
