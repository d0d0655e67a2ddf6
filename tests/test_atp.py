"""Attribution patching on tiny random models: exact where the path is linear (against a hand-patched Hugging Face
forward), the gradient of the exact patch everywhere else (against central finite differences of exact patching),
and the validation record against exact patching."""

from __future__ import annotations

import pytest
import torch

from refusal_circuits import hooks
from refusal_circuits.atp import AtPEstimates, attribution_patching, validate_atp
from refusal_circuits.chat import chat_format
from refusal_circuits.directions import Direction
from refusal_circuits.errors import InputError
from refusal_circuits.patching import prompt_run
from refusal_circuits.scores import refusal_tokens_from_strings
from tests.helpers import SHORT_PROMPTS, random_direction

pytestmark = pytest.mark.tiny

CLEAN, REFERENCE = SHORT_PROMPTS
_direction = random_direction


@pytest.fixture(scope="module")
def deep(deep_tiny_model):
    return deep_tiny_model


@pytest.fixture(scope="module")
def setup(deep):
    d = _direction(deep, layer=2)
    refusal = refusal_tokens_from_strings(deep.tokenizer, ["I"]).for_lang("en")
    est = attribution_patching(deep, d, CLEAN, REFERENCE, refusal, batch_size=3, progress=False)
    return d, refusal, est


def _ids(model, text: str) -> torch.Tensor:
    fmt = chat_format(model.tokenizer)
    return torch.tensor([model.tokenizer.encode(fmt.render(model.tokenizer, text), add_special_tokens=False)])


def _hf_mlp(model, layer: int, text: str, n_post: int) -> torch.Tensor:
    """The MLP output of ``layer`` at the post-instruction tokens, from the plain Hugging Face model."""
    hf, ids = model.original_model, _ids(model, text)
    seen = {}
    h = hf.model.layers[layer].mlp.register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("m", out[0, -n_post:].double()))
    try:
        hf(input_ids=ids)
    finally:
        h.remove()
    return seen["m"]


def _hf_mlp_projection(model, direction: Direction, layer: int, pos: int, value, text: str) -> float:
    """``resid_pre[r̂ layer] . r̂`` at r̂'s position with MLP ``layer``'s output at post-instruction token ``pos``
    set to ``value`` (None: clean), from the plain Hugging Face model."""
    hf, fmt, ids = model.original_model, chat_format(model.tokenizer), _ids(model, text)

    def post(_m, _a, out):
        if value is None:
            return None
        out = out.clone()
        out[:, out.shape[1] - fmt.n_post + pos] = value.to(out.dtype)
        return out

    h = hf.model.layers[layer].mlp.register_forward_hook(post)
    try:
        out = hf(input_ids=ids, output_hidden_states=True)
    finally:
        h.remove()
    r = direction.vector.double() / direction.vector.double().norm()
    return float(out.hidden_states[direction.layer][0, direction.position].double() @ r)


def test_exact_where_the_path_is_linear(deep, setup):
    """The MLP of the layer below r̂'s writes into r̂'s projection only directly: patched with the reference mean by
    hand in Hugging Face, AtP's estimate is the exact change at r̂'s position and exactly zero after it. (A head of
    that layer is not linear: its own layer's MLP reads it; see the finite-difference test.)"""
    d, _refusal, est = setup
    n_post = chat_format(deep.tokenizer).n_post
    pos = n_post + d.position
    value = torch.stack([_hf_mlp(deep, 1, t, n_post) for t in REFERENCE]).mean(0)[pos]
    largest = 0.0
    for i, text in enumerate(CLEAN):
        exact = _hf_mlp_projection(deep, d, 1, pos, value, text) - _hf_mlp_projection(deep, d, 1, pos, None, text)
        assert abs(float(est.mlps["projection"][i, 1, pos]) - exact) < 1e-5 * (1 + abs(exact))
        largest = max(largest, abs(exact))
    assert largest > 1e-3  # the comparison is not 0 == 0
    assert bool((est.mlps["projection"][:, 1, pos + 1:] == 0).all())
    assert est.linear_check is not None and est.linear_check < 1e-3
    # Nodes at or above r̂'s layer cannot move its projection.
    assert bool((est.heads["projection"][:, 2:] == 0).all()) and bool((est.mlps["projection"][:, 2:] == 0).all())


def _scaled_patch(model, node, eps: float, ref: torch.Tensor, n_post: int):
    kind, layer, head, pos = node
    d_head = int(model.cfg.d_head)

    def fn(x, _name):
        x = x.clone()
        flat = x.flatten(2)
        at = x.shape[1] - n_post + pos
        sl = slice(head * d_head, (head + 1) * d_head) if kind == "head" else slice(None)
        flat[:, at, sl] = flat[:, at, sl] + eps * (ref.to(x.dtype) - flat[:, at, sl])
        return flat.view_as(x)

    return lambda _idx: [(hooks.attn_z(layer) if kind == "head" else hooks.mlp_out(layer), fn)]


