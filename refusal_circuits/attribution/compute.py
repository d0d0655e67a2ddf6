"""Direct attribution onto r̂ of every component at every position (:func:`attribute`), in named phases.

1. Inputs: the prompts as records, the direction's provenance, r̂ (:func:`_prompt_records`,
   :func:`_direction_meta`).
2. Targets: the token sets of DLA and what the final norm reads of their logit-space direction
   (:func:`_logit_readout`).
3. One forward pass per batch with the probes of :mod:`~refusal_circuits.attribution.probe`, the template prefix
   attributed once where the rows share it (:func:`_run_pass`), checked on the spot: the parts rebuild the residual
   stream, and the DLA parts add up to the model's own logit difference (:func:`_dla_parts`).
4. Rows: each prompt's own positions (:func:`_batch_rows`), then all of them left-padded to a common length into
   one :class:`~refusal_circuits.attribution.records.Attribution` (:func:`_assemble`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from refusal_circuits import exactness, hooks
from refusal_circuits import forward as fwd
from refusal_circuits.attribution.inputs import _check_one_device, _unit_vector
from refusal_circuits.attribution.probe import _BatchProbe
from refusal_circuits.attribution.records import Attribution, LogitAttribution
from refusal_circuits.attribution.targets import LogitTargets, _logit_targets
from refusal_circuits.chat import ChatBatch, ChatFormat, Span, chat_format
from refusal_circuits.data import PromptRecord, PromptSet
from refusal_circuits.directions import Direction, check_compatible
from refusal_circuits.errors import InputError
from refusal_circuits.forward import batches, decoder_forward, device_of
from refusal_circuits.geometry import FrozenNorm, HeadGeometry, final_norm, head_geometry, logit_map
from refusal_circuits.models import HookedModel, hf_model_of, model_id
from refusal_circuits.scores import RefusalTokens

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Inputs and targets.


def _prompt_records(prompts: PromptSet | Sequence[str]) -> tuple[list[PromptRecord], PromptSet]:
    """The prompts as records (plain instructions become harmful prompts of an undetermined language)."""
    if isinstance(prompts, PromptSet):
        records = list(prompts)
        pset = prompts
    else:
        records = [PromptRecord(f"#{i}", "und", "harmful", s) for i, s in enumerate(prompts)]
        pset = PromptSet(tuple(records), "instructions")
    if not records:
        raise InputError("no prompts to attribute")
    return records, pset


def _direction_meta(direction: Direction | Tensor, model: HookedModel) -> dict[str, Any]:
    """The provenance of the direction the record carries, once the direction is checked to fit ``model``."""
    if isinstance(direction, Direction):
        check_compatible(direction, model)
        return {k: v for k, v in direction.to_json().items() if k in ("model", "lang", "layer", "position", "norm")}
    return {"model": "tensor", "lang": None, "layer": None, "position": -1, "norm": float(direction.norm())}


def _unembedding(model: HookedModel) -> tuple[Tensor, Tensor | None]:
    hf = hf_model_of(model)
    head = hf.get_output_embeddings() if hf is not None else None
    if head is None:
        raise InputError("direct logit attribution needs a model with an output embedding (lm_head)")
    return head.weight.detach(), (None if head.bias is None else head.bias.detach())


@dataclass(frozen=True)
class _LogitReadout:
    """What DLA reads at the last position, per language group (``group_of``).

    ``u`` (``[group, d_model]``) is the logit-space direction, the mean refusal row minus the mean compliance row
    of ``W_U`` divided by Granite's ``logits_scaling``, and ``u_bias`` the matching unembedding-bias difference:
    the model's own (pre-cap) logit difference is ``h_last . u + u_bias``. Through the final norm ``norm`` with its
    scale frozen, a write ``c`` adds ``(c . v) / scale``; ``const`` is what the norm's bias and ``u_bias`` add.
    """

    targets: LogitTargets
    norm: FrozenNorm
    group_of: dict[str, int]
    v: Tensor  # [group, d_model] float64, on the model's device
    const: Tensor  # [group] float64
    u: Tensor  # [group, d_model] float64
    u_bias: Tensor  # [group] float64
    space: str


def _logit_readout(model: HookedModel, geo: HeadGeometry, targets: LogitTargets,
                   records: Sequence[PromptRecord]) -> _LogitReadout:
    norm = final_norm(model)
    w_u, b_u = _unembedding(model)
    w_u, b_u = w_u.cpu(), (None if b_u is None else b_u.cpu())
    lmap = logit_map(model)
    if lmap.softcap is not None:
        log.warning("%s soft-caps its logits (%g tanh(x / %g)): direct logit attribution explains the logit "
                    "difference before the cap", geo.architecture, lmap.softcap, lmap.softcap)
    langs = list(dict.fromkeys(r_.lang for r_ in records))
    u = torch.stack([w_u[list(targets.refusal[lang])].double().mean(0) - w_u[list(targets.compliance[lang])].double().mean(0)
                     for lang in langs]) / lmap.scaling
    u_bias = (torch.zeros(len(langs), dtype=torch.float64) if b_u is None else
              torch.stack([b_u[list(targets.refusal[lang])].double().mean()
                           - b_u[list(targets.compliance[lang])].double().mean() for lang in langs])) / lmap.scaling
    v, const = norm.readout(u)
    return _LogitReadout(targets, norm, {lang: i for i, lang in enumerate(langs)}, v.to(device_of(model)),
                         const + u_bias, u, u_bias, lmap.describe())


# --------------------------------------------------------------------------------------------------------------
# One batch.


@dataclass(frozen=True)
class _Setup:
    """What every batch's pass reads: the model, its geometry, r̂ on its device, the DLA read-out (or None)."""

    model: HookedModel
    geo: HeadGeometry
    r: Tensor
    readout: _LogitReadout | None
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class _Pass:
    """One batch's forward pass: its probe, the shared prefix's probe (None without one), the decoder's output
    and the largest completeness error of the probes."""

    probe: _BatchProbe
    prefix: _BatchProbe | None
    n_prefix: int
    hidden: Tensor | None
    worst: float


