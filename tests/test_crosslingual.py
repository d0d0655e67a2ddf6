"""Cross-lingual statistics (unit) and the paired comparison on a tiny model (tiny)."""

from __future__ import annotations

import pytest
import torch

from refusal_circuits import crosslingual as xl
from refusal_circuits.attribution import Attribution, attribute, concat_attributions
from refusal_circuits.chat import Span, chat_format
from refusal_circuits.data import PromptRecord, PromptSet
from refusal_circuits.errors import InputError


@pytest.mark.unit
def test_auroc_cohens_d_spearman_known_values():
    assert xl.auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert xl.auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert xl.auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert xl.cohens_d(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0])) == pytest.approx(1 / 2 ** 0.5)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert xl.spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert xl.spearman(a, -a) == pytest.approx(-1.0)
    assert xl.spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.8660254)


@pytest.mark.unit
def test_benjamini_hochberg_matches_the_textbook_procedure():
    p = torch.tensor([0.01, 0.04, 0.03, 0.005, 0.5])
    q = xl.benjamini_hochberg(p)
    # sorted: .005 .01 .03 .04 .5 -> *5/rank: .025 .025 .05 .05 .5 -> cummin from the top
    assert torch.allclose(q, torch.tensor([0.025, 0.05, 0.05, 0.025, 0.5], dtype=torch.float64))


@pytest.mark.unit
def test_paired_stats_zero_differences_are_never_significant_and_large_ones_are():
    zero = xl.paired_stats(torch.zeros(20, 3))
    assert torch.all(zero["p"] == 1.0) and torch.all(zero["mean"] == 0)
    g = torch.Generator().manual_seed(0)
    shifted = torch.randn(30, 2, generator=g) * 0.1 + torch.tensor([1.0, 0.0])
    st = xl.paired_stats(shifted)
    assert st["p"][0] < 0.001 and st["ci_low"][0] > 0.8 and st["ci_high"][0] < 1.2
    assert st["p"][1] > 0.01
    with pytest.raises(InputError, match="at least 2"):
        xl.paired_stats(torch.zeros(1, 3))


def fake_attribution(base_heads: torch.Tensor, other_heads: torch.Tensor) -> Attribution:
    """A hand-built attribution of n English prompts and their n 'translations' (heads given, post positions)."""
    n, n_layers, n_heads = base_heads.shape
    s, n_post = 6, 2
    heads = torch.zeros(2 * n, n_layers, n_heads, s)
    # the same write at every post-instruction position, so head_scores("post") (their mean) is the given score
    heads[..., -n_post:] = torch.cat([base_heads, other_heads])[..., None].expand(-1, -1, -1, n_post)
    mlps = torch.zeros(2 * n, n_layers, s)
    embed = torch.zeros(2 * n, s)
    resid = torch.cat([torch.zeros(2 * n, 1, s), torch.cumsum(heads.sum(2) + mlps, 1)], 1)
    spans = torch.full((2 * n, s), int(Span.PREFIX))
    spans[:, -n_post:] = int(Span.POST)
    sources = torch.zeros(2 * n, n_layers, n_heads, n_post, len(Span))
    sources[..., int(Span.INSTRUCTION)] = heads[..., -n_post:]
    return Attribution(embed=embed, heads=heads, mlps=mlps, attn_bias=None, resid=resid,
                       mask=torch.ones(2 * n, s, dtype=torch.long), spans=spans, sources=sources,
                       attn_mass=torch.zeros_like(sources), dla=None, ids=[f"p{i}" for i in range(n)] * 2,
                       langs=["en"] * n + ["xx"] * n, labels=["harmful"] * (2 * n), tokens=[["t"] * s] * (2 * n),
                       model="fake", direction={"layer": 2, "position": -1, "lang": "en"})


