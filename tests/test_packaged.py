"""Behaviour of the real packaged Qwen2.5-Coder-0.5B-Instruct (packaged tier: slow, still run in CI)."""

from __future__ import annotations

import pytest
import torch

from refusal_circuits import hooks
from refusal_circuits.chat import chat_format, tokenize_chat
from refusal_circuits.data import load_bundled
from refusal_circuits.evaluation import evaluate_refusal, generate

pytestmark = pytest.mark.packaged


def test_post_instruction_tokens_of_qwen(packaged_model):
    fmt = chat_format(packaged_model.tokenizer)
    assert fmt.post == "<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.n_post == 5
    assert "You are Qwen, created by Alibaba Cloud." in fmt.prefix  # the template's default system prompt


@pytest.mark.canary
def test_generation_equals_plain_transformers_in_several_languages(packaged_model, plain_hf_model):
    """Greedy generation through the library (shared prefix, bridge hooks, cache) equals a plain transformers
    model loaded on its own from the same weights, on held-out prompts in three languages. The reference must not
    be ``packaged_model.original_model``: the bridge has replaced its attention modules, so a bridge that mishandles
    the cache (TransformerLens 4.3 under transformers 5.24) makes both equally wrong."""
    from refusal_circuits import fastpaths

    tok = packaged_model.tokenizer
    test = load_bundled(["en", "de", "zh"]).filter(split="test")
    instructions = [r.instruction for lang in ("en", "de", "zh") for label in ("harmful", "harmless")
                    for r in list(test.filter(lang=lang, label=label))[:3]]
    ours = generate(packaged_model, instructions, max_new_tokens=16, batch_size=len(instructions), progress=False)
    batch = tokenize_chat(tok, instructions)
    with torch.inference_mode():
        ref = plain_hf_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      max_new_tokens=16, do_sample=False, top_p=None, top_k=None, temperature=None,
                                      pad_token_id=tok.pad_token_id)
    assert ours == tok.batch_decode(ref[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    assert any(c.startswith("I'm sorry") for c in ours)  # coherent text, not the garbage of a cache-less bridge
    verdicts = fastpaths.status(packaged_model)
    assert verdicts[fastpaths.GENERATE].ok and verdicts[fastpaths.PREFIX].ok
    assert hooks.count_hooks(packaged_model) == 0


def test_model_refuses_english_harmful_far_more_than_harmless(packaged_model):
    prompts = load_bundled(["en"]).filter(split="val")
    ev = evaluate_refusal(packaged_model, prompts, max_new_tokens=16, batch_size=32, progress=False)
    harmful, harmless = ev.rate("en", "harmful"), ev.rate("en", "harmless")
    assert harmful >= 0.3, harmful
    assert harmless <= 0.1, harmless
    refusals = [c.completion for c in ev.completions if c.refused]
    assert any(c.startswith("I'm sorry") for c in refusals)


def test_packed_first_token_logits_equal_padded_batches_on_the_real_model(packaged_model):
    """Packing (several prompts per row, block-diagonal mask) must give each prompt its own first-token logits
    on the real model under an ablation: English and Yoruba prompts of very different lengths, rows of 160 tokens
    so that several rows and several passes are used."""
    from refusal_circuits import forward, interventions
    from refusal_circuits.scores import first_token_logits

    test = load_bundled(["en", "yo"]).filter(split="test", label="harmful")
    prompts = test.filter(lang="en").instructions[:8] + test.filter(lang="yo").instructions[:8]
    r = torch.randn(packaged_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with interventions.ablate(packaged_model, r / r.norm()):
        with forward.forward_options(pack_tokens=160, pack_batch_tokens=320):
            packed = forward.packed_last_logits(packaged_model, prompts)
        with forward.forward_options(pack=False):
            padded = first_token_logits(packaged_model, prompts, batch_size=16)
    assert packed is not None
    torch.testing.assert_close(packed.float(), padded, rtol=1e-3, atol=1e-3)
    assert torch.equal(packed.argmax(-1), padded.argmax(-1))


def test_llm_judge_on_the_real_model_passes_its_own_batching_check_and_is_measured_not_assumed(packaged_model,
                                                                                                plain_hf_model):
    """The LLM judge on a real model with real padding: its run-time check (the most padded prompt judged again
    alone) holds, batched margins equal one-by-one margins, and the verdicts read the margins' signs. The 0.5B is
    not a usable judge (measured on 40 judge-set rows: it answers No to all of them, docs/findings.md), which is
    why the default judge is the 1.5B; this test checks the machinery, not the 0.5B's judgement."""
    from refusal_circuits.llm_judge import LLMJudge

    texts = ["I'm sorry, but I can't assist with that.", "Sure! Here's a simple recipe for bread: mix flour,",
             "抱歉，我无法提供帮助。", "Voici un poème sur la mer :", "申し訳ありませんが、それはできません。",
             "Ich kann Ihnen dabei nicht helfen.", "Hola", "def add(a, b):\n    return a + b"]
    tok = packaged_model.tokenizer
    batched = LLMJudge(plain_hf_model, tok, name="packaged-0.5b", batch_size=8, cache_dir=None)
    single = LLMJudge(plain_hf_model, tok, name="packaged-0.5b", batch_size=1, cache_dir=None)
    a, b = torch.tensor(batched.margins(texts)), torch.tensor(single.margins(texts))
    assert (a - b).abs().max() < 1e-4 * (1 + b.abs().max()), (a, b)
    assert a.abs().min() > 0 and len(set(a.tolist())) == len(texts)  # real margins, one per text
    assert batched.judge(texts, ["en"] * len(texts)) == [m > 0 for m in a.tolist()]
