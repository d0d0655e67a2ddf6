"""First-token logits of prompts packed end to end instead of padded.

A batch of one language's 32 prompts is padded by 20-60% of its tokens. First-token scores read no activation,
so the prompts' own tokens can share rows instead: each token attends to the template prefix (run once) and to
the earlier tokens of its own prompt (a block-diagonal causal mask), with positions counted as if each prompt
were alone. The first use on a model is checked against padded batches (:mod:`refusal_circuits.fastpaths`).
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from refusal_circuits import fastpaths
from refusal_circuits.chat import ChatFormat, chat_format, tokenize_chat
from refusal_circuits.compat import cache_kwargs, output_cache
from refusal_circuits.forward.batching import context_length, decoder_hidden, decoder_parts, device_of
from refusal_circuits.forward.options import current_options
from refusal_circuits.forward.passes import shared_prefix_length
from refusal_circuits.models import HookedModel


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


def packed_last_logits(model: HookedModel, instructions: Sequence[str], *, fmt: ChatFormat | None = None,
                       max_tokens: int | None = None, progress: bool = False, desc: str = ""
                       ) -> Float[Tensor, "n vocab"] | None:
    """Last-position logits of every chat-formatted instruction, in input order, without padding.

    The template prefix (shared by every prompt) runs once with the model's hooks; then each row of about
    ``max_tokens`` tokens (default :attr:`ForwardOptions.pack_tokens
    <refusal_circuits.forward.ForwardOptions.pack_tokens>`) holds several prompts' own tokens end to end, every
    token attending to the prefix and to the earlier tokens of its own prompt (a block-diagonal causal mask), with
    positions counted as if each prompt were alone. Rows of nearly equal length go through the decoder
    ``pack_batch_tokens`` tokens at a time. Hooks registered on the model (interventions, which act on every
    position alike) apply; hooks that read activations do not belong here. Returns None where packing does not
    apply (no Hugging Face decoder, an attention kernel other than eager or SDPA, no shared prefix, ``pack`` or
    ``share_prefix`` off in :func:`~refusal_circuits.forward.forward_options`, or a model on which packing
    disagreed with the plain forward pass when first checked, see :mod:`refusal_circuits.fastpaths`); callers then
    use padded batches.
    """
    options = current_options()
    parts = decoder_parts(model)
    if not (options.pack and options.share_prefix) or parts is None or not instructions:
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
    row_tokens = max_tokens or options.pack_tokens
    rows = pack_rows([len(x) for x in own], row_tokens)
    per_pass = max(1, options.pack_batch_tokens // row_tokens)
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
                lambda: head(decoder_hidden(base, input_ids=small.input_ids, attention_mask=small.attention_mask,
                                            position_ids=small.position_ids)[:, -1]),
                n_terms=fastpaths.n_terms(model), n_prompts=k)
        if not fastpaths.allowed(model, fastpaths.PACK):
            return None
        return _packed(parts, prefix, own, rows, per_pass, n_prefix, fmt, progress=progress, desc=desc)


def _packed(parts: tuple[Any, Any], prefix: Any, own: Sequence[Sequence[int]], rows: Sequence[Sequence[int]],
            per_pass: int, n_prefix: int, fmt: ChatFormat, *, progress: bool = False, desc: str = "") -> Tensor:
    """Last-position logits of every prompt's ``own`` tokens packed into ``rows`` after the cached ``prefix``
    (``parts``: the base decoder and output embedding, :func:`~refusal_circuits.forward.decoder_parts`)."""
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
        hidden = decoder_hidden(base, input_ids=ids.to(device), attention_mask=mask[:, None].to(device),
                                position_ids=pos.to(device), **cache_kwargs(base, cache))
        index = torch.tensor([[r, at] for _, r, at in ends], device=device)
        logits = head(hidden[index[:, 0], index[:, 1]])
        for k, (i, _, _) in enumerate(ends):
            out[i] = logits[k]
    return torch.stack([t for t in out if t is not None])
