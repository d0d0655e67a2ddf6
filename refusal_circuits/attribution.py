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
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from refusal_circuits import exactness, hooks
from refusal_circuits import forward as fwd
from refusal_circuits.chat import SPAN_NAMES, ChatFormat, Span, chat_format
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction, check_compatible
from refusal_circuits.errors import InputError
from refusal_circuits.forward import batches, decoder_forward, device_of
from refusal_circuits.geometry import (
    FrozenNorm,
    HeadGeometry,
    ResidualWrite,
    attn_raw,
    block_in,
    final_norm,
    head_geometry,
    logit_map,
    mlp_raw,
)
from refusal_circuits.models import hf_model_of, model_id
from refusal_circuits.scores import RefusalTokens

log = logging.getLogger(__name__)

#: The final norm with its scale frozen (the same description as every post-norm).
FinalNorm = FrozenNorm

N_SPANS = len(Span)
#: The file names :meth:`Attribution.save` writes.
TENSORS_FILE = "attributions.safetensors"
TOKENS_FILE = "attributions.json"
SUMMARY_FILE = "summary.json"


# --------------------------------------------------------------------------------------------------------------
# Running the decoder, reading the unembedding.


def _unembedding(model: Any) -> tuple[Tensor, Tensor | None]:
    hf = hf_model_of(model)
    head = hf.get_output_embeddings() if hf is not None else None
    if head is None:
        raise InputError("direct logit attribution needs a model with an output embedding (lm_head)")
    return head.weight.detach(), (None if head.bias is None else head.bias.detach())


def _unit_vector(direction: Direction | Tensor, model: Any) -> Tensor:
    from refusal_circuits.interventions import _unit

    return _unit(direction, model, torch.float64)


# --------------------------------------------------------------------------------------------------------------
# Logit-difference targets for DLA.


@dataclass(frozen=True)
class LogitTargets:
    """Per language: the refusal tokens and the compliance tokens whose mean logit difference DLA explains."""

    refusal: dict[str, tuple[int, ...]]
    compliance: dict[str, tuple[int, ...]]
    strings: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"refusal": {k: [self.strings.get(t, str(t)) for t in v] for k, v in self.refusal.items()},
                "compliance": {k: [self.strings.get(t, str(t)) for t in v] for k, v in self.compliance.items()},
                "refusal_ids": {k: list(v) for k, v in self.refusal.items()},
                "compliance_ids": {k: list(v) for k, v in self.compliance.items()}}