@pytest.mark.unit
def test_paired_heads_finds_the_planted_loss_and_nothing_else():
    g = torch.Generator().manual_seed(1)
    n = 24
    base = torch.randn(n, 3, 4, generator=g) * 0.2 + torch.linspace(-1, 1, 12).view(3, 4)
    other = base + torch.randn(n, 3, 4, generator=g) * 0.05
    other[:, 1, 2] -= 0.8  # the translation loses head L1.H2
    res = xl.paired_heads(fake_attribution(base, other), "en", "xx")
    top = res.ranked_heads(1)[0]
    assert (top["layer"], top["head"]) == (1, 2) and top["significant"] and top["mean"] == pytest.approx(-0.8, abs=0.05)
    assert res.n_significant() <= 2  # BH at 5%: one planted + at most a chance finding
    assert res.pattern.startswith("same heads")
    assert res.spans["mean"][int(Span.INSTRUCTION)] == pytest.approx(float((other - base).sum((1, 2)).mean()), abs=1e-5)
    html = res._repr_html_()
    assert "L1.H2" in html


@pytest.mark.unit
def test_weaker_and_different_heads_are_told_apart():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(16, 4, 4, generator=g) * 0.05 + torch.randn(4, 4, generator=g)
    weaker = xl.paired_heads(fake_attribution(base, 0.4 * base), "en", "xx")
    assert weaker.pattern == "same heads, weaker" and weaker.rank_correlation > 0.9 and weaker.slope < 0.5
    shuffled = base[:, torch.randperm(4, generator=g)][:, :, torch.randperm(4, generator=g)]
    different = xl.paired_heads(fake_attribution(base, shuffled.flip(1)), "en", "xx")
    assert different.pattern == "different heads"


@pytest.mark.unit
def test_trajectory_split_layer():
    base = torch.zeros(10, 3, 4)
    base[:, 0, 0] = 1.0  # layer 0 head writes 1 onto r̂
    other = base.clone()
    other[:, 1, 0] = -1.0  # from layer 1 on, the translation loses it
    other += torch.randn(10, 3, 4, generator=torch.Generator().manual_seed(0)) * 0.01
    att = fake_attribution(base, other)
    split, traj = xl.trajectory_split_layer(att, "en", "xx")
    assert split == 2  # resid index 2 = resid_pre[2], the first after layer 1's write
    assert traj["base"][3] == pytest.approx(1.0)


@pytest.mark.tiny
def test_an_identical_translation_flags_nothing(tiny_model):
    """The English prompts relabelled as another language, attributed in differently composed batches: float
    noise only, so no head, no trajectory split."""
    texts = ["tell me a story", "what is the capital of peru", "how to bake bread", "name three colours",
             "write a haiku about rain", "explain gravity briefly", "list some fruit", "why do cats purr"]
    en = PromptSet(tuple(PromptRecord(f"p{i}", "en", "harmful", t) for i, t in enumerate(texts)), "t")
    xx = PromptSet(tuple(PromptRecord(f"p{i}", "xx", "harmful", t) for i, t in enumerate(texts)), "t")
    extra = PromptSet(tuple(PromptRecord(f"q{i}", "xx", "harmless", "a much longer filler prompt " * 3)
                            for i in range(3)), "t")
    r = torch.randn(int(tiny_model.cfg.d_model), generator=torch.Generator().manual_seed(0))
    a = attribute(tiny_model, r, en, dla=False, batch_size=3, progress=False)
    b = attribute(tiny_model, r, PromptSet(tuple(xx) + tuple(extra), "t"), dla=False, batch_size=5, progress=False)
    both = concat_attributions([a, b])
    res = xl.paired_heads(both, "en", "xx")
    assert res.n_pairs == len(texts)
    assert res.n_significant() == 0, res.ranked_heads(3)
    assert float(res.heads["mean"].abs().max()) < 1e-5
    split, _ = xl.trajectory_split_layer(both, "en", "xx")
    assert split is None


