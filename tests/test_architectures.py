"""Every supported architecture, on a tiny random model: attribution, source split, DLA, ablation and
orthogonalisation against independent expectations computed from the plain Hugging Face modules in float64.

The expectations never use the library's geometry: a head's write is read off the Hugging Face forward pass
itself. For each layer the output projection's input ``z`` (split per head), its output ``o`` and the tensor
actually added to the residual stream ``A`` are captured with forward hooks on plain modules (``A`` is the post-norm
output where the architecture has one, else ``o``, times Granite's ``residual_multiplier``; which module that is
comes from each architecture's ``modeling_*.py``, written down in :data:`LAYOUT`). Every map from ``o`` to ``A``
here scales each channel of each token by its own number, ``A_i = (A_i / o_i) o_i``, so head ``h``'s write is
``(A / o) * (z_h W_O[h]^T)``: the naive, per-head ``d_model`` route, with the norm's per-token scale taken from the
model's own output. Table in docs/architectures.md; each row names the tests here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from refusal_circuits import attribution as attr
from refusal_circuits import exactness, hooks, interventions
from refusal_circuits.chat import tokenize_chat
from refusal_circuits.errors import InputError
from refusal_circuits.exactness import ExactnessError
from refusal_circuits.models import load_model
from refusal_circuits.scores import refusal_tokens_from_strings
from tests.helpers import ARCHITECTURES, tiny_arch_dir

pytestmark = pytest.mark.tiny

PROMPTS = ["hi", "tell me a story about a cat", "what is two plus two?"]
SUFFIX = " zz!"
#: "Exact" in float32: errors within this share of the largest value compared.
REL = 1e-4


@dataclass(frozen=True)
class Layout:
    """Where each architecture's residual writers sit in its Hugging Face modules (from its ``modeling_*.py``)."""

    layers: str  # the decoder layers
    attn: str  # attention module, relative to a layer
    o_proj: str  # output projection, relative to a layer
    final_norm: str
    embeds: tuple[str, ...]  # modules whose outputs add up to resid_pre[0] (before any decoder-level multiplier)
    attn_post_norm: str | None = None  # relative to a layer
    mlp_post_norm: str | None = None
    orthogonalizable: bool = True


_LLAMA = Layout("model.layers", "self_attn", "self_attn.o_proj", "model.norm", ("model.embed_tokens",))
_POST = Layout("model.layers", "self_attn", "self_attn.o_proj", "model.norm", ("model.embed_tokens",),
               "post_attention_layernorm", "post_feedforward_layernorm", orthogonalizable=False)
LAYOUT: dict[str, Layout] = {
    "qwen2": _LLAMA, "llama": _LLAMA, "mistral": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "granite": _LLAMA,
    "phi3": _LLAMA, "gemma2": _POST, "gemma3": _POST, "olmo2": _POST,
    "gpt2": Layout("transformer.h", "attn", "attn.c_proj", "transformer.ln_f", ("transformer.wte", "transformer.wpe")),
    "gpt_neox": Layout("gpt_neox.layers", "attention", "attention.dense", "gpt_neox.final_layer_norm",
                       ("gpt_neox.embed_in",)),
    "phi": Layout("model.layers", "self_attn", "self_attn.dense", "model.final_layernorm", ("model.embed_tokens",)),
}
assert set(LAYOUT) == set(ARCHITECTURES)


