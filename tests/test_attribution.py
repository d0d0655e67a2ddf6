"""Attribution on tiny random models: exact identities checked against independent computations."""

from __future__ import annotations

import pytest
import torch

from refusal_circuits import attribution as attr
from refusal_circuits import hooks
from refusal_circuits.chat import Span
from refusal_circuits.data import PromptRecord, PromptSet
from refusal_circuits.errors import InputError
from refusal_circuits.forward import batches
from refusal_circuits.patching import ablate_heads, head_patch_hooks
from refusal_circuits.scores import refusal_tokens_from_strings
from tests.helpers import tiny_llama_dir

pytestmark = pytest.mark.tiny

PROMPTS = ["hi", "tell me a story about a cat", "what is two plus two?", "x" * 30, "why is the sky blue"]


@pytest.fixture(scope="module")
def r(tiny_model):
    g = torch.Generator().manual_seed(3)
    return torch.randn(int(tiny_model.cfg.d_model), generator=g)


@pytest.fixture(scope="module")
def targets(tiny_model):
    tok = tiny_model.tokenizer
    return refusal_tokens_from_strings(tok, ["I"]), [tok("S")["input_ids"][0], tok("T")["input_ids"][0]]


@pytest.fixture(scope="module")
def result(tiny_model, r, targets):
    refusal, compliance = targets
    return attr.attribute(tiny_model, r, PROMPTS, refusal_tokens=refusal, compliance_tokens=compliance,
                          batch_size=2, adv_suffix=" zz!", progress=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from refusal_circuits.models import load_model

    return load_model(str(tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))))


@pytest.mark.canary
def test_completeness_every_layer_and_position(result):
    # embed + every head and MLP below layer l == resid_pre[l] . r̂, and the final residual too.
    assert result.completeness_error() < 1e-6
    assert result.resid.abs().max() > 0.01  # not vacuous (random init: small activations)


def test_resid_matches_hugging_face_hidden_states(tiny_model, r, result):
    """The resid projections agree with a plain Hugging Face forward run one prompt at a time (no batching)."""
    hf = tiny_model.original_model
    rhat = r / r.norm()
    for i, text in enumerate(PROMPTS):
        _, batch = next(iter(batches(tiny_model, [text], 1, adv_suffix=" zz!")))
        out = hf(input_ids=batch.input_ids, output_hidden_states=True)
        n = batch.input_ids.shape[1]
        hs = torch.stack(out.hidden_states[:-1] + (out.hidden_states[-1],))  # last one is after the final norm
        want = hs[:-1, 0] @ rhat  # resid_pre of every layer
        got = result.resid[i, :-1, -n:]
        assert torch.allclose(got, want, atol=1e-4), (i, (got - want).abs().max())


@pytest.mark.canary
def test_head_scores_equal_naive_per_head_outputs(tiny_model, r, result):
    """The naive route: per-head d_model outputs z_h W_O[h]^T, then project on r̂; must equal z_h . (W_O[h] r̂)."""
    rhat = r / r.norm()
    geo = attr.head_geometry(tiny_model)
    zs: dict[int, torch.Tensor] = {}

    def grab(layer):
        def fn(z, _name):
            zs[layer] = z.detach().clone()
        return fn

    text = PROMPTS[1]
    _, batch = next(iter(batches(tiny_model, [text], 1, adv_suffix=" zz!")))
    with hooks.add_hooks(tiny_model, [(hooks.attn_z(layer), grab(layer)) for layer in range(geo.n_layers)]):
        tiny_model.original_model(input_ids=batch.input_ids)
    n = batch.input_ids.shape[1]
    for layer in range(geo.n_layers):
        z = zs[layer][0].view(n, geo.n_heads, geo.d_head)
        w = geo.w_o[layer].view(-1, geo.n_heads, geo.d_head)  # [d_model, head, d_head]
        per_head = torch.einsum("shd,mhd->hsm", z, w)  # [head, pos, d_model]: the expensive way
        naive = per_head @ rhat
        assert torch.allclose(result.heads[1, layer, :, -n:], naive, atol=1e-5)


def test_sources_sum_to_head_writes_and_mass_to_one(result):
    n_post = result.n_post
    assert torch.allclose(result.sources.sum(-1), result.heads[..., -n_post:], atol=1e-5)
    assert torch.allclose(result.attn_mass.sum(-1), torch.ones_like(result.attn_mass[..., 0]), atol=1e-5)
    # nothing is read from padding; the suffix span exists and gets attention
    assert result.attn_mass[..., int(Span.PAD)].abs().max() == 0
    assert result.attn_mass[..., int(Span.ADV_SUFFIX)].sum() > 0


