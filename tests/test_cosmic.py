"""COSMIC selection (issue 18, item 4): readout layers and scores against plain Hugging Face forwards and the library's
own interventions on a tiny random model; agreement with an Arditi-style selection."""

from __future__ import annotations

import pytest
import torch

from tests.test_harm import HARMFUL, HARMLESS

pytestmark = pytest.mark.tiny


@pytest.fixture(scope="module")
def cands(tiny_model):
    from refusal_circuits.directions import extract_candidates

    return extract_candidates(tiny_model, HARMFUL[1::2], HARMLESS[1::2], lang="en", progress=False)


def _hf_last(model, texts, layer):
    """Mean resid_pre[layer] at the last token, each prompt run alone by plain Hugging Face."""
    from refusal_circuits.chat import tokenize_chat

    rows = []
    for text in texts:
        batch = tokenize_chat(model.tokenizer, [text])
        with torch.no_grad():
            out = model.original_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       output_hidden_states=True)
        rows.append(out.hidden_states[layer][0, -1].double())
    return torch.stack(rows).mean(0)


def test_readout_layers_and_scores_are_what_the_definition_says(tiny_model, cands):
    from refusal_circuits.activations import site_activations
    from refusal_circuits.cosmic import cosmic_select
    from refusal_circuits.interventions import ablate, actadd
    from refusal_circuits.scores import first_token_logits, kl_divergence

    harmful, harmless = HARMFUL[::2], HARMLESS[::2]
    got = cosmic_select(tiny_model, cands, harmful, harmless, layer_frac=0.5, kl_max=None, max_layer_frac=1.0,
                        batch_size=3, progress=False)
    # two layers: layer 1 is the only one after the first, so it is the readout layer
    assert got.readout_layers == (1,)
    mu_h, mu_b = _hf_last(tiny_model, harmful, 1), _hf_last(tiny_model, harmless, 1)
    assert got.baseline_similarity == pytest.approx(float(torch.cosine_similarity(mu_h, mu_b, dim=0)), abs=1e-5)
    s = next(x for x in got.scores if (x.position, x.layer) == (-2, 1))
    d = cands.direction(-2, 1)
    with ablate(tiny_model, d):
        ab = site_activations(tiny_model, {"h": harmful}, 1, -1, progress=False)["h"].mean(0)
        kl = float(kl_divergence(first_token_logits(tiny_model, harmless), first_token_logits(tiny_model, harmless)
                                 ).mean())
    with actadd(tiny_model, d):
        ad = site_activations(tiny_model, {"b": harmless}, 1, -1, progress=False)["b"].mean(0)
    assert s.ablation == pytest.approx(float(torch.cosine_similarity(ab, mu_b, dim=0)), abs=1e-5)
    assert s.induction == pytest.approx(float(torch.cosine_similarity(ad, mu_h, dim=0)), abs=1e-5)
    assert kl == pytest.approx(0.0, abs=1e-9) and s.kl >= 0
    best = max(got.passing(), key=lambda x: x.score)
    assert (got.direction.position, got.direction.layer) == (best.position, best.layer)
    assert got.direction.meta["selection"]["strategy"] == "cosmic" and "<table" in got._repr_html_()
    from refusal_circuits.hooks import count_hooks

    assert count_hooks(tiny_model) == 0


def test_agreement_with_an_arditi_style_selection(tiny_model, cands):
    from refusal_circuits.cosmic import cosmic_select, selection_agreement
    from refusal_circuits.scores import RefusalTokens
    from refusal_circuits.selection import POLYREFUSE, select_direction

    harmful, harmless = HARMFUL[::2], HARMLESS[::2]
    tokens = RefusalTokens({"en": (5, 7)})
    arditi = select_direction(tiny_model, cands, harmful, harmless, tokens, config=POLYREFUSE.__class__(
        "loose", kl_max=None, induce_min=None, max_layer_frac=1.0), exhaustive=True, batch_size=3, progress=False)
    cosmic = cosmic_select(tiny_model, cands, harmful, harmless, kl_max=None, max_layer_frac=1.0, batch_size=3,
                           progress=False)
    agree = selection_agreement(cosmic, arditi)
    assert agree.n_common == len(cosmic.scores) == len(arditi.scores)
    assert agree.same_site == ((cosmic.direction.position, cosmic.direction.layer)
                               == (arditi.direction.position, arditi.direction.layer))
    assert agree.cosine == pytest.approx(float(cosmic.direction.vector @ arditi.direction.vector), abs=1e-6)
    assert -1.0 <= agree.rank_correlation <= 1.0 and "same_site" in agree.to_json()


def test_bad_input_is_refused(tiny_model, cands):
    from refusal_circuits.cosmic import cosmic_select
    from refusal_circuits.errors import InputError

    with pytest.raises(InputError, match="validation prompts"):
        cosmic_select(tiny_model, cands, [], HARMLESS, progress=False)
    with pytest.raises(InputError, match="layer_frac"):
        cosmic_select(tiny_model, cands, HARMFUL, HARMLESS, layer_frac=0.0, progress=False)
    with pytest.raises(InputError, match="KL filter"):
        cosmic_select(tiny_model, cands, HARMFUL[:2], HARMLESS[:2], kl_max=-1.0, max_layer_frac=1.0, progress=False)