@pytest.mark.parametrize("node", [("head", 0, 1, -1), ("mlp", 0, -1, -2), ("head", 2, 0, -1), ("mlp", 1, -1, -1),
                                  ("head", 1, 2, -2)])
def test_estimate_is_the_derivative_of_exact_patching(deep, setup, node):
    """Nonlinear paths: AtP is d/dε of the exact patch clean + ε (ref − clean) at ε = 0, by central differences of
    patched forward passes (the score for every node, the projection below r̂'s layer). One prompt per run, so
    each prompt's own clean value is moved."""
    d, refusal, est = setup
    n_post = chat_format(deep.tokenizer).n_post
    kind, layer, head, pos = node
    pos = n_post + pos  # the last template token, or r̂'s
    node = (kind, layer, head, pos)
    d_head = int(deep.cfg.d_head)
    ref_all = []
    for t in REFERENCE:
        got = {}
        name = hooks.attn_z(layer) if kind == "head" else hooks.mlp_out(layer)
        run = prompt_run(deep, d, [t], refusal, patch_for=lambda _i, got=got, name=name: [
            (name, lambda x, _n: got.__setitem__("x", x.flatten(2)[0, x.shape[1] - n_post + pos].double()))])
        del run
        ref_all.append(got["x"])
    ref = torch.stack(ref_all).mean(0)
    if kind == "head":
        ref = ref[head * d_head:(head + 1) * d_head]
    eps = 1e-2
    largest = 0.0
    for metric in ("score", "projection"):
        if metric == "projection" and layer >= d.layer:
            continue
        for i, text in enumerate(CLEAN):
            plus = prompt_run(deep, d, [text], refusal, patch_for=_scaled_patch(deep, node, eps, ref, n_post))
            minus = prompt_run(deep, d, [text], refusal, patch_for=_scaled_patch(deep, node, -eps, ref, n_post))
            key = "scores" if metric == "score" else "projections"
            fd = float((getattr(plus, key) - getattr(minus, key))[0]) / (2 * eps)
            got = float(est.estimate(node, metric)[i])
            assert abs(got - fd) < 2e-3 * (1 + abs(fd)), (metric, i, got, fd)
            largest = max(largest, abs(fd))
    assert largest > 1e-3  # the node moves the metric: the comparison is not 0 == 0


def test_validation_against_exact_patching(deep, setup):
    d, refusal, est = setup
    val = validate_atp(deep, d, CLEAN, REFERENCE, refusal, est, n_top=3, n_random=3, batch_size=3, progress=False)
    assert len(val.nodes) == 6 and len(set(val.nodes)) == 6
    summary = val.to_json()["summary"]
    for m in ("score", "projection"):
        assert summary[m]["worst_error"] >= 0 and summary[m]["max_abs_exact"] > 0
        assert -1 <= summary[m]["pearson"] <= 1
    assert "Pearson" in val._repr_html_() and "worst error" in repr(val)
    # The same seed picks the same random nodes.
    again = validate_atp(deep, d, CLEAN, REFERENCE, refusal, est, n_top=3, n_random=3, batch_size=3, progress=False)
    assert again.nodes == val.nodes and again.exact == val.exact


def test_paired_reference_is_exact_on_the_linear_path(deep):
    d = _direction(deep, layer=2, seed=5)
    refusal = refusal_tokens_from_strings(deep.tokenizer, ["I"]).for_lang("en")
    est = attribution_patching(deep, d, CLEAN, REFERENCE, refusal, paired=True, batch_size=2, progress=False)
    assert isinstance(est, AtPEstimates) and est.reference == "paired"
    n_post = chat_format(deep.tokenizer).n_post
    pos = n_post + d.position
    for i, (text, partner) in enumerate(zip(CLEAN, REFERENCE, strict=True)):
        value = _hf_mlp(deep, 1, partner, n_post)[pos]
        exact = _hf_mlp_projection(deep, d, 1, pos, value, text) - _hf_mlp_projection(deep, d, 1, pos, None, text)
        assert abs(float(est.mlps["projection"][i, 1, pos]) - exact) < 1e-5 * (1 + abs(exact))


def test_bad_input_and_hook_hygiene(deep, setup):
    d, refusal, _est = setup
    with pytest.raises(InputError, match="equally many"):
        attribution_patching(deep, d, CLEAN, REFERENCE[:2], refusal, paired=True, progress=False)
    with pytest.raises(InputError, match="clean and reference"):
        attribution_patching(deep, d, [], REFERENCE, refusal, progress=False)
    with pytest.raises(InputError, match="refusal tokens"):
        attribution_patching(deep, d, CLEAN, REFERENCE, [], progress=False)
    with pytest.raises(InputError, match="unknown metric"):
        _est.head_totals("logits")
    with torch.inference_mode(), pytest.raises(InputError, match="inference_mode"):
        attribution_patching(deep, d, CLEAN, REFERENCE, refusal, progress=False)
    assert hooks.count_hooks(deep) == 0
