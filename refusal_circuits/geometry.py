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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_circuits.errors import InputError
from refusal_circuits.models import hf_model_of

# --------------------------------------------------------------------------------------------------------------
# Hook names of the raw outputs and writes (the TransformerLens aliases live in refusal_circuits.hooks).


def attn_raw(layer: int) -> str:
    """The attention module's output ``o`` (``o_proj`` output, bias included), before any post-norm or multiplier."""
    return f"blocks.{layer}.attn.hook_out"


def mlp_raw(layer: int) -> str:
    """The MLP's output, before any post-norm or multiplier."""
    return f"blocks.{layer}.mlp.hook_out"


def _post_norm_out(layer: int, which: str) -> str:
    return f"blocks.{layer}.{which}.hook_out"


def block_in(layer: int) -> str:
    """``resid_pre[layer]``: the block's input (a hook that replaces it changes what the block and its residual
    connection see)."""
    return f"blocks.{layer}.hook_in"


def block_out(layer: int) -> str:
    """``resid_post[layer]``."""
    return f"blocks.{layer}.hook_out"


# --------------------------------------------------------------------------------------------------------------
# Norms with their scale frozen.


@dataclass(frozen=True)
class FrozenNorm:
    """An RMSNorm or LayerNorm: ``w * (x - mean(x)) / scale(x) + b``; with ``scale`` frozen it is linear.

    ``weight`` is the effective weight (Gemma's ``1 + weight`` already added).
    """

    weight: Tensor
    bias: Tensor | None
    eps: float
    centered: bool  # LayerNorm subtracts the mean; RMSNorm does not

    def scale(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        """``sqrt(mean((x - mean x)^2) + eps)`` per token, float64."""
        x = x.to(torch.float64)
        if self.centered:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1) + self.eps).sqrt()

    def readout(self, u: Float[Tensor, "k d_model"]) -> tuple[Float[Tensor, "k d_model"], Float[Tensor, " k"]]:
        """``(v, const)`` with ``norm(x) . u = (x . v) / scale(x) + const`` for each row ``u``."""
        u = u.to(torch.float64)
        v = u * self.weight.to(torch.float64).to(u.device)
        if self.centered:
            v = v - v.mean(-1, keepdim=True)
        const = (u @ self.bias.to(torch.float64).to(u.device) if self.bias is not None
                 else torch.zeros(len(u), dtype=torch.float64, device=u.device))
        return v, const

    def apply(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The norm's output in float64."""
        x = x.to(torch.float64)
        s = self.scale(x)[..., None]
        if self.centered:
            x = x - x.mean(-1, keepdim=True)
        out = x / s * self.weight.to(torch.float64).to(x.device)
        return out + self.bias.to(torch.float64).to(x.device) if self.bias is not None else out


def _eps_of(module: Any) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon", "layer_norm_eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def frozen_norm(module: Any, *, offset_hint: bool = False, what: str = "norm", arch: str = "this model"
                ) -> FrozenNorm:
    """Describe a Hugging Face norm module as a :class:`FrozenNorm`, proven on a probe input.

    Whether it centres (LayerNorm) and whether it multiplies by ``weight`` or ``1 + weight`` (Gemma) is decided by
    running the module on a fixed random input and keeping the description that reproduces its output; a norm
    matching none of them is refused with :class:`InputError`.
    """
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    eps = _eps_of(module)
    if weight is None or not isinstance(weight, Tensor) or weight.ndim != 1 or eps is None:
        raise InputError(f"{arch}: the {what} ({type(module).__name__}) is not an RMSNorm or LayerNorm with a "
                         "per-channel weight and an epsilon; its scale cannot be frozen")
    weight = weight.detach()
    bias = bias.detach() if isinstance(bias, Tensor) else None
    d = int(weight.shape[0])
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, d, generator=g, dtype=torch.float64) * 2.0 + 0.7).to(weight.device, weight.dtype)
    with torch.no_grad():
        y = module(x).to(torch.float64)
    best: tuple[float, FrozenNorm] | None = None
    for offset in (offset_hint, not offset_hint):
        for centered in (bias is not None, bias is None):
            cand = FrozenNorm(weight.to(torch.float64) + (1.0 if offset else 0.0), bias, eps, centered)
            err = float((cand.apply(x) - y).abs().max())
            if best is None or err < best[0]:
                best = (err, cand)
    assert best is not None
    from refusal_circuits.exactness import rel_tolerance

    if not best[0] <= rel_tolerance(weight.dtype, d) * (1.0 + float(y.abs().max())):
        raise InputError(f"{arch}: the {what} ({type(module).__name__}) computes neither an RMSNorm nor a LayerNorm "
                         f"(with weight or 1 + weight) on a probe input (closest differs by {best[0]:.3g}); its "
                         "scale cannot be frozen")
    return best[1]


