"""Controls of the paired comparison (issue 17, item 7): difference in differences, contrast correlations and their
English-vs-English null, the value-bias term, cross-fitted patching. Synthetic records with known truth (unit) and
the tiny model (tiny)."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_circuits import crosslingual as xl
from refusal_circuits.attribution import Attribution, attribute
from refusal_circuits.chat import Span
from refusal_circuits.crosslingual.controls import value_bias_writes
from refusal_circuits.crosslingual.crossfit import crossfit_patch_top_heads, losing_of
from refusal_circuits.data import PromptRecord, PromptSet
from refusal_circuits.stats import did_stats


def four_groups(en_h: torch.Tensor, xx_h: torch.Tensor, en_s: torch.Tensor, xx_s: torch.Tensor) -> Attribution:
    """A hand-built attribution: English and 'translated' harmful prompts (ids h*) and harmless prompts (ids s*),
    head scores given ``[prompt, layer, head]`` (the same at both post-instruction positions)."""
    groups = [(en_h, "en", "harmful", "h"), (xx_h, "xx", "harmful", "h"), (en_s, "en", "harmless", "s"),
              (xx_s, "xx", "harmless", "s")]
    scores = torch.cat([g[0] for g in groups])
    n, n_layers, n_heads = scores.shape
    s, n_post = 6, 2
    heads = torch.zeros(n, n_layers, n_heads, s)
    heads[..., -n_post:] = scores[..., None].expand(-1, -1, -1, n_post)
    mlps, embed = torch.zeros(n, n_layers, s), torch.zeros(n, s)
    resid = torch.cat([torch.zeros(n, 1, s), torch.cumsum(heads.sum(2) + mlps, 1)], 1)
    spans = torch.full((n, s), int(Span.PREFIX))
    spans[:, -n_post:] = int(Span.POST)
    sources = torch.zeros(n, n_layers, n_heads, n_post, len(Span))
    sources[..., int(Span.INSTRUCTION)] = heads[..., -n_post:]
    mass = torch.zeros_like(sources)
    mass[..., int(Span.INSTRUCTION)] = 1.0
    ids = [f"{p}{i}" for t, _, _, p in groups for i in range(len(t))]
    return Attribution(embed=embed, heads=heads, mlps=mlps, attn_bias=None, resid=resid,
                       mask=torch.ones(n, s, dtype=torch.long), spans=spans, sources=sources, attn_mass=mass, dla=None,
                       ids=ids, langs=[g[1] for g in groups for _ in range(len(g[0]))],
                       labels=[g[2] for g in groups for _ in range(len(g[0]))], tokens=[["t"] * s] * n, model="fake",
                       direction={"layer": 2, "position": -1, "lang": "en"})


def noisy(shape: tuple[int, ...], g: torch.Generator, sd: float = 0.05) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * sd


@pytest.mark.unit
def test_a_language_wide_offset_is_significant_harmful_only_but_not_after_the_harmless_control():
    g = torch.Generator().manual_seed(0)
    n, shape = 24, (3, 4)
    profile = torch.linspace(-1, 1, 12).view(shape)
    en_h, en_s = profile + noisy((n, *shape), g, 0.2), 0.3 * profile + noisy((n, *shape), g, 0.2)
    xx_h = en_h + 0.5 + noisy((n, *shape), g)  # every translated write shifted by 0.5, whatever the label
    xx_s = en_s + 0.5 + noisy((n, *shape), g)
    res = xl.paired_heads(four_groups(en_h, xx_h, en_s, xx_s), "en", "xx", n_boot=500, n_perm=1000)
    assert res.n_significant() == 12  # harmful only: the offset reads as a change in every head
    c = res.controls
    assert c is not None and c.n_harmful == c.n_harmless == n
    assert c.n_did_significant() == 0, c.did["q"]
    assert float(c.did["mean"].abs().max()) < 0.05
    assert torch.all((c.did["ci_low"] < 0) & (c.did["ci_high"] > 0))
    # The harmful-only numbers sit beside the difference in differences.
    assert torch.allclose(c.did["harmful_mean"], res.heads["mean"])
    row = res.to_json(3)["heads"][0]
    assert row["significant"] and not row["did_significant"] and row["harmful_diff"] == pytest.approx(row["mean"])


@pytest.mark.unit
def test_a_head_that_loses_only_on_harmful_prompts_is_flagged_by_the_difference_in_differences():
    g = torch.Generator().manual_seed(1)
    n, shape = 24, (3, 4)
    profile = torch.linspace(-1, 1, 12).view(shape)
    en_h, en_s = profile + noisy((n, *shape), g, 0.2), noisy((n, *shape), g, 0.2)
    xx_h, xx_s = en_h + 0.3 + noisy((n, *shape), g), en_s + 0.3 + noisy((n, *shape), g)
    xx_h[:, 1, 2] -= 0.8  # L1.H2 loses on harmful prompts only
    res = xl.paired_heads(four_groups(en_h, xx_h, en_s, xx_s), "en", "xx", n_boot=500, n_perm=1000)
    c = res.controls
    assert c is not None
    assert c.ranked_did(1) == [(1, 2)] and bool(c.did["significant"][1, 2])
    assert float(c.did["mean"][1, 2]) == pytest.approx(-0.8, abs=0.05)
    assert float(c.did["ci_low"][1, 2]) < -0.8 < float(c.did["ci_high"][1, 2])
    assert c.n_did_significant() <= 2  # the planted head, at most one chance finding
    div = xl.divergence(four_groups(en_h, xx_h, en_s, xx_s), "en")
    text = div.languages["xx"].summary()
    assert "After the harmless control (difference in differences" in text and "L1.H2 (-0.8" in text
    obj = json.loads(json.dumps(div.to_json(), allow_nan=False))
    assert obj["languages"]["xx"]["n_did_significant"] == c.n_did_significant()
    first = obj["languages"]["xx"]["controls"]["did_heads"][0]
    assert (first["layer"], first["head"], first["did_significant"]) == (1, 2, True)


@pytest.mark.unit
def test_did_stats_resamples_both_groups_and_matches_the_plain_estimator():
    g = torch.Generator().manual_seed(2)
    d, e = torch.randn(15, 3, generator=g) + 1.0, torch.randn(40, 3, generator=g) + 1.0
    st = did_stats(d, e, n_boot=4000)
    assert torch.allclose(st["mean"], d.double().mean(0) - e.double().mean(0))
    # The interval's width follows sqrt(var_d / n_d + var_e / n_e), not a paired difference's.
    se = (d.double().var(0) / 15 + e.double().var(0) / 40).sqrt()
    width = st["ci_high"] - st["ci_low"]
    assert torch.allclose(width, 2 * 1.96 * se, rtol=0.2)


@pytest.mark.unit
def test_a_shared_constant_inflates_the_raw_correlation_but_not_the_contrast_correlation():
    """Per head a prompt-invariant part (the same in both languages and labels, like a value bias) plus a
    refusal contrast unrelated between the languages: raw Spearman is high, the contrasts' is not."""
    g = torch.Generator().manual_seed(3)
    n, shape = 32, (6, 8)
    constant = torch.randn(shape, generator=g) * 5.0
    r_en, r_xx = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    en_h, en_s = constant + r_en + noisy((n, *shape), g, 0.1), constant + noisy((n, *shape), g, 0.1)
    xx_h, xx_s = constant + r_xx + noisy((n, *shape), g, 0.1), constant + noisy((n, *shape), g, 0.1)
    res = xl.paired_heads(four_groups(en_h, xx_h, en_s, xx_s), "en", "xx", n_boot=300, n_perm=300)
    c = res.controls.correlations
    assert res.rank_correlation > 0.8 and c["raw_rank_correlation"] == pytest.approx(res.rank_correlation)
    truth = xl.spearman(r_en, r_xx)
    assert abs(c["rank_correlation"] - truth) < 0.1 and c["rank_correlation"] < 0.4
    assert c["rank_correlation_ci_low"] < c["rank_correlation"] < c["rank_correlation_ci_high"]
    assert c["raw_rank_correlation_ci_low"] > 0.7


