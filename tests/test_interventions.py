"""Ablation, activation addition and weight orthogonalisation, checked exactly on tiny random models."""

from __future__ import annotations

import pytest
import torch

from refusal_circuits import hooks, interventions
from refusal_circuits.chat import tokenize_chat
from refusal_circuits.errors import InputError
from refusal_circuits.models import load_model
from tests.helpers import tiny_qwen_dir

pytestmark = pytest.mark.tiny

TEXTS = ["how do I do the thing", "a", "write a much longer request so that padding matters here"]


def _unit(d_model, seed=1):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d_model, generator=g)
    return v / v.norm()


def _logits(model, batch):
    with torch.inference_mode():
        return model(batch.input_ids, attention_mask=batch.attention_mask)


def _real(logits, batch):
    return logits[batch.attention_mask.bool()]


def test_ablation_leaves_no_component_along_r_anywhere(tiny_model):
    r = _unit(tiny_model.cfg.d_model)
    batch = tokenize_chat(tiny_model.tokenizer, TEXTS)
    seen = {}

    def grab(x, name):
        seen[name] = x.detach().clone()

    names = [hooks.resid_pre(layer) for layer in range(tiny_model.cfg.n_layers)] + ["ln_final.hook_in"]
    with interventions.ablate(tiny_model, r), hooks.add_hooks(tiny_model, [(n, grab) for n in names]):
        _logits(tiny_model, batch)
    for name, x in seen.items():
        assert (x @ r).abs().max() < 1e-5, name
    assert hooks.count_hooks(tiny_model) == 0


def test_activation_addition_adds_alpha_r_at_its_layer_only(tiny_model):
    r = _unit(tiny_model.cfg.d_model)
    batch = tokenize_chat(tiny_model.tokenizer, TEXTS)
    seen = {}

    def grab(x, name):
        seen[name] = x.detach().clone()

    probe = [(hooks.resid_pre(0), grab), (hooks.resid_pre(1), grab)]
    with hooks.add_hooks(tiny_model, probe):
        _logits(tiny_model, batch)
    clean = dict(seen)
    with interventions.actadd(tiny_model, r, layer=1, alpha=3.0), hooks.add_hooks(tiny_model, probe):
        _logits(tiny_model, batch)
    assert torch.equal(seen[hooks.resid_pre(0)], clean[hooks.resid_pre(0)])
    torch.testing.assert_close(seen[hooks.resid_pre(1)], clean[hooks.resid_pre(1)] + 3.0 * r)
    with pytest.raises(InputError, match="needs layer="):
        interventions.actadd(tiny_model, r)
    with pytest.raises(InputError, match="layer 9 out of range"):
        interventions.actadd(tiny_model, r, layer=9, alpha=1.0)


@pytest.mark.canary
def test_orthogonalized_weights_equal_hook_ablation_and_leave_the_original_alone(tiny_model):
    r = _unit(tiny_model.cfg.d_model)
    batch = tokenize_chat(tiny_model.tokenizer, TEXTS)
    before = _logits(tiny_model, batch)
    with interventions.ablate(tiny_model, r):
        ablated = _logits(tiny_model, batch)
    edited = interventions.orthogonalize(tiny_model, r)
    ortho = _logits(edited, batch)
    torch.testing.assert_close(_real(ortho, batch), _real(ablated, batch), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_real(ortho, batch), _real(before, batch), atol=1e-3)
    assert torch.equal(_logits(tiny_model, batch), before), "the input model must not change"
    assert hooks.count_hooks(tiny_model) == 0 and hooks.count_hooks(edited) == 0


def test_tied_embeddings_are_untied_so_the_unembedding_keeps_its_weights(tmp_path):
    from transformers import AutoConfig

    path = tiny_qwen_dir(tmp_path / "tied", seed=3)
    config = AutoConfig.from_pretrained(path)
    config.tie_word_embeddings = True
    config.save_pretrained(path)
    model = load_model(str(path))
    hf = model.original_model
    # Share the storage for real, as a tied checkpoint does (the loader kept the saved lm_head here).
    hf.lm_head.original_component.weight = hf.model.embed_tokens.original_component.weight
    assert hf.config.tie_word_embeddings
    r = _unit(model.cfg.d_model, seed=4)
    batch = tokenize_chat(model.tokenizer, TEXTS)
    with interventions.ablate(model, r):
        ablated = _logits(model, batch)
    edited = interventions.orthogonalize(model, r)
    assert edited.original_model.config.tie_word_embeddings is False
    torch.testing.assert_close(_real(_logits(edited, batch), batch), _real(ablated, batch), rtol=1e-4, atol=1e-4)


def test_export_loads_in_plain_transformers_and_back_as_a_model_spec(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from refusal_circuits.chat import position_ids

    r = _unit(tiny_model.cfg.d_model)
    edited = interventions.orthogonalize(tiny_model, r)
    out = interventions.export_hf(edited, tmp_path / "export")
    batch = tokenize_chat(tiny_model.tokenizer, TEXTS)
    want = _real(_logits(edited, batch), batch)
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    with torch.inference_mode():
        got = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=position_ids(batch.attention_mask)).logits
    torch.testing.assert_close(_real(got, batch), want, rtol=1e-5, atol=1e-5)
    again = load_model(str(out))
    torch.testing.assert_close(_real(_logits(again, batch), batch), want, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob(".*tmp"))


def test_nested_interventions_and_an_exception_leave_no_hooks(tiny_model):
    r = _unit(tiny_model.cfg.d_model)
    batch = tokenize_chat(tiny_model.tokenizer, TEXTS)
    with pytest.raises(RuntimeError, match="boom"), interventions.ablate(tiny_model, r), \
            interventions.actadd(tiny_model, r, layer=0, alpha=1.0):
        assert hooks.count_hooks(tiny_model) == 1 + 2 * tiny_model.cfg.n_layers + 1
        _logits(tiny_model, batch)
        raise RuntimeError("boom")
    assert hooks.count_hooks(tiny_model) == 0


def test_bad_direction_shapes_are_rejected(tiny_model):
    with pytest.raises(InputError, match="needs \\(64,\\)"):
        interventions.ablate(tiny_model, torch.ones(65))
    with pytest.raises(InputError, match="zero or not finite"):
        interventions.ablate(tiny_model, torch.zeros(64))
    assert hooks.count_hooks(tiny_model) == 0
