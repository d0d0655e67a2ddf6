"""Head ablation and activation patching: direct versus total effect of a head on refusal.

A head's direct attribution (:mod:`refusal_circuits.attribution`) is what it writes onto r̂ itself. Zeroing its
output ``z_h`` changes ``resid_mid`` of its layer by exactly minus that write (tested); everything after that
layer can amplify or undo it. The *total* effect comes from activation patching at the post-instruction tokens
(where r̂ is read): on harmful prompts replace the head's ``z_h`` there by its mean on harmless prompts and
measure how far the refusal score falls, and the other way round on harmless prompts. A head with a large direct
write but little total effect is compensated downstream; a head with a small write but a large total effect acts
through later layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from refusal_circuits import exactness, hooks
from refusal_circuits.attribution import Attribution, attribute, head_geometry
from refusal_circuits.chat import chat_format
from refusal_circuits.directions import Direction, check_compatible
from refusal_circuits.errors import InputError
from refusal_circuits.forward import batches, last_logits
from refusal_circuits.io import nullable
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel, model_id
from refusal_circuits.scores import refusal_score
from refusal_circuits.stats import paired_stats_or_single

Head = tuple[int, int]


def _check_heads(model: HookedModel, heads: Sequence[Head]) -> None:
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise InputError(f"head L{layer}.H{head} out of range: the model has {n_layers} layers of {n_heads} heads")


def head_patch_hooks(model: HookedModel, values: Mapping[Head, Tensor | float], *, last: int | None = None
                     ) -> list[tuple[str, hooks.HookFn]]:
    """Hooks that overwrite heads' outputs ``z_h`` (before ``W_O``).

    Args:
        values: ``(layer, head) -> value``; a value is ``0.0`` (zero ablation), a ``[d_head]`` vector (e.g. a
            mean: mean ablation), ``[last, d_head]`` per position (broadcast over the batch), or
            ``[batch, last, d_head]`` per row.
        last: only the last ``last`` positions of every row are overwritten (the post-instruction tokens);
            None: every position. With ``last``, pass the hooks as ``readers`` to
            :func:`~refusal_circuits.forward.decoder_forward` (so the shared template prefix is left alone).
    """
    _check_heads(model, list(values))
    d_head = int(model.cfg.d_head)
    by_layer: dict[int, list[tuple[int, Tensor | float]]] = {}
    for (layer, head), value in values.items():
        by_layer.setdefault(layer, []).append((head, value))

    def make(entries: list[tuple[int, Tensor | float]]) -> hooks.HookFn:
        def fn(z: Tensor, _name: str) -> Tensor:
            z = z.clone()
            cols = z[:, -last:] if last else z
            for head, value in entries:
                sl = slice(head * d_head, (head + 1) * d_head)
                cols[..., sl] = value if isinstance(value, float) else value.to(z.dtype).to(z.device)
            return z

        return fn

    return [(hooks.attn_z(layer), make(entries)) for layer, entries in sorted(by_layer.items())]


def ablate_heads(model: HookedModel, heads: Sequence[Head] | Mapping[Head, Tensor | float]) -> hooks.HookHandle:
    """Zero ablation (a list of heads) or mean ablation (``{head: [d_head] mean}``) at every position, as a handle."""
    values = dict(heads) if isinstance(heads, Mapping) else {h: 0.0 for h in heads}
    return hooks.add_hooks(model, head_patch_hooks(model, values))


@dataclass(frozen=True)
class PromptRun:
    """Per prompt (input order): refusal score, projection on r̂ at r̂'s (layer, position), and where asked the
    outputs ``z`` of every head of some layers at the post-instruction tokens (``{layer: [prompt, post, hd]}``).

    One forward pass gives all three, so a run of the base language can serve every comparison made against it.
    """

    scores: Float[Tensor, " prompt"]
    projections: Float[Tensor, " prompt"]
    z: dict[int, Float[Tensor, "prompt post hd"]]

    def take(self, rows: Sequence[int]) -> PromptRun:
        """The same run restricted to ``rows`` (in that order)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return PromptRun(self.scores[idx], self.projections[idx], {k: v[idx] for k, v in self.z.items()})


