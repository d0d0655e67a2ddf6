"""Writer geometry: how each component of a model writes into the residual stream, per architecture.

Every decoder this library supports has the same shape of residual stream,

    resid_pre[0] = embed,      resid_post[l] = resid_pre[l] + attn_write[l] + mlp_write[l],

(sequential blocks read ``resid_mid = resid_pre + attn_write`` in the MLP; parallel ones, GPT-NeoX/Pythia and
Phi-2, read ``resid_pre`` in both), and differ only in how a sublayer's *raw output* ``x`` (what the attention
module or the MLP returns: ``o = sum_h z_h W_O[h]^T + b_O`` for attention) becomes its *write*:

    write(x) = m * norm(x)          norm(x) = w * (x - mean(x)) / scale(x) + b   (or no norm: write = m * x)

with ``m`` a scalar (Granite's ``residual_multiplier``; 1 elsewhere) and ``norm`` a *post*-norm (Gemma-2 and
Gemma-3's ``post_attention_layernorm`` / ``post_feedforward_layernorm``, OLMo-2's post-norms; Gemma's norms
multiply by ``1 + weight``), ``scale(x) = sqrt(mean((x - mean(x))^2) + eps)`` (RMSNorm: no centring, no ``b``).
:class:`ResidualWrite` holds ``m`` and the norm.

Freezing ``scale`` per token (as DLA freezes the final norm) makes the write linear in ``x``, so for any vector
``u``

    write(x) . u = factor(x) * (x . v) + const,    factor(x) = m / scale(x),   v = w * u (centred for LayerNorm),
    const = m * (b . u),

and head ``h``'s share of ``o . v`` is ``z_h . (W_O[h]^T v)``: a ``[d_head]`` dot product, exact given the
token's ``scale(o)``, which is read from the raw output ``o`` itself (a ``[batch, pos, d_model]`` tensor per layer;
no per-head ``d_model`` output is ever built). Without a post-norm ``factor = m`` and ``const = 0``.

The embedding's write is read where it enters the stream, ``resid_pre[0]``: after Gemma's ``sqrt(d_model)``
scale (inside the embedding module), Granite's ``embedding_multiplier`` (applied by the decoder outside it: the
TransformerLens ``hook_embed`` of a Granite bridge shows the scaled value only to TransformerLens's own hooks and
never fires for plain forward hooks) and GPT-2's learned position embedding ``wpe`` alike.

Hook points used (TransformerLens bridge names; each fires as a plain module call on every architecture above):
``blocks.{l}.attn.hook_z`` (the input of ``o_proj``, ``[batch, pos, head * d_head]``), ``attn.hook_v``,
``attn.hook_pattern``, ``blocks.{l}.attn.hook_out`` (the raw attention output ``o``), ``blocks.{l}.mlp.hook_out``
(the raw MLP output), the post-norms' ``ln1_post.hook_out`` / ``ln2_post.hook_out`` (the writes), and
``blocks.{l}.hook_in`` / ``hook_out`` (``resid_pre`` / ``resid_post``). The aliases ``hook_attn_out`` /
``hook_mlp_out`` are not used: on Granite they are TransformerLens-only hook points that plain hooks never see.

Everything is in raw Hugging Face weights (:mod:`refusal_circuits.models`). Nothing here is taken on trust:
attribution reconstructs the residual stream from these writes on every batch and raises
:class:`~refusal_circuits.exactness.ExactnessError` if it does not add up, so an architecture whose geometry is
described wrongly (or not at all) fails loudly instead of returning numbers.
"""

from __future__ import annotations

from refusal_circuits.geometry.heads import (
    HeadGeometry,
    architecture_of,
    attn_raw,
    block_in,
    block_out,
    head_geometry,
    mlp_raw,
    original_component,
    write_hooks,
)
from refusal_circuits.geometry.logits import LogitMap, final_norm, logit_map
from refusal_circuits.geometry.norms import FrozenNorm, ResidualWrite, frozen_norm

__all__ = [
    "FrozenNorm",
    "HeadGeometry",
    "LogitMap",
    "ResidualWrite",
    "architecture_of",
    "attn_raw",
    "block_in",
    "block_out",
    "final_norm",
    "frozen_norm",
    "head_geometry",
    "logit_map",
    "mlp_raw",
    "original_component",
    "write_hooks",
]
