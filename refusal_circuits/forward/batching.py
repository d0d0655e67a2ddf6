"""Chat batches on the model's device, bucketed by length, and the Hugging Face parts the fast paths run."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from refusal_circuits.chat import ChatBatch, ChatFormat, chat_format, tokenize_chat
from refusal_circuits.data import PromptSet
from refusal_circuits.models import HookedModel, hf_model_of


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding costs little."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def context_length(model: HookedModel) -> int | None:
    """The model's context window, when its config states one."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    return int(n_ctx) if n_ctx else None


def check_context(model: HookedModel, prompts: PromptSet, *, adv_suffix: str | None = None) -> None:
    """Raise :class:`InputError` naming the first prompt (id, language, source) longer than the model's context.

    Commands call this on every prompt they will use before the first forward pass, so a prompt that is too long
    stops them before any work is done or any file is written.
    """
    n_ctx = context_length(model)
    if n_ctx is None or not len(prompts):
        return
    fmt = chat_format(model.tokenizer)
    for start in range(0, len(prompts), 256):
        part = prompts[start : start + 256]
        tokenize_chat(model.tokenizer, part.instructions, fmt=fmt, adv_suffix=adv_suffix, max_length=n_ctx,
                      names=[f"{r.id!r} ({r.lang}) of {prompts.source}" for r in part])


def device_of(model: HookedModel) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


def batches(model: HookedModel, instructions: Sequence[str], batch_size: int, *, fmt: ChatFormat | None = None,
            adv_suffix: str | None = None, names: Sequence[str] | None = None, progress: bool = False,
            desc: str = "") -> Iterator[tuple[list[int], ChatBatch]]:
    """Length-bucketed chat batches on the model's device, with the input indices of each row.

    With ``progress`` a tqdm bar named ``desc`` counts the batches.
    """
    tokenizer = model.tokenizer
    fmt = fmt or chat_format(tokenizer)
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in instructions]
    device = device_of(model)
    for idx in tqdm(length_buckets(lengths, batch_size), desc=desc, disable=not progress, leave=False):
        batch = tokenize_chat(tokenizer, [instructions[i] for i in idx], fmt=fmt, adv_suffix=adv_suffix,
                              max_length=context_length(model),
                              names=[names[i] for i in idx] if names is not None else None)
        yield idx, batch.to(device)


def first_rows(batch: ChatBatch, k: int) -> ChatBatch:
    """The first ``k`` rows of a batch (still left-padded to the batch's width)."""
    return ChatBatch(batch.input_ids[:k], batch.attention_mask[:k], batch.spans[:k], batch.n_post)


def decoder_parts(model: HookedModel) -> tuple[Any, Any] | None:
    """``(base decoder, output embedding)`` of a bridge's Hugging Face twin (``Qwen2ForCausalLM.model``,
    ``GPT2LMHeadModel.transformer``, ... and its ``lm_head``), or None for a model without both."""
    hf = hf_model_of(model)
    if hf is None:
        return None
    base = getattr(hf, "base_model", None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if base is None or base is hf or head is None:
        return None
    return base, head


def decoder_hidden(base: Any, **inputs: Any) -> Tensor:
    """The base decoder's last hidden states (after the final norm) for ``inputs``, without building a cache."""
    return base(**inputs, use_cache=False).last_hidden_state