# --------------------------------------------------------------------------------------------------------------
# Sublayer writes.


@dataclass(frozen=True)
class ResidualWrite:
    """How a sublayer's raw output ``x`` becomes what is added to the residual stream: ``m * norm(x)``.

    Attributes:
        norm: the post-norm, or None (the write is ``m * x``).
        multiplier: the residual multiplier ``m`` (Granite's ``residual_multiplier``; 1 elsewhere).
        norm_name: the Hugging Face name of the post-norm (for messages), or None.
    """

    norm: FrozenNorm | None = None
    multiplier: float = 1.0
    norm_name: str | None = None

    @property
    def is_identity(self) -> bool:
        return self.norm is None and self.multiplier == 1.0

    def factor(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        """``m / scale(x)`` per token (``m`` without a post-norm), float64."""
        if self.norm is None:
            return torch.full(x.shape[:-1], self.multiplier, dtype=torch.float64, device=x.device)
        return self.multiplier / self.norm.scale(x)

    def readout(self, u: Float[Tensor, "k d_model"]) -> tuple[Float[Tensor, "k d_model"], Float[Tensor, " k"]]:
        """``(v, const)`` with ``write(x) . u = factor(x) * (x . v) + const`` for each row ``u``."""
        u = u.to(torch.float64)
        if self.norm is None:
            return u, torch.zeros(len(u), dtype=torch.float64, device=u.device)
        v, const = self.norm.readout(u)
        return v, self.multiplier * const

    def apply(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The write itself, float64."""
        out = x.to(torch.float64) if self.norm is None else self.norm.apply(x)
        return out * self.multiplier if self.multiplier != 1.0 else out


# --------------------------------------------------------------------------------------------------------------
# The whole model.


@dataclass(frozen=True)
class HeadGeometry:
    """Where every component writes: the attention output projections as the heads see them, and per layer how
    the attention and MLP outputs reach the residual stream.

    Attributes:
        w_o: per layer ``[d_model, n_heads * d_head]`` (the ``o_proj`` weight as an ``nn.Linear`` holds it; GPT-2's
            ``Conv1D`` transposed; head ``h`` owns columns ``h * d_head : (h + 1) * d_head``).
        b_o: per layer the output bias ``[d_model]`` or None (Qwen2, Llama: None).
        n_heads / n_kv_heads / d_head: query heads, key-value heads (grouped-query attention), head width.
        attn / mlp: per layer the :class:`ResidualWrite` of the attention and the MLP output.
        parallel: attention and MLP both read ``resid_pre`` (GPT-NeoX/Pythia ``use_parallel_residual``, Phi-2).
        architecture: the Hugging Face class name, for messages.
    """

    w_o: list[Tensor]
    b_o: list[Tensor | None]
    n_heads: int
    n_kv_heads: int
    d_head: int
    attn: list[ResidualWrite]
    mlp: list[ResidualWrite]
    parallel: bool = False
    architecture: str = "this model"

    @property
    def n_layers(self) -> int:
        return len(self.w_o)

    @property
    def has_bias(self) -> bool:
        """Whether anything of the attention writes outside the heads (an output bias, a post-norm's bias)."""
        return any(b is not None for b in self.b_o) or any(w.norm is not None and w.norm.bias is not None
                                                           for w in self.attn)

    @property
    def has_post_norm(self) -> bool:
        return any(w.norm is not None for w in (*self.attn, *self.mlp))

    def post_norms(self) -> list[str]:
        """The Hugging Face names of the post-norms (empty without)."""
        return sorted({w.norm_name for w in (*self.attn, *self.mlp) if w.norm_name})

    def kv_of_head(self) -> Tensor:
        """Index of the key-value head each query head reads (Hugging Face ``repeat_kv`` order)."""
        return torch.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)

    def head_readout(self, layer: int, vectors: Float[Tensor, "k d_model"]) -> Float[Tensor, "k head d_head"]:
        """``W_O[h]^T v'`` for every head and vector, float64, with ``v'`` the attention write's readout of ``v``
        (:meth:`ResidualWrite.readout`: ``v`` itself without a post-norm).

        ``z_h . W_O[h]^T v'`` times the token's :meth:`ResidualWrite.factor` is head ``h``'s write onto ``v``.
        """
        v, _ = self.attn[layer].readout(vectors.to(torch.float64))
        w = self.w_o[layer].to(torch.float64)
        return (v.to(w.device) @ w).view(-1, self.n_heads, self.d_head)

    def bias_readout(self, layer: int, vectors: Float[Tensor, "k d_model"]) -> tuple[Tensor, Tensor]:
        """``(b_O . v', const)`` per vector: the bias's share of ``o . v'`` (zero without a bias) and the write's
        constant (a post-norm's own bias)."""
        v, const = self.attn[layer].readout(vectors.to(torch.float64))
        b = self.b_o[layer]
        dot = (v @ b.to(torch.float64).to(v.device)) if b is not None else torch.zeros(len(v), dtype=torch.float64,
                                                                                      device=v.device)
        return dot, const

    def write_hooks(self) -> list[str]:
        """The hook points whose outputs are exactly what is added to the residual stream (:func:`write_hooks`)."""
        return _write_hook_names([w.norm is not None for w in self.attn], [w.norm is not None for w in self.mlp])


def _write_hook_names(attn_post: Sequence[bool], mlp_post: Sequence[bool]) -> list[str]:
    names = [block_in(0)]
    for layer, (a, m) in enumerate(zip(attn_post, mlp_post, strict=True)):
        names.append(_post_norm_out(layer, "ln1_post") if a else attn_raw(layer))
        names.append(_post_norm_out(layer, "ln2_post") if m else mlp_raw(layer))
    return names


def write_hooks(model: Any) -> list[str]:
    """The hook points whose outputs are exactly the writes into the residual stream.

    ``resid_pre[0]`` (the embedding, every scale and position embedding included), then per layer the attention
    write and the MLP write: a post-norm's output where the block has one (``ln1_post`` / ``ln2_post``), else the
    sublayer's raw output (a scalar multiplier after it, Granite's, does not move r̂'s span). Read from the block
    structure alone, so it also serves a bridge in compatibility mode. A model that is no ``TransformerBridge``
    gets TransformerLens's writer aliases (``hook_embed``, ``hook_pos_embed``, ``hook_attn_out``, ``hook_mlp_out``).
    """
    n_layers = int(model.cfg.n_layers)
    if hf_model_of(model) is None:
        names = [name for name in ("hook_embed", "hook_pos_embed") if name in getattr(model, "hook_dict", {})]
        return names + [f"blocks.{layer}.hook_{w}_out" for layer in range(n_layers) for w in ("attn", "mlp")]

    def has(layer: int, which: str) -> bool:
        return getattr(model.blocks[layer], "_modules", {}).get(which) is not None

    return _write_hook_names([has(layer, "ln1_post") for layer in range(n_layers)],
                             [has(layer, "ln2_post") for layer in range(n_layers)])


def architecture_of(model: Any) -> str:
    """A model's architecture for messages: the Hugging Face class and ``model_type``."""
    hf = hf_model_of(model)
    if hf is None:
        return type(model).__name__
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    return f"{type(hf).__name__} (model_type {model_type!r})" if model_type else type(hf).__name__


def _original(component: Any) -> Any:
    return getattr(component, "original_component", None) or component


def _post_norm(block: Any, which: str, cfg: Any, arch: str, layer: int) -> tuple[FrozenNorm | None, str | None]:
    bridge = getattr(block, "_modules", {}).get(which)
    if bridge is None:
        return None, None
    name = getattr(bridge, "name", None) or which
    norm = frozen_norm(_original(bridge), offset_hint=bool(getattr(cfg, "rmsnorm_uses_offset", False)),
                       what=f"layer {layer}'s post-norm {name}", arch=arch)
    return norm, str(name)


def head_geometry(model: Any) -> HeadGeometry:
    """Read the writer geometry of a ``TransformerBridge`` in raw (non-compatibility) mode.

    Raises :class:`InputError` naming the architecture where a component is not one this library can describe
    (no per-head output projection of the expected shape, a post-norm that is no RMSNorm/LayerNorm).
    """
    if getattr(model, "compatibility_mode", False):
        raise InputError("attribution needs the bridge in raw mode: compatibility mode moves value biases out of "
                         "the heads and rewrites the weights r̂ was extracted against; load with rc.load_model()")
    arch = architecture_of(model)
    cfg = model.cfg
    hf = hf_model_of(model)
    hf_cfg = getattr(hf, "config", None)
    n_heads, d_head, d_model = int(cfg.n_heads), int(cfg.d_head), int(cfg.d_model)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    if n_heads % n_kv:
        raise InputError(f"{arch}: {n_heads} query heads do not share {n_kv} key-value heads evenly")
    multiplier = float(getattr(hf_cfg, "residual_multiplier", None) or 1.0)
    w_o: list[Tensor] = []
    b_o: list[Tensor | None] = []
    attn: list[ResidualWrite] = []
    mlp: list[ResidualWrite] = []
    for layer in range(int(cfg.n_layers)):
        block = model.blocks[layer]
        try:
            mod = _original(block.attn.o)
            _ = block.mlp
        except AttributeError:
            raise InputError(f"{arch}: layer {layer} has no attention output projection (attn.o) and MLP the "
                             "attribution can read; this architecture is not supported") from None
        w = getattr(mod, "weight", None)
        if not isinstance(w, Tensor) or w.ndim != 2:
            raise InputError(f"{arch}: layer {layer}'s attention output projection ({type(mod).__name__}) has no "
                             "2-D weight; this architecture is not supported")
        w = w.detach()
        if type(mod).__name__ == "Conv1D":  # GPT-2 stores [in, out]
            w = w.T
        if tuple(w.shape) != (d_model, n_heads * d_head):
            raise InputError(f"{arch}: layer {layer}'s attention output projection has shape {tuple(w.shape)}; "
                             f"expected ({d_model}, {n_heads * d_head}) for {n_heads} heads of width {d_head}")
        w_o.append(w)
        bias = getattr(mod, "bias", None)
        b_o.append(bias.detach() if isinstance(bias, Tensor) else None)
        a_norm, a_name = _post_norm(block, "ln1_post", cfg, arch, layer)
        m_norm, m_name = _post_norm(block, "ln2_post", cfg, arch, layer)
        attn.append(ResidualWrite(a_norm, multiplier, a_name))
        mlp.append(ResidualWrite(m_norm, multiplier, m_name))
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False)) or type(model.blocks[0]).__name__ == "ParallelBlockBridge"
    return HeadGeometry(w_o, b_o, n_heads, n_kv, d_head, attn, mlp, parallel, arch)


