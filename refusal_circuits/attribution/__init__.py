"""Which components write the refusal direction, at which positions, from which source tokens.

The residual stream is a sum of writes: ``resid_pre[l] = embed + sum_{l' < l} (attn_write[l'] + mlp_write[l'])``
(:mod:`refusal_circuits.geometry`). A sublayer's write is ``m * norm(x)`` of its raw output ``x``: ``m`` a scalar
(Granite's residual multiplier, else 1), ``norm`` a post-norm (Gemma-2/3, OLMo-2) or none. With the post-norm's
scale frozen per token (read from the raw output at that token, as the final norm's is frozen for DLA) the write is
linear, and for attention, whose raw output is ``o = sum_h z_h W_O[h]^T + b_O``,

    attn_write . r̂ = factor * (sum_h z_h . (W_O[h]^T v) + b_O . v) + const,   factor = m / scale(o),  v = w * r̂

(``v = r̂``, ``factor = m``, ``const = 0`` without a post-norm). Head ``h``'s *direct attribution* at a position
is ``factor * z_h . (W_O[h]^T v)``: a ``[d_head]`` dot product, never a per-head ``d_model`` output; the bias part
``factor * b_O . v + const`` is per token (``Attribution.attn_bias``). MLP writes and the embedding (read at
``resid_pre[0]``, after every embedding scale) are projected as a whole. The projections add up exactly to
``resid_pre[l] . r̂`` at every layer and position: this is checked on every batch, in the model's dtype's
tolerance, and a model where it fails raises :class:`~refusal_circuits.exactness.ExactnessError` naming its
architecture instead of returning numbers (:meth:`Attribution.completeness_error` re-checks a record).
Everything is computed in the raw Hugging Face coordinates r̂ was extracted in, so Qwen2's value biases stay
inside their heads (``z`` already contains them).

Through attention, head ``h``'s write at destination ``p`` splits over source positions ``s`` as
``factor_p A[p, s] (v_s . W_O[h]^T v)``: what each source token feeds into r̂ through that head. We keep it for the
post-instruction destinations, summed by source span (template prefix, instruction, adversarial suffix,
post-instruction), together with the attention mass per span (Arditi et al., section 5).
:func:`source_matrix` returns the full ``[dest, src]`` matrix of chosen heads on one prompt.

Direct logit attribution (DLA) projects the same writes at the last position on ``W_U[refusal] - W_U[compliance]``
(mean unembedding of each token set, divided by Granite's ``logits_scaling``) through the final norm with its
scale frozen from the clean run, as TransformerLens does; the parts add up to the model's actual logit difference
(checked on every batch, :class:`~refusal_circuits.exactness.ExactnessError` otherwise). Gemma-2 soft-caps its
logits (``c tanh(x / c)``), which no sum of parts can follow: there DLA explains the logit difference *before* the
cap, and :attr:`LogitAttribution.space` says so.

Everything here is one forward pass per batch with a handful of hooks that reduce on the spot; nothing of
shape ``[batch, pos, head, d_model]`` is ever built.

The package, one idea a module: :mod:`~refusal_circuits.attribution.targets` (the token sets of DLA),
:mod:`~refusal_circuits.attribution.records` (the records), :mod:`~refusal_circuits.attribution.storage` (their
files), :mod:`~refusal_circuits.attribution.probe` (the hooks of one pass), :mod:`~refusal_circuits.attribution.compute`
(:func:`attribute`, in named phases), :mod:`~refusal_circuits.attribution.sources` (:func:`source_matrix`) and
:mod:`~refusal_circuits.attribution.suffix` (:func:`compare_suffix`). The writer geometry per architecture is
:mod:`refusal_circuits.geometry`, shared with the interventions.
"""

from __future__ import annotations

# Private names re-exported with ``as`` are imported from here by other modules and the tests; they are not
# part of the public API (``__all__``).
from refusal_circuits.attribution.compute import attribute
from refusal_circuits.attribution.inputs import _check_one_device as _check_one_device
from refusal_circuits.attribution.inputs import _unit_vector as _unit_vector
from refusal_circuits.attribution.probe import _BatchProbe as _BatchProbe
from refusal_circuits.attribution.records import (
    N_SPANS,
    Attribution,
    HeadTable,
    LogitAttribution,
    concat_attributions,
    top_k_heads,
)
from refusal_circuits.attribution.sources import SourceMatrix, source_matrix
from refusal_circuits.attribution.storage import SUMMARY_FILE, TENSORS_FILE, TOKENS_FILE, load_attribution
from refusal_circuits.attribution.suffix import SuffixComparison, compare_suffix
from refusal_circuits.attribution.targets import (
    LogitTargets,
    compliance_tokens_by_lang,
    rank_compliance_tokens,
)
from refusal_circuits.attribution.targets import _logit_targets as _logit_targets

# The writer geometry, importable from here as it always was (patching and the tests read it from this package).
from refusal_circuits.geometry import (
    FrozenNorm,
    HeadGeometry,
    ResidualWrite,
    final_norm,
    head_geometry,
    logit_map,
)

#: The final norm with its scale frozen (the same description as every post-norm).
FinalNorm = FrozenNorm

__all__ = [
    "N_SPANS",
    "SUMMARY_FILE",
    "TENSORS_FILE",
    "TOKENS_FILE",
    "Attribution",
    "FinalNorm",
    "FrozenNorm",
    "HeadGeometry",
    "HeadTable",
    "LogitAttribution",
    "LogitTargets",
    "ResidualWrite",
    "SourceMatrix",
    "SuffixComparison",
    "attribute",
    "compare_suffix",
    "compliance_tokens_by_lang",
    "concat_attributions",
    "final_norm",
    "head_geometry",
    "load_attribution",
    "logit_map",
    "rank_compliance_tokens",
    "source_matrix",
    "top_k_heads",
]
