"""Forward passes over chat batches, with the chat template's shared prefix run once per batch.

The template prefix (Qwen's default system prompt and user header, more than half of a typical 41-token prompt)
is the same in every row: :func:`decoder_forward` runs it once and continues every row from its key-value cache.
Hooks fire on the prefix pass too, so an intervention applies there as well; hooks that *read* activations are
registered for the continuation only, which covers every position a reader asks for (the post-instruction tokens).
Whether the prefix is shared is decided by :func:`shared_prefix`, which also proves the shortcut on the model the
first time (:mod:`refusal_circuits.fastpaths`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from refusal_circuits import fastpaths, hooks
from refusal_circuits.chat import ChatBatch, Span, position_ids
from refusal_circuits.compat import cache_kwargs, output_cache
from refusal_circuits.forward.batching import decoder_hidden, decoder_parts, first_rows
from refusal_circuits.forward.options import current_options
from refusal_circuits.models import HookedModel, hf_model_of


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early; never escapes :func:`decoder_forward`."""


def shared_prefix_length(batch: ChatBatch) -> int:
    """Length of the template prefix every row starts with (0 if the rows do not share one)."""
    is_prefix = batch.spans == int(Span.PREFIX)
    counts = is_prefix.sum(-1)
    n = int(counts[0])
    if n < 2 or not bool((counts == n).all()):
        return 0
    first = batch.input_ids[is_prefix].view(len(batch), n)
    return n if bool((first == first[0]).all()) else 0


@dataclass
class PrefixContinuation:
    """A batch split into its shared template prefix (already run, in ``cache``) and each row's own tokens.

    Rows stay left-padded: the pads move between the prefix and the rest, masked out, and positions are counted
    as if they were not there. ``attention_mask`` covers prefix + rest; ``input_ids`` and ``position_ids`` the
    rest only (``full_input_ids`` is prefix + rest, what ``generate`` expects next to the cache).
    """

    cache: Any
    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    full_input_ids: Tensor


def prefix_continuation(model: HookedModel, batch: ChatBatch, n_prefix: int,
                        prefix_readers: Sequence[tuple[str, hooks.HookFn]] = ()) -> PrefixContinuation:
    """Run the first ``n_prefix`` tokens (shared by every row, see :func:`shared_prefix_length`) once, with the
    model's own hooks and ``prefix_readers``, and return what every row continues from."""
    parts = decoder_parts(model)
    if parts is None:
        raise TypeError("prefix_continuation needs a model with a Hugging Face twin (a TransformerBridge)")
    base = parts[0]
    is_prefix = batch.spans == int(Span.PREFIX)
    prefix_ids = batch.input_ids[is_prefix].view(len(batch), n_prefix)[:1]
    with hooks.add_hooks(model, prefix_readers):
        cache = output_cache(base(input_ids=prefix_ids, use_cache=True))
    cache.batch_repeat_interleave(len(batch))
    own = ~is_prefix & batch.attention_mask.bool()
    rest_len = int(own.sum(-1).max())
    rest_mask = own[:, -rest_len:].to(batch.attention_mask.dtype)  # a shorter row's prefix tail is masked too
    ones = torch.ones(len(batch), n_prefix, dtype=rest_mask.dtype, device=rest_mask.device)
    rest_ids = batch.input_ids[:, -rest_len:]
    return PrefixContinuation(cache, rest_ids, torch.cat([ones, rest_mask], 1),
                              (n_prefix + rest_mask.long().cumsum(-1) - 1).clamp(min=n_prefix),
                              torch.cat([prefix_ids.expand(len(batch), -1), rest_ids], 1))


def _own_length(batch: ChatBatch) -> int:
    """The fewest real positions after the template prefix in any row (each row's own tokens)."""
    own = (batch.spans != int(Span.PREFIX)) & batch.attention_mask.bool()
    return int(own.sum(-1).min())


def shared_prefix(model: HookedModel, batch: ChatBatch) -> int:
    """Length of the template prefix to run once for ``batch`` (0: run the batch the plain way).

    Nonzero only when the model has a Hugging Face decoder, sharing is on
    (:attr:`ForwardOptions.share_prefix <refusal_circuits.forward.ForwardOptions.share_prefix>`), every row starts
    with the same prefix, and the fast path holds on this model: the first time it is asked, the first two rows
    run both ways (under the hooks registered now) and their outputs at each row's own positions are compared
    (:mod:`refusal_circuits.fastpaths`); a mismatch switches sharing off for the model with a warning.
    """
    parts = decoder_parts(model)
    if not current_options().share_prefix or parts is None:
        return 0
    base = parts[0]
    n_prefix = shared_prefix_length(batch)
    if not n_prefix:
        return 0
    if fastpaths.allowed(model, fastpaths.PREFIX) is None:
        small = first_rows(batch, 2)
        k = _own_length(small)

        def fast() -> Tensor:
            cont = prefix_continuation(model, small, n_prefix)
            return decoder_hidden(base, input_ids=cont.input_ids, attention_mask=cont.attention_mask,
                                  position_ids=cont.position_ids, **cache_kwargs(base, cont.cache))[:, -k:]

        def plain() -> Tensor:
            return decoder_hidden(base, input_ids=small.input_ids, attention_mask=small.attention_mask,
                                  position_ids=small.position_ids)[:, -k:]

        with torch.inference_mode():
            fastpaths.check(model, fastpaths.PREFIX, fast, plain, n_terms=fastpaths.n_terms(model),
                            n_prompts=len(small))
    return n_prefix if fastpaths.allowed(model, fastpaths.PREFIX) else 0


