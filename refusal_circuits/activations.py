"""Streaming means of the residual stream at the post-instruction positions.

Arditi et al. extract the refusal direction from the mean of ``resid_pre`` over prompts, at every layer and at
each of the chat template's post-instruction positions. We never hold the activations: each batch adds its
float64 sum into a ``[n_post, n_layers, d_model]`` accumulator, and the forward pass stops after the last layer
needed, so the cost is at most one forward pass without the unembedding. :func:`group_means` collects several
groups (harmful and harmless, languages, halves) in one length bucketing, so batches are hardly padded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_circuits import hooks
from refusal_circuits.chat import ChatFormat, chat_format
from refusal_circuits.errors import InputError
from refusal_circuits.forward import batches, run_until
from refusal_circuits.models import HookedModel

K = TypeVar("K")

#: Means at the post-instruction positions: ``[n_post, n_layers, d_model]``, position ``i`` is ``i - n_post``.
PostMeans = Float[Tensor, "pos layer d_model"]


@dataclass(frozen=True)
class MeanActivations:
    """Mean ``resid_pre`` of one group of prompts at every layer and post-instruction position.

    Attributes:
        mean: float64 ``[n_post, n_layers, d_model]``; index 0 is position ``-n_post``, the last is ``-1``.
        n: how many prompts the mean is over.
        layers: the layers of axis 1 (all of them unless asked otherwise).
    """

    mean: PostMeans
    n: int
    layers: tuple[int, ...]

    @property
    def positions(self) -> tuple[int, ...]:
        """The negative indices of axis 0 into the post-instruction tokens."""
        n_post = self.mean.shape[0]
        return tuple(range(-n_post, 0))

    def combine(self, other: MeanActivations) -> MeanActivations:
        """The mean over both groups of prompts together (weighted by their sizes)."""
        if self.layers != other.layers or self.mean.shape != other.mean.shape:
            raise InputError("cannot combine means over different layers or positions")
        n = self.n + other.n
        return MeanActivations((self.mean * self.n + other.mean * other.n) / n, n, self.layers)


@torch.inference_mode()
def mean_resid_pre(
    model: HookedModel,
    instructions: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    fmt: ChatFormat | None = None,
    progress: bool = True,
    desc: str = "activations",
) -> MeanActivations:
    """Mean residual stream before each of ``layers`` at every post-instruction position.

    Args:
        model: a :class:`~refusal_circuits.models.HookedModel`.
        instructions: the user instructions (chat-formatted here).
        layers: which layers (default: all).
        batch_size: prompts per forward pass; batches group prompts of similar length.
        fmt: the chat format (derived from the tokenizer when None).

    Returns:
        The :class:`MeanActivations`, float64, checked free of NaN and inf.
    """
    if not instructions:
        raise InputError("no instructions to average over")
    return group_means(model, {0: instructions}, layers=layers, batch_size=batch_size, fmt=fmt,
                       progress=progress, desc=desc)[0]


@torch.inference_mode()
def group_means(
    model: HookedModel,
    groups: Mapping[K, Sequence[str]],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    fmt: ChatFormat | None = None,
    progress: bool = True,
    desc: str = "activations",
) -> dict[K, MeanActivations]:
    """:func:`mean_resid_pre` of several groups of instructions, from one length bucketing of all of them.

    Each group's mean is the one :func:`mean_resid_pre` gives it alone (up to float noise), but the batches
    mix groups: rows of a batch have nearly equal lengths, so padding costs little. Collected one group at a
    time, a batch of 32 prompts is padded to its longest: over the bundled languages' train halves that is
    about 50% more tokens than the prompts have, against 2% for one bucketing of all of them.

    Args:
        groups: name -> instructions; every group needs at least one.

    Returns:
        name -> :class:`MeanActivations`, in the order of ``groups``.
    """
    names = list(groups)
    empty = [str(name) for name in names if not len(groups[name])]
    if empty:
        raise InputError(f"no instructions to average over in group(s) {', '.join(empty)}")
    n_layers = int(model.cfg.n_layers)
    layer_list = tuple(range(n_layers)) if layers is None else tuple(int(layer) for layer in layers)
    bad = [layer for layer in layer_list if not 0 <= layer < n_layers]
    if bad:
        raise InputError(f"layer(s) {bad} out of range; the model has {n_layers} layers")
    fmt = fmt or chat_format(model.tokenizer)
    n_post = fmt.n_post
    flat = [s for name in names for s in groups[name]]
    group_of = torch.tensor([g for g, name in enumerate(names) for _ in groups[name]])
    total = torch.zeros(len(names), n_post, len(layer_list), int(model.cfg.d_model), dtype=torch.float64)
    rows = group_of[:0]  # the current batch's group indices

    def accumulate(slot: int):
        def fn(x: Tensor, _name: str) -> None:
            # Prompts are left-padded, so the post-instruction tokens are the last n_post of every row.
            total[:, :, slot].index_add_(0, rows, x[:, -n_post:].to(torch.float64).cpu())

        return fn

    grabs = [(hooks.resid_pre(layer), accumulate(slot)) for slot, layer in enumerate(layer_list)]
    stop_at = hooks.resid_pre(max(layer_list))
    for idx, batch in batches(model, flat, batch_size, fmt=fmt, progress=progress, desc=desc):
        rows = group_of[idx]
        run_until(model, batch, stop_at, grabs)
    out = {}
    for g, name in enumerate(names):
        n = len(groups[name])
        mean = total[g] / n
        if not torch.isfinite(mean).all():
            raise FloatingPointError("non-finite mean activation: the model produced NaN or inf")
        out[name] = MeanActivations(mean, n, layer_list)
    return out
