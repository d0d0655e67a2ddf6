"""The run-time self-checks of the fast paths: they hold on a healthy model, and a broken fast path is caught,
switched off with one warning, and the results stay those of the plain forward pass."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from refusal_circuits import fastpaths, forward
from refusal_circuits.chat import ChatBatch, Span, tokenize_chat
from refusal_circuits.generation import generate_ids
from refusal_circuits.scores import first_token_logits

pytestmark = pytest.mark.canary

PROMPTS = ["How do I bake bread?", "Write a poem about the sea, please.", "hi", "Explain photosynthesis briefly.",
           "What is two plus two?"]


@pytest.fixture()
def fresh_model(tiny_dir):
    """A model of its own: the verdicts live on the model, and these tests break paths on purpose."""
    from refusal_circuits.models import load_model

    return load_model(str(tiny_dir))


def _plain_last_logits(model, prompts):
    batch = tokenize_chat(model.tokenizer, prompts)
    with torch.inference_mode():
        return model.original_model.lm_head(forward.decoder_forward(model, batch, share_prefix=False)[:, -1])


def _plain_generation(model, prompts, n):
    """Greedy tokens of each prompt alone through plain Hugging Face generate (no padding, no shared prefix)."""
    out = []
    for p in prompts:
        batch = tokenize_chat(model.tokenizer, [p])
        res = model.original_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                            max_new_tokens=n, do_sample=False, top_p=None, top_k=None,
                                            temperature=None, pad_token_id=model.tokenizer.pad_token_id)
        out.append(res[0, batch.input_ids.shape[1]:].tolist())
    return out


@pytest.mark.tiny
def test_every_fast_path_holds_and_is_recorded(fresh_model):
    assert fastpaths.status(fresh_model) == {}
    batch = tokenize_chat(fresh_model.tokenizer, PROMPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastpaths.FastPathWarning)
        fast = forward.last_logits(fresh_model, batch)
        packed = forward.packed_last_logits(fresh_model, PROMPTS)
        ids = generate_ids(fresh_model, PROMPTS, max_new_tokens=6, progress=False)
    verdicts = fastpaths.status(fresh_model)
    assert set(verdicts) == set(fastpaths.PATHS)
    assert all(v.ok and v.error <= v.allowed for v in verdicts.values())
    plain = _plain_last_logits(fresh_model, PROMPTS)
    assert packed is not None
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-4)
    eos = fresh_model.tokenizer.eos_token_id
    assert [[t for t in row if t != eos] for row in ids] == [
        [t for t in row[: len(ids[i])] if t != eos] for i, row in enumerate(_plain_generation(fresh_model, PROMPTS, 6))]


def _wrong_prefix_cache(monkeypatch):
    """Break the shared-prefix path the way a library upgrade can: the cache no longer holds the real prefix."""
    real = forward.passes.prefix_continuation

    def broken(model, batch, n_prefix, prefix_readers=()):
        ids = batch.input_ids.clone()
        ids[batch.spans == int(Span.PREFIX)] = 0
        wrong = real(model, ChatBatch(ids, batch.attention_mask, batch.spans, batch.n_post), n_prefix, prefix_readers)
        return dataclasses.replace(real(model, batch, n_prefix, prefix_readers), cache=wrong.cache)

    monkeypatch.setattr(forward.passes, "prefix_continuation", broken)  # where every caller looks it up


@pytest.mark.tiny
def test_a_broken_prefix_is_caught_and_results_stay_right(fresh_model, monkeypatch):
    plain = _plain_last_logits(fresh_model, PROMPTS)
    expected_ids = _plain_generation(fresh_model, PROMPTS, 6)
    _wrong_prefix_cache(monkeypatch)
    batch = tokenize_chat(fresh_model.tokenizer, PROMPTS)
    with pytest.warns(fastpaths.FastPathWarning, match="shared template prefix.*transformers") as caught:
        got = forward.last_logits(fresh_model, batch)
    assert len(caught) == 1
    assert fastpaths.allowed(fresh_model, fastpaths.PREFIX) is False
    torch.testing.assert_close(got, plain, atol=1e-4, rtol=1e-4)
    # The verdict sticks: no second warning, and generation does not use the broken prefix either.
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastpaths.FastPathWarning)
        again = forward.last_logits(fresh_model, batch)
        ids = generate_ids(fresh_model, PROMPTS, max_new_tokens=6, progress=False)
    torch.testing.assert_close(again, plain, atol=1e-4, rtol=1e-4)
    eos = fresh_model.tokenizer.eos_token_id
    for row, exp in zip(ids, expected_ids, strict=True):
        assert [t for t in row if t != eos] == [t for t in exp[: len(row)] if t != eos]


@pytest.mark.tiny
def test_a_broken_generation_prefill_is_caught(fresh_model, monkeypatch):
    """Forward passes through the prefix stay right, but generation's prefill is broken: only GENERATE goes off."""
    expected_ids = _plain_generation(fresh_model, PROMPTS, 6)
    forward.last_logits(fresh_model, tokenize_chat(fresh_model.tokenizer, PROMPTS))  # the prefix path checked first
    assert fastpaths.allowed(fresh_model, fastpaths.PREFIX) is True
    _wrong_prefix_cache(monkeypatch)  # now only generation is still to be checked
    with pytest.warns(fastpaths.FastPathWarning, match="cached generation"):
        ids = generate_ids(fresh_model, PROMPTS, max_new_tokens=6, progress=False)
    assert fastpaths.allowed(fresh_model, fastpaths.GENERATE) is False
    eos = fresh_model.tokenizer.eos_token_id
    for row, exp in zip(ids, expected_ids, strict=True):
        assert [t for t in row if t != eos] == [t for t in exp[: len(row)] if t != eos]


