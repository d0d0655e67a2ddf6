"""The hooks of one attribution forward pass (:class:`_BatchProbe`), each reducing its activation on the spot.

Per layer they project the raw value vectors, attention pattern, head inputs ``z`` and sublayer outputs onto r̂
(and, for DLA, onto the logit-space direction through the final norm), so nothing of shape
``[batch, pos, head, d_model]`` is ever built; :meth:`_BatchProbe.check` then proves the parts rebuild the
measured residual stream.
"""

from __future__ import annotations

import torch
from torch import Tensor

from refusal_circuits import exactness, hooks
from refusal_circuits.attribution.records import N_SPANS
from refusal_circuits.errors import InputError
from refusal_circuits.geometry import HeadGeometry, ResidualWrite, attn_raw, block_in, mlp_raw


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