def prompt_run(model: HookedModel, direction: Direction, instructions: Sequence[str], refusal_tokens: Sequence[int], *,
               patch_for: Callable[[list[int]], list[tuple[str, hooks.HookFn]]] | None = None,
               z_layers: Sequence[int] = (), batch_size: int = 32) -> PromptRun:
    """Score every prompt (refusal score and r̂'s projection at its site), keeping heads' ``z`` of ``z_layers``.

    ``patch_for(idx)`` gives each batch's patching hooks (``idx``: the input indices of its rows); they run as
    readers of the batch's own positions, so the shared template prefix is left alone. The ``z`` kept are the
    values after any patch.
    """
    fmt = chat_format(model.tokenizer)
    r = direction.vector.to(torch.float64)
    r = r / r.norm()
    n = len(instructions)
    width = int(model.cfg.n_heads) * int(model.cfg.d_head)
    layers = sorted(set(int(x) for x in z_layers))
    scores = torch.zeros(n, dtype=torch.float64)
    projections = torch.zeros(n, dtype=torch.float64)
    z = {layer: torch.zeros(n, fmt.n_post, width) for layer in layers}
    for idx, batch in batches(model, instructions, batch_size, fmt=fmt):
        got: dict[Any, Tensor] = {}

        def grab_site(x: Tensor, _name: str, got: dict[Any, Tensor] = got) -> None:
            got["site"] = x[:, direction.position].to(torch.float64).cpu() @ r

        def grab_z(layer: int, got: dict[Any, Tensor] = got) -> hooks.HookFn:
            def fn(x: Tensor, _name: str) -> None:
                got[layer] = x[:, -fmt.n_post:].float().cpu()
            return fn

        readers = [*(patch_for(idx) if patch_for else []), *((hooks.attn_z(a), grab_z(a)) for a in layers),
                   (hooks.resid_pre(direction.layer), grab_site)]
        logits = last_logits(model, batch, readers)
        rows = torch.as_tensor(idx, dtype=torch.long)
        scores[rows] = refusal_score(logits, refusal_tokens).to(torch.float64).cpu()
        projections[rows] = got["site"]
        for layer in layers:
            z[layer][rows] = got[layer]
    return PromptRun(scores, projections, z)


@dataclass(frozen=True)
class HeadEffect:
    """One head: its direct write onto r̂ and its total effects on refusal (means over prompts).

    Attributes:
        direct_harmful / direct_harmless: mean direct write onto r̂ over the post-instruction tokens (times the
            residual multiplier where the model has one). NaN for a head whose layer normalises its attention output
            (Gemma-2/3, OLMo-2 post-norms): there a write depends on each token's norm scale, which the mean output
            does not have; :func:`~refusal_circuits.attribution.attribute` gives those writes exactly per token.
        patch_harmful: change of the refusal score on harmful prompts when the head's output at the
            post-instruction tokens is replaced by its harmless mean (negative: the head supports refusal).
        patch_harmless: change on harmless prompts under the harmful mean (positive: the head can induce refusal).
        projection_harmful: change of ``resid_pre[r̂ layer] . r̂`` at r̂'s position under the first patch:
            the direct part (if the head sits below r̂'s layer) plus what later layers make of it.
        site_harmful / site_harmless: the mean direct write at r̂'s position only (what ``projection_harmful`` is
            compared with; NaN under a post-norm, as above).
        path: the decomposition of ``projection_harmful`` into the head's own write, the MLPs and the later heads
            (:class:`EffectPath`); None for a head at or above r̂'s layer (its patch cannot move r̂ there) or
            where it was not asked for.
        ci: 95% paired-bootstrap intervals (prompts resampled; each prompt patched against itself unpatched) of
            ``patch_harmful``, ``patch_harmless`` and ``projection_harmful``: ``{name: (low, high)}``, NaN for one
            prompt.
    """

    layer: int
    head: int
    direct_harmful: float
    direct_harmless: float
    patch_harmful: float
    patch_harmless: float
    projection_harmful: float
    site_harmful: float = float("nan")
    site_harmless: float = float("nan")
    path: EffectPath | None = None
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def direct_gap(self) -> float:
        """How much more the head writes onto r̂ on harmful than on harmless prompts."""
        return self.direct_harmful - self.direct_harmless

    @property
    def site_gap(self) -> float:
        """The same at r̂'s own position: the write the projection change compares with, like with like."""
        return self.site_harmful - self.site_harmless