def rank_compliance_tokens(first_tokens: Sequence[int], refusal_ids: Sequence[int], *, k: int = 5,
                           min_count: int = 2) -> tuple[int, ...]:
    """The ``k`` most frequent of ``first_tokens`` (greedy first tokens of answers) that are not refusal tokens.

    A token must begin at least ``min_count`` answers (fewer than ``8 * min_count`` answers: at least one).
    """
    refusal = set(int(t) for t in refusal_ids)
    counts: dict[int, int] = {}
    for t in first_tokens:
        if int(t) not in refusal:
            counts[int(t)] = counts.get(int(t), 0) + 1
    need = min(min_count, max(1, len(first_tokens) // 8))
    ranked = [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= need][:k]
    if not ranked:
        raise InputError("every greedy first token was a refusal token: no compliance tokens to contrast with; "
                         "pass compliance_tokens explicitly")
    return tuple(ranked)


@torch.inference_mode()
def discover_compliance_tokens(model: Any, instructions: Sequence[str], refusal_ids: Sequence[int], *,
                               k: int = 5, min_count: int = 2, batch_size: int = 32) -> tuple[int, ...]:
    """The ``k`` most frequent greedy first tokens on (harmless) ``instructions`` that are not refusal tokens
    (:func:`rank_compliance_tokens`). This is the "compliance" side of the logit difference DLA explains; pass
    your own tokens where you know better."""
    from refusal_circuits.scores import first_token_logits

    if not instructions:
        raise InputError("no prompts to discover compliance tokens from")
    top = first_token_logits(model, instructions, batch_size=batch_size).argmax(-1).tolist()
    return rank_compliance_tokens(top, refusal_ids, k=k, min_count=min_count)


def compliance_tokens_by_lang(first_tokens: Mapping[str, Sequence[int]], refusal: Mapping[str, Sequence[int]]
                              ) -> dict[str, tuple[int, ...]]:
    """Each language's compliance tokens from the greedy first tokens on its harmless prompts.

    ``first_tokens`` may come from a forward pass or from an earlier greedy generation (its first tokens are the
    same argmax). A model that does not understand a language may refuse every prompt in it, harmless ones
    included (the packaged 0.5B answers every Yoruba prompt with an English refusal); the logit difference still
    needs a compliance side, so such a language borrows the tokens the model starts its answers with in the other
    languages, and the log says so.
    """
    out: dict[str, tuple[int, ...]] = {}
    for lang in refusal:
        own = list(first_tokens.get(lang, ()))
        if own:
            try:
                out[lang] = rank_compliance_tokens(own, refusal[lang])
                continue
            except InputError:
                if not any(first_tokens.get(x) for x in first_tokens if x != lang):
                    raise
                log.warning("every greedy first token on %r harmless prompts is a refusal token: its compliance "
                            "tokens are taken from the other languages' harmless prompts", lang)
        others = [t for x, ts in first_tokens.items() if x != lang for t in ts]
        out[lang] = rank_compliance_tokens(others, refusal[lang]) if others else ()
    return out


def _logit_targets(model: Any, prompts: PromptSet, saved: dict[str, Any] | None, refusal_tokens: RefusalTokens | None,
                   compliance: Mapping[str, Sequence[int]] | Sequence[int] | None, batch_size: int) -> LogitTargets | None:
    tok = model.tokenizer
    if refusal_tokens is None:
        if not saved:
            log.warning("no refusal tokens given or saved with the direction: skipping direct logit attribution")
            return None
        refusal_tokens = RefusalTokens.from_json(saved)
    refusal = {lang: tuple(refusal_tokens.for_lang(lang)) for lang in prompts.langs}
    comp: dict[str, tuple[int, ...]] = {}
    if compliance is None:
        from refusal_circuits.scores import first_token_logits

        harmless = prompts.filter(label="harmless")
        top = first_token_logits(model, harmless.instructions, batch_size=batch_size).argmax(-1).tolist() \
            if len(harmless) else []
        first: dict[str, list[int]] = {}
        for rec, t in zip(harmless, top, strict=True):
            first.setdefault(rec.lang, []).append(int(t))
        comp = compliance_tokens_by_lang(first, refusal)
    for lang in prompts.langs:
        if isinstance(compliance, Mapping):
            if lang not in compliance:
                raise InputError(f"compliance tokens given for {sorted(compliance)} but not for language {lang!r}")
            comp[lang] = tuple(int(t) for t in compliance[lang])
        elif compliance is not None:
            comp[lang] = tuple(int(t) for t in compliance)
        elif not comp[lang]:
            log.warning("no harmless prompts to discover compliance tokens from: skipping direct logit "
                        "attribution (pass compliance_tokens)")
            return None
        overlap = set(comp[lang]) & set(refusal[lang])
        if overlap:
            raise InputError(f"tokens {sorted(overlap)} are both refusal and compliance tokens for {lang!r}")
    ids = {t for d in (refusal, comp) for v in d.values() for t in v}
    return LogitTargets(refusal, comp, {t: tok.decode([t]) for t in ids})


# --------------------------------------------------------------------------------------------------------------
# The record.


@dataclass(frozen=True)
class Attribution:
    """Direct attribution onto r̂ of every component at every position, for a set of prompts.

    Prompts are left-padded to a common length ``S``: position ``S - 1`` is every prompt's last token, and the
    last ``n_post`` positions are the post-instruction tokens. All score tensors are float32 and zero on padding.

    Attributes:
        embed: ``[prompt, pos]`` the token (and positional) embedding's projection (``resid_pre[0] . r̂``).
        mlps: ``[prompt, layer, pos]`` each MLP's write (through its post-norm and multiplier) onto r̂.
        heads: ``[prompt, layer, head, pos]`` head ``h``'s write onto r̂, ``factor * z_h . (W_O[h]^T v)`` (module
            docstring; ``z_h . (W_O[h] r̂)`` without a post-norm or residual multiplier).
        attn_bias: ``[prompt, layer, pos]`` what the attention writes outside its heads, ``factor * b_O . v +
            const`` (per token through a post-norm; ``b_O . r̂`` otherwise), where the model has an output bias
            (or a post-norm bias), else None.
        resid: ``[prompt, layer + 1, pos]`` ``resid_pre[l] . r̂`` for every layer, then the final residual stream
            (before the final norm).
        mask: ``[prompt, pos]`` 1 on real tokens.
        spans: ``[prompt, pos]`` :class:`~refusal_circuits.chat.Span` code of every position.
        sources: ``[prompt, layer, head, n_post, span]`` each head's write at each post-instruction position,
            summed over the source positions of each span (sums over spans to ``heads[..., -n_post:]``).
        attn_mass: ``[prompt, layer, head, n_post, span]`` attention probability from each post-instruction
            position to each span (sums to 1 over spans).
        dla: per-component direct logit attribution at the last position, or None (see :class:`LogitAttribution`).
        ids / langs / labels: per prompt; tokens: per prompt, the real tokens' strings.
    """

    embed: Float[Tensor, "prompt pos"]
    heads: Float[Tensor, "prompt layer head pos"]
    mlps: Float[Tensor, "prompt layer pos"]
    attn_bias: Float[Tensor, "prompt layer pos"] | None
    resid: Float[Tensor, "prompt layer_plus_1 pos"]
    mask: Int[Tensor, "prompt pos"]
    spans: Int[Tensor, "prompt pos"]
    sources: Float[Tensor, "prompt layer head post span"]
    attn_mass: Float[Tensor, "prompt layer head post span"]
    dla: LogitAttribution | None
    ids: list[str]
    langs: list[str]
    labels: list[str]
    tokens: list[list[str]]
    model: str
    direction: dict[str, Any]
    adv_suffix: str | None = None

    # -- shape ---------------------------------------------------------------------------------------------------
    @property
    def n_prompts(self) -> int:
        return int(self.heads.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.heads.shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.heads.shape[2])

    @property
    def n_post(self) -> int:
        return int(self.sources.shape[3])

    # -- checks --------------------------------------------------------------------------------------------------
    def reconstructed(self) -> Float[Tensor, "prompt layer_plus_1 pos"]:
        """``resid`` rebuilt from the components: embed, then cumulative head, bias and MLP writes."""
        per_layer = self.heads.double().sum(2) + self.mlps.double()
        if self.attn_bias is not None:
            per_layer = per_layer + self.attn_bias.double()
        cum = torch.cumsum(per_layer, dim=1)
        out = torch.cat([torch.zeros_like(cum[:, :1]), cum], 1) + self.embed.double()[:, None]
        return out * self.mask[:, None]

    def completeness_error(self) -> float:
        """Largest ``|resid - reconstructed|`` over prompts, layers and real positions (float noise only)."""
        return float((self.resid.double() - self.reconstructed()).abs().max())

    # -- selection -----------------------------------------------------------------------------------------------
    def select(self, *, lang: str | Sequence[str] | None = None, label: str | None = None) -> Attribution:
        """The prompts of ``lang`` (one or several) and/or ``label``."""
        langs = {lang} if isinstance(lang, str) else (set(lang) if lang is not None else None)
        keep = [i for i in range(self.n_prompts)
                if (langs is None or self.langs[i] in langs) and (label is None or self.labels[i] == label)]
        if not keep:
            raise InputError(f"no prompts with lang={lang!r}, label={label!r}; have languages "
                             f"{sorted(set(self.langs))} and labels {sorted(set(self.labels))}")
        return self.subset(keep)

    def subset(self, index: Sequence[int]) -> Attribution:
        idx = torch.tensor(list(index), dtype=torch.long)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        return replace(
            self, embed=self.embed[idx], heads=self.heads[idx], mlps=self.mlps[idx], attn_bias=pick(self.attn_bias),
            resid=self.resid[idx], mask=self.mask[idx], spans=self.spans[idx], sources=self.sources[idx],
            attn_mass=self.attn_mass[idx], dla=None if self.dla is None else self.dla.subset(idx),
            ids=[self.ids[i] for i in index], langs=[self.langs[i] for i in index],
            labels=[self.labels[i] for i in index], tokens=[self.tokens[i] for i in index])

    def position_weights(self, positions: str | int | Span = "post") -> Float[Tensor, "prompt pos"]:
        """Weights over positions that turn per-position scores into one number per prompt.

        ``"post"``: mean over the post-instruction tokens; ``"direction"``: the position r̂ was read at;
        ``"last"``: the last token; an ``int``: that negative index (counted from the end, like r̂'s position);
        a :class:`Span` or span name: mean over that span's positions.
        """
        n, s = self.mask.shape
        w = torch.zeros(n, s)
        if positions == "post":
            w[:, -self.n_post:] = 1.0 / self.n_post
        elif positions == "last":
            w[:, -1] = 1.0
        elif positions == "direction" or isinstance(positions, int) and not isinstance(positions, Span):
            p = int(self.direction["position"]) if positions == "direction" else int(positions)
            if not -s <= p < 0:
                raise InputError(f"position {p} out of range: use a negative index within the last {s} tokens")
            w[:, p] = 1.0
        else:
            span = positions if isinstance(positions, Span) else _span_named(str(positions))
            sel = (self.spans == int(span)).float()
            w = sel / sel.sum(-1, keepdim=True).clamp(min=1)
        return w

    def head_scores(self, positions: str | int | Span = "post") -> Float[Tensor, "prompt layer head"]:
        """Each head's direct write onto r̂ per prompt, reduced over positions (see :meth:`position_weights`)."""
        return torch.einsum("plhs,ps->plh", self.heads, self.position_weights(positions))

    def mlp_scores(self, positions: str | int | Span = "post") -> Float[Tensor, "prompt layer"]:
        return torch.einsum("pls,ps->pl", self.mlps, self.position_weights(positions))

    def source_spans(self) -> Float[Tensor, "prompt layer head span"]:
        """Each head's write over the post-instruction positions (mean), split by the span it reads from."""
        return self.sources.mean(3)

    def top_heads(self, k: int = 10, *, positions: str | int | Span = "post", by_abs: bool = True) -> HeadTable:
        """The ``k`` heads with the largest mean score, per (language, label), with spread and source spans."""
        scores = self.head_scores(positions)
        src = self.source_spans()
        rows: list[dict[str, Any]] = []
        for lang in dict.fromkeys(self.langs):
            for label in dict.fromkeys(self.labels):
                idx = [i for i in range(self.n_prompts) if self.langs[i] == lang and self.labels[i] == label]
                if not idx:
                    continue
                s = scores[idx]
                mean, std = s.mean(0), (s.std(0) if len(idx) > 1 else torch.zeros_like(s[0]))
                key = mean.abs() if by_abs else mean
                flat = torch.argsort(key.flatten(), descending=True)[:k]
                span_mean = src[idx].mean(0)  # [layer, head, span]
                for rank, f in enumerate(flat.tolist()):
                    layer, head = divmod(f, self.n_heads)
                    rows.append({"lang": lang, "label": label, "rank": rank + 1, "layer": layer, "head": head,
                                 "mean": float(mean[layer, head]), "std": float(std[layer, head]), "n": len(idx),
                                 "from": {SPAN_NAMES[j]: float(span_mean[layer, head, j]) for j in range(1, N_SPANS)
                                          if float(span_mean[layer, head, j]) != 0.0}})
        return HeadTable(rows, str(positions), self.model)

    # -- display and files ---------------------------------------------------------------------------------------
    def summary(self, k: int = 10) -> dict[str, Any]:
        """What ``summary.json`` holds: provenance, completeness, the top heads per (language, label), DLA totals."""
        counts: dict[str, dict[str, int]] = {}
        for lang, label in zip(self.langs, self.labels, strict=True):
            counts.setdefault(lang, {}).setdefault(label, 0)
            counts[lang][label] += 1
        out: dict[str, Any] = {
            "model": self.model, "direction": self.direction, "n_prompts": self.n_prompts, "counts": counts,
            "n_layers": self.n_layers, "n_heads": self.n_heads, "n_post": self.n_post, "adv_suffix": self.adv_suffix,
            "completeness_max_abs_error": self.completeness_error(),
            "bias_folding": ("the attention output bias's write of layer l (b_O . r̂, per token through a post-norm) is "
                             "added into mlps[:, l] in the file (also saved alone as attn_bias)"
                             if self.attn_bias is not None else
                             "no component bias writes into the residual stream outside heads and MLPs; value "
                             "biases are inside each head's z (raw coordinates)"),
            "positions": "left-padded; the last n_post positions are the post-instruction tokens",
            "top_heads": self.top_heads(k).rows,
        }
        if self.dla is not None:
            out["dla"] = self.dla.summary(self.langs, self.labels, k)
        return out

    def save(self, out_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """Write ``attributions.safetensors``, ``attributions.json`` (tokens, spans) and ``summary.json``, together
        and atomically: all three are written before any replaces an older set.

        In the file, ``mlps`` includes the attention output bias of its layer when the model has one (stated in
        the summary), so ``resid[:, l] = embed + sum_{l' < l} (heads.sum(head) + mlps)`` holds on the file alone.
        """
        from safetensors.torch import save

        from refusal_circuits.io import atomic_paths, json_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        mlps = self.mlps if self.attn_bias is None else self.mlps + self.attn_bias
        tensors: dict[str, Tensor] = {
            "embed": self.embed, "heads": self.heads, "mlps": mlps, "resid": self.resid, "mask": self.mask,
            "spans": self.spans, "sources": self.sources, "attn_mass": self.attn_mass}
        if self.attn_bias is not None:
            tensors["attn_bias"] = self.attn_bias
        if self.dla is not None:
            tensors.update(self.dla.tensors())
        s = self.mask.shape[1]
        padded_tokens = [[""] * (s - len(t)) + t for t in self.tokens]
        meta = {
            "model": self.model, "ids": self.ids, "langs": self.langs, "labels": self.labels,
            "span_names": list(SPAN_NAMES), "tokens": padded_tokens,
            "spans": [[SPAN_NAMES[c] for c in row] for row in self.spans.tolist()],
            "adv_suffix": self.adv_suffix, "direction": self.direction,
            "dla_targets": None if self.dla is None else self.dla.targets.to_json(),
            "dla_space": None if self.dla is None else self.dla.space,
            "has_attn_bias": self.attn_bias is not None, **(extra or {})}
        with atomic_paths(out / TENSORS_FILE, out / TOKENS_FILE, out / SUMMARY_FILE) as (t_tmp, j_tmp, s_tmp):
            t_tmp.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}))
            j_tmp.write_text(json_text(meta), encoding="utf-8")
            s_tmp.write_text(json_text(self.summary()), encoding="utf-8")
        return out

    def _repr_html_(self) -> str:
        langs = ", ".join(f"{html.escape(k)}" for k in dict.fromkeys(self.langs))
        head = (f"<b>Attribution onto r̂</b> · {html.escape(self.model)} · direction {html.escape(str(self.direction.get('lang')))} "
                f"layer {self.direction.get('layer')}, position {self.direction.get('position')} · "
                f"{self.n_prompts} prompts ({langs}) · completeness error {self.completeness_error():.2e}")
        return head + self.top_heads(5)._repr_html_()

    def __repr__(self) -> str:
        return (f"Attribution(model={self.model!r}, prompts={self.n_prompts}, layers={self.n_layers}, "
                f"heads={self.n_heads}, positions={self.mask.shape[1]}, dla={self.dla is not None})")


