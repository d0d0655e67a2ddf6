"""Interventions on the refusal direction: directional ablation, activation addition, weight orthogonalisation.

* :func:`ablate` removes r̂ from every write into the residual stream (the embedding and every attention and
  MLP write, at every layer and position, generated tokens included): ``x <- x - (x . r̂) r̂``. Since the
  stream is a sum of those writes, r̂ never appears in it. A write is what is actually added to the stream
  (:func:`~refusal_circuits.geometry.write_hooks`): ``resid_pre[0]`` for the embedding (after
  Gemma's and Granite's embedding scales and GPT-2's position embedding), a post-norm's *output* where a sublayer
  has one (Gemma-2/3, OLMo-2: projecting r̂ out of the attention output *before* the norm would not remove it,
  the norm's weight turns other directions back into r̂), else the sublayer's raw output (a residual multiplier
  after it, Granite's, is a scalar and keeps r̂'s span). This is the architecture-independent definition:
  projecting r̂ out of the stream after every write; for Qwen2 and Llama it is the same hooks as before.
* :func:`actadd` adds ``alpha * r̂`` to ``resid_pre[layer]`` at every position (Arditi et al.'s activation
  addition; ``alpha`` defaults to the norm of the unnormalised difference in means).
* :func:`orthogonalize` makes the ablation permanent: it projects r̂ out of every weight and bias that writes
  into the residual stream and returns a new model; :func:`export_hf` writes it as a plain Hugging Face
  directory that transformers and :func:`~refusal_circuits.models.load_model` load. Scalar multipliers
  (Gemma's ``sqrt(d_model)`` embedding scale, Granite's multipliers) commute with the projection. A post-norm
  after a writer does not: ``w * P(o) / scale(P(o))`` is not ``P(w * o / scale(o))``, so no weight edit equals the
  ablation, and :func:`orthogonalize` refuses such models (use :func:`ablate`).

The first two are :class:`~refusal_circuits.hooks.HookHandle` objects: use them as context managers (they nest,
and their hooks are removed when an exception flies) or call ``remove()``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from refusal_circuits import hooks
from refusal_circuits.directions import Direction, DirectionVector
from refusal_circuits.errors import InputError
from refusal_circuits.geometry import head_geometry, write_hooks
from refusal_circuits.models import HookedModel, boot_bridge, hf_model_of

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def _unit(direction: Direction | Tensor, model: HookedModel, dtype: torch.dtype = torch.float32) -> DirectionVector:
    """The direction as a unit vector of the model's width (a one-line error otherwise)."""
    vec = direction.vector if isinstance(direction, Direction) else direction
    if vec.ndim != 1 or vec.shape[0] != int(model.cfg.d_model):
        raise InputError(f"the direction has shape {tuple(vec.shape)}; the model needs ({int(model.cfg.d_model)},)")
    vec = vec.detach().to(dtype)
    norm = vec.norm()
    if not torch.isfinite(norm) or float(norm) == 0.0:
        raise InputError("the direction is zero or not finite")
    return vec / norm


def residual_write_hooks(model: HookedModel) -> list[str]:
    """Hook points whose outputs are exactly the writes into the residual stream: ``resid_pre[0]`` (the whole
    embedding), then each layer's attention and MLP write (a post-norm's output where there is one)."""
    return write_hooks(model)


def project_out(x: Tensor, unit: Tensor) -> Tensor:
    """``x - (x . r̂) r̂`` along the last axis, in ``x``'s dtype."""
    r = unit.to(device=x.device, dtype=x.dtype)
    return x - (x @ r)[..., None] * r


def ablate(model: HookedModel, direction: Direction | Tensor) -> hooks.HookHandle:
    """Directional ablation of r̂ from every residual-stream write, at every layer and position.

    >>> with ablate(model, direction):            # doctest: +SKIP
    ...     completions = generate(model, prompts)

    Works on every architecture :func:`~refusal_circuits.geometry.head_geometry` describes, post-norms included
    (where :func:`orthogonalize` refuses).
    """
    unit = _unit(direction, model)

    def fn(x: Tensor, _name: str) -> Tensor:
        return project_out(x, unit)

    return hooks.add_hooks(model, [(name, fn) for name in residual_write_hooks(model)])


