"""One direction or a subspace (issue 18, item 3): subspace ablation against nested directional ablations, principal
angles and subspace recovery against known geometry, and planted languages on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_harm import HARMFUL, HARMLESS


@pytest.mark.unit
def test_principal_angles_of_known_planes_and_subspace_recovery():
    from refusal_circuits.crosslingual.subspace import category_rows, principal_angles, top_subspace

    e = torch.eye(4, dtype=torch.float64)
    assert principal_angles(e[[0, 1]], e[[0, 2]]).tolist() == pytest.approx([0.0, 90.0])
    tilted = torch.stack([e[0], (e[1] + e[2]) / math.sqrt(2)])
    assert principal_angles(e[[0, 1]], tilted).tolist() == pytest.approx([0.0, 45.0], abs=1e-6)
    # rows inside a known plane (plus tiny noise) give that plane back, its first vector along their mean
    g = torch.Generator().manual_seed(0)
    plane = torch.linalg.qr(torch.randn(16, 2, generator=g, dtype=torch.float64))[0].T
    rows = (torch.randn(10, 2, generator=g, dtype=torch.float64) + torch.tensor([3.0, 0.0], dtype=torch.float64)) @ plane
    got = top_subspace(rows + 1e-9 * torch.randn(10, 16, generator=g, dtype=torch.float64), 2)
    assert principal_angles(got, plane).max() < 1e-3
    assert float(got[0] @ rows.mean(0)) > 0
    # category rows: per category with 2+ prompts, its harmful mean minus the harmless mean
    x = torch.arange(12.0, dtype=torch.float64).view(4, 3)
    mean_b = torch.ones(3, dtype=torch.float64)
    out = category_rows(x, ["a", "b", "a", "b"], mean_b)
    assert torch.equal(out, torch.stack([x[[0, 2]].mean(0), x[[1, 3]].mean(0)]) - mean_b)
    assert torch.equal(category_rows(x, [None] * 4, mean_b), x - mean_b)  # no categories: every prompt a row
    assert torch.equal(category_rows(x, ["a", "b", "a", "b"], mean_b, k=3), x - mean_b)  # fewer categories than k


@pytest.mark.tiny
def test_subspace_ablation_is_nested_directional_ablation(tiny_model):
    from refusal_circuits.errors import InputError
    from refusal_circuits.interventions import ablate, ablate_subspace
    from refusal_circuits.scores import first_token_logits

    d = int(tiny_model.cfg.d_model)
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(d, 2, generator=g))[0].T  # two orthonormal directions
    texts = HARMFUL[:3]
    with ablate(tiny_model, q[0]), ablate(tiny_model, q[1]):
        nested = first_token_logits(tiny_model, texts)
    with ablate_subspace(tiny_model, torch.stack([q[0] * 3.0, q[1] - 0.5 * q[0]])):  # the same span, not orthonormal
        together = first_token_logits(tiny_model, texts)
    assert torch.allclose(nested, together, atol=1e-4)
    with ablate(tiny_model, q[0]):
        one = first_token_logits(tiny_model, texts)
    with ablate_subspace(tiny_model, q[:1]):
        assert torch.allclose(one, first_token_logits(tiny_model, texts), atol=1e-5)
    from refusal_circuits.hooks import count_hooks

    assert count_hooks(tiny_model) == 0
    with pytest.raises(InputError, match="linearly dependent"):
        ablate_subspace(tiny_model, torch.stack([q[0], 2 * q[0]]))
    with pytest.raises(InputError, match="shape"):
        ablate_subspace(tiny_model, torch.zeros(2, d + 1))


def _prompts():
    from refusal_circuits.data import PromptRecord, PromptSet

    recs = []
    for lang in ("en", "cp"):
        for label, texts in (("harmful", HARMFUL), ("harmless", HARMLESS)):
            for i, text in enumerate(texts):
                recs.append(PromptRecord(f"{label[0]}{i}", lang, label, text,
                                         {"split": "train" if i % 2 else "test", "category": f"c{i % 4 // 2}"}))
    return PromptSet(recs, "planted")


@pytest.fixture(scope="module")
def planted(tiny_model):
    from refusal_circuits.crosslingual.subspace import refusal_subspaces
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.scores import RefusalTokens

    train = [i for i in range(8) if i % 2]
    direction = extract_candidates(tiny_model, [HARMFUL[i] for i in train], [HARMLESS[i] for i in train], lang="en",
                                   progress=False).direction(-2, 1)
    got = refusal_subspaces(tiny_model, direction, _prompts(), tokens=RefusalTokens({"en": (5, 7), "cp": (5, 7)}),
                            k=2, n_boot=100, batch_size=3, progress=False)
    return direction, got


@pytest.mark.tiny
def test_a_copy_of_the_base_language_has_its_subspace_and_no_residual(planted):
    direction, got = planted
    en, cp = got.langs["en"], got.langs["cp"]
    assert [a.value for a in cp.angles] == pytest.approx([0.0, 0.0], abs=1e-3)
    # jackknife paired by id: the copy left out with the base language stays at 0° on every left-out prompt
    assert [x for a in cp.angles for x in (a.low, a.high)] == pytest.approx([0.0] * 4, abs=1e-2)
    assert torch.allclose(got.subspaces["cp"], got.subspaces["en"], atol=1e-5)
    assert float(got.residuals["cp"].norm()) == 0.0 and cp.residual_induces is None
    assert cp.cos_own_r_hat.value == pytest.approx(1.0, abs=1e-6)
    # r̂ is en's own train direction, so ablating r̂ and ablating the own direction are one intervention
    for rec in (en, cp):
        assert rec.deltas["r_hat"].value == pytest.approx(rec.deltas["own"].value, abs=1e-5)
        assert rec.residual_extra is not None and rec.residual_extra.value == pytest.approx(0.0, abs=1e-9)
        assert rec.verdict in ("one direction", "a subspace", "no refusal to carry")
    assert cp.deltas["base_subspace"].value == pytest.approx(en.deltas["base_subspace"].value, abs=1e-5)
    # two languages with one direction share a 1-dimensional subspace: no dimension of float noise is added
    assert got.shared.shape == (1, direction.d_model)
    assert float(got.shared[0] @ direction.vector) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.tiny
def test_record_json_is_finite_or_null_and_renders(planted):
    import json

    from refusal_circuits.io import json_text

    _, got = planted
    obj = json.loads(json_text(got.to_json()))
    assert set(obj["langs"]) == {"en", "cp"} and obj["k"] == 2
    assert set(obj["langs"]["cp"]["carried"]) == {"r_hat", "base_subspace", "shared_subspace", "own", "residual",
                                                  "control", "control_k"}
    # k = 2: r̂ plus k − 1 random dimensions is the one-dimension control
    cp = got.langs["cp"]
    assert cp.deltas["control_k"].value == pytest.approx(cp.deltas["control"].value, abs=1e-9)
    assert "<table" in got._repr_html_() and "RefusalSubspaces(" in repr(got)
    assert all(torch.isfinite(t).all() for t in got.tensors().values())


@pytest.mark.tiny
def test_bad_k_is_refused(tiny_model, planted):
    from refusal_circuits.crosslingual.subspace import refusal_subspaces
    from refusal_circuits.errors import InputError

    direction, _ = planted
    with pytest.raises(InputError, match="k must be at least 2"):
        refusal_subspaces(tiny_model, direction, _prompts(), k=1, progress=False)
    with pytest.raises(InputError, match="needs at least 5 harmful train prompts per language; en, cp have fewer"):
        refusal_subspaces(tiny_model, direction, _prompts(), k=5, progress=False)


@pytest.mark.unit
def test_the_compared_subspace_contains_r_hat_and_keeps_a_span_that_already_does():
    """Ablating S_b itself (first vector only near r̂) leaves part of r̂; the subspace compared is r̂ plus the top
    k − 1 directions of S_b orthogonal to it: orthonormal, r̂ first, and the same span where S_b contains r̂."""
    from refusal_circuits.crosslingual.subspace import top_subspace, with_r_hat

    g = torch.Generator().manual_seed(0)
    r = torch.randn(32, generator=g, dtype=torch.float64)
    r = r / r.norm()
    near = top_subspace(torch.stack([r + 0.3 * torch.randn(32, generator=g, dtype=torch.float64) for _ in range(6)]), 3)
    got = with_r_hat(near, r, 3)
    assert got.shape == (3, 32)
    assert torch.allclose(got @ got.T, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(got[0], r)
    assert float((near @ r).norm()) < 1 - 1e-3  # S_b alone does not contain r̂
    extra = torch.randn(2, 32, generator=g, dtype=torch.float64)
    holds = torch.linalg.qr(torch.cat([r[None], extra]).T).Q.T  # a span with r̂ in it
    again = with_r_hat(holds, r, 3)
    proj = lambda q: q.T @ q  # noqa: E731
    assert torch.allclose(proj(again), proj(holds), atol=1e-10)