def decoder_forward(model: HookedModel, batch: ChatBatch, readers: Sequence[tuple[str, hooks.HookFn]] = (),
                    stop_at: str | None = None, *, share_prefix: bool = True,
                    prefix_readers: Sequence[tuple[str, hooks.HookFn]] = ()) -> Tensor | None:
    """Run the decoder on ``batch``; return its output for the positions that ran, or None after ``stop_at``.

    ``readers`` are hooks registered only while the batch's own (non-prefix) positions run: they see
    ``[batch, seq', ...]`` with seq' covering at least the instruction and post-instruction tokens, left-padded,
    so ``x[:, -k:]`` is the same slice as in a full forward. With ``stop_at`` the pass ends right after that
    hook fired and None is returned. Interventions registered on the model apply to every position. With
    ``share_prefix=False``, or where :func:`shared_prefix` says no, the whole batch runs in one pass and readers
    see every position. ``prefix_readers`` are registered for the shared prefix's pass (a batch of one row), when
    there is one: a caller that passes them must first ask :func:`shared_prefix` whether there will be one.

    Returns the decoder's last hidden states (after the final norm) for a ``TransformerBridge``; for other
    models the full logits.
    """
    parts = decoder_parts(model)
    run: Callable[[], Tensor]
    if parts is None:
        run = partial(model, batch.input_ids, attention_mask=batch.attention_mask)
    elif not (share_prefix and (n_prefix := shared_prefix(model, batch))):
        run = partial(decoder_hidden, parts[0], input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids)
    else:
        # The prefix once, with the model's own hooks (interventions) but not the readers; then every row
        # continues from its cache.
        cont = prefix_continuation(model, batch, n_prefix, prefix_readers)
        run = partial(decoder_hidden, parts[0], input_ids=cont.input_ids, attention_mask=cont.attention_mask,
                      position_ids=cont.position_ids, **cache_kwargs(parts[0], cont.cache))

    def stop(_x: Tensor, _name: str) -> None:
        raise _StopForward

    with hooks.add_hooks(model, [*readers, *([(stop_at, stop)] if stop_at else [])]):
        try:
            return run()
        except _StopForward:
            return None


def run_until(model: HookedModel, batch: ChatBatch, stop_at: str,
              readers: Sequence[tuple[str, hooks.HookFn]] = ()) -> None:
    """Run ``batch`` with the ``readers`` hooks, stopping right after hook ``stop_at`` fired.

    The forward pass never pays for the layers after it or the unembedding. The stop hook is registered last, so
    readers on the same point still see the activation. Readers see the batch's own positions (see
    :func:`decoder_forward`); the last ``n_post`` are the post-instruction tokens.
    """
    decoder_forward(model, batch, readers, stop_at=stop_at)


def last_logits(model: HookedModel, batch: ChatBatch, readers: Sequence[tuple[str, hooks.HookFn]] = ()
                ) -> Float[Tensor, "batch vocab"]:
    """Logits at the last position of every row (the first generated token's distribution).

    Hooks registered on the model apply; ``readers`` run on the batch's own positions only (see
    :func:`decoder_forward`), which is where a hook that patches the post-instruction tokens belongs. For a
    ``TransformerBridge`` this runs the Hugging Face decoder (with the shared prefix computed once) and unembeds
    the last position only (the Qwen2.5 unembedding is 151,936 x 896: over a 41-token prompt it costs about a
    quarter of the whole forward pass, and selection needs one position); other models run a full forward.
    """
    parts = decoder_parts(model)
    out = decoder_forward(model, batch, readers)
    assert out is not None
    return out[:, -1] if parts is None else parts[1](out[:, -1])


def token_logprobs(model: HookedModel, input_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"]
                   ) -> Float[Tensor, "batch seq vocab"]:
    """Log-probabilities at every position (hooks apply), with left-padding-aware positions."""
    hf = hf_model_of(model)
    if hf is not None:
        logits = hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                    use_cache=False).logits
    else:
        logits = model(input_ids, attention_mask=attention_mask)
    return torch.log_softmax(logits.float(), dim=-1)