@pytest.mark.tiny
def test_patching_every_language_from_one_base_run_equals_patching_each_alone(tiny_model):
    """``patch_top_heads`` runs the base language once for all languages; each language's numbers must equal a
    :func:`patch_pairs` of its own (other batches, base run computed inside), and a prompt patched with its own
    head outputs must not move (rows of the stored base run line up with the patched batch's rows)."""
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.patching import patch_pairs

    texts = ["tell me a story", "what is the capital of peru", "how to bake bread", "name three colours",
             "write a haiku about rain", "explain gravity briefly"]
    variants = {"en": texts, "aa": [t.upper() for t in texts], "bb": [" ".join(t.split()[::-1]) + " please"
                                                                        for t in texts]}
    keep = {"en": range(6), "aa": range(6), "bb": (1, 3, 4, 5)}  # "bb" lacks two translations: other base rows
    prompts = PromptSet(tuple(PromptRecord(f"p{i}", lang, "harmful", ts[i]) for lang, ts in variants.items()
                              for i in keep[lang]), "t")
    d = extract_candidates(tiny_model, texts, variants["bb"], progress=False).direction(-1, 1)
    tokens = [tiny_model.tokenizer("I")["input_ids"][0]]
    att = attribute(tiny_model, d, prompts, dla=False, batch_size=4, progress=False)
    patches = xl.patch_top_heads(tiny_model, d, att, prompts, "en", ["aa", "bb"], 2, tokens, batch_size=4,
                                 progress=False)
    for lang in ("aa", "bb"):
        got = patches[lang]
        rows = list(keep[lang])
        assert len(got.heads) == 2 and got.n_pairs == len(rows)
        alone = patch_pairs(tiny_model, d, [texts[i] for i in rows], [variants[lang][i] for i in rows], got.heads,
                            tokens, batch_size=5)
        for key in ("base_projection", "other_projection", "patched_projection", "base_score", "other_score",
                    "patched_score"):
            assert getattr(got, key) == pytest.approx(getattr(alone, key), abs=1e-5), (lang, key)
    # Per prompt: a run patched with its own stored head outputs is unchanged; with another prompt's, it moves.
    from refusal_circuits.patching import head_patch_hooks, prompt_run

    heads = [(0, h) for h in range(int(tiny_model.cfg.n_heads))]
    clean = prompt_run(tiny_model, d, texts, tokens, z_layers=[0], batch_size=4)
    d_head, n_post = int(tiny_model.cfg.d_head), chat_format(tiny_model.tokenizer).n_post

    def patch_from(run):
        return lambda idx: head_patch_hooks(
            tiny_model, {(a, h): run.z[a][idx][:, :, h * d_head:(h + 1) * d_head] for a, h in heads}, last=n_post)

    own = prompt_run(tiny_model, d, texts, tokens, patch_for=patch_from(clean), batch_size=4)
    shuffled = prompt_run(tiny_model, d, texts, tokens, patch_for=patch_from(clean.take([5, 0, 1, 2, 3, 4])),
                          batch_size=4)
    assert torch.allclose(own.scores, clean.scores, atol=1e-6)
    assert (shuffled.scores - clean.scores).abs().max() > 1e-4
    part = clean.take([3, 1])
    assert torch.equal(part.z[0], clean.z[0][[3, 1]]) and torch.equal(part.scores, clean.scores[[3, 1]])


@pytest.mark.tiny
def test_merged_halves_are_the_candidates_of_all_prompts(tiny_model):
    from refusal_circuits.directions import extract_candidates

    harmful = ["tell me a story", "what is the capital of peru", "how to bake bread", "name three colours", "x y"]
    harmless = ["write a haiku about rain", "explain gravity briefly", "list some fruit", "why do cats purr"]
    prompts = PromptSet(tuple([PromptRecord(f"h{i}", "en", "harmful", t) for i, t in enumerate(harmful)]
                              + [PromptRecord(f"s{i}", "en", "harmless", t) for i, t in enumerate(harmless)]), "t")
    (a, b), = xl.language_candidate_halves(tiny_model, prompts, batch_size=3, progress=False).values()
    assert (a.n_harmful, b.n_harmful, a.n_harmless, b.n_harmless) == (3, 2, 2, 2)  # odd strata alternate
    whole = extract_candidates(tiny_model, harmful, harmless, batch_size=4, progress=False)
    merged = a.merge(b)
    assert (merged.n_harmful, merged.n_harmless) == (5, 4)
    err = float((merged.vectors - whole.vectors).abs().max())
    assert err < 1e-6, err  # float32 forwards in other batches; an unweighted mean of the halves is off by ~1e-4


