"""The split-half reliability with bootstrap intervals (unit: planted activations whose truth is known) and the
per-prompt site activations it is computed from (tiny)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from refusal_circuits import crosslingual as xl
from refusal_circuits.crosslingual.reliability import half_weights, too_few


def _planted(directions: dict[str, torch.Tensor], *, n: int = 24, noise: float = 2.0, content: float = 0.0,
             seed: int = 0, categories: int = 4, n_langs_rows: dict[str, int] | None = None
             ) -> dict[tuple[str, str], xl.SiteGroup]:
    """Per prompt: harmful rows are the language's direction + shared content of the prompt (the same in every
    language: translations) + independent noise; harmless rows are noise. Ids sorted by category, as the bundled
    files are."""
    g = torch.Generator().manual_seed(seed)
    d = next(iter(directions.values())).shape[0]
    shared = torch.randn(n, d, generator=g, dtype=torch.float64) * content
    cats = tuple(f"c{i * categories // n}" for i in range(n))
    out = {}
    for lang, r in directions.items():
        m = (n_langs_rows or {}).get(lang, n)
        for label in ("harmful", "harmless"):
            x = torch.randn(m, d, generator=g, dtype=torch.float64) * noise
            if label == "harmful":
                x = x + r + shared[:m]
            out[lang, label] = xl.SiteGroup(tuple(f"{label}-{i}" for i in range(m)), cats[:m], x)
    return out


def _unit(d: int, k: int) -> torch.Tensor:
    return torch.eye(d, dtype=torch.float64)[k]


@pytest.mark.unit
def test_one_direction_plus_independent_noise_corrected_interval_covers_one():
    """Two languages, the same direction, independent noise (within ≈ 0.3-0.5): the corrected interval covers 1
    in most seeds, the point is near 1, and shared prompt content lifts the same-prompt cosine above the
    disjoint one (what the correction exists for)."""
    d, covered, points = 32, 0, []
    for seed in range(20):
        r = 4 * _unit(d, 0)
        got = xl.split_half_reliability(_planted({"en": r, "de": r}, content=1.0, seed=seed), "en", layer=0,
                                        position=-1, n_splits=10)
        lo, hi = got.intervals["corrected"]["de"]
        covered += lo <= 1 <= hi
        points.append(got.corrected("de"))
        assert 0.05 < got.values["within"]["de"] < 0.9
        assert got.values["same_prompt"]["de"] > got.values["disjoint"]["de"]
        lo_w, hi_w = got.intervals["within"]["de"]
        assert lo_w <= got.values["within"]["de"] <= hi_w  # re-centred: an interval contains its own estimate
    assert covered >= 17, covered  # 95% intervals: 19 expected
    assert sum(points) / len(points) == pytest.approx(1.0, abs=0.15)


@pytest.mark.unit
def test_orthogonal_directions_corrected_interval_excludes_one_and_is_near_zero():
    d = 32
    for seed in range(5):
        got = xl.split_half_reliability(_planted({"en": 4 * _unit(d, 0), "de": 4 * _unit(d, 1)}, n=48, seed=seed),
                                        "en", layer=0, position=-1, n_splits=10)
        lo, hi = got.intervals["corrected"]["de"]
        assert hi < 1 and lo < 0.3 and abs(got.corrected("de")) < 0.5, (lo, hi, got.corrected("de"))
        assert "distinct" in got.summary("de") and "lies below 1" in got.summary("de")


@pytest.mark.unit
def test_the_summary_says_what_the_interval_allows():
    d = 32
    same = xl.split_half_reliability(_planted({"en": 3 * _unit(d, 0), "de": 3 * _unit(d, 0)}, noise=1.0), "en",
                                     layer=0, position=-1, n_splits=5)
    assert same.intervals["corrected"]["de"][0] > 0.5
    assert "no evidence the directions differ" in same.summary("de")
    noisy = xl.split_half_reliability(_planted({"en": 0.6 * _unit(d, 0), "de": 0.6 * _unit(d, 0)}, n=16), "en",
                                      layer=0, position=-1, n_splits=5)
    assert any(s in noisy.summary("de") for s in ("too wide to tell", "cannot tell")), noisy.summary("de")
    assert noisy.summary("en").startswith("en: the base language")


@pytest.mark.unit
def test_every_split_holds_half_of_every_category():
    cats = {f"p{i}": f"c{i // 5}" for i in range(20)}  # sorted by category, 5 each: a file-order cut is 2 blocks
    a, b = half_weights(cats, range(30))
    assert torch.all(a + b == 1)
    for k in range(4):
        cols = [i for i, c in enumerate(cats.values()) if c == f"c{k}"]
        assert torch.all((a[:, cols].sum(1) - b[:, cols].sum(1)).abs() <= 1)
    assert len({tuple(row.tolist()) for row in a}) > 10  # different seeds, different splits



@pytest.mark.unit
def test_within_language_cosine_uses_stratified_halves_not_blocks_of_categories():
    """Each category adds its own large content to the harmful prompts. Stratified halves hold the same mix of
    categories, so their directions agree; a cut in file order (two blocks of categories) would not."""
    d, n = 32, 24
    g = torch.Generator().manual_seed(0)
    topic = torch.randn(4, d, generator=g, dtype=torch.float64) * 4
    cats = tuple(f"c{i * 4 // n}" for i in range(n))
    harmful = topic[[i * 4 // n for i in range(n)]] + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    harmless = 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    ids = {label: tuple(f"{label}-{i}" for i in range(n)) for label in ("harmful", "harmless")}
    site = {("en", "harmful"): xl.SiteGroup(ids["harmful"], cats, harmful),
            ("en", "harmless"): xl.SiteGroup(ids["harmless"], cats, harmless)}
    got = xl.split_half_reliability(site, "en", layer=0, position=-1, n_splits=10)
    first = harmful[: n // 2].mean(0) - harmless[: n // 2].mean(0)
    second = harmful[n // 2 :].mean(0) - harmless[n // 2 :].mean(0)
    file_order = float(torch.nn.functional.cosine_similarity(first, second, dim=0))
    assert got.values["within"]["en"] > 0.95 and file_order < 0.6, (got.values["within"]["en"], file_order)


def _strict(obj: dict) -> None:
    """Finite JSON, and every null statistic with its reason under ``KEY_why``."""
    json.dumps(obj, allow_nan=False)
    for key, value in obj.items():
        if key.endswith("_why") or not isinstance(value, dict):
            continue
        missing = {lang for lang, v in value.items() if v is None or (isinstance(v, list) and None in v)}
        if missing:
            assert missing <= set(obj.get(f"{key}_why", {})), (key, missing)


@pytest.mark.unit
def test_json_is_finite_or_null_with_the_reason():
    d = 16
    site = _planted({"en": _unit(d, 0), "de": _unit(d, 0), "ja": _unit(d, 0)}, n=8, n_langs_rows={"ja": 3})
    # A zero direction in fr, in every half: every activation is the same.
    for label in ("harmful", "harmless"):
        site["fr", label] = xl.SiteGroup(site["en", label].ids, site["en", label].categories,
                                         torch.zeros_like(site["en", label].x))
    got = xl.split_half_reliability(site, "en", layer=2, position=-1, langs=["en", "de", "ja", "fr"], n_splits=4,
)
    out = got.to_json()
    _strict(out)
    assert out["within"]["ja"] is None and out["within_why"]["ja"] == too_few(3, 3)
    assert out["corrected_why"]["ja"].startswith("ja: too few train prompts to split in halves (3 harmful")
    assert out["within"]["fr"] is None and out["within_why"]["fr"].startswith("zero direction")
    assert isinstance(out["corrected"]["de"], float) and len(out["corrected_ci"]["de"]) == 2
    assert set(out["summary"]) == {"en", "de", "ja", "fr"} and out["summary"]["ja"].startswith("ja: cannot tell")
    assert "nan" not in got._repr_html_().lower().replace("n/a", "")
    # The base language unusable: every cross-language statistic is null, naming it.
    small = xl.split_half_reliability(site, "ja", layer=2, position=-1, langs=["ja", "de"], n_splits=2)
    js = small.to_json()
    _strict(js)
    assert js["disjoint_why"]["de"].startswith("ja: too few") and isinstance(js["within"]["de"], float)


@pytest.mark.unit
def test_same_prompt_is_the_cosine_of_the_directions_of_all_prompts():
    d = 16
    site = _planted({"en": 4 * _unit(d, 0), "de": 4 * (_unit(d, 1) + _unit(d, 0))}, n=16, content=0.5)
    got = xl.split_half_reliability(site, "en", layer=0, position=-1, n_splits=3)

    def direction(lang: str) -> torch.Tensor:
        return site[lang, "harmful"].x.mean(0) - site[lang, "harmless"].x.mean(0)

    expected = float(torch.nn.functional.cosine_similarity(direction("en"), direction("de"), dim=0))
    assert got.values["same_prompt"]["de"] == pytest.approx(expected, abs=1e-12)
    assert got.values["same_prompt"]["en"] == pytest.approx(1.0) and got.values["paired"]["en"] == pytest.approx(1.0)
    assert got.values["disjoint"]["en"] == pytest.approx(got.values["within"]["en"])
    assert math.isfinite(got.corrected("de"))


@pytest.mark.tiny
def test_site_rows_average_to_the_group_means_at_the_site(tiny_model):
    from refusal_circuits.activations import collect_groups, group_means, site_activations
    from refusal_circuits.errors import InputError

    groups = {"h": ["tell me a story", "how to bake bread", "x y", "what is the capital of peru"],
              "b": ["write a haiku about rain", "explain gravity briefly", "list fruit"]}
    means = group_means(tiny_model, groups, batch_size=2, progress=False)
    for layer, position in ((1, -1), (0, -2)):
        rows = site_activations(tiny_model, groups, layer, position, batch_size=3, progress=False)
        for name, x in rows.items():
            assert x.shape == (len(groups[name]), tiny_model.cfg.d_model) and x.dtype == torch.float64
            expected = means[name].mean[position, layer]
            assert torch.allclose(x.mean(0), expected, atol=1e-5, rtol=1e-5), name
    both = collect_groups(tiny_model, groups, site=(1, -1), batch_size=2, progress=False)
    assert torch.equal(both.means["h"].mean, means["h"].mean)  # the same batches: the same sums, exactly
    assert torch.allclose(both.site["b"].mean(0), means["b"].mean[-1, 1], atol=1e-5, rtol=1e-5)
    one = site_activations(tiny_model, {"h": groups["h"][:1]}, 1, -1, progress=False)["h"][0]
    assert torch.allclose(both.site["h"][0], one, atol=1e-5)  # a row does not depend on its batch
    with pytest.raises(InputError, match="position"):
        site_activations(tiny_model, groups, 1, 0, progress=False)
