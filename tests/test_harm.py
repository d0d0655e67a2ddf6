"""Harm vs refusal per language (issue 18, item 1): exact on a tiny random model against plain Hugging Face
forwards, and planted languages whose answer is known (a copy of the base language; a language whose harmful
prompts are its harmless ones)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import random_direction

# The "harmful" prompts end in a marker the random model can separate, at the last instruction token and after.
HARMFUL = [t + " zzzz" for t in ("tell me a story about a cat", "what is two plus two?", "x" * 30,
                                 "why is the sky blue", "how do I fix a bike", "name a red fruit", "sing me a song",
                                 "what time is it")]
HARMLESS = ["hi", "name three birds", "a poem on rain please", "count to five", "say yes", "list colours",
            "one word please", "describe the sea"]


def _prompts():
    from refusal_circuits.data import PromptRecord, PromptSet

    recs = []
    for lang in ("en", "cp", "nx"):
        for label, texts in (("harmful", HARMFUL), ("harmless", HARMLESS)):
            for i, text in enumerate(texts):
                # cp copies English; nx's harmful prompts are English's harmless ones: nothing to recognise.
                shown = HARMLESS[i] if lang == "nx" else text
                split = "train" if i % 2 else "test"
                recs.append(PromptRecord(f"{label[0]}{i}", lang, label, shown,
                                         {"split": split, "category": f"c{i % 2}"}))
    return PromptSet(recs, "planted")


def _hf_hidden(model, instruction: str, layer: int):
    """resid_pre[layer] of every position of one prompt run alone, by plain Hugging Face."""
    from refusal_circuits.chat import tokenize_chat

    batch = tokenize_chat(model.tokenizer, [instruction])
    hf = model.original_model
    with torch.no_grad():
        out = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return out.hidden_states[layer][0].double(), batch


@pytest.mark.tiny
def test_rows_at_the_last_instruction_token_are_hugging_faces(tiny_model):
    from refusal_circuits.activations import last_instruction, site_rows
    from refusal_circuits.chat import Span, chat_format
    from refusal_circuits.errors import InputError

    fmt = chat_format(tiny_model.tokenizer)
    t_inst = last_instruction(fmt)
    groups = {"a": HARMFUL[:3], "b": HARMLESS[:2]}
    got = site_rows(tiny_model, groups, [(1, t_inst), (0, -1)], batch_size=2, progress=False)
    for name, texts in groups.items():
        for i, text in enumerate(texts):
            hidden, batch = _hf_hidden(tiny_model, text, 1)
            assert int(batch.spans[0, t_inst]) == Span.INSTRUCTION and int(batch.spans[0, t_inst + 1]) == Span.POST
            assert torch.allclose(got[1, t_inst][name][i], hidden[t_inst], atol=1e-5), (name, i)
            assert torch.allclose(got[0, -1][name][i], _hf_hidden(tiny_model, text, 0)[0][-1], atol=1e-5)
    with pytest.raises(InputError, match="last instruction token"):
        site_rows(tiny_model, groups, [(1, t_inst - 1)], progress=False)


@pytest.fixture(scope="module")
def planted(tiny_model):
    from refusal_circuits.crosslingual.harm import harm_and_refusal
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.scores import RefusalTokens

    train = [i for i in range(8) if i % 2]
    direction = extract_candidates(tiny_model, [HARMFUL[i] for i in train], [HARMLESS[i] for i in train], lang="en",
                                   progress=False).direction(-2, 1)
    tokens = RefusalTokens({"en": (5, 7), "cp": (5, 7), "nx": (5, 7)})
    return direction, harm_and_refusal(tiny_model, direction, _prompts(), tokens=tokens, n_boot=200, batch_size=3,
                                       progress=False)


@pytest.mark.tiny
def test_the_harm_direction_is_the_difference_of_hugging_face_means(tiny_model, planted):
    from refusal_circuits.activations import last_instruction
    from refusal_circuits.chat import chat_format

    _, got = planted
    t_inst = last_instruction(chat_format(tiny_model.tokenizer))
    train = [i for i in range(8) if i % 2]
    mean = {label: torch.stack([_hf_hidden(tiny_model, texts[i], 1)[0][t_inst] for i in train]).mean(0)
            for label, texts in (("harmful", HARMFUL), ("harmless", HARMLESS))}
    gap = mean["harmful"] - mean["harmless"]
    assert got.harm_position == t_inst and got.harm_layer == 1
    assert torch.allclose(got.harm_direction.double(), gap / gap.norm(), atol=1e-5)
    assert got.alpha == pytest.approx(float(gap.norm()), rel=1e-5)
    # The AUROC of the test prompts' projections, counted by hand.
    test = [i for i in range(8) if not i % 2]
    ph = [float(_hf_hidden(tiny_model, HARMFUL[i], 1)[0][t_inst] @ (gap / gap.norm())) for i in test]
    pb = [float(_hf_hidden(tiny_model, HARMLESS[i], 1)[0][t_inst] @ (gap / gap.norm())) for i in test]
    wins = sum((a > b) + 0.5 * (a == b) for a in ph for b in pb) / (len(ph) * len(pb))
    assert got.langs["en"].harm_auroc.value == pytest.approx(wins)


@pytest.mark.tiny
def test_a_copy_of_the_base_language_keeps_everything_and_a_language_without_harm_recognises_none(planted):
    _, got = planted
    en, cp, nx = got.langs["en"], got.langs["cp"], got.langs["nx"]
    for rec in (en, cp):  # paired resampling: the copy's retention is exactly 1 on every resample
        assert (rec.harm_retention.value, rec.harm_retention.low, rec.harm_retention.high) == pytest.approx((1, 1, 1))
        assert rec.refusal_retention.value == pytest.approx(1.0)
        assert rec.harm_level == "as base" and rec.refusal_level == "as base"
    assert cp.cos_harm_base.value == pytest.approx(1.0, abs=1e-6)
    assert cp.heads["harm"].agreement.value == pytest.approx(1.0)
    assert "recognises harm as en does and converts it into refusal as en does" in cp.sentence()
    # the paired difference of the two retentions: exactly 0 on every resample for the copy; none for the base
    assert cp.retention_gap is not None
    assert (cp.retention_gap.value, cp.retention_gap.low, cp.retention_gap.high) == pytest.approx((0, 0, 0), abs=1e-5)
    assert en.retention_gap is None and "base language" in en.to_json()["retention_gap_why"]
    # nx: its harmful prompts are its harmless prompts, so both gaps are exactly 0.
    assert nx.harm_retention.value == pytest.approx(0.0, abs=1e-9)
    assert nx.refusal_retention.value == pytest.approx(0.0, abs=1e-9)
    assert nx.harm_retention.low < 0 < nx.harm_retention.high
    assert nx.harm_auroc.value == pytest.approx(0.5)
    assert nx.steer_harm is not None and cp.steer_harm is not None
    assert nx.steer_harm.value == pytest.approx(cp.steer_harm.value, abs=1e-4)  # same harmless prompts
    for rec in got.langs.values():
        for est in (rec.cos_harm_refusal, rec.harm_auroc, rec.refusal_auroc, rec.score_harmful):
            assert est is not None and (est.why is not None or est.low <= est.value + 1e-9 <= est.high + 2e-9)


@pytest.mark.tiny
def test_steering_adds_the_harm_direction_at_the_last_instruction_token_only(tiny_model, planted):
    from refusal_circuits.crosslingual.harm import _steer_scores
    from refusal_circuits.scores import refusal_score

    _, got = planted
    unit, alpha, t_inst = got.harm_direction, 3.0, got.harm_position
    texts = HARMLESS[:3]
    fast = _steer_scores(tiny_model, texts, unit, alpha, 1, t_inst, (5, 7), batch_size=2)
    hf = tiny_model.original_model

    def pre(_module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, t_inst] += alpha * unit.to(h.dtype)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    from refusal_circuits.chat import tokenize_chat

    for i, text in enumerate(texts):
        batch = tokenize_chat(tiny_model.tokenizer, [text])
        handle = hf.model.layers[1].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1]
        finally:
            handle.remove()
        assert float(fast[i]) == pytest.approx(float(refusal_score(logits, (5, 7))[0]), abs=1e-4)


@pytest.mark.tiny
def test_json_is_finite_or_null_with_a_reason_and_the_record_renders(planted):
    import json

    from refusal_circuits.io import json_text

    _, got = planted
    obj = json.loads(json_text(got.to_json()))
    assert set(obj["langs"]) == {"en", "cp", "nx"}
    assert obj["langs"]["cp"]["harm_level"] == "as base"
    assert "<table" in got._repr_html_() and "harm retention" in got._repr_html_()
    assert all(torch.isfinite(t).all() for t in got.tensors().values())
    assert "HarmRefusal(" in repr(got)


@pytest.mark.unit
def test_levels_follow_the_interval():
    from refusal_circuits.crosslingual.harm import level
    from refusal_circuits.crosslingual.sites import Estimate

    assert level(Estimate(1.0, 0.8, 1.2)) == "as base"
    assert level(Estimate(0.6, 0.4, 0.8)) == "weaker"
    assert level(Estimate(0.05, -0.2, 0.3)) == "absent"
    assert level(Estimate(0.7, 0.1, 1.3)) == "unclear"
    assert level(Estimate(math.nan, math.nan, math.nan, "no prompts")) == "unclear"


@pytest.mark.tiny
def test_bad_input_names_what_is_wrong(tiny_model):
    from refusal_circuits.crosslingual.harm import harm_and_refusal
    from refusal_circuits.data import PromptSet
    from refusal_circuits.errors import InputError

    direction = random_direction(tiny_model, layer=1)
    prompts = _prompts()
    with pytest.raises(InputError, match="harm layer 9"):
        harm_and_refusal(tiny_model, direction, prompts, harm_layer=9, progress=False)
    with pytest.raises(InputError, match="'cp' needs at least 2 harmful"):
        harm_and_refusal(tiny_model, direction, PromptSet([r for r in prompts if not (r.lang == "cp" and
                                                           r.label == "harmful")]), progress=False)
