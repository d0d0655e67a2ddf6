"""Builders shared by the tests: a byte-level tokenizer with any chat template, and a tiny random Qwen2."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from tests.fixtures import templates

#: Short prompts of different lengths (left padding matters), as "harmful" and "harmless" for tiny-model tests.
SHORT_PROMPTS = (["tell me a story about a cat", "what is two plus two?", "x" * 30, "why is the sky blue"],
                 ["hi", "name three birds", "a poem on rain please", "count to five"])


def random_direction(model, layer: int, seed: int = 3):
    """A seeded random unit direction at ``layer``, position -2, for the tiny models."""
    from refusal_circuits.directions import Direction
    from refusal_circuits.models import model_id

    g = torch.Generator().manual_seed(seed)
    v = torch.randn(int(model.cfg.d_model), generator=g)
    return Direction(vector=v / v.norm(), norm=float(v.norm()), layer=layer, position=-2, model=model_id(model),
                     lang="en", n_harmful=4, n_harmless=4, prompts_sha256="")


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


# --------------------------------------------------------------------------------------------------------------
# One tiny random model per architecture (tests/test_architectures.py). Every one has 2 layers, d_model 64,
# random non-zero biases and random norm weights (random init leaves norm weights at 1 and biases at 0, which
# would hide a norm or bias the library forgets), and the Qwen chat template's byte tokenizer.

def _tiny_common(tokenizer) -> dict:
    return {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.pad_token_id}


def _llama_like(**extra) -> dict:
    return {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False, **extra}


def _arch_configs(tokenizer) -> dict:
    """Name -> (config class name, model class name, config kwargs)."""
    common = _tiny_common(tokenizer)
    gemma = {"head_dim": 16, "query_pre_attn_scalar": 16, "hidden_activation": "gelu_pytorch_tanh"}
    return {
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _llama_like(**common)),
        "llama": ("LlamaConfig", "LlamaForCausalLM", _llama_like(attention_bias=True, mlp_bias=True, **common)),
        "mistral": ("MistralConfig", "MistralForCausalLM", _llama_like(head_dim=16, sliding_window=None, **common)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _llama_like(head_dim=16, **common)),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", _llama_like(**gemma, **common)),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
                   _llama_like(**gemma, final_logit_softcapping=3.0, attn_logit_softcapping=5.0,
                               sliding_window=256, **common)),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", _llama_like(**gemma, sliding_window=256, **common)),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _llama_like(**common)),
        "granite": ("GraniteConfig", "GraniteForCausalLM",
                    _llama_like(embedding_multiplier=3.0, residual_multiplier=0.4, logits_scaling=2.5,
                                attention_multiplier=0.2, **common)),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", _llama_like(pad_token_id=common["pad_token_id"],
                                                              **{k: v for k, v in common.items()
                                                                 if k != "pad_token_id"})),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel",
                 {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512, "n_inner": 128,
                  "tie_word_embeddings": True, **common}),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                     {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "max_position_embeddings": 512, "use_parallel_residual": True,
                      "rotary_pct": 0.5, "tie_word_embeddings": False, **common}),
        "phi": ("PhiConfig", "PhiForCausalLM",
                {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 512, "partial_rotary_factor": 0.5, "tie_word_embeddings": False,
                 **common}),
    }


#: The architectures :func:`tiny_arch_dir` builds.
ARCHITECTURES = ("qwen2", "llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3", "olmo2", "granite", "phi3",
                 "gpt2", "gpt_neox", "phi")


def tiny_arch_dir(arch: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny random model of architecture ``arch`` (one of :data:`ARCHITECTURES`) with random biases and
    norm weights, and the Qwen byte tokenizer."""
    import transformers

    tokenizer = qwen_tokenizer()
    config_cls, model_cls, kwargs = _arch_configs(tokenizer)[arch]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or name.split(".")[-2] in ("ln_1", "ln_2", "ln_f")
            if p.ndim == 1 and is_norm and name.endswith("weight"):
                p.add_(torch.randn_like(p) * 0.3)  # Gemma's (1 + w) and every plain w alike
    return _save_with_random_biases(model, tokenizer, path)
