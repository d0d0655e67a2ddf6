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
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from refusal_circuits import hooks
from refusal_circuits.attribution import head_geometry
from refusal_circuits.chat import chat_format
from refusal_circuits.directions import Direction, check_compatible
from refusal_circuits.errors import InputError
from refusal_circuits.forward import batches, last_logits
from refusal_circuits.io import nullable
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel, model_id
from refusal_circuits.scores import refusal_score

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
    """

    layer: int
    head: int
    direct_harmful: float
    direct_harmless: float
    patch_harmful: float
    patch_harmless: float
    projection_harmful: float

    @property
    def direct_gap(self) -> float:
        """How much more the head writes onto r̂ on harmful than on harmless prompts."""
        return self.direct_harmful - self.direct_harmless


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

    @staticmethod
    def _head_json(e: HeadEffect) -> dict[str, Any]:
        why = "the head's layer normalises its attention output per token (post-norm): see attribute()"
        out: dict[str, Any] = {k: v for k, v in e.__dict__.items() if not k.startswith("direct_")}
        for key in ("direct_harmful", "direct_harmless"):
            out.update(nullable(key, getattr(e, key), why))
        out.update(nullable("direct_gap", e.direct_gap, why))
        return out

    def _repr_html_(self) -> str:
        rows = (
            f"<tr><td>L{e.layer}.H{e.head}</td><td>{e.direct_harmful:+.3f}</td><td>{e.direct_harmless:+.3f}</td>"
            f"<td>{e.projection_harmful:+.3f}</td><td>{e.patch_harmful:+.3f}</td><td>{e.patch_harmless:+.3f}</td></tr>"
            for e in self.effects)
        return table(f"Direct vs total effect · {esc(self.model)} · baseline refusal score harmful "
                     f"{self.baseline_harmful:+.2f} (n={self.n_harmful}), harmless {self.baseline_harmless:+.2f} "
                     f"(n={self.n_harmless})",
                     ["head", "direct (harmful)", "direct (harmless)", "Δ r̂ projection, harmful→harmless patch",
                      "Δ refusal score, harmful→harmless patch", "Δ refusal score, harmless→harmful patch"], rows)

    def __repr__(self) -> str:
        lines = [f"L{e.layer}.H{e.head}: direct {e.direct_harmful:+.3f}/{e.direct_harmless:+.3f}  "
                 f"Δproj {e.projection_harmful:+.3f}  Δscore {e.patch_harmful:+.3f}/{e.patch_harmless:+.3f}"
                 for e in self.effects]
        return "HeadEffects(\n  " + "\n  ".join(lines) + "\n)"


@torch.inference_mode()
def total_effects(model: HookedModel, direction: Direction, harmful: Sequence[str], harmless: Sequence[str],
                  heads: Sequence[Head], refusal_tokens: Sequence[int], *, batch_size: int = 32,
                  progress: bool = True) -> HeadEffects:
    """Direct write and total effect (activation patching at the post-instruction tokens) of each head.

    Costs two forward passes over ``harmful`` + ``harmless`` for the means and baselines, then one pass over each
    set per head (first-token logits only, template prefix shared).
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

    def head_mean(which: str, layer: int, head: int) -> Tensor:
        return means[which][layer][:, head * d_head:(head + 1) * d_head]

    def scores(instructions: Sequence[str], patch: list[tuple[str, hooks.HookFn]]) -> tuple[float, float]:
        run = prompt_run(model, direction, instructions, refusal_tokens, patch_for=lambda _idx: patch,
                         batch_size=batch_size)
        return float(run.scores.mean()), float(run.projections.mean())

    base_h, base_proj_h = float(clean["harmful"].scores.mean()), float(clean["harmful"].projections.mean())
    base_l = float(clean["harmless"].scores.mean())
    effects: list[HeadEffect] = []
    for layer, head in tqdm(heads, desc="total effects", disable=not progress, leave=False):
        to_harmless = head_patch_hooks(model, {(layer, head): head_mean("harmless", layer, head)}, last=n_post)
        to_harmful = head_patch_hooks(model, {(layer, head): head_mean("harmful", layer, head)}, last=n_post)
        s_h, p_h = scores(harmful, to_harmless)
        s_l, _ = scores(harmless, to_harmful)
        effects.append(HeadEffect(
            layer, head,
            direct_harmful=factor[layer] * float((head_mean("harmful", layer, head) @ read[layer][head]).mean()),
            direct_harmless=factor[layer] * float((head_mean("harmless", layer, head) @ read[layer][head]).mean()),
            patch_harmful=s_h - base_h, patch_harmless=s_l - base_l, projection_harmful=p_h - base_proj_h))
    return HeadEffects(effects, base_h, base_l, len(harmful), len(harmless), model_id(model),
                       {"lang": direction.lang, "layer": direction.layer, "position": direction.position})


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