@dataclass(frozen=True)
class EffectPath:
    """Where a head's total effect on r̂'s projection comes from: the change of every component's write onto r̂ at
    r̂'s (layer, position) when the head is patched (harmful prompts, harmless mean), from attributing the patched
    run and the clean one. ``own + sum(heads) + sum(mlps) + rest == total`` exactly, and ``total`` equals the
    projection change measured without attribution (checked where it is computed).

    Attributes:
        own: the change of the head's own write at r̂'s position (the direct part of the effect).
        heads: per layer from the head's own to r̂'s layer − 1, the summed change of the other heads' writes (the
            head's own layer: 0, as its other heads do not read it).
        mlps: per layer, the change of the MLP's write (its own layer's MLP reads the patched head).
        rest: attention biases and embedding (0 up to rounding without a post-norm).
        total: the change of ``resid_pre[r̂ layer] . r̂`` at r̂'s position.
        ci: 95% bootstrap intervals (prompts resampled) of ``own``, ``via_mlps``, ``via_heads`` and ``total``.
    """

    own: float
    heads: dict[int, float]
    mlps: dict[int, float]
    rest: float
    total: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def via_heads(self) -> float:
        return sum(self.heads.values())

    @property
    def via_mlps(self) -> float:
        return sum(self.mlps.values())

    def to_json(self) -> dict[str, Any]:
        return {"own": self.own, "via_heads": self.via_heads, "via_mlps": self.via_mlps, "rest": self.rest,
                "total": self.total, **_ci_json(self.ci), "heads": {str(k): v for k, v in self.heads.items()},
                "mlps": {str(k): v for k, v in self.mlps.items()}}


