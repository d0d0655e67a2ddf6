"""Streaming means of the residual stream at the post-instruction positions.

Arditi et al. extract the refusal direction from the mean of ``resid_pre`` over prompts, at every layer and at
each of the chat template's post-instruction positions. We never hold the activations: each batch adds its
float64 sum into a ``[n_post, n_layers, d_model]`` accumulator, and the forward pass stops after the last layer
needed, so the cost is at most one forward pass without the unembedding. :func:`group_means` collects several
groups (harmful and harmless, languages, halves) in one length bucketing, so batches are hardly padded.

Resampling statistics (the split-half reliability of :mod:`refusal_circuits.crosslingual.reliability`) need the
activations of every prompt, but at one site only: :func:`site_activations` keeps ``resid_pre`` at one (layer,
post-instruction position) per prompt, ``[n, d_model]`` per group, and stops the pass after that layer;
:func:`collect_groups` gives the means and those rows from the same forward pass. :func:`site_rows` keeps rows at
several sites at once, one of which may be the last instruction token (:func:`last_instruction`, Zhao et al.'s
``t_inst``: where a harmfulness direction is read, one position before the post-instruction tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
#: One group's ``resid_pre`` at one site, one row per prompt in the group's order (float64).
SiteRows = Float[Tensor, "prompt d_model"]


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


@dataclass(frozen=True)
class GroupActivations:
    """What :func:`collect_groups` gathered in one pass: each group's means, and its rows at the site if asked.

    Attributes:
        means: name -> :class:`MeanActivations` (empty when no layer was asked for).
        site: name -> ``[n, d_model]`` float64, ``resid_pre[layer]`` at the site's position for every prompt of the
            group, in the group's order (empty when no site was asked for).
        layer, position: the site (None without one).
        sites: ``(layer, position) ->`` the same rows at every site asked for with ``sites`` (and ``site``).
    """

    means: dict[Any, MeanActivations]
    site: dict[Any, SiteRows]
    layer: int | None = None
    position: int | None = None
    sites: dict[tuple[int, int], dict[Any, SiteRows]] = field(default_factory=dict)


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
    got = collect_groups(model, groups, layers=layers, batch_size=batch_size, fmt=fmt, progress=progress, desc=desc)
    return dict(got.means)


@torch.inference_mode()
def site_activations(
    model: HookedModel,
    groups: Mapping[K, Sequence[str]],
    layer: int,
    position: int,
    *,
    batch_size: int = 32,
    fmt: ChatFormat | None = None,
    progress: bool = True,
    desc: str = "activations",
) -> dict[K, SiteRows]:
    """Every prompt's ``resid_pre[layer]`` at post-instruction ``position`` (``-n_post`` .. ``-1``), per group.

    One length bucketing of all groups, as :func:`group_means`; the pass stops right after ``resid_pre[layer]``
    and no other layer is held, so memory is ``n × d_model`` per group. The mean of a group's rows is its
    :func:`group_means` mean at that site (up to float noise).

    Returns:
        name -> float64 ``[n, d_model]``, rows in the order of the group's instructions.
    """
    got = collect_groups(model, groups, layers=(), site=(layer, position), batch_size=batch_size, fmt=fmt,
                         progress=progress, desc=desc)
    return dict(got.site)


def last_instruction(fmt: ChatFormat) -> int:
    """The site position of the instruction's last token (Zhao et al.'s ``t_inst``): ``-n_post - 1``, one before
    the post-instruction tokens (every prompt is tokenized in pieces, so it is always the instruction's own)."""
    return -fmt.n_post - 1


@torch.inference_mode()
def site_rows(
    model: HookedModel,
    groups: Mapping[K, Sequence[str]],
    sites: Sequence[tuple[int, int]],
    *,
    batch_size: int = 32,
    fmt: ChatFormat | None = None,
    progress: bool = True,
    desc: str = "activations",
) -> dict[tuple[int, int], dict[K, SiteRows]]:
    """Every prompt's ``resid_pre[layer]`` at each ``(layer, position)`` of ``sites``, per group, from one pass.

    A position is a post-instruction token (``-n_post`` .. ``-1``) or the last instruction token
    (:func:`last_instruction`). The pass stops after the deepest site's layer; memory is ``n × d_model`` per site.

    Returns:
        ``(layer, position) -> name -> float64 [n, d_model]``, rows in the order of the group's instructions.
    """
    if not sites:
        raise InputError("site_rows needs at least one (layer, position) site")
    got = collect_groups(model, groups, layers=(), sites=sites, batch_size=batch_size, fmt=fmt, progress=progress,
                         desc=desc)
    return {key: dict(rows) for key, rows in got.sites.items()}


@torch.inference_mode()
def collect_groups(
    model: HookedModel,
    groups: Mapping[K, Sequence[str]],
    *,
    layers: Sequence[int] | None = None,
    site: tuple[int, int] | None = None,
    sites: Sequence[tuple[int, int]] = (),
    batch_size: int = 32,
    fmt: ChatFormat | None = None,
    progress: bool = True,
    desc: str = "activations",
) -> GroupActivations:
    """:func:`group_means` at ``layers`` (default all; ``()`` for none) and, with ``site = (layer, position)``,
    :func:`site_activations` there, from one forward pass over all groups (stopped after the last layer needed).

    ``sites`` asks for rows at more sites (see :func:`site_rows`); their positions may also be the last instruction
    token, ``-n_post - 1`` (:func:`last_instruction`).

    Returns:
        a :class:`GroupActivations`, both mappings in the order of ``groups``; everything checked free of NaN
        and inf.
    """
    names = list(groups)
    empty = [str(name) for name in names if not len(groups[name])]
    if empty:
        raise InputError(f"no instructions to average over in group(s) {', '.join(empty)}")
    n_layers = int(model.cfg.n_layers)
    layer_list = tuple(range(n_layers)) if layers is None else tuple(int(layer) for layer in layers)
    all_sites = list(dict.fromkeys([*([site] if site is not None else []), *((int(a), int(b)) for a, b in sites)]))
    needed = [*layer_list, *(layer for layer, _ in all_sites)]
    bad = [layer for layer in needed if not 0 <= layer < n_layers]
    if bad:
        raise InputError(f"layer(s) {bad} out of range; the model has {n_layers} layers")
    if not needed:
        raise InputError("nothing to collect: no layer and no site")
    fmt = fmt or chat_format(model.tokenizer)
    n_post, d_model = fmt.n_post, int(model.cfg.d_model)
    if site is not None and not -n_post <= site[1] < 0:
        raise InputError(f"position {site[1]} out of range: the chat template has {n_post} post-instruction tokens")
    far = [p for _, p in all_sites if not -n_post - 1 <= p < 0]
    if far:
        raise InputError(f"site position(s) {far} out of range: the chat template has {n_post} post-instruction "
                         f"tokens (-{n_post}..-1) and the last instruction token is {-n_post - 1}")
    flat = [s for name in names for s in groups[name]]
    group_of = torch.tensor([g for g, name in enumerate(names) for _ in groups[name]])
    total = torch.zeros(len(names), n_post, len(layer_list), d_model, dtype=torch.float64)
    rows_at = torch.zeros(len(all_sites), len(flat), d_model, dtype=torch.float64)
    rows = group_of[:0]  # the current batch's group indices
    idx: list[int] = []  # the current batch's indices into ``flat``

    def accumulate(slot: int):
        def fn(x: Tensor, _name: str) -> None:
            # Prompts are left-padded, so the post-instruction tokens are the last n_post of every row.
            total[:, :, slot].index_add_(0, rows, x[:, -n_post:].to(torch.float64).cpu())

        return fn

    def keep_rows(k: int, position: int):
        def fn(x: Tensor, _name: str) -> None:
            # Pieces are tokenized apart (chat.tokenize_chat), so -n_post - 1 is always the instruction's last token.
            rows_at[k, idx] = x[:, position].to(torch.float64).cpu()

        return fn

    grabs = [(hooks.resid_pre(layer), accumulate(slot)) for slot, layer in enumerate(layer_list)]
    grabs += [(hooks.resid_pre(layer), keep_rows(k, position)) for k, (layer, position) in enumerate(all_sites)]
    stop_at = hooks.resid_pre(max(needed))
    for idx, batch in batches(model, flat, batch_size, fmt=fmt, progress=progress, desc=desc):
        rows = group_of[idx]
        run_until(model, batch, stop_at, grabs)
    if not torch.isfinite(rows_at).all():
        raise FloatingPointError("non-finite activation: the model produced NaN or inf")
    means: dict[Any, MeanActivations] = {}
    by_site: dict[tuple[int, int], dict[Any, Tensor]] = {key: {} for key in all_sites}
    start = 0
    for g, name in enumerate(names):
        n = len(groups[name])
        if layer_list:
            mean = total[g] / n
            if not torch.isfinite(mean).all():
                raise FloatingPointError("non-finite mean activation: the model produced NaN or inf")
            means[name] = MeanActivations(mean, n, layer_list)
        for k, key in enumerate(all_sites):
            by_site[key][name] = rows_at[k, start:start + n]
        start += n
    at_site = by_site[site] if site is not None else {}
    return GroupActivations(means, at_site, None if site is None else site[0], None if site is None else site[1],
                            by_site)
