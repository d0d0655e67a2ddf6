"""Forward passes that compute only what a caller needs.

Four tricks keep the library near the cost of one plain forward pass:

* :func:`run_until` stops the forward pass right after a given hook fired (an exception that the hook
  raises and we catch), so collecting ``resid_pre`` never pays for the last layers or the unembedding.
* :func:`last_logits` unembeds only the last position. The Qwen2.5 unembedding is 151,936 x 896: over a
  41-token prompt it costs about a quarter of the whole forward pass, and selection needs one position.
* :func:`decoder_forward` computes the chat template's prefix (Qwen's default system prompt and user header,
  more than half of a typical 41-token prompt) once per batch and continues every row from its key-value cache.
  Hooks fire on the prefix pass too, so an intervention applies there as well; hooks that *read* activations
  are registered for the continuation only, which covers every position a reader asks for (the
  post-instruction tokens).
* :func:`packed_last_logits` packs prompts end to end instead of padding them (first-token scores, which read
  no activation): a batch of one language's 32 prompts is padded by 20-60% of its tokens.

Every function takes the :class:`~refusal_circuits.models.HookedModel` protocol; the fast paths use the Hugging
Face twin of a ``TransformerBridge`` (whose hook points fire when the twin runs) and fall back to a full forward
for other models.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from refusal_circuits import fastpaths, hooks
from refusal_circuits.chat import ChatBatch, ChatFormat, Span, chat_format, position_ids, tokenize_chat
from refusal_circuits.compat import cache_kwargs, output_cache
from refusal_circuits.data import PromptSet
from refusal_circuits.models import hf_model_of


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding costs little."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def context_length(model: Any) -> int | None:
    """The model's context window, when its config states one."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    return int(n_ctx) if n_ctx else None


def check_context(model: Any, prompts: PromptSet, *, adv_suffix: str | None = None) -> None:
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


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def batches(model: Any, instructions: Sequence[str], batch_size: int, *, fmt: ChatFormat | None = None,
            adv_suffix: str | None = None, names: Sequence[str] | None = None, progress: bool = False,
            desc: str = "") -> Iterator[tuple[list[int], ChatBatch]]:
    """Length-bucketed chat batches on the model's device, with the input indices of each row.

    With ``progress`` a tqdm bar named ``desc`` counts the batches.
    """
    from tqdm.auto import tqdm

    tokenizer = model.tokenizer
    fmt = fmt or chat_format(tokenizer)
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in instructions]
    device = device_of(model)
    for idx in tqdm(length_buckets(lengths, batch_size), desc=desc, disable=not progress, leave=False):
        batch = tokenize_chat(tokenizer, [instructions[i] for i in idx], fmt=fmt, adv_suffix=adv_suffix,
                              max_length=context_length(model),
                              names=[names[i] for i in idx] if names is not None else None)
        yield idx, batch.to(device)