def _ci_json(ci: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """``{name}_ci_low`` / ``{name}_ci_high`` per interval, null with a reason where it is undefined."""
    out: dict[str, Any] = {}
    for name, (lo, hi) in ci.items():
        out.update(nullable(f"{name}_ci_low", lo, "one prompt: no interval"))
        out.update(nullable(f"{name}_ci_high", hi, "one prompt: no interval"))
    return out


def _intervals(per_prompt: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
    """Paired-bootstrap 95% intervals of the means of per-prompt differences (one seeded resampling)."""
    names = list(per_prompt)
    stats = paired_stats_or_single(torch.stack([per_prompt[k].double() for k in names], -1), n_perm=1)
    return {k: (float(stats["ci_low"][i]), float(stats["ci_high"][i])) for i, k in enumerate(names)}


@dataclass(frozen=True)
class HeadEffects:
    """Direct versus total effects of a set of heads; renders as a table in Jupyter."""

    effects: list[HeadEffect]
    baseline_harmful: float
    baseline_harmless: float
    n_harmful: int
    n_harmless: int
    model: str
    direction: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "direction": self.direction, "baseline_harmful": self.baseline_harmful,
                "baseline_harmless": self.baseline_harmless, "n_harmful": self.n_harmful,
                "n_harmless": self.n_harmless,
                "heads": [self._head_json(e) for e in self.effects]}

    def _head_json(self, e: HeadEffect) -> dict[str, Any]:
        why = "the head's layer normalises its attention output per token (post-norm): see attribute()"
        out: dict[str, Any] = {k: v for k, v in e.__dict__.items()
                               if not k.startswith(("direct_", "site_")) and k not in ("path", "ci")}
        out.update(_ci_json(e.ci))
        for key in ("direct_harmful", "direct_harmless", "site_harmful", "site_harmless"):
            out.update(nullable(key, getattr(e, key), why))
        out.update(nullable("direct_gap", e.direct_gap, why))
        out.update(nullable("site_gap", e.site_gap, why))
        no_path = ("the head sits at or above r̂'s layer: its patch cannot move r̂ at r̂'s site"
                   if e.layer >= int(self.direction["layer"]) else "not decomposed (total_effects(decompose=False))")
        out.update(nullable("path", None if e.path is None else e.path.to_json(), no_path))
        return out

    def _repr_html_(self) -> str:
        def num(x: float | None) -> str:
            return "n/a" if x is None or x != x else f"{x:+.3f}"

        rows = (
            f"<tr><td>L{e.layer}.H{e.head}</td><td>{num(e.direct_gap)}</td><td>{num(e.site_gap)}</td>"
            f"<td>{num(e.projection_harmful)}</td><td>{num(e.path.own if e.path else None)}</td>"
            f"<td>{num(e.path.via_mlps if e.path else None)}</td><td>{num(e.path.via_heads if e.path else None)}</td>"
            f"<td>{num(e.patch_harmful)}</td><td>{num(e.patch_harmless)}</td></tr>"
            for e in self.effects)
        return table(f"Direct vs total effect · {esc(self.model)} · r̂ at layer {self.direction['layer']}, position "
                     f"{self.direction['position']} · baseline refusal score harmful {self.baseline_harmful:+.2f} "
                     f"(n={self.n_harmful}), harmless {self.baseline_harmless:+.2f} (n={self.n_harmless})",
                     ["head", "direct gap (post-instruction mean)", "direct gap at r̂'s position",
                      "Δ r̂ projection, harmful→harmless patch", "of which own write", "via MLPs", "via later heads",
                      "Δ refusal score, harmful→harmless patch", "Δ refusal score, harmless→harmful patch"], rows)

    def __repr__(self) -> str:
        def path(e: HeadEffect) -> str:
            p = e.path
            return "" if p is None else f" = own {p.own:+.3f} + MLPs {p.via_mlps:+.3f} + heads {p.via_heads:+.3f}"

        lines = [f"L{e.layer}.H{e.head}: site gap {e.site_gap:+.3f}  Δproj {e.projection_harmful:+.3f}{path(e)}  "
                 f"Δscore {e.patch_harmful:+.3f}/{e.patch_harmless:+.3f}"
                 for e in self.effects]
        return "HeadEffects(\n  " + "\n  ".join(lines) + "\n)"


@torch.inference_mode()
def total_effects(model: HookedModel, direction: Direction, harmful: Sequence[str], harmless: Sequence[str],
                  heads: Sequence[Head], refusal_tokens: Sequence[int], *, decompose: bool = True,
                  batch_size: int = 32, progress: bool = True) -> HeadEffects:
    """Direct write and total effect (activation patching at the post-instruction tokens) of each head.

    Costs two forward passes over ``harmful`` + ``harmless`` for the means and baselines, then one pass over each
    set per head (first-token logits only, template prefix shared). With ``decompose`` (the default), the harmful
    prompts are also attributed once clean and once under each patch of a head below r̂'s layer, which splits
    its projection change into :class:`EffectPath` (about 1.5 forward passes over ``harmful`` per head).
    """
    check_compatible(direction, model)
    heads = [(int(layer), int(head)) for layer, head in heads]
    _check_heads(model, heads)
    if not harmful or not harmless:
        raise InputError("total effects need harmful and harmless prompts")
    if not refusal_tokens:
        raise InputError("total effects need refusal tokens")
    geo = head_geometry(model)
    r = direction.vector.to(torch.float64)
    r = r / r.norm()
    fmt = chat_format(model.tokenizer)
    n_post, d_head = fmt.n_post, geo.d_head
    if not -n_post <= direction.position < 0:
        raise InputError(f"the direction's position {direction.position} is not a post-instruction position")
    layers = sorted({layer for layer, _ in heads})
    # One unpatched pass per group gives its baseline scores and the heads' mean outputs to patch in.
    clean = {name: prompt_run(model, direction, group, refusal_tokens, z_layers=layers, batch_size=batch_size)
             for name, group in (("harmful", harmful), ("harmless", harmless))}
    means = {name: {layer: z.to(torch.float64).mean(0) for layer, z in run.z.items()} for name, run in clean.items()}
    read = {layer: geo.head_readout(layer, r[None].to(geo.w_o[layer].device))[0].cpu() for layer in layers}
    # Without a post-norm a head's write is m * z_h . W_O[h]^T r̂; with one it needs each token's scale (NaN).
    factor = {layer: geo.attn[layer].multiplier if geo.attn[layer].norm is None else float("nan") for layer in layers}
    site = n_post + direction.position  # r̂'s position among the post-instruction tokens

    def head_mean(which: str, layer: int, head: int) -> Tensor:
        return means[which][layer][:, head * d_head:(head + 1) * d_head]

    def write(which: str, layer: int, head: int, at: int | None = None) -> float:
        """The mean direct write over the post-instruction tokens, or at post-instruction token ``at`` only."""
        z = head_mean(which, layer, head)
        return factor[layer] * float(((z if at is None else z[at:at + 1]) @ read[layer][head]).mean())

    def scores(instructions: Sequence[str], patch: list[tuple[str, hooks.HookFn]]) -> PromptRun:
        return prompt_run(model, direction, instructions, refusal_tokens, patch_for=_constant(patch),
                          batch_size=batch_size)

    ref_h, ref_l = clean["harmful"], clean["harmless"]
    base_h, base_l = float(ref_h.scores.mean()), float(ref_l.scores.mean())
    below = [h for h in heads if h[0] < direction.layer]
    clean_attr = (attribute(model, direction, list(harmful), dla=False, batch_size=batch_size, progress=False)
                  if decompose and below else None)
    effects: list[HeadEffect] = []
    for layer, head in tqdm(heads, desc="total effects", disable=not progress, leave=False):
        to_harmless = head_patch_hooks(model, {(layer, head): head_mean("harmless", layer, head)}, last=n_post)
        to_harmful = head_patch_hooks(model, {(layer, head): head_mean("harmful", layer, head)}, last=n_post)
        run_h, run_l = scores(harmful, to_harmless), scores(harmless, to_harmful)
        d_score_h, d_score_l = run_h.scores - ref_h.scores, run_l.scores - ref_l.scores
        d_proj = run_h.projections - ref_h.projections
        path = None
        if clean_attr is not None and layer < direction.layer:
            patched = attribute(model, direction, list(harmful), dla=False, batch_size=batch_size,
                                patch_for=_constant(to_harmless), progress=False)
            path = _effect_path(clean_attr, patched, direction, (layer, head), float(d_proj.mean()),
                                exactness.compute_dtype(model))
        effects.append(HeadEffect(
            layer, head, direct_harmful=write("harmful", layer, head), direct_harmless=write("harmless", layer, head),
            patch_harmful=float(d_score_h.mean()), patch_harmless=float(d_score_l.mean()),
            projection_harmful=float(d_proj.mean()),
            site_harmful=write("harmful", layer, head, site), site_harmless=write("harmless", layer, head, site),
            path=path, ci={**_intervals({"patch_harmful": d_score_h, "projection_harmful": d_proj}),
                           **_intervals({"patch_harmless": d_score_l})}))
    return HeadEffects(effects, base_h, base_l, len(harmful), len(harmless), model_id(model),
                       {"lang": direction.lang, "layer": direction.layer, "position": direction.position})


def _constant(patch: list[tuple[str, hooks.HookFn]]) -> Callable[[list[int]], list[tuple[str, hooks.HookFn]]]:
    """The same patch for every batch."""
    return lambda _idx: patch


def _effect_path(clean: Attribution, patched: Attribution, direction: Direction, head: Head, measured: float,
                 dtype: torch.dtype) -> EffectPath:
    """The patched run's attribution minus the clean one's at r̂'s (layer, position), per component, checked to
    add up to the projection change ``measured`` by :func:`prompt_run` (another code path: a hook on
    ``resid_pre``)."""
    top, (layer, h) = direction.layer, head
    at = clean.resid.shape[-1] + direction.position  # rows are left-padded: the same template token in every row
    per_head = (patched.heads - clean.heads)[:, :, :, at].double()  # [prompt, layer, head]
    per_mlp = (patched.mlps - clean.mlps)[:, :, at].double()  # [prompt, layer]
    d_heads, d_mlps = per_head.mean(0), per_mlp.mean(0)
    d_rest = (patched.embed - clean.embed)[:, at].double().mean()
    if clean.attn_bias is not None and patched.attn_bias is not None:
        d_rest = d_rest + (patched.attn_bias - clean.attn_bias)[:, :top, at].double().sum(-1).mean()
    own_per = per_head[:, layer, h].clone()
    own = float(d_heads[layer, h])
    d_heads[layer, h] = 0.0
    per_head[:, layer, h] = 0.0
    per_total = (patched.resid - clean.resid)[:, top, at].double()
    total = float(per_total.mean())
    exactness.require(torch.tensor([total]), torch.tensor([measured]), dtype,
                      f"the decomposition of L{layer}.H{h}'s total effect: the attributed change of r̂'s projection "
                      "differs from the measured one", n_terms=2 * top + 1,
                      hint="the attribution and the patched forward pass disagree on this model")
    ci = _intervals({"own": own_per, "via_mlps": per_mlp[:, layer:top].sum(-1),
                     "via_heads": per_head[:, layer:top].sum((-1, -2)), "total": per_total})
    return EffectPath(own, {a: float(d_heads[a].sum()) for a in range(layer, top)},
                      {a: float(d_mlps[a]) for a in range(layer, top)}, float(d_rest), total, ci)


@dataclass(frozen=True)
class PairPatch:
    """Patching heads from a base-language run into its translations (paired prompts).

    ``fraction``: share of the base-minus-translation gap in the r̂ projection at r̂'s site that the patch closes
    (only heads below r̂'s layer can move it); ``score_fraction``: share of the gap in the refusal score (every
    patched head can move it).
    """

    heads: list[Head]
    base_projection: float
    other_projection: float
    patched_projection: float
    other_score: float
    patched_score: float
    n_pairs: int
    base_score: float = float("nan")

    @property
    def fraction(self) -> float:
        gap = self.base_projection - self.other_projection
        return (self.patched_projection - self.other_projection) / gap if abs(gap) > 1e-9 else float("nan")

    @property
    def score_fraction(self) -> float:
        gap = self.base_score - self.other_score
        return (self.patched_score - self.other_score) / gap if abs(gap) > 1e-9 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "heads"}, "heads": [list(h) for h in self.heads],
                "fraction": self.fraction, "score_fraction": self.score_fraction}


