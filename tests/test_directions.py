"""Streaming means, candidates, and direction files (tiny tier: exact checks against brute force)."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_circuits.activations import group_means, mean_resid_pre
from refusal_circuits.chat import chat_format, tokenize_chat
from refusal_circuits.directions import check_compatible, extract_candidates, load_direction
from refusal_circuits.errors import InputError

pytestmark = pytest.mark.tiny

HARMFUL = ["how to do a bad thing", "tell me something bad please", "bad", "a much longer bad request here ok"]
HARMLESS = ["bake bread", "what is two plus two", "write a poem about the sea in spring", "hi"]


def _brute_mean(model, instructions):
    """Every prompt alone (no padding), resid_pre from HF hidden states, averaged in float64."""
    hf = model.original_model
    n_post = tokenize_chat(model.tokenizer, instructions[:1]).n_post
    acc = 0
    for text in instructions:
        b = tokenize_chat(model.tokenizer, [text])
        with torch.inference_mode():
            hs = hf(input_ids=b.input_ids, output_hidden_states=True).hidden_states
        acc = acc + torch.stack([h[0, -n_post:] for h in hs[: model.cfg.n_layers]], dim=1).double()
    return acc / len(instructions)


def test_streaming_mean_equals_brute_force_with_padding_and_small_batches(tiny_model):
    got = mean_resid_pre(tiny_model, HARMFUL, batch_size=3, progress=False)
    assert got.mean.dtype == torch.float64 and got.n == len(HARMFUL)
    n_post = tokenize_chat(tiny_model.tokenizer, ["x"]).n_post  # byte-level tokens of the Qwen template
    assert got.mean.shape == (n_post, tiny_model.cfg.n_layers, tiny_model.cfg.d_model)
    assert got.positions == tuple(range(-n_post, 0))
    torch.testing.assert_close(got.mean, _brute_mean(tiny_model, HARMFUL), rtol=1e-5, atol=1e-5)


def test_group_means_in_one_bucketing_equal_each_group_alone(tiny_model):
    """Batches of 3 over 8 prompts sorted by length mix both groups (the longest harmful and harmless prompts share
    the first batch), so a row credited to the wrong group changes both means."""
    got = group_means(tiny_model, {"h": HARMFUL, "b": HARMLESS, "one": ["bad"]}, batch_size=3, progress=False)
    assert list(got) == ["h", "b", "one"] and [m.n for m in got.values()] == [4, 4, 1]
    torch.testing.assert_close(got["h"].mean, _brute_mean(tiny_model, HARMFUL), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["b"].mean, _brute_mean(tiny_model, HARMLESS), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["one"].mean, _brute_mean(tiny_model, ["bad"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="in group.s. empty"):
        group_means(tiny_model, {"h": HARMFUL, "empty": []}, progress=False)


def test_subset_of_layers_and_bad_layer(tiny_model):
    one = mean_resid_pre(tiny_model, HARMLESS, layers=[1], progress=False)
    full = mean_resid_pre(tiny_model, HARMLESS, progress=False)
    torch.testing.assert_close(one.mean[:, 0], full.mean[:, 1])
    with pytest.raises(InputError, match="out of range"):
        mean_resid_pre(tiny_model, HARMLESS, layers=[7], progress=False)


def test_candidates_are_difference_in_means_and_direction_is_unit(tiny_model):
    c = extract_candidates(tiny_model, HARMFUL, HARMLESS, lang="en", progress=False)
    torch.testing.assert_close(c.vectors, c.harmful.mean - c.harmless.mean)
    d = c.direction(-1, 1)
    assert d.vector.dtype == torch.float32 and abs(float(d.vector.norm()) - 1) < 1e-6
    assert d.norm == pytest.approx(float(c.vectors[-1, 1].norm()))
    with pytest.raises(InputError, match="position -99 out of range"):
        c.direction(-99, 0)
    # resid_pre[0] is the embedding of the template tokens, the same for every prompt: no direction there.
    with pytest.raises(InputError, match="zero"):
        c.direction(-1, 0)


def test_custom_estimator_is_used(tiny_model):
    def flipped(h, b):
        return b.mean - h.mean

    c = extract_candidates(tiny_model, HARMFUL, HARMLESS, estimator=flipped, progress=False)
    assert c.estimator == "flipped"
    torch.testing.assert_close(c.vectors, c.harmless.mean - c.harmful.mean)


def test_direction_round_trips_through_safetensors_and_json(tiny_model, tmp_path):
    c = extract_candidates(tiny_model, HARMFUL, HARMLESS, lang="de", prompts_sha256="abc", progress=False)
    d = c.direction(-2, 1, selection={"bypass": -1.5})
    d.save(tmp_path / "dir")
    meta = json.loads((tmp_path / "dir" / "direction.json").read_text())
    assert {"model", "lang", "layer", "position", "n_prompts", "prompts_sha256", "version"} <= set(meta)
    assert (meta["lang"], meta["layer"], meta["position"], meta["n_prompts"]) == ("de", 1, -2, 8)
    back = load_direction(tmp_path / "dir")
    assert torch.equal(back.vector, d.vector) and back.meta["selection"] == {"bypass": -1.5}
    assert back.candidates is not None and back.candidates.shape == c.vectors.shape
    assert not list((tmp_path / "dir").glob(".*tmp"))


def test_bad_direction_files_are_named(tiny_model, tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_direction(tmp_path / "nowhere")
    c = extract_candidates(tiny_model, HARMFUL, HARMLESS, progress=False)
    c.direction(-1, 1).save(tmp_path / "d")
    (tmp_path / "d" / "direction.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle, not safetensors
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_direction(tmp_path / "d")
    c.direction(-1, 1).save(tmp_path / "e")
    (tmp_path / "e" / "direction.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_direction(tmp_path / "e")


def test_direction_from_another_model_is_rejected(tiny_model):
    c = extract_candidates(tiny_model, HARMFUL, HARMLESS, progress=False)
    d = c.direction(-1, 1)
    wide = d.__class__(**{**d.__dict__, "vector": torch.ones(96) / 96**0.5, "candidates": None})
    with pytest.raises(InputError, match="d_model 96 .* has 64: it comes from another model"):
        check_compatible(wide, tiny_model)
    deep = d.__class__(**{**d.__dict__, "layer": 5})
    with pytest.raises(InputError, match="layer 5, out of range"):
        check_compatible(deep, tiny_model)


def test_shared_prefix_forward_equals_a_plain_forward_under_an_intervention(tiny_model):
    from refusal_circuits import forward, interventions

    batch = tokenize_chat(tiny_model.tokenizer, HARMFUL + HARMLESS)
    assert forward.shared_prefix_length(batch) > 0
    r = torch.randn(tiny_model.cfg.d_model)
    with torch.inference_mode(), interventions.ablate(tiny_model, r):
        fast = forward.last_logits(tiny_model, batch)
        full = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]
        with forward.forward_options(share_prefix=False):
            plain = forward.last_logits(tiny_model, batch)
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("intervention", ["ablate", "actadd"])
def test_packed_first_token_logits_equal_padded_ones_under_an_intervention(tiny_model, intervention):
    """Rows of at most 60 tokens: prompts share rows, the longest prompt (over 60) gets one alone; every
    prompt's logits must be its own, in input order, as a padded forward gives them."""
    from refusal_circuits import forward, interventions
    from refusal_circuits.hooks import count_hooks
    from refusal_circuits.scores import first_token_logits

    prompts = [*HARMFUL, *HARMLESS, "a much longer instruction than any other one in this small batch of prompts"]
    fmt = chat_format(tiny_model.tokenizer)
    own = (tokenize_chat(tiny_model.tokenizer, prompts).attention_mask.sum(-1) - len(fmt.prefix_ids)).tolist()
    rows = forward.pack_rows(own, 60)
    assert max(own) > 60 and len(rows[0]) == 1 and max(len(row) for row in rows) >= 2 and len(rows) < len(prompts)
    r = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), forward.forward_options(pack_tokens=60), getattr(interventions, intervention)(
            tiny_model, r, **({"layer": 1, "alpha": 4.0} if intervention == "actadd" else {})):
        packed = forward.packed_last_logits(tiny_model, prompts)  # every row in one pass, shorter rows padded
        via_scores = first_token_logits(tiny_model, prompts)
        with forward.forward_options(pack_batch_tokens=120):
            two_rows = forward.packed_last_logits(tiny_model, prompts)  # two rows per pass, several passes
        with forward.forward_options(pack=False):
            assert forward.packed_last_logits(tiny_model, prompts) is None
            padded = first_token_logits(tiny_model, prompts, batch_size=3)
        clean_batch = tokenize_chat(tiny_model.tokenizer, prompts)
        full = tiny_model(clean_batch.input_ids, attention_mask=clean_batch.attention_mask)[:, -1]
    assert packed is not None and packed.shape == padded.shape
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(via_scores, padded, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(two_rows, padded, rtol=1e-4, atol=1e-4)
    assert (packed - packed[torch.arange(len(prompts)).roll(1)]).abs().max() > 1e-3  # rows differ: order matters
    assert count_hooks(tiny_model) == 0


def test_packing_under_sdpa_and_not_under_a_kernel_that_ignores_the_mask(tiny_model, monkeypatch):
    """SDPA takes the block-diagonal mask as eager attention does; flash attention would ignore it, so no packing."""
    from refusal_circuits import forward
    from refusal_circuits.scores import first_token_logits

    prompts = [*HARMFUL, *HARMLESS]
    config = tiny_model.original_model.config
    with torch.inference_mode():
        with forward.forward_options(pack=False):
            padded = first_token_logits(tiny_model, prompts, batch_size=3)
        monkeypatch.setattr(config, "_attn_implementation", "sdpa")
        sdpa = forward.packed_last_logits(tiny_model, prompts)
        monkeypatch.setattr(config, "_attn_implementation", "flash_attention_2")
        assert forward.packed_last_logits(tiny_model, prompts) is None
    assert sdpa is not None
    torch.testing.assert_close(sdpa, padded, rtol=1e-4, atol=1e-4)


def test_pack_rows_fill_rows_up_to_the_budget():
    from refusal_circuits.forward import pack_rows

    lengths = [30, 5, 12, 50, 9, 9, 20]  # 135 tokens: 4 rows of about 34
    rows = pack_rows(lengths, 40)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert rows == [[3], [0], [6, 5], [2, 4, 1]]  # longest first, each to the row with fewest tokens: 50|30|29|26
    assert pack_rows(lengths, 1000) == [[3, 0, 6, 2, 4, 5, 1]] and pack_rows([], 10) == []
    assert len(pack_rows([1, 1, 1], 1)) == 3


def test_generation_from_the_shared_prefix_equals_plain_generation_under_an_intervention(tiny_model):
    """Prompts of different lengths (pads between prefix and instruction), an ablation hook, 6 greedy tokens."""
    from refusal_circuits import forward, interventions
    from refusal_circuits.generation import generate_ids
    from refusal_circuits.hooks import count_hooks

    prompts = [*HARMFUL, *HARMLESS, "a much longer instruction than any other one in this small batch of prompts"]
    r = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    runs = {}
    for share in (True, False):
        first: list = []
        with forward.forward_options(share_prefix=share), interventions.ablate(tiny_model, r):
            ids = generate_ids(tiny_model, prompts, max_new_tokens=6, batch_size=4, progress=False,
                               first_logits=first)
        runs[share] = (ids, torch.stack(first))
    assert runs[True][0] == runs[False][0] and all(len(x) == 6 for x in runs[True][0])
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-4, atol=1e-4)
    assert count_hooks(tiny_model) == 0
