"""The whole model's writer geometry: hook names of the raw outputs and writes, and :class:`HeadGeometry`.

See :mod:`refusal_circuits.geometry` for the equations; the hook names of the TransformerLens aliases live in
:mod:`refusal_circuits.hooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_circuits.errors import InputError
from refusal_circuits.geometry.norms import FrozenNorm, ResidualWrite, frozen_norm
from refusal_circuits.models import HookedModel, hf_model_of

# --------------------------------------------------------------------------------------------------------------
# Hook names of the raw outputs and writes.


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


def write_hooks(model: HookedModel) -> list[str]:
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


def architecture_of(model: HookedModel) -> str:
    """A model's architecture for messages: the Hugging Face class and ``model_type``."""
    hf = hf_model_of(model)
    if hf is None:
        return type(model).__name__
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    return f"{type(hf).__name__} (model_type {model_type!r})" if model_type else type(hf).__name__


def original_component(component: Any) -> Any:
    """The Hugging Face module a bridge component wraps (the component itself when it wraps none)."""
    return getattr(component, "original_component", None) or component


def _post_norm(block: Any, which: str, cfg: Any, arch: str, layer: int) -> tuple[FrozenNorm | None, str | None]:
    bridge = getattr(block, "_modules", {}).get(which)
    if bridge is None:
        return None, None
    name = getattr(bridge, "name", None) or which
    norm = frozen_norm(original_component(bridge), offset_hint=bool(getattr(cfg, "rmsnorm_uses_offset", False)),
                       what=f"layer {layer}'s post-norm {name}", arch=arch)
    return norm, str(name)


def head_geometry(model: HookedModel) -> HeadGeometry:
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
            mod = original_component(block.attn.o)
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