def decoder_parts(model: Any) -> tuple[Any, Any] | None:
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


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early; never escapes :func:`run_until`."""


#: Share the template prefix's key-value cache across a batch (set False to compare against a plain forward).
SHARE_PREFIX = True


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


def prefix_continuation(model: Any, batch: ChatBatch, n_prefix: int,
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


def first_rows(batch: ChatBatch, k: int) -> ChatBatch:
    """The first ``k`` rows of a batch (still left-padded to the batch's width)."""
    return ChatBatch(batch.input_ids[:k], batch.attention_mask[:k], batch.spans[:k], batch.n_post)


def _own_length(batch: ChatBatch) -> int:
    """The fewest real positions after the template prefix in any row (each row's own tokens)."""
    own = (batch.spans != int(Span.PREFIX)) & batch.attention_mask.bool()
    return int(own.sum(-1).min())


def shared_prefix(model: Any, batch: ChatBatch) -> int:
    """Length of the template prefix to run once for ``batch`` (0: run the batch the plain way).

    Nonzero only when the model has a Hugging Face decoder, sharing is on (:data:`SHARE_PREFIX`), every row starts
    with the same prefix, and the fast path holds on this model: the first time it is asked, the first two rows
    run both ways (under the hooks registered now) and their outputs at each row's own positions are compared
    (:mod:`refusal_circuits.fastpaths`); a mismatch switches sharing off for the model with a warning.
    """
    parts = decoder_parts(model)
    if not SHARE_PREFIX or parts is None:
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
            return _decoder(base, input_ids=cont.input_ids, attention_mask=cont.attention_mask,
                            position_ids=cont.position_ids, **cache_kwargs(base, cont.cache))[:, -k:]

        def plain() -> Tensor:
            return _decoder(base, input_ids=small.input_ids, attention_mask=small.attention_mask,
                            position_ids=small.position_ids)[:, -k:]

        with torch.inference_mode():
            fastpaths.check(model, fastpaths.PREFIX, fast, plain, n_terms=fastpaths.n_terms(model),
                            n_prompts=len(small))
    return n_prefix if fastpaths.allowed(model, fastpaths.PREFIX) else 0


def decoder_forward(model: Any, batch: ChatBatch, readers: Sequence[tuple[str, hooks.HookFn]] = (),
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
        run = partial(_decoder, parts[0], input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids)
    else:
        # The prefix once, with the model's own hooks (interventions) but not the readers; then every row
        # continues from its cache.
        cont = prefix_continuation(model, batch, n_prefix, prefix_readers)
        run = partial(_decoder, parts[0], input_ids=cont.input_ids, attention_mask=cont.attention_mask,
                      position_ids=cont.position_ids, **cache_kwargs(parts[0], cont.cache))

    def stop(_x: Tensor, _name: str) -> None:
        raise _StopForward

    with hooks.add_hooks(model, [*readers, *([(stop_at, stop)] if stop_at else [])]):
        try:
            return run()
        except _StopForward:
            return None


def _decoder(base: Any, **inputs: Any) -> Tensor:
    return base(**inputs, use_cache=False).last_hidden_state


def run_until(model: Any, batch: ChatBatch, stop_at: str, readers: Sequence[tuple[str, hooks.HookFn]] = ()) -> None:
    """Run ``batch`` with the ``readers`` hooks, stopping right after hook ``stop_at`` fired.

    The stop hook is registered last, so readers on the same point still see the activation. Readers see the
    batch's own positions (see :func:`decoder_forward`); the last ``n_post`` are the post-instruction tokens.
    """
    decoder_forward(model, batch, readers, stop_at=stop_at)


def last_logits(model: Any, batch: ChatBatch, readers: Sequence[tuple[str, hooks.HookFn]] = ()
                ) -> Float[Tensor, "batch vocab"]:
    """Logits at the last position of every row (the first generated token's distribution).

    Hooks registered on the model apply; ``readers`` run on the batch's own positions only (see
    :func:`decoder_forward`), which is where a hook that patches the post-instruction tokens belongs. For a
    ``TransformerBridge`` this runs the Hugging Face decoder (with the shared prefix computed once) and unembeds
    the last position only; other models run a full forward.
    """
    parts = decoder_parts(model)
    out = decoder_forward(model, batch, readers)
    assert out is not None
    return out[:, -1] if parts is None else parts[1](out[:, -1])


#: Pack prompts end to end for first-token logits (set False to use padded batches, e.g. to compare).
PACK = True

#: Tokens per packed row: about this many, so attention over a row (computed for every pair of its tokens, masked to
#: each prompt's own) adds a few percent; several rows go through each forward pass (see :data:`PACK_BATCH_TOKENS`).
PACK_TOKENS = 384

#: Tokens per forward pass of packed rows. On a CPU every forward pass streams all the weights from memory, so a
#: pass should carry many tokens: on the 0.5B here, 64-token passes ran at 110-130 tokens/s, 256-512-token passes
#: at 150-200; 60 French and Yoruba prompts took 9.6-12.7 s packed (rows of 384-768 tokens, passes of 512-2048)
#: against 15.8-16.9 s in padded batches of 32.
PACK_BATCH_TOKENS = 1536


def pack_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into ``ceil(sum / max_tokens)`` rows of nearly equal total length (each prompt, longest
    first, goes to the row with the fewest tokens so far; a row exceeds ``max_tokens`` by less than one prompt)."""
    if not lengths:
        return []
    n_rows = min(len(lengths), max(1, math.ceil(sum(lengths) / max_tokens)))
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    heap = [(0, k) for k in range(n_rows)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        used, k = heapq.heappop(heap)
        rows[k].append(i)
        heapq.heappush(heap, (used + lengths[i], k))
    return sorted(rows, key=lambda row: -sum(lengths[i] for i in row))


def packed_last_logits(model: Any, instructions: Sequence[str], *, fmt: ChatFormat | None = None,
                       max_tokens: int | None = None, progress: bool = False, desc: str = ""
                       ) -> Float[Tensor, "n vocab"] | None:
    """Last-position logits of every chat-formatted instruction, in input order, without padding.

    The template prefix (shared by every prompt) runs once with the model's hooks; then each row of about
    :data:`PACK_TOKENS` tokens holds several prompts' own tokens end to end, every token attending to the prefix and
    to the earlier tokens of its own prompt (a block-diagonal causal mask), with positions counted as if each prompt
    were alone. Rows of nearly equal length go through the decoder :data:`PACK_BATCH_TOKENS` tokens at a time.
    Hooks registered on the model (interventions, which act on every position alike) apply; hooks that read
    activations do not belong here. Returns None where packing does not apply (no Hugging Face decoder, an attention
    kernel other than eager or SDPA, no shared prefix, ``PACK`` off, or a model on which packing disagreed with the
    plain forward pass when first checked, see :mod:`refusal_circuits.fastpaths`); callers then use padded batches.
    """
    parts = decoder_parts(model)
    if not (PACK and SHARE_PREFIX) or parts is None or not instructions:
        return None
    base, head = parts
    if getattr(base.config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        return None  # a kernel that ignores a custom 4-D mask (flash attention) would mix the packed prompts
    fmt = fmt or chat_format(model.tokenizer)
    n_prefix = len(fmt.prefix_ids)
    if n_prefix < 2:
        return None
    device = device_of(model)
    own: list[list[int]] = []
    for start in range(0, len(instructions), 256):
        batch = tokenize_chat(model.tokenizer, instructions[start : start + 256], fmt=fmt,
                              max_length=context_length(model))
        if shared_prefix_length(batch) != n_prefix:
            return None
        own += [row[mask.bool()].tolist()[n_prefix:]
                for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]
    rows = pack_rows([len(x) for x in own], max_tokens or PACK_TOKENS)
    per_pass = max(1, PACK_BATCH_TOKENS // (max_tokens or PACK_TOKENS))
    with torch.inference_mode():
        prefix = base(input_ids=torch.tensor([list(fmt.prefix_ids)], device=device), use_cache=True)
        if fastpaths.allowed(model, fastpaths.PACK) is None:
            # The first few prompts in one packed row (so the block-diagonal mask is what keeps them apart)
            # against the plain padded forward pass of the same prompts.
            k = min(4, len(own))
            small = tokenize_chat(model.tokenizer, instructions[:k], fmt=fmt, max_length=context_length(model))
            small = small.to(device)
            fastpaths.check(
                model, fastpaths.PACK, lambda: _packed(parts, prefix, own[:k], [list(range(k))], 1, n_prefix, fmt),
                lambda: head(_decoder(base, input_ids=small.input_ids, attention_mask=small.attention_mask,
                                      position_ids=small.position_ids)[:, -1]),
                n_terms=fastpaths.n_terms(model), n_prompts=k)
        if not fastpaths.allowed(model, fastpaths.PACK):
            return None
        return _packed(parts, prefix, own, rows, per_pass, n_prefix, fmt, progress=progress, desc=desc)


def _packed(parts: tuple[Any, Any], prefix: Any, own: Sequence[Sequence[int]], rows: Sequence[Sequence[int]], per_pass: int,
            n_prefix: int, fmt: ChatFormat, *, progress: bool = False, desc: str = "") -> Tensor:
    """Last-position logits of every prompt's ``own`` tokens packed into ``rows`` after the cached ``prefix``
    (``parts``: the base decoder and output embedding, :func:`decoder_parts`)."""
    from tqdm.auto import tqdm

    base, head = parts
    device = prefix.last_hidden_state.device
    dtype = prefix.last_hidden_state.dtype
    out: list[Tensor | None] = [None] * len(own)
    for first in tqdm(range(0, len(rows), per_pass), desc=desc, disable=not progress, leave=False):
        group = rows[first : first + per_pass]
        width = max(sum(len(own[i]) for i in row) for row in group)
        ids = torch.full((len(group), width), int(fmt.prefix_ids[0]), dtype=torch.long)
        seg = torch.full((len(group), width), -1, dtype=torch.long)  # -1: padding at the end of a row
        pos = torch.full((len(group), width), n_prefix, dtype=torch.long)
        ends: list[tuple[int, int, int]] = []  # (prompt, row, position of its last token)
        for r, row in enumerate(group):
            at = 0
            for j, i in enumerate(row):
                n = len(own[i])
                ids[r, at : at + n] = torch.tensor(own[i])
                seg[r, at : at + n] = j
                pos[r, at : at + n] = torch.arange(n_prefix, n_prefix + n)
                ends.append((i, r, at + n - 1))
                at += n
        # Own prompt, earlier or same position; padding sees only the prefix (a row of all -inf would be NaN).
        allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & (pos[:, :, None] >= pos[:, None, :])
        allowed = torch.cat([torch.ones(len(group), width, n_prefix, dtype=torch.bool), allowed], 2)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        cache = copy.deepcopy(output_cache(prefix))
        cache.batch_repeat_interleave(len(group))
        hidden = base(input_ids=ids.to(device), attention_mask=mask[:, None].to(device),
                      position_ids=pos.to(device), use_cache=False, **cache_kwargs(base, cache)).last_hidden_state
        index = torch.tensor([[r, at] for _, r, at in ends], device=device)
        logits = head(hidden[index[:, 0], index[:, 1]])
        for k, (i, _, _) in enumerate(ends):
            out[i] = logits[k]
    return torch.stack([t for t in out if t is not None])


def token_logprobs(model: Any, input_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"]
                   ) -> Float[Tensor, "batch seq vocab"]:
    """Log-probabilities at every position (hooks apply), with left-padding-aware positions."""
    hf = hf_model_of(model)
    if hf is not None:
        logits = hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                    use_cache=False).logits
    else:
        logits = model(input_ids, attention_mask=attention_mask)
    return torch.log_softmax(logits.float(), dim=-1)