def concat_attributions(parts: Sequence[Attribution]) -> Attribution:
    """One record from several (e.g. one per language), re-padded on the left to a common length."""
    if not parts:
        raise InputError("nothing to concatenate")
    first = parts[0]
    for p in parts[1:]:
        if (p.n_layers, p.n_heads, p.n_post) != (first.n_layers, first.n_heads, first.n_post) or p.model != first.model:
            raise InputError("attributions from different models or shapes cannot be concatenated")
        if p.direction != first.direction:
            raise InputError("attributions onto different directions cannot be concatenated")
        if (p.attn_bias is None) != (first.attn_bias is None) or (p.dla is None) != (first.dla is None):
            raise InputError("attributions with and without bias or DLA parts cannot be concatenated")
        if p.dla is not None and first.dla is not None and p.dla.space != first.dla.space:
            raise InputError("attributions of logit differences in different logit spaces cannot be concatenated")
    s = max(int(p.mask.shape[1]) for p in parts)

    def pad(t: Tensor) -> Tensor:
        extra = s - int(t.shape[-1])
        return torch.nn.functional.pad(t, (extra, 0)) if extra else t

    def cat(get: Any) -> Tensor:
        return torch.cat([get(p) for p in parts])

    dla = None
    if first.dla is not None:
        ds = [p.dla for p in parts if p.dla is not None]
        refusal = {k: v for d in ds for k, v in d.targets.refusal.items()}
        comp = {k: v for d in ds for k, v in d.targets.compliance.items()}
        strings = {k: v for d in ds for k, v in d.targets.strings.items()}
        dla = LogitAttribution(torch.cat([d.embed for d in ds]), torch.cat([d.heads for d in ds]),
                               torch.cat([d.mlps for d in ds]),
                               None if ds[0].attn_bias is None else torch.cat([d.attn_bias for d in ds if d.attn_bias is not None]),
                               torch.cat([d.const for d in ds]), torch.cat([d.logit_diff for d in ds]),
                               torch.cat([d.scale for d in ds]), LogitTargets(refusal, comp, strings), ds[0].space)
    return Attribution(
        embed=cat(lambda p: pad(p.embed)), heads=cat(lambda p: pad(p.heads)), mlps=cat(lambda p: pad(p.mlps)),
        attn_bias=None if first.attn_bias is None else cat(lambda p: pad(p.attn_bias)),
        resid=cat(lambda p: pad(p.resid)), mask=cat(lambda p: pad(p.mask)), spans=cat(lambda p: pad(p.spans)),
        sources=cat(lambda p: p.sources), attn_mass=cat(lambda p: p.attn_mass), dla=dla,
        ids=[x for p in parts for x in p.ids], langs=[x for p in parts for x in p.langs],
        labels=[x for p in parts for x in p.labels], tokens=[x for p in parts for x in p.tokens], model=first.model,
        direction=first.direction, adv_suffix=first.adv_suffix)


