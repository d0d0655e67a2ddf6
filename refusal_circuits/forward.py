"""Forward passes that compute only what a caller needs.

Two tricks keep the library near the cost of one plain forward pass:

* :func:`run_until` stops the forward pass right after a given hook fired (an exception that the hook
  raises and we catch), so collecting ``resid_pre`` never pays for the last layers or the unembedding.
* :func:`last_logits` unembeds only the last position. The Qwen2.5 unembedding is 151,936 x 896: over a
  41-token prompt it costs about a quarter of the whole forward pass, and selection needs one position.

Every function takes the :class:`~refusal_circuits.models.HookedModel` protocol; the fast paths use the Hugging
Face twin of a ``TransformerBridge`` (whose hook points fire when the twin runs) and fall back to a full forward
for other models.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from refusal_circuits import hooks
from refusal_circuits.chat import ChatBatch, ChatFormat, chat_format, tokenize_chat
from refusal_circuits.models import hf_model_of


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding costs little."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def context_length(model: Any) -> int | None:
    """The model's context window, when its config states one."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    return int(n_ctx) if n_ctx else None


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def batches(model: Any, instructions: Sequence[str], batch_size: int, *, fmt: ChatFormat | None = None,
            adv_suffix: str | None = None, names: Sequence[str] | None = None
            ) -> Iterator[tuple[list[int], ChatBatch]]:
    """Length-bucketed chat batches on the model's device, with the input indices of each row."""
    tokenizer = model.tokenizer
    fmt = fmt or chat_format(tokenizer)
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in instructions]
    device = device_of(model)
    for idx in length_buckets(lengths, batch_size):
        batch = tokenize_chat(tokenizer, [instructions[i] for i in idx], fmt=fmt, adv_suffix=adv_suffix,
                              max_length=context_length(model),
                              names=[names[i] for i in idx] if names is not None else None)
        yield idx, batch.to(device)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early; never escapes :func:`run_until`."""


def run_until(model: Any, batch: ChatBatch, stop_at: str, extra: Sequence[tuple[str, hooks.HookFn]] = ()) -> None:
    """Run ``batch`` through ``model`` with the ``extra`` hooks, stopping right after hook ``stop_at`` fired.

    The stop hook is registered last, so the ``extra`` hooks on the same point still see the activation.
    """

    def stop(_x: Tensor, _name: str) -> None:
        raise _StopForward

    with hooks.add_hooks(model, [*extra, (stop_at, stop)]):
        try:
            model(batch.input_ids, attention_mask=batch.attention_mask)
        except _StopForward:
            return


def last_logits(model: Any, batch: ChatBatch) -> Float[Tensor, "batch vocab"]:
    """Logits at the last position of every row (the first generated token's distribution).

    Hooks registered on the model apply. For a ``TransformerBridge`` this runs the Hugging Face decoder and
    unembeds the last position only; other models run a full forward.
    """
    hf = hf_model_of(model)
    if hf is not None and hasattr(hf, "model") and hasattr(hf, "lm_head"):
        out = hf.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False)
        return hf.lm_head(out.last_hidden_state[:, -1])
    return model(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]


def token_logprobs(model: Any, input_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"]
                   ) -> Float[Tensor, "batch seq vocab"]:
    """Log-probabilities at every position (hooks apply), with left-padding-aware positions."""
    hf = hf_model_of(model)
    if hf is not None:
        from refusal_circuits.chat import position_ids

        logits = hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                    use_cache=False).logits
    else:
        logits = model(input_ids, attention_mask=attention_mask)
    return torch.log_softmax(logits.float(), dim=-1)
