"""Attribution on the real packaged Qwen2.5-Coder-0.5B-Instruct (packaged tier; run in CI).

Exact identities on real heads (completeness at every layer and position, DLA against the model's own logits,
zero ablation against the direct score) and the behaviour they should show on prompts the direction never saw.
"""

from __future__ import annotations

import pytest
import torch

from refusal_circuits import hooks
from refusal_circuits.attribution import attribute, top_k_heads
from refusal_circuits.data import load_bundled
from refusal_circuits.forward import batches
from refusal_circuits.patching import ablate_heads, total_effects

pytestmark = pytest.mark.packaged


@pytest.fixture(scope="module")
def result(packaged_model, packaged_selection):
    from refusal_circuits.data import PromptSet

    prompts = load_bundled(["en", "de"]).filter(split="test")
    chosen = PromptSet(tuple(prompts.filter(lang="en").head(12)) + tuple(prompts.filter(lang="de").head(6)),
                       prompts.source)
    return attribute(packaged_model, packaged_selection.direction, chosen, batch_size=12, progress=False)


def test_completeness_on_real_heads_every_layer_and_position(result):
    scale = float(result.resid.abs().max())
    err = result.completeness_error()
    assert scale > 10  # the real stream carries r̂ strongly somewhere
    assert err < 1e-4 * scale, (err, scale)


def test_dla_equals_the_models_logit_difference(packaged_model, result):
    dla = result.dla
    assert dla is not None and dla.completeness_error() < 1e-3
    assert dla.targets.refusal["en"] and dla.targets.compliance["en"]
    # An independent check for two prompts: a plain Hugging Face forward, full logits.
    hf = packaged_model.original_model
    for i in (0, result.n_prompts - 1):
        text = [r for r in load_bundled([result.langs[i]]) if r.id == result.ids[i]][0].instruction
        _, batch = next(iter(batches(packaged_model, [text], 1)))
        logits = hf(input_ids=batch.input_ids).logits[0, -1].double()
        lang = result.langs[i]
        want = logits[list(dla.targets.refusal[lang])].mean() - logits[list(dla.targets.compliance[lang])].mean()
        assert abs(float(dla.logit_diff[i]) - float(want)) < 1e-3


def test_the_direction_is_present_on_unseen_english_harmful_prompts(result, packaged_selection):
    d = packaged_selection.direction
    en = result.select(lang="en")
    proj = en.resid[:, d.layer, d.position]
    harmful = proj[[i for i, lab in enumerate(en.labels) if lab == "harmful"]]
    harmless = proj[[i for i, lab in enumerate(en.labels) if lab == "harmless"]]
    assert float(harmful.mean() - harmless.mean()) > 0.5 * d.norm, (harmful.mean(), harmless.mean(), d.norm)
    # ... and the components below r̂'s layer explain it: the top 20 heads by gap carry a real share of it
    h = en.select(label="harmful").head_scores(d.position).mean(0)[: d.layer]
    s = en.select(label="harmless").head_scores(d.position).mean(0)[: d.layer]
    gap = h - s
    top = top_k_heads(gap, 20)
    assert sum(float(gap[layer, head]) for layer, head in top) > 0.2 * float(harmful.mean() - harmless.mean())


def test_sources_and_attention_mass_are_consistent_on_real_heads(result):
    assert torch.allclose(result.sources.sum(-1), result.heads[..., -result.n_post:], atol=1e-4)
    assert torch.allclose(result.attn_mass.sum(-1), torch.ones_like(result.attn_mass[..., 0]), atol=1e-4)


def test_zero_ablation_of_a_real_head_moves_resid_mid_by_its_direct_score(packaged_model, packaged_selection, result):
    d = packaged_selection.direction
    r = d.vector / d.vector.norm()
    en = result.select(lang="en", label="harmful")
    gap = en.head_scores(d.position).mean(0)
    (layer, head), = top_k_heads(gap[: d.layer], 1)
    text = [p for p in load_bundled(["en"]) if p.id == en.ids[0]][0].instruction
    _, batch = next(iter(batches(packaged_model, [text], 1)))
    seen = []
    hf = packaged_model.original_model
    with hooks.add_hooks(packaged_model, [(hooks.resid_mid(layer), lambda x, _n: seen.append(x[0] @ r))]):
        hf(input_ids=batch.input_ids)
        with ablate_heads(packaged_model, [(layer, head)]):
            hf(input_ids=batch.input_ids)
    n = batch.input_ids.shape[1]
    delta = seen[1] - seen[0]
    assert torch.allclose(delta, -en.heads[0, layer, head, -n:], atol=2e-3), (delta - -en.heads[0, layer, head, -n:]).abs().max()
    assert hooks.count_hooks(packaged_model) == 0


def test_total_effects_of_the_top_heads(packaged_model, packaged_selection, result):
    d = packaged_selection.direction
    en = result.select(lang="en")
    gap = en.select(label="harmful").head_scores().mean(0) - en.select(label="harmless").head_scores().mean(0)
    heads = top_k_heads(gap[: d.layer], 2)
    english = load_bundled(["en"]).filter(split="val")
    effects = total_effects(packaged_model, d, english.filter(label="harmful").instructions[:8],
                            english.filter(label="harmless").instructions[:8], heads,
                            d.meta["refusal_tokens"]["ids"]["en"], batch_size=8, progress=False)
    assert [(e.layer, e.head) for e in effects.effects] == heads
    # Patching the harmless mean into harmful runs must lower refusal for at least one of the top r̂ writers,
    # and moves the r̂ projection by at least the head's direct gap in the same direction on average.
    assert min(e.patch_harmful for e in effects.effects) < 0
    assert sum(e.projection_harmful for e in effects.effects) < 0
    assert hooks.count_hooks(packaged_model) == 0
    assert "Direct vs total" in effects._repr_html_()


def test_attribution_patching_on_the_real_model_passes_its_checks_and_tracks_exact_patching(packaged_model,
                                                                                            packaged_selection):
    """On the real model the run-time checks run (the MLP below r̂ exactly, that layer's largest head as the
    derivative of exact patching: the check that caught a head wrongly taken as linear), and on the heads with the
    largest refusal-score estimates AtP follows exact patching (measured within 10% on 16 prompts; here 8)."""
    from refusal_circuits.atp import attribution_patching, validate_atp

    d = packaged_selection.direction
    test = load_bundled(["en"]).filter(split="test")
    harmful = test.filter(label="harmful").instructions[:8]
    harmless = test.filter(label="harmless").instructions[:8]
    refusal = packaged_selection.refusal_tokens.for_lang("en")
    est = attribution_patching(packaged_model, d, harmful, harmless, refusal, batch_size=8, progress=False)
    assert est.linear_check is not None
    val = validate_atp(packaged_model, d, harmful, harmless, refusal, est, n_top=6, n_random=2, batch_size=8,
                       progress=False)
    heads = [(e, x) for n, e, x in zip(val.nodes, val.estimate["score"], val.exact["score"], strict=True)
             if n[0] == "head" and abs(x) > 0.05]
    assert heads, "no head among the largest estimates moves the refusal score"
    for e, x in heads:
        assert abs(e - x) < 0.25 * abs(x) + 0.02, (e, x)
    assert val.spearman("score") > 0.8
    assert hooks.count_hooks(packaged_model) == 0