def orthonormal_basis(vectors: Tensor, model: HookedModel, *, rtol: float = 1e-6) -> Tensor:
    """An orthonormal basis ``[k, d_model]`` (float32) of the span of ``vectors`` ``[k, d_model]``, in their order
    (Gram-Schmidt by QR: the first row is the first vector's direction). A one-line error if the vectors are not of
    the model's width, not finite, or linearly dependent (a basis of fewer dimensions than asked would ablate less
    than the caller thinks)."""
    d_model = int(model.cfg.d_model)
    if vectors.ndim != 2 or vectors.shape[1] != d_model or vectors.shape[0] == 0:
        raise InputError(f"a subspace needs vectors of shape (k, {d_model}); got {tuple(vectors.shape)}")
    v = vectors.detach().double()
    if not torch.isfinite(v).all():
        raise InputError("the subspace's vectors are not finite")
    q, r = torch.linalg.qr(v.T)
    diag = r.diagonal().abs()
    if float(diag.min()) <= rtol * float(v.norm(dim=1).max()):
        raise InputError(f"the subspace's {v.shape[0]} vectors are linearly dependent: they span fewer dimensions")
    return (q * torch.sign(r.diagonal())).T.float()


def project_out_subspace(x: Tensor, basis: Tensor) -> Tensor:
    """``x - (x Q^T) Q`` along the last axis for an orthonormal basis ``Q`` ``[k, d]``, in ``x``'s dtype."""
    q = basis.to(device=x.device, dtype=x.dtype)
    return x - (x @ q.T) @ q


def ablate_subspace(model: HookedModel, vectors: Tensor) -> hooks.HookHandle:
    """:func:`ablate` of a k-dimensional subspace: its span (``vectors`` ``[k, d_model]``, orthonormalised here)
    projected out of every residual-stream write, at every layer and position. For one vector it is
    :func:`ablate`; for orthonormal vectors, nested :func:`ablate` of each (tested)."""
    basis = orthonormal_basis(vectors, model)

    def fn(x: Tensor, _name: str) -> Tensor:
        return project_out_subspace(x, basis)

    return hooks.add_hooks(model, [(name, fn) for name in residual_write_hooks(model)])


def actadd(model: HookedModel, direction: Direction | Tensor, *, layer: int | None = None, alpha: float | None = None
        ) -> hooks.HookHandle:
    """Activation addition: ``resid_pre[layer] += alpha * r̂`` at every position.

    Args:
        direction: a :class:`Direction` (whose ``layer`` and ``norm`` are the defaults) or a vector.
        layer: where to add; defaults to the direction's layer.
        alpha: the coefficient; defaults to :func:`default_alpha`: the coefficient calibrated at selection
            (``direction.meta["actadd"]``), else the direction's ``norm`` (Arditi et al. add the unnormalised
            difference in means). Negative values subtract.
    """
    unit = _unit(direction, model)
    if layer is None:
        if not isinstance(direction, Direction):
            raise InputError("activation addition of a bare vector needs layer=")
        layer = direction.layer
    if alpha is None:
        if not isinstance(direction, Direction):
            raise InputError("activation addition of a bare vector needs alpha=")
        alpha = default_alpha(direction)
    n_layers = int(model.cfg.n_layers)
    if not 0 <= layer < n_layers:
        raise InputError(f"layer {layer} out of range; the model has {n_layers} layers")
    coef = float(alpha)

    def fn(x: Tensor, _name: str) -> Tensor:
        return x + coef * unit.to(device=x.device, dtype=x.dtype)

    return hooks.add_hooks(model, [(hooks.resid_pre(layer), fn)])


def default_alpha(direction: Direction) -> float:
    """The calibrated activation-addition coefficient of ``direction``, or its norm if it has none."""
    calibrated = direction.meta.get("actadd", {}).get("alpha") if isinstance(direction.meta.get("actadd"), dict) else None
    return float(calibrated) if calibrated is not None else direction.norm


# --- weight orthogonalisation ---------------------------------------------------------------------------------

_WRAPPER = "._original_component"


