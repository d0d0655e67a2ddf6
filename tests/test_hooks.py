"""Hook handles remove exactly what they added: nesting, exceptions, failed registration (tiny tier)."""

from __future__ import annotations

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