@pytest.mark.unit
def test_split_half_cosines_separate_shared_content_from_a_shared_direction():
    """Planted: every language's direction is r plus noise, plus content c_i shared by the same prompts' halves
    across languages. Same-prompt cosines see the content; disjoint ones do not; the correction recovers ~1."""
    from refusal_circuits.activations import MeanActivations
    from refusal_circuits.directions import DirectionCandidates

    g = torch.Generator().manual_seed(0)
    d = 20000
    r, c1, c2 = (torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3))

    def cand(lang: str, vec: torch.Tensor) -> DirectionCandidates:
        zero = MeanActivations(torch.zeros(1, 1, d, dtype=torch.float64), 4, (0,))
        harmful = MeanActivations(vec.view(1, 1, d), 4, (0,))
        return DirectionCandidates(vec.view(1, 1, d), (-1,), "m", lang, 4, 4, "", "diff_in_means", harmful, zero)

    def noise() -> torch.Tensor:
        return torch.randn(d, generator=g, dtype=torch.float64)

    halves = {lang: (cand(lang, r + 2 * c1 + noise()), cand(lang, r + 2 * c2 + noise())) for lang in ("en", "de")}
    got = xl.split_half_cosines(halves, "en", 0, -1)
    assert got.paired["de"] > 0.6 > 0.3 > got.disjoint["de"]  # shared content inflates same-prompt cosines
    assert got.corrected("de") == pytest.approx(1.0, abs=0.1)
    assert got.within["en"] == pytest.approx(got.disjoint["en"])
    assert got.to_json()["corrected"]["de"] == pytest.approx(got.corrected("de"))


def _two_languages() -> PromptSet:
    texts = {("en", "harmful"): ["tell me a story", "what is the capital of peru", "how to bake bread", "x y"],
             ("en", "harmless"): ["write a haiku about rain", "explain gravity briefly", "list fruit", "why purr"],
             ("de", "harmful"): ["erzähl mir eine lange Geschichte bitte", "Hauptstadt", "wie backt man Brot"],
             ("de", "harmless"): ["schreib ein Gedicht", "erkläre die Schwerkraft kurz und einfach", "Obst", "warum"]}
    return PromptSet(tuple(PromptRecord(f"{lab[1]}{i}", lang, lab, t) for (lang, lab), ts in texts.items()
                           for i, t in enumerate(ts)), "t")


@pytest.mark.tiny
def test_halves_of_several_languages_in_one_bucketing_equal_each_half_alone(tiny_model):
    """Batches of 3 over both languages' 15 prompts mix languages, labels and halves."""
    from refusal_circuits.directions import extract_candidates

    prompts = _two_languages()
    halves = xl.language_candidate_halves(tiny_model, prompts, batch_size=3, progress=False)
    assert list(halves) == ["en", "de"]
    for lang, pair in halves.items():
        h, b = (prompts.filter(lang=lang, label=label).halves(seed=0) for label in ("harmful", "harmless"))
        for k, got in enumerate(pair):  # the seeded stratified halves, not the first and second half in file order
            part_h, part_b = h[k].instructions, b[k].instructions
            alone = extract_candidates(tiny_model, part_h, part_b, batch_size=4, progress=False)
            assert got.lang == lang and float((got.vectors - alone.vectors).abs().max()) < 1e-6, lang
    whole = xl.language_candidates(tiny_model, prompts, batch_size=3, progress=False)
    for lang, (a, b) in halves.items():
        assert float((a.merge(b).vectors - whole[lang].vectors).abs().max()) < 1e-6


