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

Which of the shortcuts run, and their sizes, is a :class:`ForwardOptions` record read with
:func:`current_options` and changed for a ``with`` block by :func:`forward_options` (no module globals).

Every function takes the :class:`~refusal_circuits.models.HookedModel` protocol; the fast paths use the Hugging
Face twin of a ``TransformerBridge`` (whose hook points fire when the twin runs) and fall back to a full forward
for other models. The code lives in :mod:`.options`, :mod:`.batching`, :mod:`.passes` (the shared prefix) and
:mod:`.packing`; every name is importable from here.
"""

from __future__ import annotations

from refusal_circuits.forward.batching import (
    batches,
    check_context,
    context_length,
    decoder_hidden,
    decoder_parts,
    device_of,
    first_rows,
    length_buckets,
)
from refusal_circuits.forward.options import ForwardOptions, current_options, forward_options
from refusal_circuits.forward.packing import pack_rows, packed_last_logits
from refusal_circuits.forward.passes import (
    PrefixContinuation,
    decoder_forward,
    last_logits,
    prefix_continuation,
    run_until,
    shared_prefix,
    shared_prefix_length,
    token_logprobs,
)

__all__ = [
    "ForwardOptions",
    "PrefixContinuation",
    "batches",
    "check_context",
    "context_length",
    "current_options",
    "decoder_forward",
    "decoder_hidden",
    "decoder_parts",
    "device_of",
    "first_rows",
    "forward_options",
    "last_logits",
    "length_buckets",
    "pack_rows",
    "packed_last_logits",
    "prefix_continuation",
    "run_until",
    "shared_prefix",
    "shared_prefix_length",
    "token_logprobs",
]