def _run_pass(setup: _Setup, batch: ChatBatch, rows: Tensor,
              patch: Sequence[tuple[str, hooks.HookFn]] = ()) -> _Pass:
    """Run the probes over ``batch`` (``rows``: each row's language group) and check they rebuild the residual
    stream. ``patch``: hooks registered before the probes on the batch's own positions (an activation patch the
    probes then attribute)."""
    geo, model, dtype = setup.geo, setup.model, setup.dtype
    dla_v = None if setup.readout is None else setup.readout.v
    dla_rows = rows if dla_v is not None else None
    b = int(rows.shape[0])
    n_prefix = fwd.shared_prefix(model, batch)  # 0 where the prefix is not shared or its check failed
    if not n_prefix:
        probe = _BatchProbe(geo, setup.r, dla_v, b, batch.input_ids.shape[1], batch.n_post, batch.spans, dla_rows)
        hidden = decoder_forward(model, batch, [*patch, *probe.hook_list()], share_prefix=False)
        return _Pass(probe, None, 0, hidden, probe.check(batch.attention_mask, dtype))
    # The template prefix is the same for every row: attribute it once (a batch of one), and let every row
    # continue from it; its value projections join the keys of the rows' own pass.
    prefix = _BatchProbe(geo, setup.r, None, 1, n_prefix, batch.n_post, None, None)
    not_prefix = batch.spans != int(Span.PREFIX)
    own = not_prefix & batch.attention_mask.bool()
    rest_len = int(own.sum(-1).max())
    tail_spans = torch.where(own[:, -rest_len:], batch.spans[:, -rest_len:],
                             torch.zeros_like(batch.spans[:, -rest_len:]))
    key_spans = torch.cat([torch.full((b, n_prefix), int(Span.PREFIX), device=setup.device), tail_spans], 1)
    probe = _BatchProbe(geo, setup.r, dla_v, b, rest_len, batch.n_post, key_spans, dla_rows,
                        prefix_vproj=prefix.vprojs)
    hidden = decoder_forward(model, batch, [*patch, *probe.hook_list()], share_prefix=True,
                             prefix_readers=prefix.hook_list())
    worst = prefix.check(torch.ones(1, n_prefix, device=setup.device), dtype)
    worst = max(worst, probe.check(own[:, -rest_len:], dtype))
    return _Pass(probe, prefix, n_prefix, hidden, worst)