@pytest.mark.tiny
def test_transfer_cells_measured_together_equal_each_cell_alone(tiny_model):
    """The transfer matrix runs every target of one intervention in one length bucketing (batches of 3 mix the
    languages); each cell must equal its own measurement, judged with its own language's refusal tokens."""
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.interventions import ablate, actadd
    from refusal_circuits.scores import first_token_logits

    prompts = _two_languages()
    dirs = {}
    for lang in ("en", "de"):
        h, b = (prompts.filter(lang=lang, label=label).instructions for label in ("harmful", "harmless"))
        dirs[lang] = extract_candidates(tiny_model, h, b, lang=lang, progress=False).direction(-1, 1)
    # The tiny model starts every prompt with the same token t: English counts it as a refusal, German does not, so
    # a row judged with the other language's tokens, or a count given to the other language, changes a cell.
    t0 = int(first_token_logits(tiny_model, ["hi"]).argmax())
    ids = {"en": [t0], "de": [t0 + 1]}
    got = xl.transfer_matrix(tiny_model, dirs, prompts, refusal_ids=ids, batch_size=3, progress=False,
                             cells={("en", "en"), ("en", "de"), ("de", "de")})
    assert [(r.refused, r.n) for r in (*got.baseline["en"], *got.baseline["de"])] == [(4, 4), (4, 4), (0, 3), (0, 4)]
    for src, targets in (("en", ("en", "de")), ("de", ("de",))):
        assert set(got.ablate[src]) == set(targets)
        for t in targets:
            h, b = (prompts.filter(lang=t, label=label).instructions for label in ("harmful", "harmless"))
            with ablate(tiny_model, dirs[src]):
                want_h = xl.first_token_refusals(tiny_model, h, ids[t], batch_size=4)
            with actadd(tiny_model, dirs[src]):
                want_b = xl.first_token_refusals(tiny_model, b, ids[t], batch_size=4)
            assert (got.ablate[src][t].refused, got.ablate[src][t].n) == (sum(want_h), len(h)), (src, t)
            assert (got.actadd[src][t].refused, got.actadd[src][t].n) == (sum(want_b), len(b)), (src, t)


@pytest.mark.tiny
def test_transfer_cells_judged_by_generation_equal_each_cell_alone(tiny_model):
    """The ``generate`` judge: one generation over every target of an intervention, split back per language."""
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.evaluation import evaluate_refusal
    from refusal_circuits.interventions import ablate

    prompts = _two_languages()
    h, b = (prompts.filter(lang="en", label=label).instructions for label in ("harmful", "harmless"))
    dirs = {"en": extract_candidates(tiny_model, h, b, lang="en", progress=False).direction(-1, 1)}
    got = xl.transfer_matrix(tiny_model, dirs, prompts, judge="generate", max_new_tokens=2, batch_size=3,
                             progress=False)
    for t in ("en", "de"):
        harmful = prompts.filter(lang=t, label="harmful")
        with ablate(tiny_model, dirs["en"]):
            want = evaluate_refusal(tiny_model, harmful, max_new_tokens=2, batch_size=4, progress=False)
        refused = [c.refused for c in want.completions]
        assert (got.ablate["en"][t].refused, got.ablate["en"][t].n) == (sum(refused), len(harmful)), t