def _module(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


class Built:
    """One architecture's tiny model: its directory, the library's bridge (float32), a float64 plain HF twin."""

    def __init__(self, arch: str, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.arch, self.path, self.layout = arch, path, LAYOUT[arch]
        self.model = load_model(str(path))
        self.ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager")
        self.ref.eval()
        self.ref.requires_grad_(False)
        self.multiplier = float(getattr(self.ref.config, "residual_multiplier", None) or 1.0)
        self.r = torch.randn(int(self.model.cfg.d_model), generator=torch.Generator().manual_seed(3),
                             dtype=torch.float64)
        self.rhat = self.r / self.r.norm()
        tok = self.model.tokenizer
        self.refusal = refusal_tokens_from_strings(tok, ["I"])
        self.compliance = [tok("S")["input_ids"][0], tok("T")["input_ids"][0]]
        self._result: attr.Attribution | None = None

    @property
    def result(self) -> attr.Attribution:
        if self._result is None:
            self._result = attr.attribute(self.model, self.r.float(), PROMPTS, refusal_tokens=self.refusal,
                                          compliance_tokens=self.compliance, batch_size=2, adv_suffix=SUFFIX,
                                          progress=False)
        return self._result

    def layers(self) -> list[Any]:
        return list(_module(self.ref, self.layout.layers))

    def reference(self, text: str) -> dict[str, Any]:
        """Plain float64 Hugging Face forward of one chat-formatted prompt, with every write read off its modules."""
        batch = tokenize_chat(self.model.tokenizer, [text], adv_suffix=SUFFIX)
        lay = self.layout
        got: dict[str, Any] = {}
        handles = []

        def keep(key: str, pre: bool = False) -> Any:
            if pre:
                return lambda _m, args: got.__setitem__(key, args[0].detach())
            return lambda _m, _a, out: got.__setitem__(key, (out[0] if isinstance(out, tuple) else out).detach())

        for i, layer in enumerate(self.layers()):
            o_proj = _module(layer, lay.o_proj)
            handles.append(o_proj.register_forward_pre_hook(keep(f"z{i}", pre=True)))
            handles.append(o_proj.register_forward_hook(keep(f"o{i}")))
            if lay.attn_post_norm:
                handles.append(_module(layer, lay.attn_post_norm).register_forward_hook(keep(f"a{i}")))
            handles.append(layer.mlp.register_forward_hook(keep(f"mlp{i}")))
            if lay.mlp_post_norm:
                handles.append(_module(layer, lay.mlp_post_norm).register_forward_hook(keep(f"m{i}")))
        handles.append(_module(self.ref, lay.final_norm).register_forward_pre_hook(keep("final", pre=True)))
        try:
            with torch.inference_mode():
                out = self.ref(input_ids=batch.input_ids, output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()
        got["hidden"] = out.hidden_states
        got["logits"] = out.logits[0, -1]
        got["n"] = batch.input_ids.shape[1]
        return got

    def expected(self, text: str) -> dict[str, torch.Tensor]:
        """Per-component writes onto r̂ of one prompt, the naive way (see the module docstring)."""
        ref = self.reference(text)
        cfg = self.model.cfg
        n_heads, d_head = int(cfg.n_heads), int(cfg.d_head)
        heads, bias, mlps = [], [], []
        for i, layer in enumerate(self.layers()):
            o_proj = _module(layer, self.layout.o_proj)
            w = o_proj.weight.T if type(o_proj).__name__ == "Conv1D" else o_proj.weight  # [d_model, h * d]
            z = ref[f"z{i}"][0].view(-1, n_heads, d_head)
            per_head = torch.einsum("shd,mhd->shm", z, w.view(-1, n_heads, d_head))  # [pos, head, d_model]
            o = ref[f"o{i}"][0]
            write = (ref[f"a{i}"][0] if self.layout.attn_post_norm else o) * self.multiplier
            ratio = write / o  # each channel's gain at each token: w_c / scale_token (times m)
            head_writes = (ratio[:, None, :] * per_head) @ self.rhat  # [pos, head]
            heads.append(head_writes.T)
            bias.append(write @ self.rhat - head_writes.sum(-1))
            mlp_write = (ref[f"m{i}"][0] if self.layout.mlp_post_norm else ref[f"mlp{i}"][0]) * self.multiplier
            mlps.append(mlp_write @ self.rhat)
        hs = ref["hidden"]
        resid = torch.stack([h[0] @ self.rhat for h in hs[:-1]] + [ref["final"][0] @ self.rhat])
        return {"heads": torch.stack(heads), "bias": torch.stack(bias), "mlps": torch.stack(mlps),
                "embed": hs[0][0] @ self.rhat, "resid": resid, "logits": ref["logits"], "n": ref["n"]}


_CACHE: dict[str, Built] = {}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    def get(arch: str) -> Built:
        if arch not in _CACHE:
            _CACHE[arch] = Built(arch, tiny_arch_dir(arch, tmp_path_factory.mktemp(f"tiny-{arch}")))
        return _CACHE[arch]

    yield get
    _CACHE.clear()


def _close(got: torch.Tensor, want: torch.Tensor, scale: float) -> float:
    """Largest ``|got - want|`` relative to ``scale``; asserts it is within :data:`REL`."""
    err = float((got.double() - want.double()).abs().max()) / scale
    assert err <= REL, err
    return err


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attribution_equals_the_naive_per_head_writes(build, arch):
    """Completeness, and each head's, bias's, MLP's and the embedding's write against the plain HF modules."""
    b = build(arch)
    res = b.result
    scale = float(res.resid.abs().max())
    assert scale > 1e-3
    assert res.completeness_error() <= REL * scale
    for i, text in enumerate(PROMPTS):
        want = b.expected(text)
        n = want["n"]
        _close(res.resid[i, :, -n:], want["resid"], scale)
        _close(res.embed[i, -n:], want["embed"], scale)
        _close(res.heads[i, :, :, -n:], want["heads"], scale)
        _close(res.mlps[i, :, -n:], want["mlps"], scale)
        bias = res.attn_bias[i, :, -n:] if res.attn_bias is not None else torch.zeros_like(want["bias"])
        _close(bias, want["bias"], scale)
    assert hooks.count_hooks(b.model) == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sources_sum_to_the_head_writes(build, arch):
    b = build(arch)
    res = b.result
    scale = float(res.heads.abs().max())
    _close(res.sources.sum(-1), res.heads[..., -res.n_post:], scale)
    torch.testing.assert_close(res.attn_mass.sum(-1), torch.ones_like(res.attn_mass[..., 0]), atol=1e-5, rtol=0)
    sm = attr.source_matrix(b.model, b.r.float(), PROMPTS[1], [(1, 3), (0, 0)], adv_suffix=SUFFIX)
    n = len(sm.tokens)
    _close(sm.writes(), res.heads[1, [1, 0], [3, 0], -n:], scale)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dla_adds_up_to_the_real_logit_difference(build, arch):
    b = build(arch)
    dla = b.result.dla
    assert dla is not None
    scale = 1.0 + float(dla.logit_diff.abs().max())
    assert dla.completeness_error() <= REL * scale
    refusal, compliance = list(b.refusal.ids), b.compliance
    cap = getattr(b.ref.config, "final_logit_softcapping", None)
    for i, text in enumerate(PROMPTS):
        logits = b.expected(text)["logits"]
        if cap:
            # Gemma-2 soft-caps: DLA explains the logit difference before the cap, and says so.
            assert "pre-soft-cap" in dla.space
            pre = torch.atanh(logits / cap) * cap
            assert float((cap * torch.tanh(pre / cap) - logits).abs().max()) < 1e-9
            logits = pre
        want = logits[refusal].mean() - logits[compliance].mean()
        assert abs(float(dla.logit_diff[i]) - float(want)) <= REL * scale, (i, float(dla.logit_diff[i]), float(want))
    if arch == "granite":
        assert "logits_scaling" in dla.space


def _hf_logits(model: Any, batch: Any) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return out.logits[batch.attention_mask.bool()].double()


def _reference_ablation(b: Built, batch: Any) -> torch.Tensor:
    """Directional ablation written on the plain float64 HF model: r̂ projected out of every module output that is
    added to the residual stream (the embeddings, each attention write, each MLP write)."""
    r = b.rhat
    lay = b.layout

    def project(_m: Any, _a: Any, out: Any) -> Any:
        x = out[0] if isinstance(out, tuple) else out
        x = x - (x @ r)[..., None] * r
        return (x, *out[1:]) if isinstance(out, tuple) else x

    writers = [_module(b.ref, e) for e in lay.embeds]
    for layer in b.layers():
        writers.append(_module(layer, lay.attn_post_norm) if lay.attn_post_norm else _module(layer, lay.o_proj))
        writers.append(_module(layer, lay.mlp_post_norm) if lay.mlp_post_norm else layer.mlp)
    handles = [m.register_forward_hook(project) for m in writers]
    try:
        # One prompt at a time: transformers' float64 eager attention turns a left-padded row into NaN.
        out = []
        for row, mask in zip(batch.input_ids, batch.attention_mask.bool(), strict=True):
            with torch.inference_mode():
                out.append(b.ref(input_ids=row[mask][None]).logits[0])
        return torch.cat(out)
    finally:
        for h in handles:
            h.remove()


TEXTS = ["how do I do the thing", "a", "write a much longer request so that padding matters here"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ablation_removes_r_from_the_stream_and_equals_an_independent_ablation(build, arch):
    b = build(arch)
    model, r = b.model, b.rhat.float()
    assert interventions.residual_write_hooks(model) == attr.head_geometry(model).write_hooks()
    batch = tokenize_chat(model.tokenizer, TEXTS)
    seen: dict[str, torch.Tensor] = {}

    def grab(x: torch.Tensor, name: str) -> None:
        seen[name] = x.detach().clone()

    n_layers = int(model.cfg.n_layers)
    names = [hooks.resid_pre(layer) for layer in range(n_layers)] + [hooks.resid_post(n_layers - 1)]
    with interventions.ablate(model, r), hooks.add_hooks(model, [(name, grab) for name in names]):
        ablated = _hf_logits(model.original_model, batch)
    mask = batch.attention_mask.bool()
    for name, x in seen.items():
        assert float((x[mask] @ r).abs().max()) <= 1e-5 * float(x[mask].abs().max()), name
    want = _reference_ablation(b, batch)
    _close(ablated, want, float(want.abs().max()))
    assert not torch.allclose(ablated, _hf_logits(model.original_model, batch), atol=1e-3)
    assert hooks.count_hooks(model) == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_orthogonalized_weights_equal_hook_ablation_or_are_refused(build, arch):
    b = build(arch)
    model, r = b.model, b.rhat.float()
    if not b.layout.orthogonalizable:
        with pytest.raises(InputError, match="post_attention_layernorm.*use hook ablation instead.*ablate"):
            interventions.orthogonalize(model, r)
        with pytest.raises(InputError, match="no weight edit equals directional ablation"):
            interventions.orthogonalized_state_dict(model, r)
        return
    batch = tokenize_chat(model.tokenizer, TEXTS)
    with interventions.ablate(model, r):
        ablated = _hf_logits(model.original_model, batch)
    edited = interventions.orthogonalize(model, r)
    ortho = _hf_logits(edited.original_model, batch)
    _close(ortho, ablated, float(ablated.abs().max()))
    assert hooks.count_hooks(model) == 0 and hooks.count_hooks(edited) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_within_the_dtype_tolerance(build, dtype):
    """Gemma-2 (post-norms, soft-capped logits) in half precision: no ExactnessError, errors within tolerance."""
    b = build("gemma2")
    model = load_model(str(b.path), dtype=dtype)
    res = attr.attribute(model, b.r.float(), PROMPTS, refusal_tokens=b.refusal, compliance_tokens=b.compliance,
                         batch_size=2, adv_suffix=SUFFIX, progress=False)
    n_terms = 2 * res.n_layers + 1
    tol = exactness.rel_tolerance(dtype, n_terms)
    assert res.completeness_error() <= tol * (1.0 + float(res.resid.abs().max()))
    assert res.dla is not None
    assert res.dla.completeness_error() <= tol * (1.0 + float(res.dla.logit_diff.abs().max()))
    # and it still measures the float32 numbers, to half precision
    ref = b.result
    assert float((res.heads - ref.heads).abs().max()) <= tol * (1.0 + float(ref.heads.abs().max()))


def test_a_missing_mlp_term_raises_exactness_error(build, monkeypatch):
    b = build("qwen2")
    original = attr._BatchProbe._on_mlp

    def drop_layer_one(self, layer):
        fn = original(self, layer)
        if layer != 1:
            return fn

        def dropped(x, name):
            fn(x, name)
            self.mlps[:, layer] = 0.0
        return dropped

    monkeypatch.setattr(attr._BatchProbe, "_on_mlp", drop_layer_one)
    with pytest.raises(ExactnessError, match=r"Qwen2ForCausalLM.*do not add up.*error \d"):
        attr.attribute(b.model, b.r.float(), PROMPTS[:2], dla=False, progress=False)
    assert hooks.count_hooks(b.model) == 0


def test_a_wrong_final_norm_raises_exactness_error_in_dla(build, monkeypatch):
    from dataclasses import replace

    from refusal_circuits.attribution import compute

    b = build("llama")
    real = attr.final_norm(b.model)
    monkeypatch.setattr(compute, "final_norm", lambda model: replace(real, eps=real.eps + 0.5))
    with pytest.raises(ExactnessError, match=r"direct logit attribution of LlamaForCausalLM.*do not add up"):
        attr.attribute(b.model, b.r.float(), PROMPTS[:2], refusal_tokens=b.refusal, compliance_tokens=b.compliance,
                       progress=False)


def test_a_hook_layout_the_library_does_not_know_is_refused_by_name(build, monkeypatch):
    b = build("mistral")
    monkeypatch.setattr(b.model.cfg, "n_key_value_heads", 1)  # hook_v now has the "wrong" width
    with pytest.raises(InputError, match=r"MistralForCausalLM.*attn.hook_v has shape.*not supported"):
        attr.attribute(b.model, b.r.float(), PROMPTS[:1], dla=False, progress=False)
    assert hooks.count_hooks(b.model) == 0


def test_soft_capping_is_stated_in_the_saved_record(build, tmp_path, caplog):
    b = build("gemma2")
    with caplog.at_level(logging.WARNING, logger="refusal_circuits"):
        res = attr.attribute(b.model, b.r.float(), PROMPTS[:1], refusal_tokens=b.refusal,
                             compliance_tokens=b.compliance, progress=False)
    assert any("before the cap" in rec.getMessage() for rec in caplog.records)
    res.save(tmp_path)
    back = attr.load_attribution(tmp_path)
    assert back.dla is not None and back.dla.space == res.dla.space and "pre-soft-cap" in back.dla.space
    import json

    assert "pre-soft-cap" in json.loads((tmp_path / attr.SUMMARY_FILE).read_text())["dla"]["space"]


def test_orthogonalize_checks_itself_against_hook_ablation(build, monkeypatch):
    """A writer the weight edit misses (here: layer 1's MLP) is caught by orthogonalize's own run-time check."""
    b = build("phi3")
    real = interventions._writer_parameters

    def missing_one(model, expected):
        return {k: v for k, v in real(model, expected).items() if not (".1." in k and v.startswith("mlp_out"))}

    monkeypatch.setattr(interventions, "_writer_parameters", missing_one)
    with pytest.raises(ExactnessError, match=r"orthogonalized weights of Phi3ForCausalLM.*do not reproduce hook ablation: error"):
        interventions.orthogonalize(b.model, b.rhat.float())
    assert hooks.count_hooks(b.model) == 0