def load_attribution(path: str | os.PathLike[str]) -> Attribution:
    """Read a directory written by :meth:`Attribution.save` (safetensors and JSON only, never pickle)."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(path)
    tfile, jfile = d / TENSORS_FILE, d / TOKENS_FILE
    for f in (tfile, jfile):
        if not f.is_file():
            raise InputError(f"{f}: not found (expected a directory written by `refusal-circuits attribute`)")
    try:
        t = load_file(str(tfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{tfile}: not a readable safetensors file ({e})") from None
    try:
        meta = json.loads(jfile.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{jfile}: not valid JSON ({e})") from None
    need = ["embed", "heads", "mlps", "resid", "mask", "spans", "sources", "attn_mass"]
    missing = [k for k in need if k not in t] + [k for k in ("ids", "langs", "labels", "tokens") if k not in meta]
    if missing:
        raise InputError(f"{d}: missing {', '.join(missing)}")
    n = int(t["heads"].shape[0])
    if any(len(meta[k]) != n for k in ("ids", "langs", "labels", "tokens")):
        raise InputError(f"{jfile}: ids/langs/labels/tokens do not match the {n} prompts of {tfile}")
    attn_bias = t.get("attn_bias")
    mlps = t["mlps"] - attn_bias if attn_bias is not None else t["mlps"]
    dla = None
    if "dla_heads" in t and meta.get("dla_targets"):
        tj = meta["dla_targets"]
        strings = {int(i): s for key in ("refusal", "compliance")
                   for ids_, strs in zip(tj[f"{key}_ids"].values(), tj[key].values(), strict=True)
                   for i, s in zip(ids_, strs, strict=True)}
        targets = LogitTargets({k: tuple(v) for k, v in tj["refusal_ids"].items()},
                               {k: tuple(v) for k, v in tj["compliance_ids"].items()}, strings)
        bias = t.get("dla_bias")
        dla = LogitAttribution(t["dla_embed"], t["dla_heads"], t["dla_mlps"] - bias if bias is not None else t["dla_mlps"],
                               bias, t["dla_const"], t["dla_logit_diff"], t["dla_scale"], targets,
                               str(meta.get("dla_space") or "logits"))
    tokens = [[tok for tok, m in zip(row, mrow, strict=True) if m] for row, mrow in zip(meta["tokens"], t["mask"].tolist(),
                                                                                         strict=True)]
    return Attribution(embed=t["embed"], heads=t["heads"], mlps=mlps, attn_bias=attn_bias, resid=t["resid"],
                       mask=t["mask"], spans=t["spans"], sources=t["sources"], attn_mass=t["attn_mass"], dla=dla,
                       ids=list(meta["ids"]), langs=list(meta["langs"]), labels=list(meta["labels"]), tokens=tokens,
                       model=str(meta.get("model", "")), direction=dict(meta.get("direction") or {}),
                       adv_suffix=meta.get("adv_suffix"))


def top_k_heads(scores: Float[Tensor, "layer head"], k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs with the largest ``|scores|``, largest first."""
    n_heads = int(scores.shape[1])
    flat = torch.argsort(scores.abs().flatten(), descending=True)[:k].tolist()
    return [divmod(int(f), n_heads) for f in flat]


def _span_named(name: str) -> Span:
    try:
        return Span[name.upper()]
    except KeyError:
        raise InputError(f"unknown span {name!r}; choose from {list(SPAN_NAMES[1:])}") from None


@dataclass(frozen=True)
class LogitAttribution:
    """Direct logit attribution at the last position onto ``mean W_U[refusal] - mean W_U[compliance]``.

    Each part is the component's write ``c`` mapped through the final norm with the clean run's scale:
    ``(c . v) / scale``. ``embed + heads.sum + mlps.sum (+ attn_bias.sum) + const == logit_diff``.

    ``space`` says which logits ``logit_diff`` is a difference of: ``"logits"``; Granite's logits (the
    unembedding divided by ``logits_scaling``, folded into the parts); or, for Gemma-2, the logits *before* its
    final soft-cap ``c tanh(x / c)``, which is not linear and so not split into parts.
    """

    embed: Float[Tensor, " prompt"]
    heads: Float[Tensor, "prompt layer head"]
    mlps: Float[Tensor, "prompt layer"]
    attn_bias: Float[Tensor, "prompt layer"] | None
    const: Float[Tensor, " prompt"]
    logit_diff: Float[Tensor, " prompt"]
    scale: Float[Tensor, " prompt"]
    targets: LogitTargets
    space: str = "logits"

    def total(self) -> Float[Tensor, " prompt"]:
        out = self.embed.double() + self.heads.double().sum((1, 2)) + self.mlps.double().sum(1) + self.const.double()
        if self.attn_bias is not None:
            out = out + self.attn_bias.double().sum(1)
        return out

    def completeness_error(self) -> float:
        return float((self.total() - self.logit_diff.double()).abs().max())

    def subset(self, idx: Tensor) -> LogitAttribution:
        return replace(self, embed=self.embed[idx], heads=self.heads[idx], mlps=self.mlps[idx],
                       attn_bias=None if self.attn_bias is None else self.attn_bias[idx], const=self.const[idx],
                       logit_diff=self.logit_diff[idx], scale=self.scale[idx])

    def tensors(self) -> dict[str, Tensor]:
        out = {"dla_embed": self.embed, "dla_heads": self.heads,
               "dla_mlps": self.mlps if self.attn_bias is None else self.mlps + self.attn_bias,
               "dla_const": self.const, "dla_logit_diff": self.logit_diff, "dla_scale": self.scale}
        if self.attn_bias is not None:
            out["dla_bias"] = self.attn_bias
        return out

    def summary(self, langs: Sequence[str], labels: Sequence[str], k: int) -> dict[str, Any]:
        out: dict[str, Any] = {"targets": self.targets.to_json(), "completeness_max_abs_error": self.completeness_error(),
                               "space": self.space, "groups": []}
        n_heads = self.heads.shape[2]
        for lang in dict.fromkeys(langs):
            for label in dict.fromkeys(labels):
                idx = [i for i, (a, b) in enumerate(zip(langs, labels, strict=True)) if a == lang and b == label]
                if not idx:
                    continue
                mean = self.heads[idx].mean(0)
                top = torch.argsort(mean.abs().flatten(), descending=True)[:k].tolist()
                out["groups"].append({
                    "lang": lang, "label": label, "n": len(idx),
                    "logit_diff": float(self.logit_diff[idx].mean()),
                    "top_heads": [{"layer": f // n_heads, "head": f % n_heads,
                                   "mean": float(mean.flatten()[f])} for f in top],
                    "mlps": [float(x) for x in self.mlps[idx].mean(0)]})
        return out


@dataclass(frozen=True)
class HeadTable:
    """Top heads per (language, label): mean and standard deviation of their direct write onto r̂."""

    rows: list[dict[str, Any]]
    positions: str
    model: str

    def where(self, *, lang: str | None = None, label: str | None = None) -> HeadTable:
        """The rows of one language and/or label."""
        rows = [r for r in self.rows if (lang is None or r["lang"] == lang) and (label is None or r["label"] == label)]
        return HeadTable(rows, self.positions, self.model)

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><td>{html.escape(r['lang'])}</td><td>{html.escape(r['label'])}</td><td>{r['rank']}</td>"
            f"<td>L{r['layer']}.H{r['head']}</td><td>{r['mean']:+.3f}</td><td>{r['std']:.3f}</td><td>{r['n']}</td>"
            f"<td>{html.escape(', '.join(f'{k} {v:+.2f}' for k, v in r['from'].items()))}</td></tr>"
            for r in self.rows)
        return (f"<table><caption>Top heads by direct write onto r̂ (positions: {html.escape(self.positions)})"
                "</caption><tr><th>lang</th><th>label</th><th>#</th><th>head</th><th>mean</th><th>std</th><th>n</th>"
                f"<th>read from (post-instruction mean)</th></tr>{body}</table>")

    def __repr__(self) -> str:
        lines = [f"{r['lang']:>3} {r['label']:<8} #{r['rank']:<2} L{r['layer']}.H{r['head']:<3} "
                 f"{r['mean']:+.3f} ± {r['std']:.3f}" for r in self.rows]
        return "HeadTable(\n  " + "\n  ".join(lines) + "\n)"


# --------------------------------------------------------------------------------------------------------------
# Computing it.


