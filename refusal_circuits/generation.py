"""Batched greedy generation under whatever hooks are registered on the model (an intervention, say).

For a ``TransformerBridge`` the Hugging Face ``generate`` runs through the bridge's hook points with its key-value
cache, prefilled from the chat template's shared prefix (:mod:`refusal_circuits.forward`). That cached path is
proven once per model against greedy decoding without any cache (:func:`_uncached_greedy`, a full forward pass
per step); on a mismatch it is switched off (:mod:`refusal_circuits.fastpaths`) and the cache-free reference
runs instead. Models without a Hugging Face twin decode with a plain greedy loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from refusal_circuits import fastpaths
from refusal_circuits.chat import ChatBatch, ChatFormat, position_ids
from refusal_circuits.compat import cache_kwargs
from refusal_circuits.forward import batches, first_rows, passes
from refusal_circuits.models import HookedModel, hf_model_of


@torch.inference_mode()
def generate_ids(
    model: HookedModel,
    instructions: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    fmt: ChatFormat | None = None,
    adv_suffix: str | None = None,
    progress: bool = True,
    desc: str = "generate",
    first_logits: list[torch.Tensor | None] | None = None,
) -> list[list[int]]:
    """Greedy new token ids for chat-formatted ``instructions``, in input order (padding after EOS removed).

    Any hooks registered on ``model`` (for example an intervention) act during generation: for a
    TransformerBridge the Hugging Face ``generate`` runs through the bridge's hook points, with its KV cache.
    Models without a Hugging Face twin fall back to a plain greedy loop without a cache. Pass a list as
    ``first_logits`` to receive each prompt's first-step logits (float32 ``[vocab]``, in input order; the
    refusal score needs no second forward pass then).
    """
    tokenizer = model.tokenizer
    out: list[list[int]] = [[] for _ in instructions]
    if first_logits is not None:
        first_logits[:] = [None] * len(instructions)
    hf = hf_model_of(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model)
    for idx, batch in batches(model, instructions, batch_size, fmt=fmt, adv_suffix=adv_suffix, progress=progress,
                              desc=desc):
        ids, mask = batch.input_ids, batch.attention_mask
        if hf is not None and _cached_generation_holds(model, batch, pad_id):
            step_logits, gen = _cached_generate(model, batch, max_new_tokens, pad_id, first_logits is not None)
        elif hf is not None:  # the cache-free reference: slower, and right whatever the cache does
            gen, step_logits = _uncached_greedy(hf, ids, mask, max_new_tokens)
        else:
            gen, step_logits = _greedy_loop(model, ids, mask, max_new_tokens, tokenizer.eos_token_id), None
        if first_logits is not None and step_logits is not None:
            for row, i in enumerate(idx):
                first_logits[i] = step_logits[0][row].float().cpu()
        for row, i in enumerate(idx):
            new = gen[row, ids.shape[1] :].tolist()
            cut = next((j for j, t in enumerate(new) if t in eos), None)
            out[i] = new if cut is None else new[: cut + 1]
    return out


def _cached_generate(model: HookedModel, batch: ChatBatch, max_new_tokens: int, pad_id: int | None, logits: bool
                     ) -> tuple[Any, torch.Tensor]:
    """Hugging Face ``generate`` with its key-value cache, prefilled from the shared template prefix where the
    model allows it; returns ``(logits per step or None, sequences)``, the sequences in the batch's own layout."""
    hf = hf_model_of(model)
    assert hf is not None, "cached generation needs a Hugging Face twin"
    ids, mask, extra = batch.input_ids, batch.attention_mask, {}
    # Looked up on the module at call time, so a test can break the prefix path for every caller at once.
    if n_prefix := passes.shared_prefix(model, batch):
        # The template prefix runs once (interventions apply to it); every row's prefill starts after it.
        cont = passes.prefix_continuation(model, batch, n_prefix)
        ids, mask, extra = cont.full_input_ids, cont.attention_mask, cache_kwargs(hf, cont.cache)
    res = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=pad_id, top_p=None, top_k=None, temperature=None, output_logits=logits,
                      return_dict_in_generate=True, **extra)
    # With a shared prefix the rows were re-laid (prefix, then pads, then the rest): same width, so the new tokens
    # start at the same column as in the batch.
    return (res.logits if logits else None), res.sequences


@torch.inference_mode()
def _uncached_greedy(hf: Any, ids: torch.Tensor, mask: torch.Tensor, n: int
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding with a full forward pass per step and no cache: ``(sequences, logits per step)``."""
    steps: list[torch.Tensor] = []
    for _ in range(n):
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits[:, -1]
        steps.append(logits)
        nxt = logits.argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
    return ids, steps


def _cached_generation_holds(model: HookedModel, batch: ChatBatch, pad_id: int | None) -> bool:
    """Whether generation may use Hugging Face ``generate`` with its key-value cache (and the shared prefix).

    Checked once per model: the first time, the batch's first two rows generate four greedy tokens through the
    cached path and through :func:`_uncached_greedy` (a full forward pass per step, no cache at all; both under the
    hooks registered now). Their step logits must agree up to and including the first step at which a token differs
    (:func:`~refusal_circuits.fastpaths.generation_error`). A mismatch switches the cached path off for the model.
    """
    known = fastpaths.allowed(model, fastpaths.GENERATE)
    if known is not None:
        return known
    small = first_rows(batch, 2)
    width = small.input_ids.shape[1]
    fast_logits, fast_seq = _cached_generate(model, small, 4, pad_id, True)
    plain_seq, plain_logits = _uncached_greedy(hf_model_of(model), small.input_ids, small.attention_mask, 4)
    a, b = fastpaths.generation_error((fast_seq[:, width:], fast_logits), (plain_seq[:, width:], plain_logits))
    return fastpaths.record(model, fastpaths.GENERATE, a, b, n_terms=fastpaths.n_terms(model), n_prompts=len(small))


def _eos_ids(model: HookedModel) -> set[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the generation config's (one or a list)."""
    eos: set[int] = set()
    hf = hf_model_of(model)
    gen_eos = getattr(getattr(hf, "generation_config", None), "eos_token_id", None)
    for value in (model.tokenizer.eos_token_id, gen_eos):
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(int(v) for v in value)
    return eos


def generate(model: HookedModel, instructions: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 16,
             fmt: ChatFormat | None = None, adv_suffix: str | None = None, progress: bool = True,
             desc: str = "generate") -> list[str]:
    """Greedy completions (text) for chat-formatted ``instructions``, in input order; see :func:`generate_ids`."""
    ids = generate_ids(model, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size, fmt=fmt,
                       adv_suffix=adv_suffix, progress=progress, desc=desc)
    return [model.tokenizer.decode(row, skip_special_tokens=True) for row in ids]


def _greedy_loop(model: HookedModel, ids: torch.Tensor, mask: torch.Tensor, n: int, eos: int | None) -> torch.Tensor:
    """Greedy decoding by full forward passes of a model without a Hugging Face twin (rows stop at ``eos``)."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(n):
        logits = model(ids, attention_mask=mask)
        nxt = logits[:, -1].argmax(-1)
        if eos is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
        if bool(done.all()):
            break
    return ids
