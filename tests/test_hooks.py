"""Hook handles remove exactly what they added: nesting, exceptions, failed registration (tiny tier)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from refusal_circuits import hooks
from refusal_circuits.errors import InputError

pytestmark = pytest.mark.tiny


def _ids():
    return torch.randint(0, 200, (1, 6))


def test_nested_handles_remove_only_their_own(tiny_model):
    calls = []
    before = hooks.count_hooks(tiny_model)
    with hooks.add_hooks(tiny_model, [(hooks.resid_pre(0), lambda x, n: calls.append("outer"))]):
        with hooks.add_hooks(tiny_model, [(hooks.resid_pre(1), lambda x, n: calls.append("inner"))]):
            tiny_model(_ids())
        assert hooks.count_hooks(tiny_model) == before + 1
        tiny_model(_ids())
    assert hooks.count_hooks(tiny_model) == before
    assert calls == ["outer", "inner", "outer"]


def test_exception_inside_the_block_removes_hooks(tiny_model):
    before = hooks.count_hooks(tiny_model)
    with pytest.raises(RuntimeError), hooks.add_hooks(tiny_model, [(hooks.resid_pre(0), lambda x, n: None)]):
        raise RuntimeError("boom")
    assert hooks.count_hooks(tiny_model) == before


def test_exception_inside_a_hook_removes_hooks(tiny_model):
    before = hooks.count_hooks(tiny_model)

    def bad(x, name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), hooks.add_hooks(tiny_model, [(hooks.resid_pre(1), bad)]):
        tiny_model(_ids())
    assert hooks.count_hooks(tiny_model) == before


def test_failed_registration_halfway_leaves_no_hooks(tiny_model):
    before = hooks.count_hooks(tiny_model)
    with pytest.raises(InputError, match="no hook point named 'blocks.99.hook_resid_pre'"):
        hooks.add_hooks(tiny_model, [(hooks.resid_pre(0), lambda x, n: None), (hooks.resid_pre(99), lambda x, n: None)])
    assert hooks.count_hooks(tiny_model) == before


def test_a_hook_can_replace_the_activation(tiny_model):
    ids = _ids()
    with torch.inference_mode():
        clean = tiny_model(ids)
        with hooks.add_hooks(tiny_model, [(hooks.resid_pre(1), lambda x, n: torch.zeros_like(x))]):
            zeroed = tiny_model(ids)
        again = tiny_model(ids)
    assert not torch.allclose(clean, zeroed)
    assert torch.equal(clean, again)


# --- no stray hooks, anywhere: every module of the bridge and of its Hugging Face model, and torch's global hooks


def _hook_census(model) -> dict[str, int]:
    """Forward (pre-)hooks on every module the model has, by module name, plus torch's global module hooks.

    The bridge wires a few capture hooks of its own on its first forward pass; compare a census taken after one.
    """
    from torch.nn.modules import module as torch_module

    from refusal_circuits.models import hf_model_of

    census: dict[str, int] = {}
    seen: set[int] = set()
    for prefix, root in (("bridge", model.named_modules()), ("hf", hf_model_of(model).named_modules())):
        for name, m in root:
            if id(m) in seen:
                continue
            seen.add(id(m))
            n = len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            if n:
                census[f"{prefix}:{name}"] = n
    census["global"] = len(torch_module._global_forward_hooks) + len(torch_module._global_forward_pre_hooks)
    return census


def _prompt(model):
    from refusal_circuits.chat import tokenize_chat

    return tokenize_chat(model.tokenizer, ["tell me about bread", "x"])


def _logits(model, batch):
    with torch.inference_mode():
        return model(batch.input_ids, attention_mask=batch.attention_mask)


def _direction(model):
    torch.manual_seed(1)
    return torch.randn(int(model.cfg.d_model))


def test_the_census_sees_a_hook_on_any_module(tiny_model):
    """The check below can fail: a hook on a plain Hugging Face submodule (not a hook point) is counted."""
    from refusal_circuits.models import hf_model_of

    clean = _hook_census(tiny_model)
    handle = hf_model_of(tiny_model).model.norm.register_forward_hook(lambda *a: None)
    try:
        assert _hook_census(tiny_model) != clean
    finally:
        handle.remove()
    assert _hook_census(tiny_model) == clean


def test_nested_interventions_removed_in_any_order(tiny_model):
    from refusal_circuits import interventions

    batch = _prompt(tiny_model)
    clean, census = _logits(tiny_model, batch), _hook_census(tiny_model)
    r = _direction(tiny_model)
    with interventions.ablate(tiny_model, r):
        ablated = _logits(tiny_model, batch)
    outer = interventions.actadd(tiny_model, r, layer=1, alpha=3.0)
    inner = interventions.ablate(tiny_model, r)
    both = _logits(tiny_model, batch)
    outer.remove()  # not the order they were added in
    torch.testing.assert_close(_logits(tiny_model, batch), ablated, rtol=0, atol=0)
    outer.remove()  # removal is idempotent and touches nothing else
    assert inner.active
    inner.remove()
    assert not torch.allclose(both, ablated) and not torch.allclose(both, clean)
    assert _hook_census(tiny_model) == census
    assert torch.equal(_logits(tiny_model, batch), clean)


def test_a_missing_hook_point_in_the_middle_of_a_list_removes_those_added(tiny_model):
    batch = _prompt(tiny_model)
    clean, census = _logits(tiny_model, batch), _hook_census(tiny_model)
    names = [hooks.EMBED, hooks.attn_out(0), hooks.mlp_out(0), "blocks.0.hook_nowhere", hooks.attn_out(1)]
    with pytest.raises(InputError, match="no hook point named 'blocks.0.hook_nowhere'"):
        hooks.add_hooks(tiny_model, [(name, lambda x, n: torch.zeros_like(x)) for name in names])
    assert _hook_census(tiny_model) == census
    assert torch.equal(_logits(tiny_model, batch), clean)


def test_an_interrupt_while_registering_removes_those_added(tiny_model, monkeypatch):
    """Ctrl-C can arrive inside ``register_forward_hook`` itself (here: on the third hook point)."""
    batch = _prompt(tiny_model)
    clean, census = _logits(tiny_model, batch), _hook_census(tiny_model)
    third = tiny_model.hook_dict[hooks.mlp_out(0)]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(third, "register_forward_hook", interrupted)
    names = [hooks.EMBED, hooks.attn_out(0), hooks.mlp_out(0), hooks.attn_out(1)]
    with pytest.raises(KeyboardInterrupt):
        hooks.add_hooks(tiny_model, [(name, lambda x, n: torch.zeros_like(x)) for name in names])
    monkeypatch.undo()
    assert _hook_census(tiny_model) == census
    assert torch.equal(_logits(tiny_model, batch), clean)


@pytest.mark.parametrize("where", ["hook", "forward"])
def test_ctrl_c_mid_generation_under_nested_interventions_leaves_no_hooks(tiny_model, monkeypatch, where):
    """KeyboardInterrupt on the third decoding step, raised by a hook or by a patched forward of the Hugging Face
    decoder, inside actadd inside ablate: afterwards no hook is left and the model computes what it computed."""
    from refusal_circuits import interventions
    from refusal_circuits.evaluation import generate
    from refusal_circuits.models import hf_model_of

    batch = _prompt(tiny_model)
    clean, census = _logits(tiny_model, batch), _hook_census(tiny_model)
    before = generate(tiny_model, ["tell me about bread"], max_new_tokens=4, progress=False)
    calls = []

    def count_and_interrupt(*_args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    norm = hf_model_of(tiny_model).model.norm  # the final norm runs once per step, prefill included
    decoder = getattr(norm, "original_component", norm)  # the Hugging Face module inside the bridge's wrapper
    if where == "forward":
        real = decoder.forward

        def forward(*args, **kwargs):
            count_and_interrupt()
            return real(*args, **kwargs)

        monkeypatch.setattr(decoder, "forward", forward)
    r = _direction(tiny_model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(pytest.raises(KeyboardInterrupt))
        stack.enter_context(interventions.ablate(tiny_model, r))
        stack.enter_context(interventions.actadd(tiny_model, r, layer=1, alpha=2.0))
        if where == "hook":
            stack.enter_context(hooks.add_hooks(tiny_model, [(hooks.resid_post(1), lambda x, n: count_and_interrupt())]))
        generate(tiny_model, ["tell me about bread"], max_new_tokens=8, progress=False)
    assert len(calls) == 3, "the interrupt came mid-generation, after some tokens"
    monkeypatch.undo()
    assert _hook_census(tiny_model) == census
    assert torch.equal(_logits(tiny_model, batch), clean)
    assert generate(tiny_model, ["tell me about bread"], max_new_tokens=4, progress=False) == before