def clean_state_dict(model: HookedModel | torch.nn.Module) -> dict[str, Tensor]:
    """The Hugging Face state dict of a bridge (or a plain HF model) under the architecture's own key names.

    The bridge wraps each Hugging Face module, which adds ``_original_component`` to the keys and aliases some
    parameters under extra names; both are undone here by keeping exactly the keys a fresh model expects.
    """
    hf: Any = hf_model_of(model) or model  # a Hugging Face model: transformers' own attributes
    expected = _expected_keys(hf.config)
    out: dict[str, Tensor] = {}
    for key, value in hf.state_dict().items():
        clean = key.replace(_WRAPPER, "")
        if clean in expected and clean not in out:
            out[clean] = value
    missing = expected - set(out)
    if missing:
        raise RuntimeError(f"could not recover Hugging Face weights for {sorted(missing)[:5]}")
    return out


def _expected_keys(config: Any) -> set[str]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    return set(fresh.state_dict())


def _writer_parameters(model: HookedModel, expected: set[str]) -> dict[str, str]:
    """Clean parameter names of everything that writes into the residual stream, with what they are.

    Found through the bridge's own component mapping (``embed``, ``blocks[l].attn.o``, ``blocks[l].mlp.out``),
    so any architecture TransformerLens supports is covered, biases included.
    """
    hf = hf_model_of(model)
    if hf is None:
        raise InputError("orthogonalize needs a TransformerBridge (it edits the Hugging Face weights)")
    names: dict[int, str] = {}
    for n, p in hf.named_parameters(remove_duplicate=False):
        clean = n.replace(_WRAPPER, "")
        if clean in expected:  # the bridge also lists each parameter under alias paths
            names.setdefault(id(p), clean)
    found: dict[str, str] = {}

    def take(component: Any, kind: str) -> None:
        module = getattr(component, "original_component", component)
        # GPT-2's Conv1D stores its weight [in, out]: the residual is the last axis, as for an embedding's rows.
        layout = "rows" if type(module).__name__ == "Conv1D" else "linear"
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in names:
                found[names[id(p)]] = f"{kind}.{pname}" + (f".{layout}" if pname == "weight" else "")

    take(model.embed, "embed")
    if getattr(model.cfg, "positional_embedding_type", None) == "standard" and hasattr(model, "pos_embed"):
        take(model.pos_embed, "pos_embed")
    for block in model.blocks:
        take(block.attn.o, "attn_out")
        take(block.mlp.out, "mlp_out")
    return found


def check_orthogonalizable(model: HookedModel) -> None:
    """Raise :class:`InputError` unless projecting r̂ out of the writers' weights equals :func:`ablate` on
    ``model``: it does not where a norm follows a writer (Gemma-2, Gemma-3, OLMo-2 post-norms)."""
    geo = head_geometry(model)
    if geo.has_post_norm:
        raise InputError(
            f"{geo.architecture} normalises its attention and MLP outputs after the output projection "
            f"({', '.join(geo.post_norms())}): orthogonalising o_proj and down_proj no longer removes r̂ from what "
            "reaches the residual stream (the norm rescales each token and its weight turns other directions back "
            "into r̂), and no weight edit equals directional ablation there; use hook ablation instead: "
            "refusal_circuits.interventions.ablate(model, direction)")


def orthogonalized_state_dict(model: HookedModel, direction: Direction | Tensor) -> tuple[dict[str, Tensor], bool]:
    """Raw HF weights with r̂ projected out of every residual-stream write; returns ``(state, untied)``.

    Weights are edited in float64 and cast back. If the input and output embeddings were tied, the output
    embedding keeps the original weights and ``untied`` is True (the config must then be untied). Raises
    :class:`InputError` for models where no weight edit equals the ablation (:func:`check_orthogonalizable`).
    """
    unit = _unit(direction, model).to(torch.float64)
    check_orthogonalizable(model)
    state = clean_state_dict(model)
    writers = _writer_parameters(model, set(state))  # the clean keys are exactly the architecture's own
    tied = bool(getattr(getattr(hf_model_of(model) or model, "config", None), "tie_word_embeddings", False))
    out = dict(state)
    for name, kind in writers.items():
        w = state[name].to(torch.float64)
        if kind.startswith(("embed", "pos_embed")) or kind.endswith(".rows"):
            edited = w - (w @ unit)[:, None] * unit[None, :]  # rows are residual vectors (Conv1D: x W, [in, out])
        elif w.ndim == 2:
            edited = w - unit[:, None] * (unit @ w)[None, :]  # nn.Linear: out = W x, out in the residual
        else:
            edited = w - (w @ unit) * unit  # a bias
        out[name] = edited.to(state[name].dtype).contiguous()
    # The embedding is edited; an output embedding that shares its storage (tied weights) must keep the
    # original, so the new model gets its own copy and an untied config.
    hf: Any = hf_model_of(model) or model  # a Hugging Face model: transformers' own attributes
    embed_name = next(n for n, k in writers.items() if k.startswith("embed.weight"))
    embed_ptr = state[embed_name].data_ptr()
    for n, p in hf.named_parameters(remove_duplicate=False):
        clean = n.replace(_WRAPPER, "")
        if clean != embed_name and clean in out and p.data_ptr() == embed_ptr:
            out[clean] = state[embed_name].detach().clone()
    untied = tied
    return out, untied