class _BatchProbe:
    """The hooks of one attribution forward pass; each reduces its activation on the spot.

    Per layer the hooks fire in the order ``hook_v``, ``hook_pattern``, ``hook_z`` (heads' raw scores
    ``z_h . W_O[h]^T v``), ``attn.hook_out`` (the raw output ``o``: now each token's ``factor = m / scale(o)`` is
    known and scales that layer's head scores, sources and DLA parts; the bias part is written), ``mlp.hook_out``.
    """

    def __init__(self, geo: HeadGeometry, r: Tensor, dla_v: Tensor | None, b: int, s: int, n_post: int,
                 key_spans: Tensor | None, dla_rows: Tensor | None, prefix_vproj: list[Tensor] | None = None) -> None:
        """A probe for ``b`` rows of ``s`` positions.

        Args:
            key_spans: ``[b, keys]`` span codes of the attention keys (the positions this pass attends to, including
                a cached prefix); None for a prefix pass, which records no sources.
            prefix_vproj: per layer ``[1, n_prefix, head]`` value projections of a cached prefix, placed before this
                pass's own keys.
        """
        self.geo = geo
        n_layers = geo.n_layers
        self.n_post = n_post
        self.r = r
        self.dla_v = dla_v  # [groups, d_model] float64
        self.dla_rows = dla_rows  # [b] group index per row
        self.read_r = [geo.head_readout(layer, r[None])[0] for layer in range(n_layers)]  # [head, d_head]
        self.bias_r = [tuple(t[0] for t in geo.bias_readout(layer, r[None])) for layer in range(n_layers)]
        self.read_dla = ([geo.head_readout(layer, dla_v) for layer in range(n_layers)]  # [groups, head, d_head]
                         if dla_v is not None else None)
        self.bias_dla = ([geo.bias_readout(layer, dla_v) for layer in range(n_layers)]  # ([groups], [groups])
                         if dla_v is not None else None)
        self.kv = geo.kv_of_head().to(r.device)
        f64, dev = torch.float64, r.device
        self.embed = torch.zeros(b, s, dtype=f64, device=dev)
        self.heads = torch.zeros(b, n_layers, geo.n_heads, s, dtype=f64, device=dev)
        self.attn_bias = torch.zeros(b, n_layers, s, dtype=f64, device=dev)
        self.mlps = torch.zeros(b, n_layers, s, dtype=f64, device=dev)
        self.resid = torch.zeros(b, n_layers + 1, s, dtype=f64, device=dev)
        self.sources = torch.zeros(b, n_layers, geo.n_heads, n_post, N_SPANS, dtype=f64, device=dev)
        self.attn_mass = torch.zeros_like(self.sources)
        self.span_onehot = (None if key_spans is None else
                            torch.nn.functional.one_hot(key_spans, N_SPANS).to(torch.float64))  # [b, keys, span]
        self.prefix_vproj = prefix_vproj
        self.vproj: Tensor | None = None
        self.vprojs: list[Tensor] = []  # per layer, kept for a prefix pass
        # DLA parts before dividing by the final norm's scale (known only at the end of the pass).
        self.dla_embed = torch.zeros(b, dtype=f64, device=dev)
        self.dla_heads = torch.zeros(b, n_layers, geo.n_heads, dtype=f64, device=dev)
        self.dla_bias = torch.zeros(b, n_layers, dtype=f64, device=dev)
        self.dla_mlps = torch.zeros(b, n_layers, dtype=f64, device=dev)
        self.final_last: Tensor | None = None
        self._z_seen: set[int] = set()
        self._done: set[str] = set()

    def _dla(self, x_last: Tensor) -> Tensor:
        """``x . v_row`` for the last position of every row."""
        assert self.dla_v is not None and self.dla_rows is not None
        return (x_last.to(torch.float64) * self.dla_v[self.dla_rows]).sum(-1)

    def hook_list(self) -> list[tuple[str, hooks.HookFn]]:
        n_layers = self.geo.n_layers
        out: list[tuple[str, hooks.HookFn]] = [(block_in(0), self.on_embed)]
        for layer in range(n_layers):
            out += [(hooks.resid_pre(layer), self._on_resid(layer)),
                    (hooks.attn_v(layer), self._on_v(layer)),
                    (hooks.attn_pattern(layer), self._on_pattern(layer)),
                    (hooks.attn_z(layer), self._on_z(layer)),
                    (attn_raw(layer), self._on_attn_out(layer)),
                    (mlp_raw(layer), self._on_mlp(layer))]
        out.append((hooks.resid_post(n_layers - 1), self._on_resid(n_layers)))
        return out

    def _layout(self, what: str, got: tuple[int, ...], want: str) -> InputError:
        return InputError(f"{self.geo.architecture}: {what} has shape {got}; attribution needs {want} (this "
                          "architecture's attention hooks have another layout and are not supported)")

    def on_embed(self, x: Tensor, _name: str) -> None:
        """``resid_pre[0]``: the embedding's whole write (token and position embeddings, every scale applied)."""
        self.embed += x.to(torch.float64) @ self.r
        if self.dla_v is not None:
            self.dla_embed += self._dla(x[:, -1])
        self._done.add("embed")

    def _on_resid(self, slot: int) -> hooks.HookFn:
        def fn(x: Tensor, _name: str) -> None:
            self.resid[:, slot] = x.to(torch.float64) @ self.r
            if slot == self.geo.n_layers:
                self.final_last = x[:, -1].to(torch.float64)
            self._done.add(f"resid{slot}")
        return fn

    def _on_v(self, layer: int) -> hooks.HookFn:
        geo = self.geo

        def fn(v: Tensor, _name: str) -> None:
            b, s = v.shape[:2]
            if v.ndim != 3 or v.shape[-1] != geo.n_kv_heads * geo.d_head:
                raise self._layout(f"layer {layer}'s attn.hook_v", tuple(v.shape),
                                   f"[batch, pos, {geo.n_kv_heads} * {geo.d_head}]")
            v = v.reshape(b, s, geo.n_kv_heads, geo.d_head).to(torch.float64)[:, :, self.kv]  # [b,s,h,d]
            self.vproj = torch.einsum("bshd,hd->bsh", v, self.read_r[layer])
            if self.span_onehot is None:
                self.vprojs.append(self.vproj)
            elif self.prefix_vproj is not None:
                self.vproj = torch.cat([self.prefix_vproj[layer].expand(b, -1, -1), self.vproj], 1)
        return fn

    def _on_pattern(self, layer: int) -> hooks.HookFn:
        n_post = self.n_post

        def fn(pattern: Tensor, _name: str) -> None:
            if pattern.ndim != 4 or pattern.shape[1] != self.geo.n_heads:
                raise self._layout(f"layer {layer}'s attn.hook_pattern", tuple(pattern.shape),
                                   f"[batch, {self.geo.n_heads}, dest, src]")
            if self.span_onehot is None:  # a prefix pass: its positions are no destinations we keep
                return
            a = pattern[:, :, -n_post:, :].to(torch.float64)  # [b, head, post, src]
            if self.vproj is None or self.vproj.shape[1] != a.shape[-1]:
                raise self._layout(f"layer {layer}'s values (hook_v before hook_pattern)",
                                   tuple(() if self.vproj is None else self.vproj.shape), f"{a.shape[-1]} keys")
            contrib = a * self.vproj.transpose(1, 2)[:, :, None, :]  # A[p, s] (v_s . W_O[h]^T v), factor to come
            self.sources[:, layer] = torch.einsum("bhps,bsk->bhpk", contrib, self.span_onehot)
            self.attn_mass[:, layer] = torch.einsum("bhps,bsk->bhpk", a, self.span_onehot)
        return fn

    def _on_z(self, layer: int) -> hooks.HookFn:
        geo = self.geo

        def fn(z: Tensor, _name: str) -> None:
            b, s = z.shape[:2]
            if z.ndim != 3 or z.shape[-1] != geo.n_heads * geo.d_head:
                raise self._layout(f"layer {layer}'s attn.hook_z", tuple(z.shape),
                                   f"[batch, pos, {geo.n_heads} * {geo.d_head}] (the input of the output projection)")
            z = z.reshape(b, s, geo.n_heads, geo.d_head).to(torch.float64)
            self.heads[:, layer] = torch.einsum("bshd,hd->bhs", z, self.read_r[layer])
            if self.read_dla is not None:
                assert self.dla_rows is not None
                self.dla_heads[:, layer] = torch.einsum("bhd,bhd->bh", z[:, -1], self.read_dla[layer][self.dla_rows])
            self._z_seen.add(layer)
        return fn

    def _on_attn_out(self, layer: int) -> hooks.HookFn:
        write: ResidualWrite = self.geo.attn[layer]
        n_post = self.n_post

        def fn(o: Tensor, _name: str) -> None:
            if layer not in self._z_seen:
                raise InputError(f"{self.geo.architecture}: layer {layer}'s attention output fired before its "
                                 "hook_z; attribution cannot scale the heads' writes on this architecture")
            f = write.factor(o)  # [b, s]: m / scale(o) per token (m without a post-norm)
            if write.norm is not None or write.multiplier != 1.0:
                self.heads[:, layer] *= f[:, None, :]
                self.sources[:, layer] *= f[:, None, -n_post:, None]
                self.dla_heads[:, layer] *= f[:, -1:]
            dot, const = self.bias_r[layer]
            self.attn_bias[:, layer] = dot * f + const
            if self.bias_dla is not None:
                assert self.dla_rows is not None
                dot_g, const_g = self.bias_dla[layer]
                self.dla_bias[:, layer] = dot_g[self.dla_rows] * f[:, -1] + const_g[self.dla_rows]
            self._done.add(f"attn{layer}")
        return fn

    def _on_mlp(self, layer: int) -> hooks.HookFn:
        write: ResidualWrite = self.geo.mlp[layer]

        def fn(x: Tensor, _name: str) -> None:
            w = x if write.is_identity else write.apply(x)  # the MLP's write: m * post_norm(x)
            self.mlps[:, layer] = w.to(torch.float64) @ self.r
            if self.dla_v is not None:
                self.dla_mlps[:, layer] = self._dla(w[:, -1])
            self._done.add(f"mlp{layer}")
        return fn

    def reconstructed(self) -> Tensor:
        """``resid`` rebuilt from this pass's parts, ``[b, layer + 1, s]``."""
        per_layer = self.heads.sum(2) + self.attn_bias + self.mlps
        cum = torch.cumsum(per_layer, dim=1)
        return torch.cat([torch.zeros_like(cum[:, :1]), cum], 1) + self.embed[:, None]

    def check(self, mask: Tensor, dtype: torch.dtype) -> float:
        """Raise :class:`~refusal_circuits.exactness.ExactnessError` unless embed + heads + biases + MLPs rebuild
        the measured ``resid`` at every layer and real position (``mask``: ``[b, s]``) of this pass."""
        n_layers = self.geo.n_layers
        missing = [k for k in ["embed", *(f"resid{i}" for i in range(n_layers + 1)),
                               *(f"{w}{i}" for i in range(n_layers) for w in ("attn", "mlp"))] if k not in self._done]
        if missing:
            raise exactness.ExactnessError(f"attribution of {self.geo.architecture}: hook points for "
                                           f"{', '.join(missing[:4])} never fired; the residual stream cannot be "
                                           "rebuilt on this architecture")
        keep = mask.bool()[:, None, :].expand_as(self.resid)
        return exactness.require(self.reconstructed()[keep], self.resid[keep], dtype,
                                 f"attribution of {self.geo.architecture}: embed + heads + biases + MLPs do not add "
                                 "up to the measured residual stream", n_terms=2 * n_layers + 1,
                                 hint="its writer geometry is not one this library describes correctly")