@pytest.mark.tiny
def test_a_broken_packing_is_caught_and_padded_batches_take_over(fresh_model, monkeypatch):
    padded = _plain_last_logits(fresh_model, PROMPTS)
    real = forward.packing._packed

    def broken(hf, prefix, own, rows, *args, **kwargs):  # positions as if every prompt continued the one before
        return real(hf, prefix, [list(reversed(x)) for x in own], rows, *args, **kwargs)

    monkeypatch.setattr(forward.packing, "_packed", broken)
    with pytest.warns(fastpaths.FastPathWarning, match="packed first-token logits"):
        assert forward.packed_last_logits(fresh_model, PROMPTS) is None
    got = first_token_logits(fresh_model, PROMPTS, progress=False)
    torch.testing.assert_close(got, padded.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.unit
def test_generation_comparison_stops_after_the_first_differing_token():
    tokens_a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    tokens_b = torch.tensor([[1, 2, 9], [4, 5, 6]])
    logits_a = [torch.full((2, 3), float(t)) for t in range(3)]
    logits_b = [torch.full((2, 3), float(t)) for t in range(3)]
    logits_b[2] = logits_b[2] + 100  # after the divergence: not compared... but the divergence step itself is
    a, b = fastpaths.generation_error((tokens_a, logits_a), (tokens_b, logits_b))
    assert a.shape == b.shape == (3, 2, 3)
    a, b = fastpaths.generation_error((tokens_a[:, :2], logits_a[:2]), (tokens_b[:, :2], logits_b[:2]))
    assert torch.equal(a, b)
    a, b = fastpaths.generation_error((tokens_a[:1], logits_a), (tokens_b, logits_b))
    assert a.shape != b.shape


@pytest.mark.tiny
def test_attention_that_ignores_the_cache_is_caught_on_every_path(fresh_model):
    """What TransformerLens 4.3's attention bridges did under transformers 5.24 (the cache came as ``cache=``,
    they read ``past_key_values=``): every cached forward attended to its own tokens alone. Every fast path is
    switched off, and logits and generations stay those of the plain, cache-free computation."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    plain = _plain_last_logits(fresh_model, PROMPTS)
    batch = tokenize_chat(fresh_model.tokenizer, PROMPTS)
    from refusal_circuits.generation import _uncached_greedy

    reference, _ = _uncached_greedy(fresh_model.original_model, batch.input_ids, batch.attention_mask, 6)

    def forget(_module, args, kwargs):
        return args, {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "layer_past")}

    handles = [m.register_forward_pre_hook(forget, with_kwargs=True)
               for m in fresh_model.original_model.modules() if isinstance(m, AttentionBridge)]
    try:
        with pytest.warns(fastpaths.FastPathWarning) as caught:
            got = forward.last_logits(fresh_model, batch)
            packed = forward.packed_last_logits(fresh_model, PROMPTS)
            ids = generate_ids(fresh_model, PROMPTS, max_new_tokens=6, progress=False, batch_size=len(PROMPTS))
    finally:
        for h in handles:
            h.remove()
    assert {str(w.message).split(" fast path")[0].removeprefix("the ") for w in caught} == set(fastpaths.PATHS)
    assert packed is None
    torch.testing.assert_close(got, plain, atol=1e-4, rtol=1e-4)
    eos = fresh_model.tokenizer.eos_token_id
    for j, row in enumerate(ids):
        want = reference[j, batch.input_ids.shape[1]:].tolist()
        assert row == want[: len(row)] and (len(row) == 6 or row[-1] == eos)


@pytest.mark.unit
def test_forward_options_change_only_inside_the_block_and_come_back_after_an_error():
    defaults = forward.current_options()
    assert defaults == forward.ForwardOptions(share_prefix=True, pack=True, pack_tokens=384, pack_batch_tokens=1536)
    with forward.forward_options(pack=False) as outer:
        assert forward.current_options() is outer and not outer.pack and outer.share_prefix
        with pytest.raises(RuntimeError, match="inside"), forward.forward_options(share_prefix=False, pack_tokens=8):
            assert forward.current_options() == dataclasses.replace(outer, share_prefix=False, pack_tokens=8)
            raise RuntimeError("inside")
        assert forward.current_options() is outer  # nested blocks start from, and return to, the enclosing one
    assert forward.current_options() == defaults
    with pytest.raises(TypeError), forward.forward_options(pack_token=8):  # a misspelt name changes nothing
        pass
    with pytest.raises(ValueError, match="pack_tokens must be a positive int"):
        forward.ForwardOptions(pack_tokens=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.pack = False  # type: ignore[misc]
    assert forward.current_options() == defaults


@pytest.mark.unit
def test_forward_options_are_per_thread():
    """A block in one thread is not seen by another (the settings live in a ContextVar, not a module global)."""
    import threading

    entered, release, seen = threading.Event(), threading.Event(), []

    def other():
        entered.wait()
        seen.append(forward.current_options().share_prefix)
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    with forward.forward_options(share_prefix=False):
        entered.set()
        release.wait(10)
        assert forward.current_options().share_prefix is False
    thread.join(10)
    assert seen == [True]