def orthogonalize(model: HookedModel, direction: Direction | Tensor) -> TransformerBridge:
    """A new model (a TransformerBridge in raw weights) whose weights never write r̂ into the residual stream.

    Its logits equal those of ``model`` under :func:`ablate` up to float32 rounding (checked per architecture in
    ``tests/test_architectures.py``). The input model is not changed; the new one holds a second copy of the
    weights. Models with a norm after their writers (Gemma-2, Gemma-3, OLMo-2) are refused with
    :class:`InputError`: use :func:`ablate` there.
    """
    from transformers import AutoModelForCausalLM

    hf = hf_model_of(model)
    if hf is None:
        raise InputError("orthogonalize needs a TransformerBridge (it edits the Hugging Face weights)")
    state, untied = orthogonalized_state_dict(model, direction)
    config = copy.deepcopy(hf.config)
    if untied:
        config.tie_word_embeddings = False
    new = AutoModelForCausalLM.from_config(config, torch_dtype=next(hf.parameters()).dtype,
                                           attn_implementation="eager")
    new.load_state_dict(state, strict=True)
    new.to(next(hf.parameters()).device)
    new.eval()
    new.requires_grad_(False)
    source = getattr(model, "refusal_circuits_source", None) or hf.config.name_or_path
    spec = getattr(model, "refusal_circuits_spec", None) or source
    bridge = boot_bridge(new, model.tokenizer, source, f"{spec}+orthogonalized", device=next(hf.parameters()).device,
                         dtype=next(hf.parameters()).dtype)
    _check_equals_ablation(model, new, direction)
    return bridge


@torch.inference_mode()
def _check_equals_ablation(model: HookedModel, edited_hf: torch.nn.Module, direction: Direction | Tensor) -> None:
    """Raise :class:`~refusal_circuits.exactness.ExactnessError` unless the edited weights' logits equal hook
    ablation's on a short probe sequence (two forward passes of 12 tokens): the run-time proof that the weight
    edit covered every writer of this architecture."""
    from refusal_circuits import exactness
    from refusal_circuits.geometry import architecture_of

    hf = hf_model_of(model)
    assert hf is not None
    vocab = int(hf.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, min(vocab, 4096), (1, 12), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(hf.parameters()).device)
    with ablate(model, direction):
        want = hf(input_ids=ids, use_cache=False).logits
    got = edited_hf(input_ids=ids, use_cache=False).logits
    exactness.require(got, want, exactness.compute_dtype(hf), f"orthogonalized weights of {architecture_of(model)} "
                      "do not reproduce hook ablation", n_terms=2 * int(model.cfg.n_layers) + 1,
                      hint="some residual-stream writer of this architecture was not edited; use ablate() instead")


def export_hf(model: HookedModel, out_dir: str | os.PathLike[str], *, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a bridge or HF model) as a Hugging Face directory, atomically.

    The directory holds ``model.safetensors``, ``config.json``, the generation config and the tokenizer, and
    loads with ``AutoModelForCausalLM.from_pretrained`` and with ``refusal_circuits.load_model``.
    """
    import json

    from safetensors.torch import save_file

    from refusal_circuits.io import atomic_dir

    hf: Any = hf_model_of(model) or model  # a Hugging Face model: transformers' own attributes
    state = {k: v.detach().contiguous().clone() for k, v in clean_state_dict(model).items()}
    target = Path(out_dir)
    with atomic_dir(target) as tmp:
        hf.config.save_pretrained(tmp)
        if getattr(hf, "generation_config", None) is not None:
            hf.generation_config.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if extra_meta:
            (tmp / "refusal_circuits.json").write_text(json.dumps(extra_meta, indent=2, ensure_ascii=False))
    return target
