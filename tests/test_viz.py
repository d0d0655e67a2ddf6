"""Figures render to SVG/PNG without a display, escape text, and inline their JavaScript (tiny tier)."""

from __future__ import annotations

import pytest
import torch

from refusal_circuits import viz
from refusal_circuits.attribution import attribute

pytestmark = pytest.mark.tiny


@pytest.fixture(scope="module")
def attribution(tiny_model):
    from refusal_circuits.data import PromptRecord, PromptSet

    ps = PromptSet(tuple(PromptRecord(f"p{i}", "en", label, f"prompt {i} <b>") for i, label in
                         enumerate(["harmful", "harmless", "harmful", "harmless"])), "t")
    r = torch.randn(int(tiny_model.cfg.d_model), generator=torch.Generator().manual_seed(0))
    return attribute(tiny_model, r, ps, dla=False, progress=False)


def test_figures_render_to_svg_and_png(attribution, tmp_path):
    figs = [
        viz.head_heatmap(attribution.head_scores().mean(0), title="heads", significant=torch.eye(2, 4, dtype=torch.bool)),
        viz.projection_heatmap(attribution, lang="en"),
        viz.matrix([[1.0, 0.5], [0.5, 1.0]], ["en", "de"], ["en", "de"], title="cos", cbar="cosine"),
        viz.refusal_rates({"baseline": {"en": (0.5, 0.3, 0.7), "de": (0.1, 0.0, 0.3)}}),
        viz.trajectories({"en": [0.0, 1.0, 2.0], "de": [0.0, 0.5, 1.0]}, title="t", marker_layer=1),
    ]
    for i, fig in enumerate(figs):
        viz.save(fig, tmp_path / f"f{i}.png")
        assert (tmp_path / f"f{i}.png").stat().st_size > 1000
        svg = viz.to_svg(fig)
        assert svg.startswith("<svg") and "<script" not in svg


def test_token_html_escapes_and_colours():
    out = viz.token_projection_html(["<script>", "ok", "\n"], [1.0, -0.5, 0.0])
    assert "<script>" not in out and "&lt;script&gt;" in out and "rgba(214,39,40,1.00)" in out


def test_attention_view_is_self_contained(attribution):
    html = viz.attention_view(["a", "b"], torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]), ["L0.H0"])
    assert "CircuitsVis.render" in html and "unpkg.com" not in html and "<script" in html


def test_grouped_bars_draw_each_value_and_leave_missing_ones_out():
    fig = viz.grouped_bars({"same": {"de": 0.9, "ja": None}, "disjoint": {"de": 0.3, "ja": -0.1}},
                           title="cosines", ylabel="cosine")
    heights = sorted(round(p.get_height(), 3) for p in fig.axes[0].patches if p.get_height() == p.get_height())
    assert heights == [-0.1, 0.3, 0.9]  # ja's missing "same" bar is not drawn as 0
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["de", "ja"]
    from matplotlib.container import ErrorbarContainer

    def error_bars(f):
        return sum(isinstance(c, ErrorbarContainer) for c in f.axes[0].containers)

    assert error_bars(fig) == 0 and error_bars(viz.refusal_rates({"baseline": {"en": (0.5, 0.3, 0.7)}})) == 1