@pytest.mark.unit
def test_english_vs_english_null_is_near_the_ceiling_on_same_distribution_data():
    """The translation uses exactly the English heads: the null (English half vs English half) and the same
    statistic English half vs translation half both sit near 1, the latter inside the null's interval; a
    translation with other heads falls far below the null."""
    g = torch.Generator().manual_seed(4)
    n, shape = 32, (4, 6)
    contrast = torch.randn(shape, generator=g)
    en_h, en_s = contrast + noisy((n, *shape), g, 0.3), noisy((n, *shape), g, 0.3)
    xx_h, xx_s = contrast + noisy((n, *shape), g, 0.3), noisy((n, *shape), g, 0.3)
    c = xl.paired_heads(four_groups(en_h, xx_h, en_s, xx_s), "en", "xx", n_boot=300, n_perm=300).controls
    r = c.correlations
    assert r["null_rank_correlation"] > 0.9
    assert r["null_rank_correlation_ci_low"] <= r["halves_rank_correlation"] <= 1.0
    # Resampled means are noisier than the sample's, so near the ceiling the percentile interval sits below the
    # estimate; the null and the halves statistic are resampled alike, so they compare with each other.
    assert 0.9 < r["null_rank_correlation_ci_low"] < r["null_rank_correlation_ci_high"] <= 1.0
    assert abs(r["halves_rank_correlation"] - r["null_rank_correlation"]) < 0.05
    other = contrast.flatten()[torch.randperm(contrast.numel(), generator=g)].view(shape)
    xx_h2 = other + noisy((n, *shape), g, 0.3)
    c2 = xl.paired_heads(four_groups(en_h, xx_h2, en_s, xx_s), "en", "xx", n_boot=300, n_perm=300).controls
    assert c2.correlations["halves_rank_correlation"] < c2.correlations["null_rank_correlation_ci_low"] - 0.3


