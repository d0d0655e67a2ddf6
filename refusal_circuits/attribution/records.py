"""The records attribution returns: :class:`Attribution` (per component and position onto r̂),
:class:`LogitAttribution` (DLA at the last position) and :class:`HeadTable` (top heads per language and label).

They are plain frozen dataclasses of CPU tensors: they select, reduce, summarise and render themselves, and
compute nothing from a model. Saving and loading live in :mod:`refusal_circuits.attribution.storage`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from refusal_circuits.attribution.targets import LogitTargets
from refusal_circuits.chat import SPAN_NAMES, Span
from refusal_circuits.errors import InputError
from refusal_circuits.markup import esc, table

#: The number of span codes (:class:`~refusal_circuits.chat.Span`), the last axis of the source tensors.
N_SPANS = len(Span)


@dataclass(frozen=True)
class Attribution:
    """Direct attribution onto r̂ of every component at every position, for a set of prompts.

    Prompts are left-padded to a common length ``S``: position ``S - 1`` is every prompt's last token, and the
    last ``n_post`` positions are the post-instruction tokens. All score tensors are float32 and zero on padding.

    Attributes:
        embed: ``[prompt, pos]`` the token (and positional) embedding's projection (``resid_pre[0] . r̂``).
        mlps: ``[prompt, layer, pos]`` each MLP's write (through its post-norm and multiplier) onto r̂.
        heads: ``[prompt, layer, head, pos]`` head ``h``'s write onto r̂, ``factor * z_h . (W_O[h]^T v)`` (package
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
        and atomically (:func:`~refusal_circuits.attribution.storage.save_attribution`)."""
        # Imported here: storage builds these records when it loads them, so it imports this module.
        from refusal_circuits.attribution.storage import save_attribution

        return save_attribution(self, out_dir, extra)

    def _repr_html_(self) -> str:
        langs = ", ".join(esc(k) for k in dict.fromkeys(self.langs))
        head = (f"<b>Attribution onto r̂</b> · {esc(self.model)} · direction {esc(self.direction.get('lang'))} "
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
        rows = (f"<tr><td>{esc(r['lang'])}</td><td>{esc(r['label'])}</td><td>{r['rank']}</td>"
                f"<td>L{r['layer']}.H{r['head']}</td><td>{r['mean']:+.3f}</td><td>{r['std']:.3f}</td><td>{r['n']}</td>"
                f"<td>{esc(', '.join(f'{k} {v:+.2f}' for k, v in r['from'].items()))}</td></tr>" for r in self.rows)
        return table(f"Top heads by direct write onto r̂ (positions: {esc(self.positions)})",
                     ["lang", "label", "#", "head", "mean", "std", "n", "read from (post-instruction mean)"], rows)

    def __repr__(self) -> str:
        lines = [f"{r['lang']:>3} {r['label']:<8} #{r['rank']:<2} L{r['layer']}.H{r['head']:<3} "
                 f"{r['mean']:+.3f} ± {r['std']:.3f}" for r in self.rows]
        return "HeadTable(\n  " + "\n  ".join(lines) + "\n)"
