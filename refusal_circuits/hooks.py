"""Hook names, built in one place from typed arguments, and hook handles that clean up exactly.

TransformerLens's ``model.hooks()`` resets *every* hook when it exits, including hooks another context
added; we register plain PyTorch forward hooks on the hook-point modules instead and keep the handles, so a
:class:`HookHandle` removes exactly what it added: on ``remove()``, on leaving its ``with`` block, when an
exception flies, and when registration fails halfway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.utils.hooks import RemovableHandle

from refusal_circuits.errors import InputError

if TYPE_CHECKING:
    # Type-only: hooks sits below models in the layers (docs/architecture.md).
    from refusal_circuits.models import HookedModel

#: A hook function gets the activation and the hook name; it returns a replacement or None (keep).
HookFn = Callable[[Tensor, str], Tensor | None]

EMBED = "hook_embed"
POS_EMBED = "hook_pos_embed"


def resid_pre(layer: int) -> str:
    """Residual stream before block ``layer`` (Hugging Face ``hidden_states[layer]``)."""
    return f"blocks.{layer}.hook_resid_pre"


def resid_mid(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_mid"


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def attn_out(layer: int) -> str:
    """The attention block's write into the residual stream."""
    return f"blocks.{layer}.hook_attn_out"


def mlp_out(layer: int) -> str:
    """The MLP block's write into the residual stream."""
    return f"blocks.{layer}.hook_mlp_out"


def attn_z(layer: int) -> str:
    """Per-head attention output before ``W_O``: ``[batch, pos, head, d_head]``."""
    return f"blocks.{layer}.attn.hook_z"


def attn_pattern(layer: int) -> str:
    """Attention probabilities ``[batch, head, dest, src]``."""
    return f"blocks.{layer}.attn.hook_pattern"


def attn_v(layer: int) -> str:
    """Values ``[batch, pos, kv_head, d_head]``."""
    return f"blocks.{layer}.attn.hook_v"


def residual_writers(n_layers: int) -> list[str]:
    """Every hook whose output is added into the residual stream: embedding, then attention and MLP outputs."""
    return [EMBED] + [name for layer in range(n_layers) for name in (attn_out(layer), mlp_out(layer))]


class HookHandle:
    """Forward hooks registered on a model; ``remove()`` or leaving the ``with`` block removes them all.

    Removal is idempotent and never touches hooks that this handle did not add, so handles nest freely.
    """

    def __init__(self, model: HookedModel, hooks: Sequence[tuple[str, HookFn]]) -> None:
        self._handles: list[RemovableHandle] = []
        hook_dict = model.hook_dict
        try:
            for name, fn in hooks:
                if name not in hook_dict:
                    raise InputError(f"the model has no hook point named {name!r}")
                self._handles.append(hook_dict[name].register_forward_hook(_adapt(fn, name)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _adapt(fn: HookFn, name: str) -> Callable[[Any, Any, Any], Any]:
    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        return fn(output, name)

    return hook


def add_hooks(model: HookedModel, hooks: Sequence[tuple[str, HookFn]]) -> HookHandle:
    """Register ``hooks`` (name, fn) on ``model``; use the result as a context manager or call ``remove()``."""
    return HookHandle(model, hooks)


def count_hooks(model: HookedModel) -> int:
    """Number of forward hooks currently registered on the model's hook points (for hygiene checks)."""
    # hook_dict holds aliases (blocks.0.hook_resid_pre is blocks.0.hook_in): count each module once.
    unique = {id(hp): hp for hp in model.hook_dict.values()}
    return sum(len(hp._forward_hooks) for hp in unique.values())
