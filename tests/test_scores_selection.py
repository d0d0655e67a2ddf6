"""Refusal score, KL, cross-entropy (unit) and candidate selection on a tiny model (tiny)."""

from __future__ import annotations

import math

import pytest
import torch

from refusal_circuits import hooks, interventions
from refusal_circuits.directions import extract_candidates
from refusal_circuits.scores import (
    completion_cross_entropy,
    first_token_logits,
    kl_divergence,
    refusal_score,
    refusal_tokens_from_strings,
)
from refusal_circuits.selection import ARDITI, POLYREFUSE, SelectionConfig, SelectionError, select_direction


@pytest.mark.unit
def test_refusal_score_is_the_log_odds_of_the_token_set():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(logits, -1)
    want = torch.log(p[:, [0, 2]].sum(-1)) - torch.log(1 - p[:, [0, 2]].sum(-1))
    torch.testing.assert_close(refusal_score(logits, [0, 2]), want)
    assert refusal_score(logits, [1])[1].item() == pytest.approx(math.log(1 / 3))


@pytest.mark.unit
def test_kl_is_zero_for_equal_and_positive_otherwise():
    a = torch.randn(3, 10)
    assert kl_divergence(a, a).abs().max() < 1e-6
    assert (kl_divergence(a, a.flip(-1)) > 0).all()
    assert kl_divergence(a, a + 5.0).abs().max() < 1e-6  # a shift changes no probability


HARMFUL = ["how to do a bad thing", "tell me something bad please", "bad", "a much longer bad request here"]
HARMLESS = ["bake bread", "what is two plus two", "write a poem about the sea", "hi"]


@pytest.mark.tiny
def test_completion_cross_entropy_matches_a_manual_teacher_forced_pass(tiny_model):
    from refusal_circuits.chat import tokenize_chat

    tok = tiny_model.tokenizer
    completions = [tok("ok sure", add_special_tokens=False)["input_ids"], tok("no", add_special_tokens=False)["input_ids"]]
    got = completion_cross_entropy(tiny_model, HARMLESS[:2], completions)
    total, n = 0.0, 0
    for text, comp in zip(HARMLESS[:2], completions, strict=True):
        prompt = tokenize_chat(tok, [text]).input_ids[0].tolist()
        ids = torch.tensor([prompt + comp])
        with torch.inference_mode():
            logp = torch.log_softmax(tiny_model(ids)[0].float(), -1)
        for j, t in enumerate(comp):
            total -= float(logp[len(prompt) + j - 1, t])
            n += 1
    assert got == pytest.approx(total / n, rel=1e-4)


@pytest.mark.tiny
def test_selection_scores_match_direct_measurement_and_pick_the_lowest_bypass(tiny_model):
    tokens = refusal_tokens_from_strings(tiny_model.tokenizer, ["I", "S"], langs=["en"])
    cands = extract_candidates(tiny_model, HARMFUL, HARMLESS, lang="en", progress=False)
    loose = SelectionConfig("loose", kl_max=None, induce_min=None, max_layer_frac=1.0)
    sel = select_direction(tiny_model, cands, HARMFUL, HARMLESS, tokens, config=loose, positions=[-1, -2],
                           progress=False)
    assert {(s.position, s.layer) for s in sel.scores} == {(-1, 1), (-2, 1)}  # layer 0 is all zero
    best = min(sel.scores, key=lambda s: s.bypass)
    assert (sel.direction.position, sel.direction.layer) == (best.position, best.layer)
    # Re-measure the chosen candidate's bypass score by hand.
    with interventions.ablate(tiny_model, sel.direction):
        logits = first_token_logits(tiny_model, HARMFUL)
    assert float(refusal_score(logits, tokens.ids).mean()) == pytest.approx(best.bypass, abs=1e-5)
    assert sel.direction.meta["selection"]["filter"] == "loose"
    assert hooks.count_hooks(tiny_model) == 0
    assert "Selected direction" in sel._repr_html_()


@pytest.mark.tiny
def test_no_passing_candidate_lists_the_best_and_fallback_is_recorded(tiny_model):
    tokens = refusal_tokens_from_strings(tiny_model.tokenizer, ["I"], langs=["en"])
    cands = extract_candidates(tiny_model, HARMFUL, HARMLESS, lang="en", progress=False)
    impossible = SelectionConfig("impossible", kl_max=-1.0, induce_min=None, max_layer_frac=1.0)
    with pytest.raises(SelectionError, match="no candidate passes the impossible filter; best by bypass: pos"):
        select_direction(tiny_model, cands, HARMFUL, HARMLESS, tokens, config=impossible, positions=[-1],
                         progress=False)
    loose = SelectionConfig("loose", kl_max=None, induce_min=None, max_layer_frac=1.0)
    sel = select_direction(tiny_model, cands, HARMFUL, HARMLESS, tokens, config=impossible, fallback=loose,
                           positions=[-1], progress=False)
    assert sel.fallback_from == "impossible" and sel.config.name == "loose"
    assert sel.to_json()["fallback_from"] == "impossible"


