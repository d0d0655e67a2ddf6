"""Builders shared by the tests: a byte-level tokenizer with any chat template, and a tiny random Qwen2."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from tests.fixtures import templates


def byte_tokenizer(chat_template: str | None, specials: list[str], *, bos: str | None = None,
                   eos: str | None = None, pad: str | None = None) -> PreTrainedTokenizerFast:
    """A real fast tokenizer whose ordinary tokens are single bytes, plus the given special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.add_special_tokens({"additional_special_tokens": specials})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer(templates.QWEN2, templates.QWEN2_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")


def tiny_qwen_dir(path: Path, seed: int = 0, n_layers: int = 2) -> Path:
    """Save a tiny random Qwen2 (2 layers, d_model 64, 4 query / 2 key-value heads) with the byte tokenizer."""
    tokenizer = qwen_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return _save_with_random_biases(Qwen2ForCausalLM(config), tokenizer, path)


def _save_with_random_biases(model, tokenizer, path: Path) -> Path:
    """Random init leaves biases at zero; make them non-zero so bias handling is exercised; save both."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_llama_dir(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama with biases on every attention and MLP projection (o_proj included), so the output
    bias of attention is a residual-stream writer outside the heads; Qwen's chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = qwen_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return _save_with_random_biases(LlamaForCausalLM(config), tokenizer, path)