def _dla_parts(setup: _Setup, p: _Pass, rows: Tensor) -> dict[str, Tensor]:
    """The DLA parts of the batch's rows, divided by the final norm's frozen scale, checked to add up to the
    model's own logit difference; empty without DLA."""
    readout = setup.readout
    if readout is None:
        return {}
    probe, hidden = p.probe, p.hidden
    assert probe.final_last is not None and hidden is not None
    scale = readout.norm.scale(probe.final_last).cpu()
    groups = rows.cpu()
    const = readout.const[groups]
    probe_parts = {"embed": probe.dla_embed.cpu(), "heads": probe.dla_heads.cpu(), "mlps": probe.dla_mlps.cpu()}
    extra = {"dla_embed": probe_parts["embed"] / scale, "dla_heads": probe_parts["heads"] / scale[:, None, None],
             "dla_mlps": probe_parts["mlps"] / scale[:, None], "dla_const": const, "dla_scale": scale}
    # The model's own logit difference, from its real final norm and unembedding: the parts must add up.
    actual = (hidden[:, -1].to(torch.float64).cpu() * readout.u[groups]).sum(-1) + readout.u_bias[groups]
    extra["dla_logit_diff"] = actual
    extra["dla_bias"] = probe.dla_bias.cpu() / scale[:, None]
    parts = (extra["dla_embed"] + extra["dla_heads"].sum((1, 2)) + extra["dla_mlps"].sum(1) + const
             + extra["dla_bias"].sum(1))
    geo = setup.geo
    exactness.require(parts, actual, setup.dtype, f"direct logit attribution of {geo.architecture}: the parts do "
                      "not add up to the model's logit difference", n_terms=2 * geo.n_layers + 1,
                      hint="its final norm or unembedding is not one this library describes; pass dla=False")
    return extra


def _row_part(t: Tensor, pre: Tensor | None, j: int, k: int) -> Tensor:
    """Row ``j``'s last ``k`` positions of ``t``, after the shared prefix's ``pre`` where there is one."""
    mine = t[j, ..., -k:]
    return mine if pre is None else torch.cat([pre[0], mine], -1)


def _batch_rows(setup: _Setup, p: _Pass, batch: ChatBatch, extra: Mapping[str, Tensor]
                ) -> list[tuple[dict[str, Tensor], list[str]]]:
    """Per row of the batch: its parts over its real positions (on the CPU) and its tokens' strings."""
    tok = setup.model.tokenizer
    probe, prefix = p.probe, p.prefix
    lengths = batch.lengths.tolist()
    out: list[tuple[dict[str, Tensor], list[str]]] = []
    for j in range(int(probe.heads.shape[0])):
        k = lengths[j] - p.n_prefix  # this pass's own positions of row j (all of them without a shared prefix)
        row = {"embed": _row_part(probe.embed, prefix.embed if prefix else None, j, k),
               "heads": _row_part(probe.heads, prefix.heads if prefix else None, j, k),
               "attn_bias": _row_part(probe.attn_bias, prefix.attn_bias if prefix else None, j, k),
               "mlps": _row_part(probe.mlps, prefix.mlps if prefix else None, j, k),
               "resid": _row_part(probe.resid, prefix.resid if prefix else None, j, k),
               "spans": batch.spans[j, -lengths[j]:], "sources": probe.sources[j], "attn_mass": probe.attn_mass[j]}
        row.update({key: val[j] for key, val in extra.items()})
        row = {key: val.cpu() for key, val in row.items()}
        out.append((row, [tok.decode([t]) for t in batch.input_ids[j, -lengths[j]:].tolist()]))
    return out


# --------------------------------------------------------------------------------------------------------------
# Assembly.


