"""Attribution patching: the total effect of every head and MLP at every post-instruction position, at once.

Activation patching (:mod:`refusal_circuits.patching`) replaces one node's output on the clean prompts by a
reference value and runs the model again: one forward pass per node. Attribution patching (Nanda 2023; Syed et
al. 2023; Kramár et al. 2024, "AtP*") takes the first-order Taylor estimate instead,

    Δmetric(node) ≈ (x_ref(node) − x_clean(node)) · ∂metric/∂x(node) |clean,

so one forward and one backward pass per metric and batch give every node. The nodes here are each head's output
``z_h`` (before ``W_O``, ``blocks.L.attn.hook_z``) and each MLP's write (``blocks.L.hook_mlp_out``) at each
post-instruction token; the reference is a mean over other prompts (harmless, by default: the patch the study's
exact total effects use) or, paired, each clean prompt's own partner (its English original). Two metrics: the
projection ``resid_pre[r̂ layer] · r̂`` at r̂'s position and the refusal score (log-odds of the language's own
refusal tokens at the first generated token), the two that :func:`~refusal_circuits.patching.total_effects`
measures exactly.

Exact or refused: the estimate is exact for a node whose path to the metric is linear: the MLP of the layer just
below r̂'s writes into the projection only directly (no post-norm), so there AtP must equal exact patching; and
everywhere it must be the derivative of exact patching along the patch. Every call checks both on the user's model
(the MLP exactly, that layer's largest head by central differences; three patched passes over the first batch)
and raises :class:`ExactnessError` if the gradients do not reproduce them. Elsewhere AtP is an approximation: :func:`validate_atp` measures it against exact patching on
the largest estimates and a seeded random sample of the rest and reports the correlation and the worst error.

What this adds to TransformerLens 4.3's ``attribution_patching`` tools: the reference is a mean or a paired
prompt, not one corrupted prompt of the same length; the nodes are restricted to the post-instruction tokens of
chat-formatted, left-padded batches with the template prefix run once; the metrics are r̂'s projection and the
per-language refusal score; the run-time exactness check above and the validation record.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from refusal_circuits import exactness, hooks
from refusal_circuits.attribution import head_geometry
from refusal_circuits.chat import chat_format
from refusal_circuits.directions import Direction, check_compatible
from refusal_circuits.errors import InputError
from refusal_circuits.forward import batches, last_logits
from refusal_circuits.io import nullable
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel, model_id
from refusal_circuits.patching import prompt_run
from refusal_circuits.scores import refusal_score
from refusal_circuits.stats import correlation_why, spearman

METRICS = ("projection", "score")

#: A node: ("head", layer, head, post position) or ("mlp", layer, -1, post position); positions count from 0 over
#: the post-instruction tokens.
Node = tuple[str, int, int, int]


@dataclass(frozen=True)
class AtPEstimates:
    """Per prompt, the attribution-patching estimate of each metric's change for every node.

    Attributes:
        heads: ``{metric: [prompt, layer, head, post]}``.
        mlps: ``{metric: [prompt, layer, post]}``.
        baseline: ``{metric: [prompt]}`` the clean values.
        reference: "mean" or "paired".
        linear_check: the worst error of the run-time checks (see :func:`_linear_check`), or None where they could
            not run (r̂ at layer 0, or a post-norm on the MLP below it).
    """

    heads: dict[str, Float[Tensor, "prompt layer head post"]]
    mlps: dict[str, Float[Tensor, "prompt layer post"]]
    baseline: dict[str, Float[Tensor, " prompt"]]
    model: str
    direction: dict[str, Any]
    reference: str
    linear_check: float | None

    @property
    def n_prompts(self) -> int:
        return int(self.baseline["score"].shape[0])

    def head_totals(self, metric: str = "score") -> Float[Tensor, "layer head"]:
        """Each head's estimate summed over the post-instruction tokens (patching them all, to first order),
        averaged over prompts."""
        return self.heads[_metric(metric)].sum(-1).mean(0)

    def estimate(self, node: Node, metric: str) -> Float[Tensor, " prompt"]:
        kind, layer, head, pos = node
        if kind == "head":
            return self.heads[_metric(metric)][:, layer, head, pos]
        return self.mlps[_metric(metric)][:, layer, pos]

    def top_nodes(self, k: int, metric: str = "score") -> list[Node]:
        """The ``k`` nodes with the largest mean estimate in size."""
        h = self.heads[_metric(metric)].mean(0)
        m = self.mlps[_metric(metric)].mean(0)
        nodes = [(abs(float(h[a, b, p])), ("head", a, b, p)) for a in range(h.shape[0]) for b in range(h.shape[1])
                 for p in range(h.shape[2])]
        nodes += [(abs(float(m[a, p])), ("mlp", a, -1, p)) for a in range(m.shape[0]) for p in range(m.shape[1])]
        return [n for _, n in sorted(nodes, key=lambda t: -t[0])[:k]]

    def __repr__(self) -> str:
        top = self.top_nodes(5)
        parts = [f"{_name(n)} {float(self.estimate(n, 'score').mean()):+.3f}" for n in top]
        return (f"AtPEstimates({self.model}, {self.n_prompts} prompts, reference={self.reference}, "
                f"largest score effects: {', '.join(parts)})")

    def _repr_html_(self) -> str:
        rows = (f"<tr><td>{esc(_name(n))}</td><td>{float(self.estimate(n, 'projection').mean()):+.3f}</td>"
                f"<td>{float(self.estimate(n, 'score').mean()):+.3f}</td></tr>" for n in self.top_nodes(10))
        return table(f"Attribution patching · {esc(self.model)} · {self.n_prompts} prompts · reference "
                     f"{esc(self.reference)}", ["node", "Δ r̂ projection (estimate)", "Δ refusal score (estimate)"], rows)


def _metric(name: str) -> str:
    if name not in METRICS:
        raise InputError(f"unknown metric {name!r}: choose one of {', '.join(METRICS)}")
    return name


def _name(node: Node) -> str:
    kind, layer, head, pos = node
    return f"L{layer}.H{head}@{pos}" if kind == "head" else f"MLP{layer}@{pos}"


def _post_values(model: HookedModel, instructions: Sequence[str], n_post: int, batch_size: int
                 ) -> tuple[Tensor, Tensor]:
    """Per layer, ``z`` and the MLP write at the post-instruction tokens of every prompt: ``[n, layer, post, width]``
    and ``[n, layer, post, d_model]``."""
    n_layers = int(model.cfg.n_layers)
    z_all: list[Tensor] = []
    m_all: list[Tensor] = []
    order: list[int] = []
    with torch.inference_mode():
        for idx, batch in batches(model, instructions, batch_size):
            got: dict[Any, Tensor] = {}

            def grab(key: Any, got: dict[Any, Tensor] = got) -> hooks.HookFn:
                def fn(x: Tensor, _name: str) -> None:
                    got[key] = x[:, -n_post:].double().cpu()
                return fn

            readers = [(hooks.attn_z(a), grab(("z", a))) for a in range(n_layers)]
            readers += [(hooks.mlp_out(a), grab(("m", a))) for a in range(n_layers)]
            last_logits(model, batch, readers)
            z_all.append(torch.stack([got[("z", a)].flatten(2) for a in range(n_layers)], 1))
            m_all.append(torch.stack([got[("m", a)] for a in range(n_layers)], 1))
            order += idx
    inv = torch.argsort(torch.as_tensor(order))
    return torch.cat(z_all)[inv], torch.cat(m_all)[inv]


def _references(model: HookedModel, reference: Sequence[str], n_post: int, batch_size: int, paired: bool
                ) -> tuple[Tensor, Tensor]:
    """What each node is patched towards: ``z`` and the MLP write of every reference prompt (``paired``) or their
    mean (a leading axis of 1), ``[n | 1, layer, post, width | d_model]``."""
    ref_z, ref_m = _post_values(model, reference, n_post, batch_size)
    return (ref_z, ref_m) if paired else (ref_z.mean(0, keepdim=True), ref_m.mean(0, keepdim=True))


def attribution_patching(model: HookedModel, direction: Direction, clean: Sequence[str], reference: Sequence[str],
                         refusal_tokens: Sequence[int], *, paired: bool = False, batch_size: int = 16,
                         progress: bool = True) -> AtPEstimates:
    """First-order estimates of patching every head and MLP at every post-instruction token of ``clean`` with the
    mean over ``reference`` (``paired``: with ``reference[i]``'s own value, prompts paired by position).

    Costs one forward pass over ``reference`` (no gradients) and, per batch of ``clean``, one forward and two
    backward passes (one per metric; the projection's stops at r̂'s layer), then three patched passes over the
    first batch for the run-time checks (:func:`_linear_check`).
    """
    check_compatible(direction, model)
    if torch.is_inference_mode_enabled():
        raise InputError("attribution patching needs gradients: call it outside torch.inference_mode()")
    if not clean or not reference:
        raise InputError("attribution patching needs clean and reference prompts")
    if paired and len(clean) != len(reference):
        raise InputError(f"paired attribution patching needs equally many clean and reference prompts (got "
                         f"{len(clean)} and {len(reference)})")
    if not refusal_tokens:
        raise InputError("attribution patching needs refusal tokens")
    fmt = chat_format(model.tokenizer)
    n_post = fmt.n_post
    if not -n_post <= direction.position < 0:
        raise InputError(f"the direction's position {direction.position} is not a post-instruction position")
    n_layers, n_heads, d_head = int(model.cfg.n_layers), int(model.cfg.n_heads), int(model.cfg.d_head)
    r = direction.vector.to(torch.float64)
    r = r / r.norm()
    ref_z, ref_m = _references(model, reference, n_post, batch_size, paired)
    n = len(clean)
    heads = {k: torch.zeros(n, n_layers, n_heads, n_post, dtype=torch.float64) for k in METRICS}
    mlps = {k: torch.zeros(n, n_layers, n_post, dtype=torch.float64) for k in METRICS}
    baseline = {k: torch.zeros(n, dtype=torch.float64) for k in METRICS}
    for idx, batch in batches(model, clean, batch_size, progress=progress, desc="attribution patching"):
        got: dict[Any, Tensor] = {}

        def leaf(emb: Tensor, _name: str) -> Tensor:
            return emb if emb.requires_grad else emb.detach().requires_grad_(True)

        def keep(key: Any, got: dict[Any, Tensor] = got) -> hooks.HookFn:
            def fn(x: Tensor, _name: str) -> None:
                got[key] = x
            return fn

        readers: list[tuple[str, hooks.HookFn]] = [(hooks.EMBED, leaf)]
        readers += [(hooks.attn_z(a), keep(("z", a))) for a in range(n_layers)]
        readers += [(hooks.mlp_out(a), keep(("m", a))) for a in range(n_layers)]
        readers.append((hooks.resid_pre(direction.layer), keep("site")))
        with torch.enable_grad():
            logits = last_logits(model, batch, readers)
            site = got["site"][:, direction.position].to(torch.float64) @ r.to(got["site"].device)
            score = refusal_score(logits, refusal_tokens).to(torch.float64)
            rows = torch.as_tensor(idx, dtype=torch.long)
            ref_rows = rows if paired else torch.zeros(len(idx), dtype=torch.long)
            for metric, value in (("projection", site), ("score", score)):
                # Only nodes below r̂'s layer can move its projection; the rest get zero.
                layers = range(direction.layer) if metric == "projection" else range(n_layers)
                inputs = [got[("z", a)] for a in layers] + [got[("m", a)] for a in layers]
                if not inputs:
                    continue
                grads = torch.autograd.grad(value.sum(), inputs, retain_graph=metric == "projection",
                                            allow_unused=True)
                for j, a in enumerate(layers):
                    for kind, g, ref in (("z", grads[j], ref_z), ("m", grads[len(layers) + j], ref_m)):
                        if g is None:
                            continue
                        now = got[(kind, a)][:, -n_post:].detach().double().cpu().flatten(2)
                        g2 = g[:, -n_post:].double().cpu().flatten(2)
                        delta = (ref[ref_rows, a] - now) * g2  # [batch, post, width]
                        if kind == "z":
                            heads[metric][rows, a] = delta.view(len(idx), n_post, n_heads, d_head).sum(-1).transpose(1, 2)
                        else:
                            mlps[metric][rows, a] = delta.sum(-1)
        baseline["projection"][rows] = site.detach().cpu()
        baseline["score"][rows] = score.detach().cpu()
    result = AtPEstimates(heads, mlps, baseline, model_id(model),
                          {"lang": direction.lang, "layer": direction.layer, "position": direction.position},
                          "paired" if paired else "mean", None)
    check = _linear_check(model, direction, clean, refusal_tokens, result, ref_z, ref_m, paired, batch_size)
    return dataclasses.replace(result, linear_check=check)


def _patch_for(model: HookedModel, node: Node, ref_z: Tensor, ref_m: Tensor, paired: bool, n_post: int,
               scale: float = 1.0) -> Callable[[list[int]], list[tuple[str, hooks.HookFn]]]:
    """Hooks that move one node at one post-instruction token to ``clean + scale * (reference - clean)`` (1: the
    reference value itself), in each batch's rows."""
    kind, layer, head, pos = node
    d_head = int(model.cfg.d_head)

    def make(idx: list[int]) -> list[tuple[str, hooks.HookFn]]:
        rows = torch.as_tensor(idx, dtype=torch.long) if paired else torch.zeros(len(idx), dtype=torch.long)
        value = (ref_z if kind == "head" else ref_m)[rows, layer, pos]
        if kind == "head":
            value = value[:, head * d_head:(head + 1) * d_head]

        def fn(x: Tensor, _name: str) -> Tensor:
            x = x.clone()
            flat = x.flatten(2) if kind == "head" else x
            at = x.shape[1] - n_post + pos
            sl = slice(head * d_head, (head + 1) * d_head) if kind == "head" else slice(None)
            cur = flat[:, at, sl]
            flat[:, at, sl] = cur + scale * (value.to(x.dtype).to(x.device) - cur)
            return flat.view_as(x)

        return [(hooks.attn_z(layer) if kind == "head" else hooks.mlp_out(layer), fn)]

    return make


def _linear_check(model: HookedModel, direction: Direction, clean: Sequence[str],
                  refusal_tokens: Sequence[int], result: AtPEstimates, ref_z: Tensor, ref_m: Tensor, paired: bool,
                  batch_size: int) -> float | None:
    """Two checks on the first batch, on the user's model; ExactnessError if either fails.

    1. The MLP of the layer below r̂'s, at r̂'s position, writes into r̂'s projection directly and nothing else
       reads it first: there the estimate must equal exact patching (the float tolerance).
    2. The head of that layer with the largest estimate there (its own layer's MLP reads it, so the path is not
       linear): the estimate must be the derivative of exact patching along the patch, by central differences
       of two patched passes (ε = 0.01; within 2% of the larger size plus 1e-3).
    """
    below = direction.layer - 1
    geo = head_geometry(model)
    if below < 0 or geo.mlp[below].norm is not None:
        return None
    n_post = chat_format(model.tokenizer).n_post
    pos = n_post + direction.position
    rows = list(range(min(len(clean), batch_size)))
    sub_clean = [clean[i] for i in rows]
    sub_z, sub_m = (ref_z[rows], ref_m[rows]) if paired else (ref_z, ref_m)
    base = result.baseline["projection"][rows]

    def patched(node: Node, scale: float) -> Tensor:
        with torch.inference_mode():
            run = prompt_run(model, direction, sub_clean, refusal_tokens, batch_size=batch_size,
                             patch_for=_patch_for(model, node, sub_z, sub_m, paired, n_post, scale))
        return run.projections

    mlp: Node = ("mlp", below, -1, pos)
    err = exactness.require(result.mlps["projection"][rows, below, pos], patched(mlp, 1.0) - base,
                            exactness.compute_dtype(model),
                            f"attribution patching of {_name(mlp)} (a linear path into r̂'s projection): the gradient "
                            "estimate differs from exact patching", n_terms=2 * direction.layer + 1,
                            hint="gradients through this model's hooks do not match its forward pass")
    est = result.heads["projection"][rows, below, :, pos]
    head: Node = ("head", below, int(est.abs().mean(0).argmax()), pos)
    eps = 0.01
    fd = (patched(head, eps) - patched(head, -eps)) / (2 * eps)
    got = result.estimate(head, "projection")[rows]
    worst = float((got - fd).abs().max())
    allowed = 0.02 * float(torch.maximum(got.abs(), fd.abs()).max()) + 1e-3
    if worst > allowed:
        raise exactness.ExactnessError(
            f"attribution patching of {_name(head)}: the gradient estimate is not the derivative of exact patching "
            f"(error {worst:.3g}, allowed {allowed:.3g}); gradients through this model's hooks do not match its "
            "forward pass")
    return max(err, worst)


@dataclass(frozen=True)
class AtPValidation:
    """Attribution patching against exact activation patching on a set of nodes, per metric.

    Attributes:
        nodes: the nodes checked (the largest estimates first, then a seeded random sample of the rest).
        exact / estimate: ``{metric: [node]}`` mean changes over the prompts.
        pearson / spearman: agreement of estimates and exact changes over the nodes, per metric.
        worst_error: the largest |estimate − exact| over the nodes, per metric; ``scale``: the largest |exact|.
    """

    nodes: list[Node]
    exact: dict[str, list[float]]
    estimate: dict[str, list[float]]
    n_top: int
    seed: int

    def why(self, metric: str) -> str | None:
        """Why the correlations of ``metric`` are not defined (e.g. every node checked sits at or above r̂'s layer,
        so none moves its projection), or None."""
        return correlation_why(torch.tensor(self.estimate[metric]), torch.tensor(self.exact[metric]), "node changes")

    def pearson(self, metric: str) -> float:
        if self.why(metric):
            return float("nan")
        a, b = torch.tensor(self.estimate[metric]), torch.tensor(self.exact[metric])
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    def spearman(self, metric: str) -> float:
        if self.why(metric):
            return float("nan")
        return float(spearman(torch.tensor(self.estimate[metric]), torch.tensor(self.exact[metric])))

    def worst_error(self, metric: str) -> float:
        return max(abs(e - x) for e, x in zip(self.estimate[metric], self.exact[metric], strict=True))

    def scale(self, metric: str) -> float:
        return max(abs(x) for x in self.exact[metric])

    def to_json(self) -> dict[str, Any]:
        return {"nodes": [_name(n) for n in self.nodes], "n_top": self.n_top, "seed": self.seed,
                "exact": self.exact, "estimate": self.estimate,
                "summary": {m: {**nullable("pearson", self.pearson(m), self.why(m)),
                                **nullable("spearman", self.spearman(m), self.why(m)),
                                "worst_error": self.worst_error(m), "max_abs_exact": self.scale(m)} for m in METRICS}}

    def __repr__(self) -> str:
        parts = [f"{m}: pearson {self.pearson(m):.3f}, worst error {self.worst_error(m):.3g} (largest exact "
                 f"{self.scale(m):.3g})" for m in METRICS]
        return f"AtPValidation({len(self.nodes)} nodes; " + "; ".join(parts) + ")"

    def _repr_html_(self) -> str:
        rows = (f"<tr><td>{m}</td><td>{self.pearson(m):.3f}</td><td>{self.spearman(m):.3f}</td>"
                f"<td>{self.worst_error(m):.3g}</td><td>{self.scale(m):.3g}</td></tr>" for m in METRICS)
        return table(f"Attribution patching vs exact patching · {len(self.nodes)} nodes ({self.n_top} largest, the "
                     f"rest random, seed {self.seed})", ["metric", "Pearson", "Spearman", "worst |error|",
                                                         "largest |exact|"], rows)


def validate_atp(model: HookedModel, direction: Direction, clean: Sequence[str], reference: Sequence[str],
                 refusal_tokens: Sequence[int], estimates: AtPEstimates, *, n_top: int = 8, n_random: int = 8,
                 metric: str = "score", seed: int = 0, batch_size: int = 16, progress: bool = True) -> AtPValidation:
    """Exact activation patching of the ``n_top`` nodes with the largest ``metric`` estimate and ``n_random``
    others (seeded), one patched pass over ``clean`` each, against ``estimates``."""
    paired = estimates.reference == "paired"
    n_post = chat_format(model.tokenizer).n_post
    top = estimates.top_nodes(n_top, metric)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    rest: list[Node] = [("head", a, b, p) for a in range(n_layers) for b in range(n_heads) for p in range(n_post)]
    rest += [("mlp", a, -1, p) for a in range(n_layers) for p in range(n_post)]
    rest = [x for x in rest if x not in top]
    nodes = top + random.Random(seed).sample(rest, min(n_random, len(rest)))
    ref_z, ref_m = _references(model, reference, n_post, batch_size, paired)
    exact: dict[str, list[float]] = {m: [] for m in METRICS}
    est: dict[str, list[float]] = {m: [] for m in METRICS}
    with torch.inference_mode():
        for node in tqdm(nodes, desc="exact patching", disable=not progress, leave=False):
            run = prompt_run(model, direction, clean, refusal_tokens,
                             patch_for=_patch_for(model, node, ref_z, ref_m, paired, n_post), batch_size=batch_size)
            exact["projection"].append(float((run.projections - estimates.baseline["projection"]).mean()))
            exact["score"].append(float((run.scores - estimates.baseline["score"]).mean()))
            for m in METRICS:
                est[m].append(float(estimates.estimate(node, m).mean()))
    return AtPValidation(nodes, exact, est, n_top, seed)