@pytest.mark.tiny
def test_transfer_check_compares_the_first_token_judge_with_generation_on_the_same_prompts(tiny_model):
    """check_transfer against an independent computation: the sampled prompts generated under the same
    intervention (evaluate_refusal), the first-token judge by a forward pass (first_token_refusals), per language;
    the baseline cells read off a given evaluation cover every prompt of it."""
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.evaluation import evaluate_refusal
    from refusal_circuits.interventions import ablate, actadd
    from refusal_circuits.scores import first_token_logits

    prompts = _two_languages()
    h, b = (prompts.filter(lang="en", label=label).instructions for label in ("harmful", "harmless"))
    d = extract_candidates(tiny_model, h, b, lang="en", progress=False).direction(-1, 1)
    t0 = int(first_token_logits(tiny_model, ["hi"]).argmax())
    ids = {"en": [t0], "de": [t0 + 1]}
    base = evaluate_refusal(tiny_model, prompts, max_new_tokens=2, batch_size=4, progress=False)
    completions = [{"id": c.id, "lang": c.lang, "label": c.label, "first_token": c.first_token, "refused": c.refused}
                   for c in base.completions]
    got = xl.check_transfer(tiny_model, d, prompts, ids, completions=completions, per_lang=2, max_new_tokens=2,
                            batch_size=3, n_boot=50, progress=False)
    assert list(got.cells) == ["baseline harmful", "baseline harmless", "ablate en", "actadd en"]
    sample = prompts.sample(2, seed=0)
    for name, part, hook in (("baseline harmful", prompts.filter(label="harmful"), None),
                             ("baseline harmless", prompts.filter(label="harmless"), None),
                             ("ablate en", sample.filter(label="harmful"), ablate),
                             ("actadd en", sample.filter(label="harmless"), actadd)):
        for lang in ("en", "de"):
            mine = part.filter(lang=lang)
            if hook is None:
                phrases = [c.refused for c in base.completions if c.lang == lang and c.label == mine[0].label]
                first = xl.first_token_refusals(tiny_model, mine.instructions, ids[lang], batch_size=4)
            else:
                with hook(tiny_model, d):
                    phrases = [c.refused for c in evaluate_refusal(tiny_model, mine, max_new_tokens=2, batch_size=4,
                                                                   progress=False).completions]
                    first = xl.first_token_refusals(tiny_model, mine.instructions, ids[lang], batch_size=4)
            v = got.cells[name].languages[lang]
            assert v.n == len(mine), (name, lang)
            assert (v.first.refused, v.second.refused) == (sum(first), sum(phrases)), (name, lang)
            assert v.agree.refused == sum(x == y for x, y in zip(first, phrases, strict=True)), (name, lang)
        assert got.cells[name].languages["all"].n == len(part)
    # English counts the tiny model's usual first token as a refusal and German does not: the judges disagree on
    # English baseline prompts and agree on German ones, so a count given to the wrong language shows.
    assert got.cells["baseline harmful"].languages["en"].first.refused == 4
    assert got.cells["baseline harmful"].languages["de"].first.refused == 0
    html = got._repr_html_()
    assert "ablate en" in html and "<th>de</th>" in html
    with pytest.raises(InputError, match="per_lang"):
        xl.check_transfer(tiny_model, d, prompts, ids, per_lang=0)


@pytest.mark.tiny
def test_max_prompts_takes_a_stratified_sample_and_the_site_rows_come_from_the_same_pass(tiny_model):
    """A file sorted by category: the first 2 harmful prompts are one category, the seeded stratified sample of 2
    takes one of each; the candidates are those of the sample, and the site rows average to them."""
    from refusal_circuits.directions import extract_candidates

    rows = [PromptRecord(f"{label}-{i}", lang, label, f"{lang} {label} prompt number {i}", {"category": "ab"[i // 2]})
            for lang in ("en", "de") for label in ("harmful", "harmless") for i in range(4)]
    prompts = PromptSet(tuple(rows), "t")
    sample = prompts.sample(2, seed=0)
    assert {r.category for r in sample.filter(lang="en", label="harmful")} == {"a", "b"}
    assert {r.category for r in prompts.head(2).filter(lang="en", label="harmful")} == {"a"}
    got = xl.language_candidates(tiny_model, prompts, max_prompts=2, batch_size=3, progress=False)
    cands, site = xl.language_candidates_and_site(tiny_model, prompts, None, 1, -1, max_prompts=2, batch_size=3,
                                                  progress=False)
    for lang in ("en", "de"):
        h, b = (sample.filter(lang=lang, label=label).instructions for label in ("harmful", "harmless"))
        alone = extract_candidates(tiny_model, h, b, batch_size=4, progress=False)
        assert float((got[lang].vectors - alone.vectors).abs().max()) < 1e-6, lang
        assert torch.equal(cands[lang].vectors, got[lang].vectors)  # the same batches: the same numbers
        part, x = site[lang, "harmful"]
        assert part.instructions == h and x.shape == (2, tiny_model.cfg.d_model)
        diff = x.mean(0) - site[lang, "harmless"][1].mean(0)
        assert torch.allclose(diff, cands[lang].vector(-1, 1).double(), atol=1e-5)
