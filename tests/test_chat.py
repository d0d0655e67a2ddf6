"""Chat formatting and post-instruction positions on four real templates (unit tier, byte tokenizers)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refusal_circuits.chat import PLAIN_SUFFIX, Span, chat_format, tokenize_chat
from refusal_circuits.errors import InputError
from tests.fixtures import templates
from tests.helpers import byte_tokenizer

pytestmark = pytest.mark.unit

CASES = {
    "qwen2": (templates.QWEN2, templates.QWEN2_SPECIALS, {"eos": "<|im_end|>", "pad": "<|endoftext|>"},
              "<|im_end|>\n<|im_start|>assistant\n", "You are Qwen"),
    "llama3": (templates.LLAMA3, templates.LLAMA3_SPECIALS, {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>",
                                                            "pad": "<|eot_id|>"},
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<|begin_of_text|>"),
    "gemma": (templates.GEMMA, templates.GEMMA_SPECIALS, {"bos": "<bos>", "eos": "<eos>", "pad": "<eos>"},
              "<end_of_turn>\n<start_of_turn>model\n", "<bos><start_of_turn>user\n"),
    "mistral": (templates.MISTRAL, templates.MISTRAL_SPECIALS, {"bos": "<s>", "eos": "</s>", "pad": "</s>"},
                " [/INST]", "<s>[INST] "),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    template, specials, kw, post, prefix_part = CASES[request.param]
    return byte_tokenizer(template, specials, **kw), post, prefix_part


def test_post_instruction_text_is_found_from_the_template(case):
    tok, post, prefix_part = case
    fmt = chat_format(tok)
    assert fmt.post == post
    assert prefix_part in fmt.prefix
    assert tok.decode(list(fmt.post_ids)) == post


def test_batch_is_left_padded_and_ends_with_the_post_instruction_tokens(case):
    tok, post, _ = case
    fmt = chat_format(tok)
    batch = tokenize_chat(tok, ["Hi", "Tell me a much longer story about a turtle"], fmt=fmt)
    assert batch.input_ids.shape == batch.spans.shape == batch.attention_mask.shape
    short, long_ = batch.attention_mask.sum(-1).tolist()
    assert short < long_ and batch.attention_mask[1].all()
    assert batch.attention_mask[0, : long_ - short].sum() == 0, "padding must be on the left"
    for row in range(2):
        tail = batch.input_ids[row, -batch.n_post :].tolist()
        assert tail == list(fmt.post_ids)
        assert (batch.spans[row, -batch.n_post :] == Span.POST).all()
        assert (batch.spans[row][batch.attention_mask[row] == 0] == Span.PAD).all()
    # The tokens reproduce the full rendered prompt exactly.
    real = batch.input_ids[0][batch.attention_mask[0] == 1].tolist()
    assert tok.decode(real) == fmt.render(tok, "Hi")


def test_instruction_and_adversarial_suffix_spans(case):
    tok, _, _ = case
    batch = tokenize_chat(tok, ["Do X"], adv_suffix=" zz!")
    spans = batch.spans[0].tolist()
    ids = batch.input_ids[0].tolist()
    instr = [i for i, s in zip(ids, spans, strict=True) if s == Span.INSTRUCTION]
    adv = [i for i, s in zip(ids, spans, strict=True) if s == Span.ADV_SUFFIX]
    assert tok.decode(instr) == "Do X" and tok.decode(adv) == " zz!"
    assert spans.index(Span.ADV_SUFFIX) > max(i for i, s in enumerate(spans) if s == Span.INSTRUCTION)


def test_trimming_templates_place_the_trimmed_instruction():
    tok = byte_tokenizer(templates.LLAMA3, templates.LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>")
    fmt = chat_format(tok)
    assert fmt.instruction_text(tok, "  padded  ") == "padded"


def test_explicit_system_prompt_replaces_the_default():
    tok = byte_tokenizer(templates.QWEN2, templates.QWEN2_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")
    fmt = chat_format(tok, system_prompt="Be terse.")
    assert "Be terse." in fmt.prefix and "Qwen" not in fmt.prefix


def test_template_that_rejects_system_role_gives_a_clear_error():
    tok = byte_tokenizer(templates.GEMMA, templates.GEMMA_SPECIALS, bos="<bos>", eos="<eos>")
    with pytest.raises(InputError, match="System role not supported"):
        chat_format(tok, system_prompt="x")


def test_plain_fallback_without_template():
    tok = byte_tokenizer(None, [], bos=None, eos="\x00", pad="\x00")
    fmt = chat_format(tok)
    assert not fmt.uses_template and fmt.post == PLAIN_SUFFIX
    batch = tokenize_chat(tok, ["Hello"], fmt=fmt)
    assert tok.decode(batch.input_ids[0].tolist()) == "User: Hello\nAssistant:"


def test_too_long_prompt_is_named():
    tok = byte_tokenizer(templates.QWEN2, templates.QWEN2_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")
    with pytest.raises(InputError, match="prompt p7 is .* more than the model's context of 50"):
        tokenize_chat(tok, ["x" * 100], max_length=50, names=["p7"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
                .filter(lambda s: s.strip()), min_size=1, max_size=4),
       st.sampled_from(list(CASES)))
def test_formatting_property(instructions, name):
    """Property: for any text and template, each row decodes to the rendered prompt and ends with the post ids."""
    template, specials, kw, _, _ = CASES[name]
    tok = byte_tokenizer(template, specials, **kw)
    fmt = chat_format(tok)
    batch = tokenize_chat(tok, instructions, fmt=fmt)
    for row, text in enumerate(instructions):
        real = batch.input_ids[row][batch.attention_mask[row] == 1].tolist()
        assert tok.decode(real) == fmt.render(tok, text)
        assert real[-fmt.n_post :] == list(fmt.post_ids)


_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(str.strip)


@settings(max_examples=60, deadline=None)
@given(st.lists(_TEXT, min_size=1, max_size=3), _TEXT, st.sampled_from(list(CASES)))
def test_span_labels_property(instructions, suffix, name):
    """Property: the labelled spans decode to the template prefix, the instruction as the template places it, the
    adversarial suffix and the post-instruction text, in that order, for any text and template."""
    template, specials, kw, _, _ = CASES[name]
    tok = byte_tokenizer(template, specials, **kw)
    fmt = chat_format(tok)
    batch = tokenize_chat(tok, instructions, fmt=fmt, adv_suffix=suffix)
    for row, text in enumerate(instructions):
        ids, spans = batch.input_ids[row].tolist(), batch.spans[row].tolist()
        real = [s for s in spans if s != Span.PAD]
        assert real == sorted(real), "spans come in template order"
        part = {s: tok.decode([i for i, t in zip(ids, spans, strict=True) if t == s]) for s in Span if s != Span.PAD}
        assert part[Span.PREFIX] == tok.decode(list(fmt.prefix_ids))
        assert part[Span.INSTRUCTION] == fmt.instruction_text(tok, text)
        assert part[Span.ADV_SUFFIX] == suffix
        assert part[Span.POST] == fmt.post


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab ", min_size=1, max_size=60).filter(str.strip), min_size=1, max_size=4),
       st.integers(min_value=1, max_value=200))
def test_context_limit_property(instructions, max_length):
    """Property: a batch fails exactly when one of its prompts is longer than the context, naming the first one."""
    tok = byte_tokenizer(templates.QWEN2, templates.QWEN2_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")
    fmt = chat_format(tok)
    lengths = [len(tokenize_chat(tok, [text], fmt=fmt).input_ids[0]) for text in instructions]
    names = [f"p{i}" for i in range(len(instructions))]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if not too_long:
        assert tokenize_chat(tok, instructions, fmt=fmt, max_length=max_length, names=names).input_ids.shape[1] == max(lengths)
        return
    first = too_long[0]
    with pytest.raises(InputError, match=f"prompt p{first} is {lengths[first]} tokens long, more than the model's "
                                         f"context of {max_length}$"):
        tokenize_chat(tok, instructions, fmt=fmt, max_length=max_length, names=names)