def test_spans_and_tokens_line_up(tiny_model, result):
    for i, toks in enumerate(result.tokens):
        n = int(result.mask[i].sum())
        assert len(toks) == n
        assert (result.spans[i, :-n] == int(Span.PAD)).all() and (result.spans[i, -n:] != int(Span.PAD)).all()
        assert (result.spans[i, -result.n_post:] == int(Span.POST)).all()
        assert "".join(toks).endswith(tiny_model.tokenizer.decode(list(result_post_ids(tiny_model))))
    assert (result.heads * (1 - result.mask[:, None, None])).abs().max() == 0


def result_post_ids(model):
    from refusal_circuits.chat import chat_format

    return chat_format(model.tokenizer).post_ids


def test_padding_does_not_change_scores(tiny_model, r, result, targets):
    refusal, compliance = targets
    alone = attr.attribute(tiny_model, r, [PROMPTS[0]], refusal_tokens=refusal, compliance_tokens=compliance,
                           progress=False, adv_suffix=" zz!")
    n = int(alone.mask.sum())
    assert torch.allclose(alone.heads[0, ..., -n:], result.heads[0, ..., -n:], atol=1e-5)
    assert torch.allclose(alone.dla.heads[0], result.dla.heads[0], atol=1e-5)


@pytest.mark.canary
def test_dla_adds_up_to_the_models_logit_difference(tiny_model, result, targets):
    refusal, compliance = targets
    assert result.dla is not None and result.dla.completeness_error() < 1e-4
    hf = tiny_model.original_model
    for i, text in enumerate(PROMPTS):
        _, batch = next(iter(batches(tiny_model, [text], 1, adv_suffix=" zz!")))
        logits = hf(input_ids=batch.input_ids).logits[0, -1]
        want = logits[list(refusal.ids)].mean() - logits[compliance].mean()
        assert abs(float(result.dla.logit_diff[i]) - float(want)) < 1e-4


def test_zero_and_mean_ablation_change_resid_mid_by_the_direct_score(tiny_model, r):
    """Ablating head h of layer l moves resid_mid[l] . r̂ by exactly minus its direct write (zero ablation), or
    by (mean - z_h) . W_O[h] r̂ (mean ablation)."""
    rhat = r / r.norm()
    res = attr.attribute(tiny_model, r, PROMPTS[:2], dla=False, progress=False)
    geo = attr.head_geometry(tiny_model)
    idx, batch = next(iter(batches(tiny_model, PROMPTS[:2], 2)))  # rows come longest first
    seen: list[torch.Tensor] = []

    def grab(x, _name):
        seen.append(x @ rhat)

    layer, head = 1, 2
    hf = tiny_model.original_model
    with hooks.add_hooks(tiny_model, [(hooks.resid_mid(layer), grab)]):
        hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        with ablate_heads(tiny_model, [(layer, head)]):
            hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        mean = torch.randn(geo.d_head)
        with ablate_heads(tiny_model, {(layer, head): mean}):
            hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    clean, zero, meaned = seen
    m = batch.attention_mask.bool()
    s = batch.input_ids.shape[1]
    score = res.heads[idx, layer, head, -s:]
    assert torch.allclose((zero - clean)[m], -score[m], atol=1e-5)
    mean_write = float(mean.double() @ geo.head_readout(layer, rhat[None])[0, head])
    assert torch.allclose((meaned - clean)[m], (mean_write - score)[m], atol=1e-5)
    assert hooks.count_hooks(tiny_model) == 0


def test_patch_hooks_touch_only_the_last_positions(tiny_model):
    (name, fn), = head_patch_hooks(tiny_model, {(0, 1): 0.0}, last=3)
    z = torch.ones(2, 6, int(tiny_model.cfg.n_heads) * int(tiny_model.cfg.d_head))
    out = fn(z, name)
    d = int(tiny_model.cfg.d_head)
    assert out[:, -3:, d:2 * d].abs().max() == 0 and out[:, :-3].min() == 1 and out[:, -3:, :d].min() == 1
    assert z.min() == 1  # the input is not modified in place
    with pytest.raises(InputError, match="out of range"):
        head_patch_hooks(tiny_model, {(9, 0): 0.0})


def test_source_matrix_rows_sum_to_the_head_writes(tiny_model, r, result):
    sm = attr.source_matrix(tiny_model, r, PROMPTS[1], [(1, 3), (0, 0)], adv_suffix=" zz!")
    n = len(sm.tokens)
    assert torch.allclose(sm.writes(), result.heads[1, [1, 0], [3, 0], -n:], atol=1e-5)
    assert torch.allclose(sm.pattern.sum(-1), torch.ones(2, n), atol=1e-5)
    assert "L1.H3" in sm._repr_html_()