@torch.inference_mode()
def patch_pairs(model: HookedModel, direction: Direction, base: Sequence[str], other: Sequence[str], heads: Sequence[Head],
                refusal_tokens: Sequence[int], *, base_run: PromptRun | None = None, batch_size: int = 32) -> PairPatch:
    """Replace ``heads``' outputs at the post-instruction tokens of each ``other[i]`` by those of ``base[i]``.

    The post-instruction tokens are the same in every language, so position ``-k`` of a translation and of its
    English original are the same template token. Measures the r̂ projection at r̂'s (layer, position) and the
    refusal score, with and without the patch.

    ``base_run``: a :func:`prompt_run` of ``base`` (same order) keeping ``z`` of every patched head's layer, when
    one is at hand (comparing one base language with several translations needs it once, not per language).
    """
    if len(base) != len(other) or not base:
        raise InputError(f"patch_pairs needs equally many base and other prompts (got {len(base)} and {len(other)})")
    heads = [(int(a), int(b)) for a, b in heads]
    _check_heads(model, heads)
    n_post, d_head = chat_format(model.tokenizer).n_post, int(model.cfg.d_head)
    layers = sorted({a for a, _ in heads})
    if base_run is None:
        base_run = prompt_run(model, direction, base, refusal_tokens, z_layers=layers, batch_size=batch_size)
    elif len(base_run.scores) != len(base) or not set(layers) <= set(base_run.z):
        raise InputError(f"base_run covers {len(base_run.scores)} prompts and layers {sorted(base_run.z)}; "
                         f"patching needs {len(base)} prompts and layers {layers}")
    source = base_run.z

    def from_base(idx: list[int]) -> list[tuple[str, hooks.HookFn]]:
        """Each row's heads get its own base prompt's outputs (``idx``: the batch rows' input indices)."""
        return head_patch_hooks(model, {(a, h): source[a][idx][:, :, h * d_head:(h + 1) * d_head] for a, h in heads},
                                last=n_post)

    clean = prompt_run(model, direction, other, refusal_tokens, batch_size=batch_size)
    patched = prompt_run(model, direction, other, refusal_tokens, patch_for=from_base, batch_size=batch_size)
    return PairPatch(heads, float(base_run.projections.mean()), float(clean.projections.mean()),
                     float(patched.projections.mean()), float(clean.scores.mean()), float(patched.scores.mean()),
                     len(base), float(base_run.scores.mean()))
