"""Total effects of heads and their decomposition (own write, MLPs, later heads), on tiny random models, against a
plain Hugging Face forward pass patched by hand, one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from refusal_circuits import hooks
from refusal_circuits.chat import chat_format
from refusal_circuits.directions import Direction
from refusal_circuits.models import load_model
from refusal_circuits.patching import total_effects
from refusal_circuits.scores import refusal_tokens_from_strings
from tests.helpers import SHORT_PROMPTS, random_direction, tiny_arch_dir, tiny_qwen_dir

pytestmark = pytest.mark.tiny

HARMFUL, HARMLESS = SHORT_PROMPTS
_direction = random_direction


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer tiny Qwen2 (value and output-projection biases random), so a head's effect on r̂ at layer 3 can
    pass through its own layer's MLP, later heads and later MLPs."""
    return load_model(str(tiny_qwen_dir(tmp_path_factory.mktemp("tiny-qwen-4"), n_layers=4)))


def _by_hand(model, direction: Direction, layer: int, head: int, value: torch.Tensor | None, text: str
             ) -> tuple[float, float]:
    """``resid_pre[direction.layer] . r̂`` at r̂'s position, and head ``(layer, head)``'s own write there, from the
    plain Hugging Face model with the head's ``o_proj`` input at the post-instruction tokens set to ``value``."""
    hf = model.original_model
    fmt = chat_format(model.tokenizer)
    ids = torch.tensor([model.tokenizer.encode(fmt.render(model.tokenizer, text), add_special_tokens=False)])
    d_head = int(model.cfg.d_head)
    sl = slice(head * d_head, (head + 1) * d_head)
    o_proj = hf.model.layers[layer].self_attn.o_proj
    r = direction.vector.double() / direction.vector.double().norm()
    seen: dict[str, torch.Tensor] = {}

    def pre(_mod, args):
        (z,) = args
        z = z.clone()
        if value is not None:
            z[:, -fmt.n_post:, sl] = value.to(z.dtype)
        seen["z"] = z[0, direction.position, sl].double()
        return (z,)

    handle = o_proj.register_forward_pre_hook(pre)
    try:
        out = hf(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    proj = float(out.hidden_states[direction.layer][0, direction.position].double() @ r)
    own = float(seen["z"] @ o_proj.weight[:, sl].double().T @ r)
    return proj, own


def test_decomposition_adds_up_and_matches_a_patched_hugging_face_forward(deep):
    d = _direction(deep, layer=3)
    refusal = refusal_tokens_from_strings(deep.tokenizer, ["I"]).for_lang("en")
    heads = [(0, 1), (1, 0), (3, 2)]
    eff = total_effects(deep, d, HARMFUL, HARMLESS, heads, refusal, batch_size=3, progress=False)
    assert hooks.count_hooks(deep) == 0
    fmt = chat_format(deep.tokenizer)
    d_head = int(deep.cfg.d_head)
    for e in eff.effects:
        if e.layer >= d.layer:  # a head at r̂'s layer cannot move resid_pre there
            assert e.path is None and e.projection_harmful == 0.0
            continue
        assert e.path is not None
        p = e.path
        # The parts add up to the total, which is the measured projection change.
        assert abs(p.own + p.via_heads + p.via_mlps + p.rest - p.total) < 1e-5
        assert abs(p.total - e.projection_harmful) < 1e-4 * (1 + abs(e.projection_harmful))
        assert abs(p.heads[e.layer]) < 1e-6  # the head's own layer: its other heads do not read it
        assert sorted(p.mlps) == list(range(e.layer, d.layer)) and abs(p.rest) < 1e-5
        # Against the plain model, one prompt at a time, the head's harmless mean patched in by hand.
        sl = slice(e.head * d_head, (e.head + 1) * d_head)
        grabbed: list[torch.Tensor] = []

        def grab(_mod, args, grabbed=grabbed, sl=sl):
            grabbed.append(args[0][0, -fmt.n_post:, sl].detach().double())

        o_proj = deep.original_model.model.layers[e.layer].self_attn.o_proj
        handle = o_proj.register_forward_pre_hook(grab)
        try:
            for text in HARMLESS:
                _by_hand(deep, d, e.layer, e.head, None, text)
        finally:
            handle.remove()
        mean = torch.stack(grabbed).mean(0)
        clean = [_by_hand(deep, d, e.layer, e.head, None, t) for t in HARMFUL]
        patched = [_by_hand(deep, d, e.layer, e.head, mean, t) for t in HARMFUL]
        want_total = sum(a[0] - b[0] for a, b in zip(patched, clean, strict=True)) / len(HARMFUL)
        want_own = sum(a[1] - b[1] for a, b in zip(patched, clean, strict=True)) / len(HARMFUL)
        assert abs(p.total - want_total) < 1e-4 * (1 + abs(want_total)), (p.total, want_total)
        assert abs(p.own - want_own) < 1e-4 * (1 + abs(want_own)), (p.own, want_own)
        assert abs(p.total) > 1e-4  # not vacuous: the patch moves r̂'s projection
        # Like with like: without a post-norm the own part is the site-write gap, harmless minus harmful.
        assert abs(p.own - (e.site_harmless - e.site_harmful)) < 1e-4
    out = eff.to_json()["heads"]
    assert out[0]["path"]["own"] == eff.effects[0].path.own and out[2]["path"] is None
    assert "r̂'s layer" in out[2]["path_why"]
    # Paired intervals bracket their means (a moved mean outside its own interval would be a pairing bug).
    for e, row in zip(eff.effects, out, strict=True):
        for key in ("patch_harmful", "patch_harmless", "projection_harmful"):
            lo, hi = e.ci[key]
            assert lo - 1e-9 <= getattr(e, key) <= hi + 1e-9 and row[f"{key}_ci_low"] == lo
        if e.path is not None:
            for key in ("own", "via_mlps", "via_heads", "total"):
                lo, hi = e.path.ci[key]
                want = e.path.total if key == "total" else getattr(e.path, key)
                assert lo - 1e-9 <= want <= hi + 1e-9
    html, text = eff._repr_html_(), repr(eff)
    assert "via MLPs" in html and "n/a" in html  # the head at r̂'s layer has no decomposition
    assert f"own {eff.effects[0].path.own:+.3f}" in text


@pytest.mark.parametrize("arch", ["olmo2", "gemma2"])
def test_decomposition_is_exact_under_post_norms(tmp_path, arch):
    """Post-norm architectures: site writes need each token's scale (NaN from means), but the decomposition from
    the attributed runs is exact and still adds up to the measured change."""
    model = load_model(str(tiny_arch_dir(arch, tmp_path / arch)))
    d = _direction(model, layer=1)
    refusal = refusal_tokens_from_strings(model.tokenizer, ["I"]).for_lang("en")
    eff = total_effects(model, d, HARMFUL, HARMLESS, [(0, 0), (0, 3)], refusal, batch_size=2, progress=False)
    for e in eff.effects:
        assert e.path is not None
        assert abs(e.path.total - e.projection_harmful) < 1e-4 * (1 + abs(e.projection_harmful))
        assert abs(e.path.own + e.path.via_heads + e.path.via_mlps + e.path.rest - e.path.total) < 1e-5
        assert e.path.total != 0.0
        assert e.site_harmful != e.site_harmful  # NaN: a post-norm's write depends on each token's scale
    assert eff.to_json()["heads"][0]["site_harmful_why"]


def test_without_decomposition(deep):
    d = _direction(deep, layer=3)
    refusal = refusal_tokens_from_strings(deep.tokenizer, ["I"]).for_lang("en")
    eff = total_effects(deep, d, HARMFUL, HARMLESS, [(0, 1)], refusal, decompose=False, batch_size=4,
                        progress=False)
    assert eff.effects[0].path is None and "decompose=False" in eff.to_json()["heads"][0]["path_why"]