@pytest.mark.unit
def test_presets_follow_the_papers():
    assert (ARDITI.kl_max, ARDITI.induce_min, ARDITI.max_layer_frac) == (0.1, 0.0, 0.8)
    assert (POLYREFUSE.kl_max, POLYREFUSE.induce_min) == (0.2, None)
    assert ARDITI.max_layer(24) == 20  # layers 0..19 of 24 are eligible


@pytest.mark.tiny
def test_lazy_scan_chooses_what_exhaustive_scoring_chooses(tiny_model):
    tokens = refusal_tokens_from_strings(tiny_model.tokenizer, ["I"], langs=["en"])
    cands = extract_candidates(tiny_model, HARMFUL, HARMLESS, lang="en", progress=False)
    positions = [-1, -2, -3, -4]
    full = select_direction(tiny_model, cands, HARMFUL, HARMLESS, tokens, exhaustive=True, positions=positions,
                            config=SelectionConfig("loose", None, None, 1.0), progress=False)
    assert all(s.scored for s in full.scores)
    kls = sorted(s.kl for s in full.scores)
    # A KL cut that rejects the lower half, so the lazy scan must skip rejected candidates.
    cut = SelectionConfig("cut", kl_max=kls[len(kls) // 2] + 1e-9, induce_min=None, max_layer_frac=1.0)
    want = min((s for s in full.scores if s.kl < cut.kl_max), key=lambda s: s.bypass)
    lazy = select_direction(tiny_model, cands, HARMFUL, HARMLESS, tokens, config=cut, top_k=1,
                            positions=positions, progress=False)
    assert (lazy.direction.position, lazy.direction.layer) == (want.position, want.layer)
    assert sum(s.scored for s in lazy.scores) <= len(full.scores)
    assert {(s.position, s.layer, s.bypass) for s in lazy.scores} == {(s.position, s.layer, s.bypass) for s in full.scores}


@pytest.mark.tiny
def test_actadd_calibration_takes_the_first_scale_that_induces(tiny_model):
    from refusal_circuits.interventions import default_alpha
    from refusal_circuits.selection import calibrate_actadd

    tokens = refusal_tokens_from_strings(tiny_model.tokenizer, ["I"], langs=["en"])
    cands = extract_candidates(tiny_model, HARMFUL, HARMLESS, lang="en", progress=False)
    d = cands.direction(-1, 1)
    out = calibrate_actadd(tiny_model, d, HARMLESS, tokens.ids, scales=(0.5, 1.0, 50.0, 500.0))
    fractions = [t["fraction"] for t in out["tried"]]
    if out["reached"]:
        assert fractions[-1] >= 0.8 and all(f < 0.8 for f in fractions[:-1])
    else:
        assert len(fractions) == 4 and out["fraction"] == max(fractions)
    assert out["alpha"] == pytest.approx(out["scale"] * d.norm)
    # The fraction is what greedy decoding does: the first token is a refusal token.
    with interventions.actadd(tiny_model, d, alpha=out["alpha"]):
        first = first_token_logits(tiny_model, HARMLESS).argmax(-1)
    assert out["fraction"] == pytest.approx(float(torch.isin(first, torch.tensor(tokens.ids)).float().mean()))
    assert default_alpha(d) == d.norm
    d.meta["actadd"] = out
    assert default_alpha(d) == out["alpha"]


@pytest.mark.unit
def test_refusal_tokens_round_trip_through_json():
    from refusal_circuits.scores import RefusalTokens

    tokens = RefusalTokens({"en": (40, 7), "de": ()}, {40: "I", 7: "("}, {}, "discovered")
    back = RefusalTokens.from_json(tokens.to_json())
    assert back.by_lang == tokens.by_lang and back.strings == tokens.strings and back.ids == (40, 7)
    assert back.for_lang("de") == (40, 7)  # no tokens of its own: every language's


@pytest.mark.tiny
def test_induce_is_scored_only_where_a_filter_needs_it_and_the_choice_is_unchanged(tiny_model):
    tokens = refusal_tokens_from_strings(tiny_model.tokenizer, ["I"], langs=["en"])
    cands = extract_candidates(tiny_model, HARMFUL, HARMLESS, lang="en", progress=False)
    positions = [-1, -2, -3, -4]
    full = select_direction(tiny_model, cands, HARMFUL, HARMLESS, tokens, exhaustive=True, positions=positions,
                            config=SelectionConfig("loose", None, None, 1.0), progress=False)
    kls = sorted(s.kl for s in full.scores)
    cut = kls[len(kls) // 2] + 1e-9
    # Arditi-like (KL and an induce threshold nothing meets) falling back to a filter without induce.
    strict = SelectionConfig("strict", kl_max=cut, induce_min=1e9, max_layer_frac=1.0)
    loose = SelectionConfig("loose", kl_max=None, induce_min=None, max_layer_frac=1.0)
    lazy = select_direction(tiny_model, cands, HARMFUL, HARMLESS, tokens, config=strict, fallback=loose,
                            positions=positions, progress=False)
    want = min(full.scores, key=lambda s: s.bypass)
    assert (lazy.direction.position, lazy.direction.layer) == (want.position, want.layer)
    assert lazy.fallback_from == "strict"
    for s in lazy.scores:
        assert s.kl is not None
        chosen = (s.position, s.layer) == (want.position, want.layer)
        assert (s.induce is None) == (s.kl >= cut and not chosen)
    assert lazy.direction.meta["selection"]["induce"] == pytest.approx(
        next(s.induce for s in full.scores if (s.position, s.layer) == (want.position, want.layer)), abs=1e-5)


@pytest.mark.tiny
def test_evaluation_scores_come_from_generation_first_step_and_equal_a_separate_forward(tiny_model):
    from refusal_circuits.data import PromptRecord, PromptSet
    from refusal_circuits.evaluation import evaluate_refusal, generate_ids

    tokens = refusal_tokens_from_strings(tiny_model.tokenizer, ["I", "S"], langs=["en"])
    first: list = []
    generate_ids(tiny_model, HARMFUL + HARMLESS, max_new_tokens=3, batch_size=3, progress=False, first_logits=first)
    separate = first_token_logits(tiny_model, HARMFUL + HARMLESS)
    assert torch.allclose(torch.stack(first), separate.float(), atol=1e-4)
    records = tuple(PromptRecord(f"p{i}", "en", "harmful", text) for i, text in enumerate(HARMFUL))
    ev = evaluate_refusal(tiny_model, PromptSet(records, "t"), max_new_tokens=3, refusal_tokens=tokens,
                          progress=False)
    want = float(refusal_score(separate[: len(HARMFUL)], tokens.ids).mean())
    assert ev.results["en"]["harmful"].refusal_score == pytest.approx(want, abs=1e-4)


@pytest.mark.unit
def test_refusal_tokens_from_judged_completions_need_count_and_precision():
    """Per language: a token that begins >= 2 refusals and >= 80% refusals among the answers it begins."""
    from refusal_circuits.scores import refusal_tokens_from_completions

    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"

    rows = [("fr", 10, True), ("fr", 10, True), ("fr", 10, True), ("fr", 10, False),  # 3/4 = 75%: not enough
            ("fr", 11, True), ("fr", 11, True),                                           # 2/2: kept
            ("fr", 12, True),                                                             # 1 refusal: too few
            ("de", 11, False), ("de", 11, False), ("de", None, True)]                     # empty answer skipped
    got = refusal_tokens_from_completions(Tok(), [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                          report=["fr", "de", "ja"], native=False)
    assert got.by_lang == {"fr": (11,), "de": (), "ja": ()}
    assert got.origin == {"fr": "discovered", "de": "none", "ja": "none"}
    assert got.strings == {11: "<11>"} and got.counts["fr"][10] == (3, 1)


def test_a_language_that_never_refuses_gets_its_native_refusal_openers_not_english():
    """English "I" must not stand in for German: with no German refusal to learn from, German's tokens are the
    first tokens of its native refusal phrases, minus any that began a compliant German answer."""
    from refusal_circuits.scores import native_refusal_tokens, refusal_tokens_from_completions
    from tests.helpers import qwen_tokenizer

    tok = qwen_tokenizer()  # bytes: every phrase's first token is its first byte
    native = native_refusal_tokens(tok, "de")
    assert native == ()  # single letters begin too many words: a byte tokenizer has no native openers
    vocab = {"Es": 1, "Ent": 2, "Ich": 3, "Le": 4, "I": 5, "Hier": 6}

    class WordTok:
        def __call__(self, s, add_special_tokens=False):
            return {"input_ids": [vocab[next(w for w in sorted(vocab, key=len, reverse=True) if s.startswith(w))]]}

        def decode(self, ids):
            return {v: k for k, v in vocab.items()}[ids[0]]

    assert set(native_refusal_tokens(WordTok(), "de")) == {1, 2, 3, 4}
    got = refusal_tokens_from_completions(WordTok(), ["en", "en", "de", "de"], [5, 5, 3, 6],
                                          [True, True, False, False])
    assert got.by_lang["en"] == (5,) and got.origin["en"] == "discovered"
    assert set(got.by_lang["de"]) == {1, 2, 4} and got.origin["de"] == "native phrases"  # "Ich" began an answer
    assert got.for_lang("de") != got.for_lang("en")
    again = type(got).from_json(got.to_json())
    assert again.origin == got.origin