def _assemble(setup: _Setup, rows_done: Sequence[dict[str, Tensor]], token_strs: list[list[str]],
              records: Sequence[PromptRecord], dmeta: dict[str, Any], adv_suffix: str | None) -> Attribution:
    """One record from the rows, in input order, left-padded to the longest prompt."""
    n = len(rows_done)
    geo = setup.geo
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
    readout = setup.readout
    if readout is not None and "dla_embed" in rows_done[0]:
        def stack(key: str) -> Tensor:
            return torch.stack([row[key] for row in rows_done]).float().cpu()

        dla_rec = LogitAttribution(stack("dla_embed"), stack("dla_heads"), stack("dla_mlps"),
                                   stack("dla_bias") if geo.has_bias else None, stack("dla_const"),
                                   stack("dla_logit_diff"), stack("dla_scale"), readout.targets, readout.space)
    return Attribution(
        embed=stack_padded("embed").float(), heads=stack_padded("heads").float(), mlps=stack_padded("mlps").float(),
        attn_bias=attn_bias, resid=stack_padded("resid").float(), mask=mask, spans=stack_padded("spans"),
        sources=torch.stack([row["sources"] for row in rows_done]).float().cpu(),
        attn_mass=torch.stack([row["attn_mass"] for row in rows_done]).float().cpu(),
        dla=dla_rec, ids=[rec.id for rec in records], langs=[rec.lang for rec in records],
        labels=[rec.label for rec in records], tokens=token_strs, model=model_id(setup.model), direction=dmeta,
        adv_suffix=adv_suffix)


@torch.inference_mode()
def attribute(
    model: HookedModel,
    direction: Direction | Tensor,
    prompts: PromptSet | Sequence[str],
    *,
    adv_suffix: str | None = None,
    refusal_tokens: RefusalTokens | None = None,
    compliance_tokens: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    dla: bool = True,
    batch_size: int = 16,
    fmt: ChatFormat | None = None,
    patch_for: Callable[[list[int]], Sequence[tuple[str, hooks.HookFn]]] | None = None,
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
        patch_for: an activation patch to attribute: ``patch_for(idx)`` gives the hooks of the batch whose rows are
            the input indices ``idx`` (e.g. :func:`~refusal_circuits.patching.head_patch_hooks` with ``last``).
            They run before the probes on each batch's own positions (the shared template prefix is left alone,
            so patch post-instruction tokens only), and the parts still rebuild the patched residual stream
            exactly (checked). The source spans of a patched head describe its unpatched attention.

    Returns:
        The :class:`Attribution`, one row per prompt in input order.
    """
    records, pset = _prompt_records(prompts)
    _check_one_device(model)
    dmeta = _direction_meta(direction, model)
    r = _unit_vector(direction, model)
    geo = head_geometry(model)
    fmt = fmt or chat_format(model.tokenizer)
    readout: _LogitReadout | None = None
    if dla:
        saved = direction.meta.get("refusal_tokens") if isinstance(direction, Direction) else None
        targets = _logit_targets(model, pset, saved, refusal_tokens, compliance_tokens, batch_size)
        if targets is not None:
            readout = _logit_readout(model, geo, targets, records)
    device = device_of(model)
    setup = _Setup(model, geo, r.to(device), readout, device, exactness.compute_dtype(model))
    group_of = {} if readout is None else readout.group_of

    n = len(records)
    per_row: list[dict[str, Tensor] | None] = [None] * n
    token_strs: list[list[str]] = [[] for _ in range(n)]
    worst = 0.0
    for idx, batch in batches(model, [rec.instruction for rec in records], batch_size, fmt=fmt,
                              adv_suffix=adv_suffix, names=[rec.id for rec in records], progress=progress,
                              desc="attribution"):
        rows = torch.tensor([group_of.get(records[i].lang, 0) for i in idx], dtype=torch.long, device=device)
        p = _run_pass(setup, batch, rows, patch_for(idx) if patch_for else ())
        worst = max(worst, p.worst)
        extra = _dla_parts(setup, p, rows)
        for i, (row, toks) in zip(idx, _batch_rows(setup, p, batch, extra), strict=True):
            per_row[i] = row
            token_strs[i] = toks
    log.debug("attribution of %s adds up to the residual stream within %.3g", geo.architecture, worst)
    rows_done = [row for row in per_row if row is not None]
    assert len(rows_done) == n
    return _assemble(setup, rows_done, token_strs, records, dmeta, adv_suffix)