@torch.inference_mode()
def attribute(
    model: Any,
    direction: Direction | Tensor,
    prompts: PromptSet | Sequence[str],
    *,
    adv_suffix: str | None = None,
    refusal_tokens: RefusalTokens | None = None,
    compliance_tokens: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    dla: bool = True,
    batch_size: int = 16,
    fmt: ChatFormat | None = None,
    progress: bool = True,
) -> Attribution:
    """Direct attribution of every component onto r̂, at every position, plus source spans and DLA.

    Args:
        model: a ``TransformerBridge`` in raw mode (:func:`~refusal_circuits.models.load_model`).
        direction: the refusal direction (a :class:`Direction`, or a ``[d_model]`` tensor).
        prompts: a :class:`PromptSet` (ids, languages and labels are kept) or plain instructions.
        adv_suffix: text appended to every instruction, labelled as its own span.
        refusal_tokens: the refusal side of DLA (default: the tokens saved with the direction).
        compliance_tokens: the compliance side, per language or shared (default: the most frequent greedy first
            tokens on the harmless prompts of each language, refusal tokens excluded).
        dla: compute direct logit attribution (needs both token sets; skipped with a warning otherwise).
        batch_size: prompts per forward pass.

    Returns:
        The :class:`Attribution`, one row per prompt in input order.
    """
    if isinstance(prompts, PromptSet):
        records = list(prompts)
        pset = prompts
    else:
        from refusal_circuits.data import PromptRecord

        records = [PromptRecord(f"#{i}", "und", "harmful", s) for i, s in enumerate(prompts)]
        pset = PromptSet(tuple(records), "instructions")
    if not records:
        raise InputError("no prompts to attribute")
    _check_one_device(model)
    if isinstance(direction, Direction):
        check_compatible(direction, model)
        dmeta = {k: v for k, v in direction.to_json().items() if k in ("model", "lang", "layer", "position", "norm")}
    else:
        dmeta = {"model": "tensor", "lang": None, "layer": None, "position": -1, "norm": float(direction.norm())}
    r = _unit_vector(direction, model)
    geo = head_geometry(model)
    fmt = fmt or chat_format(model.tokenizer)

    targets: LogitTargets | None = None
    if dla:
        saved = direction.meta.get("refusal_tokens") if isinstance(direction, Direction) else None
        targets = _logit_targets(model, pset, saved, refusal_tokens, compliance_tokens, batch_size)
    norm = final_norm(model) if targets is not None else None
    group_of: dict[str, int] = {}
    dla_v = dla_const = u = u_bias = None
    space = "logits"
    if targets is not None and norm is not None:
        w_u, b_u = _unembedding(model)
        w_u, b_u = w_u.cpu(), (None if b_u is None else b_u.cpu())
        lmap = logit_map(model)
        space = lmap.describe()
        if lmap.softcap is not None:
            log.warning("%s soft-caps its logits (%g tanh(x / %g)): direct logit attribution explains the logit "
                        "difference before the cap", geo.architecture, lmap.softcap, lmap.softcap)
        langs = list(dict.fromkeys(r_.lang for r_ in records))
        group_of = {lang: i for i, lang in enumerate(langs)}
        # Per language: the logit-space direction u (mean refusal row minus mean compliance row of W_U, divided by
        # Granite's logits_scaling) and the matching unembedding-bias difference; the model's own (pre-cap) logit
        # difference is h_last . u + u_bias.
        u = torch.stack([w_u[list(targets.refusal[lang])].double().mean(0) - w_u[list(targets.compliance[lang])].double().mean(0)
                         for lang in langs]) / lmap.scaling
        u_bias = (torch.zeros(len(langs), dtype=torch.float64) if b_u is None else
                  torch.stack([b_u[list(targets.refusal[lang])].double().mean()
                               - b_u[list(targets.compliance[lang])].double().mean() for lang in langs])) / lmap.scaling
        dla_v, dla_const = norm.readout(u)
        dla_const = dla_const + u_bias
        dla_v = dla_v.to(device_of(model))

    n = len(records)
    per_row: list[dict[str, Tensor] | None] = [None] * n
    token_strs: list[list[str]] = [[] for _ in range(n)]
    tok = model.tokenizer
    device = device_of(model)
    dtype = exactness.compute_dtype(model)
    r_dev = r.to(device)
    worst = 0.0
    for idx, batch in batches(model, [rec.instruction for rec in records], batch_size, fmt=fmt,
                              adv_suffix=adv_suffix, names=[rec.id for rec in records], progress=progress,
                              desc="attribution"):
        rows = torch.tensor([group_of.get(records[i].lang, 0) for i in idx], dtype=torch.long, device=device)
        b = len(idx)
        n_prefix = fwd.shared_prefix(model, batch)  # 0 where the prefix is not shared or its check failed
        prefix: _BatchProbe | None = None
        if n_prefix:
            # The template prefix is the same for every row: attribute it once (a batch of one), and let every row
            # continue from it; its value projections join the keys of the rows' own pass.
            prefix = _BatchProbe(geo, r_dev, None, 1, n_prefix, batch.n_post, None, None)
            not_prefix = batch.spans != int(Span.PREFIX)
            own = not_prefix & batch.attention_mask.bool()
            rest_len = int(own.sum(-1).max())
            tail_spans = torch.where(own[:, -rest_len:], batch.spans[:, -rest_len:],
                                     torch.zeros_like(batch.spans[:, -rest_len:]))
            key_spans = torch.cat([torch.full((b, n_prefix), int(Span.PREFIX), device=device), tail_spans], 1)
            probe = _BatchProbe(geo, r_dev, dla_v, b, rest_len, batch.n_post, key_spans,
                                rows if dla_v is not None else None, prefix_vproj=prefix.vprojs)
            hidden = decoder_forward(model, batch, probe.hook_list(), share_prefix=True,
                                  prefix_readers=prefix.hook_list())
            worst = max(worst, prefix.check(torch.ones(1, n_prefix, device=device), dtype))
            worst = max(worst, probe.check(own[:, -rest_len:], dtype))
        else:
            probe = _BatchProbe(geo, r_dev, dla_v, b, batch.input_ids.shape[1], batch.n_post, batch.spans,
                                rows if dla_v is not None else None)
            hidden = decoder_forward(model, batch, probe.hook_list(), share_prefix=False)
            worst = max(worst, probe.check(batch.attention_mask, dtype))
        lengths = batch.lengths.tolist()
        extra: dict[str, Tensor] = {}
        if dla_v is not None and norm is not None and u is not None and u_bias is not None:
            assert probe.final_last is not None and hidden is not None and dla_const is not None
            scale = norm.scale(probe.final_last).cpu()
            groups = rows.cpu()
            const = dla_const[groups]
            probe_parts = {"embed": probe.dla_embed.cpu(), "heads": probe.dla_heads.cpu(), "mlps": probe.dla_mlps.cpu()}
            extra = {"dla_embed": probe_parts["embed"] / scale, "dla_heads": probe_parts["heads"] / scale[:, None, None],
                     "dla_mlps": probe_parts["mlps"] / scale[:, None], "dla_const": const, "dla_scale": scale}
            # The model's own logit difference, from its real final norm and unembedding: the parts must add up.
            actual = (hidden[:, -1].to(torch.float64).cpu() * u[groups]).sum(-1) + u_bias[groups]
            extra["dla_logit_diff"] = actual
            extra["dla_bias"] = probe.dla_bias.cpu() / scale[:, None]
            parts = (extra["dla_embed"] + extra["dla_heads"].sum((1, 2)) + extra["dla_mlps"].sum(1) + const
                     + extra["dla_bias"].sum(1))
            exactness.require(parts, actual, dtype, f"direct logit attribution of {geo.architecture}: the parts do "
                              "not add up to the model's logit difference", n_terms=2 * geo.n_layers + 1,
                              hint="its final norm or unembedding is not one this library describes; pass dla=False")
        for j, i in enumerate(idx):
            k = lengths[j] - n_prefix  # this pass's own positions of row j (all of them without a shared prefix)

            def row_part(t: Tensor, pre: Tensor | None, k: int = k, j: int = j) -> Tensor:
                mine = t[j, ..., -k:]
                return mine if pre is None else torch.cat([pre[0], mine], -1)

            row = {"embed": row_part(probe.embed, prefix.embed if prefix else None),
                   "heads": row_part(probe.heads, prefix.heads if prefix else None),
                   "attn_bias": row_part(probe.attn_bias, prefix.attn_bias if prefix else None),
                   "mlps": row_part(probe.mlps, prefix.mlps if prefix else None),
                   "resid": row_part(probe.resid, prefix.resid if prefix else None), "spans": batch.spans[j, -lengths[j]:],
                   "sources": probe.sources[j], "attn_mass": probe.attn_mass[j]}
            row.update({key: val[j] for key, val in extra.items()})
            row = {key: val.cpu() for key, val in row.items()}
            per_row[i] = row
            token_strs[i] = [tok.decode([t]) for t in batch.input_ids[j, -lengths[j]:].tolist()]
    log.debug("attribution of %s adds up to the residual stream within %.3g", geo.architecture, worst)

    rows_done = [row for row in per_row if row is not None]
    assert len(rows_done) == n
    s_max = max(int(row["embed"].shape[-1]) for row in rows_done)

    def stack_padded(key: str) -> Tensor:
        first = rows_done[0][key]
        out = torch.zeros((n, *first.shape[:-1], s_max), dtype=first.dtype)
        for i, row in enumerate(rows_done):
            t = row[key]
            out[i, ..., s_max - t.shape[-1]:] = t
        return out

    mask = torch.zeros(n, s_max, dtype=torch.long)
    for i, row in enumerate(rows_done):
        mask[i, s_max - row["embed"].shape[-1]:] = 1
    attn_bias = (stack_padded("attn_bias") * mask[:, None, :]).float() if geo.has_bias else None
    dla_rec = None
    if targets is not None and "dla_embed" in rows_done[0]:
        def stack(key: str) -> Tensor:
            return torch.stack([row[key] for row in rows_done]).float().cpu()

        dla_rec = LogitAttribution(stack("dla_embed"), stack("dla_heads"), stack("dla_mlps"),
                                   stack("dla_bias") if geo.has_bias else None, stack("dla_const"),
                                   stack("dla_logit_diff"), stack("dla_scale"), targets, space)
    return Attribution(
        embed=stack_padded("embed").float(), heads=stack_padded("heads").float(), mlps=stack_padded("mlps").float(),
        attn_bias=attn_bias, resid=stack_padded("resid").float(), mask=mask, spans=stack_padded("spans"),
        sources=torch.stack([row["sources"] for row in rows_done]).float().cpu(),
        attn_mass=torch.stack([row["attn_mass"] for row in rows_done]).float().cpu(),
        dla=dla_rec, ids=[rec.id for rec in records], langs=[rec.lang for rec in records],
        labels=[rec.label for rec in records], tokens=token_strs, model=model_id(model), direction=dmeta,
        adv_suffix=adv_suffix)