def test_save_load_round_trip_and_completeness_on_the_file_alone(result, tmp_path):
    from safetensors.torch import load_file

    result.save(tmp_path)
    t = load_file(str(tmp_path / attr.TENSORS_FILE))
    cum = torch.cumsum(t["heads"].double().sum(2) + t["mlps"].double(), 1)
    rebuilt = torch.cat([torch.zeros_like(cum[:, :1]), cum], 1) + t["embed"].double()[:, None]
    assert ((rebuilt * t["mask"][:, None]) - t["resid"].double()).abs().max() < 1e-5
    back = attr.load_attribution(tmp_path)
    assert back.ids == result.ids and back.tokens == result.tokens
    assert torch.equal(back.heads, result.heads) and back.dla is not None
    assert back.dla.completeness_error() < 1e-4
    import json

    summary = json.loads((tmp_path / attr.SUMMARY_FILE).read_text())
    assert summary["completeness_max_abs_error"] < 1e-5 and summary["top_heads"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_bias_writers_are_a_stated_component(llama, tmp_path):
    """Llama with attention_bias: b_O writes outside the heads; completeness holds in memory and on file."""
    tok = llama.tokenizer
    r = torch.randn(int(llama.cfg.d_model))
    res = attr.attribute(llama, r, PROMPTS[:3], refusal_tokens=refusal_tokens_from_strings(tok, ["I"]),
                         compliance_tokens=[tok("S")["input_ids"][0]], progress=False)
    assert res.attn_bias is not None and res.attn_bias.abs().max() > 0
    assert res.completeness_error() < 1e-5 and res.dla is not None and res.dla.completeness_error() < 1e-4
    no_bias = (res.resid - res.reconstructed()).abs().max()
    assert no_bias < 1e-5
    res.save(tmp_path)
    back = attr.load_attribution(tmp_path)
    assert back.completeness_error() < 1e-5
    assert "mlps" in __import__("json").loads((tmp_path / attr.SUMMARY_FILE).read_text())["bias_folding"]


def test_top_heads_and_rendering(result, tiny_model, r):
    table = result.top_heads(3)
    assert len(table.rows) == 3 and table.rows[0]["rank"] == 1
    means = result.head_scores("post").mean(0)
    best = max(range(means.numel()), key=lambda f: abs(float(means.flatten()[f])))
    assert (table.rows[0]["layer"], table.rows[0]["head"]) == divmod(best, result.n_heads)
    html = result._repr_html_()
    assert "L" in html and "completeness" in html
    with pytest.raises(InputError, match="unknown span"):
        result.head_scores("nonsense")
    assert torch.allclose(result.head_scores("last"), result.heads[..., -1])


def test_select_by_language_and_label(tiny_model, r):
    ps = PromptSet([PromptRecord("a", "en", "harmful", "one"), PromptRecord("a", "de", "harmful", "eins"),
                    PromptRecord("b", "en", "harmless", "two")], "test")
    res = attr.attribute(tiny_model, r, ps, dla=False, progress=False)
    assert res.select(lang="de").ids == ["a"] and res.select(label="harmless").langs == ["en"]
    with pytest.raises(InputError, match="no prompts"):
        res.select(lang="fr")


def test_compatibility_mode_is_refused(tiny_model):
    class Fake:  # the model protocol's members, in compatibility mode
        compatibility_mode = True
        cfg = tiny_model.cfg
        hook_dict = tiny_model.hook_dict
        tokenizer = tiny_model.tokenizer
        embed = tiny_model.embed
        blocks = tiny_model.blocks

        def parameters(self, recurse=True):
            return tiny_model.parameters(recurse)

        def __call__(self, *args, **kwargs):
            return tiny_model(*args, **kwargs)

    with pytest.raises(InputError, match="raw mode"):
        attr.head_geometry(Fake())


def test_no_stray_hooks_after_an_error(tiny_model, r, monkeypatch):
    def boom(self, x, name):
        raise RuntimeError("boom")

    monkeypatch.setattr(attr._BatchProbe, "on_embed", boom)
    with pytest.raises(RuntimeError, match="boom"):
        attr.attribute(tiny_model, r, PROMPTS[:2], dla=False, progress=False)
    assert hooks.count_hooks(tiny_model) == 0


def test_suffix_comparison_shifts_attention_mass(tiny_model, r):
    without = attr.attribute(tiny_model, r, PROMPTS[:3], dla=False, progress=False)
    with_suffix = attr.attribute(tiny_model, r, PROMPTS[:3], dla=False, progress=False, adv_suffix=" zz zz zz zz")
    cmp = attr.compare_suffix(without, with_suffix, k=4)
    assert len(cmp.heads) == 4 and cmp.n == 3
    for w0, w1, s1 in zip(cmp.instruction_mass_without, cmp.instruction_mass_with, cmp.suffix_mass_with, strict=True):
        assert 0 <= w1 <= 1 and 0 < s1 <= 1 and 0 <= w0 <= 1
    assert sum(cmp.suffix_mass_with) > 0
    assert "→ suffix" in cmp._repr_html_()
    with pytest.raises(InputError, match="no adversarial suffix"):
        attr.compare_suffix(without, without)


def test_shared_prefix_pass_equals_the_full_pass(tiny_model, r, result, targets, monkeypatch):
    """The template prefix attributed once and broadcast gives what a full forward of every row gives."""
    from refusal_circuits import forward

    refusal, compliance = targets
    _, batch = next(iter(batches(tiny_model, PROMPTS[:2], 2)))
    assert forward.shared_prefix_length(batch) > 10  # the Qwen template's system prompt: the fast path ran
    with forward.forward_options(share_prefix=False):
        full = attr.attribute(tiny_model, r, PROMPTS, refusal_tokens=refusal, compliance_tokens=compliance,
                              batch_size=2, adv_suffix=" zz!", progress=False)
    for name in ("embed", "heads", "mlps", "resid", "sources", "attn_mass"):
        assert torch.allclose(getattr(full, name), getattr(result, name), atol=1e-5), name
    assert torch.equal(full.mask, result.mask) and torch.equal(full.spans, result.spans)
    assert torch.allclose(full.dla.heads, result.dla.heads, atol=1e-5)


def test_a_language_refusing_every_harmless_prompt_borrows_compliance_tokens(tiny_model, monkeypatch, caplog):
    """The packaged 0.5B refuses every Yoruba prompt, harmless ones too: DLA must still have a compliance side."""
    from refusal_circuits import scores
    from refusal_circuits.scores import RefusalTokens

    vocab = int(tiny_model.cfg.d_vocab)

    def fake_first_token_logits(model, instructions, **kwargs):
        logits = torch.zeros(len(instructions), vocab)
        for i, text in enumerate(instructions):  # Yoruba prompts start with token 5 (a refusal), others with 7 or 8
            logits[i, 5 if text.startswith("yo") else (7 if i % 2 else 8)] = 1.0
        return logits

    monkeypatch.setattr(scores, "first_token_logits", fake_first_token_logits)
    recs = [PromptRecord(f"{lang}{i}", lang, "harmless", f"{lang} prompt {i}") for lang in ("en", "yo")
            for i in range(8)]
    refusal = RefusalTokens({"en": (5, 6), "yo": (5,)})
    with caplog.at_level("WARNING", logger="refusal_circuits"):
        got = attr._logit_targets(tiny_model, PromptSet(tuple(recs)), None, refusal, None, batch_size=4)
    assert got is not None and set(got.compliance["yo"]) == {7, 8} and set(got.compliance["en"]) == {7, 8}
    assert any("'yo'" in r.getMessage() and "other languages" in r.getMessage() for r in caplog.records)
    only_yo = PromptSet(tuple(r for r in recs if r.lang == "yo"))
    with pytest.raises(InputError, match="every greedy first token was a refusal token"):
        attr._logit_targets(tiny_model, only_yo, None, refusal, None, batch_size=4)


def test_compliance_tokens_from_a_generation_equal_discovery_by_forward_pass(tiny_model):
    """The study takes each language's compliance tokens from the evaluate stage's greedy first tokens instead of
    a forward pass of its own: both must give the same tokens."""
    from refusal_circuits.evaluation import evaluate_refusal
    from refusal_circuits.scores import RefusalTokens

    texts = ["tell me a story", "what is the capital of peru", "how to bake bread", "name three colours",
             "write a haiku about rain", "explain gravity briefly", "list some fruit", "why do cats purr"]
    recs = [PromptRecord(f"p{i}", lang, "harmless", t if lang == "en" else t.upper()) for lang in ("en", "xx")
            for i, t in enumerate(texts)]
    prompts = PromptSet(tuple(recs))
    evaluation = evaluate_refusal(tiny_model, prompts, max_new_tokens=2, batch_size=3, progress=False)
    first: dict[str, list[int]] = {}
    for c in evaluation.completions:
        first.setdefault(c.lang, []).append(int(c.first_token))
    seen = {t for v in first.values() for t in v}
    refusal = RefusalTokens({"en": (min(set(range(50)) - seen),), "xx": ()})
    from_generation = attr.compliance_tokens_by_lang(first, {lang: refusal.for_lang(lang) for lang in first})
    targets = attr._logit_targets(tiny_model, prompts, None, refusal, None, batch_size=5)
    assert targets is not None and from_generation == targets.compliance