def final_norm(model: Any) -> FrozenNorm:
    """The final norm (before the unembedding) as a :class:`FrozenNorm`."""
    return frozen_norm(_original(model.ln_final), offset_hint=bool(getattr(model.cfg, "rmsnorm_uses_offset", False)),
                       what="final norm", arch=architecture_of(model))


@dataclass(frozen=True)
class LogitMap:
    """What lies between the final norm's output ``h`` and the logits: ``logits = cap((h W_U^T + b_U) / s)``.

    Attributes:
        scaling: Granite's ``logits_scaling`` ``s`` (1 elsewhere): linear, folded into DLA.
        softcap: Gemma-2's ``final_logit_softcapping`` ``c`` (``cap(x) = c tanh(x / c)``), or None: not linear, so
            DLA explains the logit difference *before* the cap and says so.
    """

    scaling: float = 1.0
    softcap: float | None = None

    def describe(self) -> str:
        """One line for records: which logits DLA's parts add up to."""
        if self.softcap is not None:
            return (f"pre-soft-cap logits: the model's logits are {self.softcap:g} * tanh(x / {self.softcap:g}) of "
                    "these (final_logit_softcapping, not linear); the parts add up to the logit difference before "
                    "the cap")
        if self.scaling != 1.0:
            return f"logits (lm_head output divided by logits_scaling {self.scaling:g})"
        return "logits"


def logit_map(model: Any) -> LogitMap:
    hf_cfg = getattr(hf_model_of(model), "config", None)
    scaling = float(getattr(hf_cfg, "logits_scaling", None) or 1.0)
    cap = getattr(hf_cfg, "final_logit_softcapping", None)
    if scaling == 0.0 or not math.isfinite(scaling):
        raise InputError(f"{architecture_of(model)}: logits_scaling {scaling} cannot be divided by")
    return LogitMap(scaling, float(cap) if cap else None)