@dataclass(frozen=True)
class SourceMatrix:
    """Through-attention decomposition of chosen heads on one prompt.

    Attributes:
        tokens / spans: the prompt's tokens and their span names.
        heads: the ``(layer, head)`` pairs, in the order of axis 0.
        contributions: ``[head, dest, src]`` ``factor_dest A[dest, src] (v_src . W_O[h]^T v)`` (``v = r̂`` and
            ``factor = 1`` without a post-norm or residual multiplier, see the module docstring); rows sum to the
            head's write.
        pattern: ``[head, dest, src]`` the attention probabilities.
    """

    tokens: list[str]
    spans: list[str]
    heads: list[tuple[int, int]]
    contributions: Float[Tensor, "head dest src"]
    pattern: Float[Tensor, "head dest src"]

    def writes(self) -> Float[Tensor, "head dest"]:
        """Each head's direct write onto r̂ at every destination (the rows' sums)."""
        return self.contributions.sum(-1)

    def top_sources(self, k: int = 5, dest: int = -1) -> dict[tuple[int, int], list[tuple[str, float]]]:
        """Per head, the ``k`` source tokens feeding r̂ most (by absolute value) at destination ``dest``."""
        out: dict[tuple[int, int], list[tuple[str, float]]] = {}
        for i, h in enumerate(self.heads):
            row = self.contributions[i, dest]
            order = torch.argsort(row.abs(), descending=True)[:k].tolist()
            out[h] = [(self.tokens[j], float(row[j])) for j in order]
        return out

    def _repr_html_(self) -> str:
        parts = []
        for (layer, head), tops in self.top_sources().items():
            cells = "".join(f"<td><code>{html.escape(repr(t))}</code> {v:+.3f}</td>" for t, v in tops)
            parts.append(f"<tr><th>L{layer}.H{head}</th>{cells}</tr>")
        return ("<table><caption>Source tokens feeding r̂ at the last position (A[p,s] · v_s W_O r̂)</caption>"
                + "".join(parts) + "</table>")


