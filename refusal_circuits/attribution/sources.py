"""Through attention, on one prompt: the full ``[dest, src]`` matrix of chosen heads' writes onto r̂.

Head ``h``'s write at destination ``p`` splits over source positions ``s`` as ``factor_p A[p, s] (v_s . W_O[h]^T v)``
(the package docstring); :func:`source_matrix` keeps every pair for the heads named, where
:func:`~refusal_circuits.attribution.compute.attribute` keeps only span sums at the post-instruction positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_circuits import hooks
from refusal_circuits.attribution.inputs import _check_one_device, _unit_vector
from refusal_circuits.chat import SPAN_NAMES, ChatFormat, chat_format
from refusal_circuits.directions import Direction, check_compatible
from refusal_circuits.errors import InputError
from refusal_circuits.forward import batches, decoder_forward, device_of
from refusal_circuits.geometry import attn_raw, head_geometry
from refusal_circuits.markup import esc, table


@dataclass(frozen=True)
class SourceMatrix:
    """Through-attention decomposition of chosen heads on one prompt.

    Attributes:
        tokens / spans: the prompt's tokens and their span names.
        heads: the ``(layer, head)`` pairs, in the order of axis 0.
        contributions: ``[head, dest, src]`` ``factor_dest A[dest, src] (v_src . W_O[h]^T v)`` (``v = r̂`` and
            ``factor = 1`` without a post-norm or residual multiplier, see the package docstring); rows sum to the
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
            cells = "".join(f"<td><code>{esc(repr(t))}</code> {v:+.3f}</td>" for t, v in tops)
            parts.append(f"<tr><th>L{layer}.H{head}</th>{cells}</tr>")
        return table("Source tokens feeding r̂ at the last position (A[p,s] · v_s W_O r̂)", [], parts)


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
