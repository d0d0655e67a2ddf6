"""Where refusal diverges between English and its translations.

Wang et al. (PolyRefuse) find one refusal direction shared by the languages a model is safety-aligned in. This
package measures that and goes down to heads, one idea per module (each imports only from the ones above it):

* :mod:`~refusal_circuits.crosslingual.directions`: each language's difference-in-means direction, their cosine
  similarities (:func:`direction_cosines`, and from disjoint halves :func:`split_half_cosines`), one shared PCA
  (:func:`shared_pca`), and how well the base language's direction separates harmful from harmless prompts in
  every language (:func:`separation`: AUROC and Cohen's d).
* :mod:`~refusal_circuits.crosslingual.reliability`: how parallel the languages' directions are against how well
  each reproduces itself, over many random stratified splits, with jackknife intervals on the same-prompt,
  disjoint, within-language and noise-corrected cosines and one sentence per language saying what they allow
  (:func:`split_half_reliability`, :class:`SplitHalfReliability`).
* :mod:`~refusal_circuits.crosslingual.paired`: for every prompt id, each head's write in English vs in the
  translation (:func:`paired_heads`: mean paired difference with bootstrap intervals and sign-flip permutation
  p-values, Benjamini-Hochberg across heads, plus a floor of practical size so float noise never counts; rank
  correlation tells "the same heads, weaker" from "different heads"), where the projections part along the
  layers (:func:`trajectory_split_layer`), and patching the heads that lose most (:func:`patch_top_heads`).
* :mod:`~refusal_circuits.crosslingual.transfer`: language A's direction ablated on language B's harmful prompts
  (and added on B's harmless prompts), refusal rates with Wilson intervals, next to the baseline row
  (:func:`transfer_matrix`), and its first-token judge checked against generation + the phrase judge per target
  language and intervention (:func:`check_transfer`).
* :mod:`~refusal_circuits.crosslingual.divergence`: the per-language summary, in words and numbers
  (:func:`divergence`).
* :mod:`~refusal_circuits.crosslingual.harm`: does a language fail to recognise harm, or fail to refuse? A harm
  direction at the instruction's last token and the refusal direction at r̂'s site per language, their separation,
  retention relative to the base language, cosines, transfer and per-head contrasts, with bootstrap intervals and
  one sentence per language (:func:`harm_and_refusal`, :class:`HarmRefusal`; Zhao et al. 2025).

* :mod:`~refusal_circuits.crosslingual.totals`: the total effect of every head and MLP of the base run on each
  translation, by paired attribution patching, with the paired statistics, the harmless control and a validation
  against exact patching (:func:`paired_totals`, :class:`PairedTotals`).

The statistics themselves (intervals, AUROC, rank correlation, false-discovery control, resampling tests, the
:class:`~refusal_circuits.stats.Rate` record) live in :mod:`refusal_circuits.stats`; they are importable from
here too, as before the split.
"""

from __future__ import annotations

from refusal_circuits.crosslingual.controls import PairedControls, paired_controls, value_bias_writes
from refusal_circuits.crosslingual.crossfit import CrossFitPatch, crossfit_patch_top_heads
from refusal_circuits.crosslingual.directions import (
    ZERO_DIRECTION,
    CosineMatrix,
    Separation,
    SharedPCA,
    SplitHalfCosines,
    check_language_groups,
    direction_cosines,
    halves_why,
    language_candidate_halves,
    language_candidates,
    language_candidates_and_site,
    separation,
    shared_pca,
    site_directions,
    split_half_cosines,
)
from refusal_circuits.crosslingual.directions import _cosine as _cosine
from refusal_circuits.crosslingual.divergence import Divergence, LanguageDivergence, divergence
from refusal_circuits.crosslingual.harm import HarmRefusal, LanguageHarm, harm_and_refusal
from refusal_circuits.crosslingual.paired import (
    PairedHeads,
    losing_heads,
    pair_rows,
    paired_heads,
    patch_json,
    patch_top_heads,
    trajectory_split_layer,
    unpaired_why,
)
from refusal_circuits.crosslingual.reliability import SiteGroup, SplitHalfReliability, split_half_reliability
from refusal_circuits.crosslingual.totals import PairedTotals, paired_totals
from refusal_circuits.crosslingual.transfer import (
    TransferCheck,
    TransferMatrix,
    check_transfer,
    first_token_refusals,
    is_aligned,
    transfer_matrix,
)
from refusal_circuits.stats import (
    ONE_PAIR,
    Rate,
    auroc,
    benjamini_hochberg,
    cohens_d,
    correlation_why,
    groups_why,
    paired_stats,
    spearman,
)

__all__ = [
    "ONE_PAIR",
    "CrossFitPatch",
    "HarmRefusal",
    "LanguageHarm",
    "harm_and_refusal",
    "PairedTotals",
    "paired_totals",
    "PairedControls",
    "crossfit_patch_top_heads",
    "paired_controls",
    "value_bias_writes",
    "ZERO_DIRECTION",
    "CosineMatrix",
    "Divergence",
    "LanguageDivergence",
    "PairedHeads",
    "Rate",
    "Separation",
    "SharedPCA",
    "SiteGroup",
    "SplitHalfCosines",
    "SplitHalfReliability",
    "TransferCheck",
    "TransferMatrix",
    "auroc",
    "benjamini_hochberg",
    "check_language_groups",
    "check_transfer",
    "cohens_d",
    "correlation_why",
    "direction_cosines",
    "divergence",
    "first_token_refusals",
    "groups_why",
    "halves_why",
    "is_aligned",
    "language_candidate_halves",
    "language_candidates",
    "language_candidates_and_site",
    "losing_heads",
    "pair_rows",
    "paired_heads",
    "paired_stats",
    "patch_json",
    "patch_top_heads",
    "separation",
    "shared_pca",
    "site_directions",
    "spearman",
    "split_half_cosines",
    "split_half_reliability",
    "trajectory_split_layer",
    "transfer_matrix",
    "unpaired_why",
]