@pytest.mark.unit
def test_without_harmless_pairs_the_controls_are_null_with_reasons():
    g = torch.Generator().manual_seed(5)
    en_h = torch.randn(6, 2, 3, generator=g)
    att = four_groups(en_h, en_h + 0.1, torch.zeros(0, 2, 3), torch.zeros(0, 2, 3))
    res = xl.paired_heads(att, "en", "xx", n_boot=100, n_perm=100)
    obj = json.loads(json.dumps(xl.divergence(att, "en").to_json(), allow_nan=False))["languages"]["xx"]
    assert obj["controls"]["correlations"]["rank_correlation"] is None
    assert "harmless" in obj["controls"]["correlations"]["rank_correlation_why"]
    assert obj["heads"][0]["did"] is None and obj["heads"][0]["did_why"]
    assert res.controls.n_did_significant() == 0
    assert obj["controls"]["value_bias"] is None and "model" in obj["controls"]["value_bias_why"]


@pytest.mark.tiny
def test_value_bias_term_is_exact(tiny_model):
    """With every value projection's weight zeroed, each head's output is its value bias alone (attention sums to
    1), so its attributed write at every post-instruction token must equal :func:`value_bias_writes`."""
    r = torch.randn(int(tiny_model.cfg.d_model), generator=torch.Generator().manual_seed(0))
    vb, why = value_bias_writes(tiny_model, r)
    assert why is None and vb is not None and float(vb.abs().max()) > 1e-3  # the tiny Qwen2 has random biases
    layers = tiny_model.original_model.model.layers
    saved = [layer.self_attn.v_proj.weight.detach().clone() for layer in layers]
    prompts = PromptSet((PromptRecord("p0", "en", "harmful", "tell me a story"),
                         PromptRecord("p1", "en", "harmful", "how to bake bread")), "t")
    try:
        with torch.no_grad():
            for layer in layers:
                layer.self_attn.v_proj.weight.zero_()
        att = attribute(tiny_model, r, prompts, dla=False, progress=False)
    finally:
        with torch.no_grad():
            for layer, w in zip(layers, saved, strict=True):
                layer.self_attn.v_proj.weight.copy_(w)
    post = att.heads[..., -att.n_post:]  # [prompt, layer, head, post]
    assert torch.allclose(post, vb[None, :, :, None].expand_as(post), atol=1e-5)
    # The source split spreads it by attention mass; taking it out leaves nothing in any span.
    rest = att.sources - att.attn_mass * vb[None, :, :, None, None]
    assert float(rest.abs().max()) < 1e-5


@pytest.mark.tiny
def test_cross_fitting_chooses_on_one_half_and_measures_on_the_other(tiny_model):
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.patching import patch_pairs

    texts = ["tell me a story", "what is the capital of peru", "how to bake bread", "name three colours",
             "write a haiku about rain", "explain gravity briefly", "list some fruit", "why do cats purr"]
    cats = ["a", "a", "a", "a", "b", "b", "b", "b"]
    other = [" ".join(t.split()[::-1]) + " please" for t in texts]
    prompts = PromptSet(tuple(PromptRecord(f"p{i}", lang, "harmful", ts[i], extra={"category": cats[i]})
                              for lang, ts in (("en", texts), ("bb", other)) for i in range(len(texts))), "t")
    d = extract_candidates(tiny_model, texts, other, progress=False).direction(-1, 1)
    tokens = [tiny_model.tokenizer("I")["input_ids"][0]]
    att = attribute(tiny_model, d, prompts, dla=False, batch_size=4, progress=False)
    got, skipped = crossfit_patch_top_heads(tiny_model, d, att, prompts, "en", ["bb"], 2, tokens, batch_size=3,
                                            n_boot=200, progress=False)
    assert not skipped
    cf = got["bb"]
    a, b = cf.folds
    assert set(a.chosen_on).isdisjoint(a.measured_on) and set(b.chosen_on).isdisjoint(b.measured_on)
    assert set(a.chosen_on) == set(b.measured_on) and set(a.measured_on) == set(b.chosen_on)
    assert set(a.chosen_on) | set(a.measured_on) == {f"p{i}" for i in range(8)}
    for fold in (a, b):  # stratified: each half holds half of every category
        assert sorted(cats[int(i[1:])] for i in fold.chosen_on) == ["a", "a", "b", "b"]
    scores = att.head_scores()
    row = {(pid, lang): i for i, (pid, lang) in enumerate(zip(att.ids, att.langs, strict=True))}
    for fold in (a, b):
        chosen = (scores[[row[(p, "bb")] for p in fold.chosen_on]] - scores[[row[(p, "en")] for p in fold.chosen_on]])
        assert fold.heads == losing_of(chosen.mean(0), 2)  # chosen on the choosing half alone
        if fold.heads:
            alone = patch_pairs(tiny_model, d, [texts[int(p[1:])] for p in fold.measured_on],
                                [other[int(p[1:])] for p in fold.measured_on], fold.heads, tokens, batch_size=5)
            assert fold.fraction == pytest.approx(alone.fraction, abs=1e-4, nan_ok=True)
    s = cf.stats
    assert s["fraction"] == pytest.approx((s["fold_a_fraction"] + s["fold_b_fraction"]) / 2, nan_ok=True)
    json.dumps(cf.to_json(), allow_nan=False)