def _check_one_device(model: Any) -> None:
    """Attribution keeps its per-layer read-outs and buffers on the model's first device."""
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise InputError(f"attribution needs the model on one device; it is split across "
                         f"{', '.join(sorted(str(d) for d in devices))} (load it with device= instead of device_map=)")


@torch.inference_mode()
def source_matrix(model: Any, direction: Direction | Tensor, instruction: str, heads: Sequence[tuple[int, int]], *,
                  adv_suffix: str | None = None, fmt: ChatFormat | None = None) -> SourceMatrix:
    """The full ``[dest, src]`` decomposition of ``heads``' writes onto r̂ for one chat-formatted instruction."""
    _check_one_device(model)
    if isinstance(direction, Direction):
        check_compatible(direction, model)
    r = _unit_vector(direction, model).to(device_of(model))
    geo = head_geometry(model)
    heads = [(int(a), int(b)) for a, b in heads]
    for layer, head in heads:
        if not (0 <= layer < geo.n_layers and 0 <= head < geo.n_heads):
            raise InputError(f"head L{layer}.H{head} out of range: the model has {geo.n_layers} layers of "
                             f"{geo.n_heads} heads")
    if not heads:
        raise InputError("name at least one head, as (layer, head)")
    kv = geo.kv_of_head().to(r.device)
    contrib: dict[tuple[int, int], Tensor] = {}
    patt: dict[tuple[int, int], Tensor] = {}
    vproj: dict[int, Tensor] = {}
    layers = sorted({layer for layer, _ in heads})

    def on_v(layer: int) -> hooks.HookFn:
        def fn(v: Tensor, _name: str) -> None:
            if v.ndim != 3 or v.shape[-1] != geo.n_kv_heads * geo.d_head:
                raise InputError(f"{geo.architecture}: layer {layer}'s attn.hook_v has shape {tuple(v.shape)}; "
                                 f"source decomposition needs [batch, pos, {geo.n_kv_heads} * {geo.d_head}]")
            v = v[0].reshape(v.shape[1], geo.n_kv_heads, geo.d_head).to(torch.float64)[:, kv]  # [s, h, d]
            vproj[layer] = torch.einsum("shd,hd->hs", v, geo.head_readout(layer, r[None])[0])
        return fn

    def on_pattern(layer: int) -> hooks.HookFn:
        def fn(pattern: Tensor, _name: str) -> None:
            if pattern.ndim != 4 or pattern.shape[1] != geo.n_heads:
                raise InputError(f"{geo.architecture}: layer {layer}'s attn.hook_pattern has shape "
                                 f"{tuple(pattern.shape)}; source decomposition needs [batch, {geo.n_heads}, dest, src]")
            for lay, head in heads:
                if lay == layer:
                    a = pattern[0, head].to(torch.float64)
                    patt[(lay, head)] = a.cpu()
                    contrib[(lay, head)] = a * vproj[layer][head][None, :]
        return fn

    def on_attn_out(layer: int) -> hooks.HookFn:
        def fn(o: Tensor, _name: str) -> None:
            f = geo.attn[layer].factor(o[0])  # [dest]: m / scale(o) per token
            for lay, head in heads:
                if lay == layer:
                    contrib[(lay, head)] = (contrib[(lay, head)] * f[:, None]).cpu()
        return fn

    readers = [x for layer in layers for x in ((hooks.attn_v(layer), on_v(layer)),
                                                (hooks.attn_pattern(layer), on_pattern(layer)),
                                                (attn_raw(layer), on_attn_out(layer)))]
    fmt = fmt or chat_format(model.tokenizer)
    _, batch = next(iter(batches(model, [instruction], 1, fmt=fmt, adv_suffix=adv_suffix)))
    decoder_forward(model, batch, readers, stop_at=attn_raw(layers[-1]), share_prefix=False)
    tok = model.tokenizer
    return SourceMatrix([tok.decode([t]) for t in batch.input_ids[0].tolist()],
                        [SPAN_NAMES[c] for c in batch.spans[0].tolist()], heads,
                        torch.stack([contrib[h] for h in heads]).float(), torch.stack([patt[h] for h in heads]).float())


@dataclass(frozen=True)
class SuffixComparison:
    """Arditi et al. §5: do the heads that write r̂ look away from the instruction when a suffix is appended?

    Per head (the ``k`` largest writers onto r̂ without the suffix): mean attention mass from the post-instruction
    tokens to the instruction (without and with the suffix) and to the suffix, and the mean write onto r̂.
    """

    heads: list[tuple[int, int]]
    instruction_mass_without: list[float]
    instruction_mass_with: list[float]
    suffix_mass_with: list[float]
    write_without: list[float]
    write_with: list[float]
    suffix: str
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"suffix": self.suffix, "n": self.n, "heads": [
            {"layer": a, "head": b, "instruction_mass_without": w0, "instruction_mass_with": w1, "suffix_mass_with": s1,
             "write_without": r0, "write_with": r1}
            for (a, b), w0, w1, s1, r0, r1 in zip(self.heads, self.instruction_mass_without, self.instruction_mass_with,
                                                  self.suffix_mass_with, self.write_without, self.write_with,
                                                  strict=True)]}

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>L{h['layer']}.H{h['head']}</td><td>{h['instruction_mass_without']:.2f}</td>"
            f"<td>{h['instruction_mass_with']:.2f}</td><td>{h['suffix_mass_with']:.2f}</td>"
            f"<td>{h['write_without']:+.3f}</td><td>{h['write_with']:+.3f}</td></tr>" for h in self.to_json()["heads"])
        return (f"<table><caption>Adversarial suffix {html.escape(repr(self.suffix))} ({self.n} prompts): attention "
                "from the post-instruction tokens</caption><tr><th>head</th><th>→ instruction (without)</th>"
                "<th>→ instruction (with)</th><th>→ suffix (with)</th><th>write onto r̂ (without)</th>"
                f"<th>write onto r̂ (with)</th></tr>{rows}</table>")


def compare_suffix(without: Attribution, with_suffix: Attribution, k: int = 10) -> SuffixComparison:
    """Compare two attributions of the same prompts, without and with an adversarial suffix."""
    if without.ids != with_suffix.ids or without.langs != with_suffix.langs:
        raise InputError("compare_suffix needs attributions of the same prompts, in the same order")
    if not with_suffix.adv_suffix:
        raise InputError("the second attribution has no adversarial suffix")
    w0 = without.head_scores("post").mean(0)
    w1 = with_suffix.head_scores("post").mean(0)
    heads = top_k_heads(w0, k)
    m0 = without.attn_mass.mean((0, 3))  # [layer, head, span]
    m1 = with_suffix.attn_mass.mean((0, 3))
    ins, suf = int(Span.INSTRUCTION), int(Span.ADV_SUFFIX)
    return SuffixComparison(heads, [float(m0[a, b, ins]) for a, b in heads], [float(m1[a, b, ins]) for a, b in heads],
                            [float(m1[a, b, suf]) for a, b in heads], [float(w0[a, b]) for a, b in heads],
                            [float(w1[a, b]) for a, b in heads], with_suffix.adv_suffix, without.n_prompts)
