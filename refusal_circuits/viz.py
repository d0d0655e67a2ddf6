"""Figures for papers and for the offline report.

Every figure is a matplotlib ``Figure`` (vector output, no JavaScript, identical in the paper and in the report):
:func:`to_svg` gives the inline SVG the report embeds, :func:`save` writes SVG or PNG. Token-level views are
small HTML snippets (:func:`token_projection_html`), and attention views use circuitsvis's bundled renderer.
Colour maps are perceptually uniform (``viridis``) or diverging around zero (``RdBu_r``), with labelled colour bars.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from refusal_circuits.attribution import Attribution
from refusal_circuits.chat import Span
from refusal_circuits.io import atomic_path
from refusal_circuits.markup import esc

_RC: dict[str, Any] = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
       "legend.fontsize": 7, "figure.dpi": 150, "svg.fonttype": "none", "axes.spines.top": False,
       "axes.spines.right": False}


def _plt() -> Any:
    """pyplot with the Agg backend and the paper style; imported on first use (matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.style.use(_RC)
    return plt


def svg_document(fig: Any) -> str:
    """The figure as a standalone SVG file's text (text kept as text), and the figure closed."""
    plt = _plt()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def to_svg(fig: Any) -> str:
    """The figure as an inline SVG string (no XML prologue), and the figure closed."""
    text = svg_document(fig)
    return text[text.index("<svg"):]


def save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write the figure as SVG or PNG (by suffix), atomically; the figure stays open."""
    p = Path(path)
    fmt = p.suffix.lstrip(".").lower()
    if fmt not in ("svg", "png", "pdf"):
        raise ValueError(f"{p}: use .svg, .png or .pdf")
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format=fmt, bbox_inches="tight", dpi=300 if fmt == "png" else None)
    return p


def refusal_rates(rates: Mapping[str, Mapping[str, tuple[float, float, float]]], title: str = "Refusal rate") -> Any:
    """Grouped bars: ``rates[condition][lang] = (rate, ci_low, ci_high)``; one colour per condition."""
    return _bars(rates, title=title, ylabel="refusal rate (95% Wilson CI)", ylim=(0.0, 1.05))


def grouped_bars(values: Mapping[str, Mapping[str, float | None]], *, title: str, ylabel: str,
                 ylim: tuple[float, float] | None = None, langs: Sequence[str] | None = None) -> Any:
    """Grouped bars: ``values[series][lang]``; one colour per series, missing values left out; ``langs`` fixes
    the order of the groups (default: as they first appear)."""
    fig = _bars({c: {lang: (v, v, v) for lang, v in row.items() if v is not None} for c, row in values.items()},
                title=title, ylabel=ylabel, ylim=ylim, langs=langs)
    fig.axes[0].axhline(0, color="black", linewidth=0.5)
    return fig


def _bars(values: Mapping[str, Mapping[str, tuple[float, float, float]]], *, title: str, ylabel: str,
          ylim: tuple[float, float] | None, langs: Sequence[str] | None = None) -> Any:
    """``values[series][lang] = (value, low, high)``: one group of bars per language, error bars where
    ``low < high``."""
    plt = _plt()
    series = list(values)
    langs = list(langs or dict.fromkeys(lang for c in series for lang in values[c]))
    fig, ax = plt.subplots(figsize=(max(3.5, 0.45 * len(langs) * max(1, len(series)) / 2), 2.4))
    width = 0.8 / max(1, len(series))
    for i, c in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(langs))]
        vals = [values[c].get(lang, (float("nan"),) * 3) for lang in langs]
        err = [[max(0.0, v[0] - v[1]) for v in vals], [max(0.0, v[2] - v[0]) for v in vals]]
        has_err = any(e > 0 for side in err for e in side)
        ax.bar(xs, [v[0] for v in vals], width=width, label=c, yerr=err if has_err else None, capsize=1.5,
               error_kw={"elinewidth": 0.6})
    ax.set_xticks(range(len(langs)), langs)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, ncol=min(4, len(series)), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return fig


def matrix(values: Tensor | Sequence[Sequence[float | None]], rows: Sequence[str], cols: Sequence[str], *, title: str,
           cbar: str, vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
           fmt: str = "{:.2f}", xlabel: str = "", ylabel: str = "") -> Any:
    """A labelled heatmap with the value printed in every cell (cosine and transfer matrices); a NaN or None
    cell (not measured, or not computable: the caption says why) is left empty."""
    plt = _plt()
    if not isinstance(values, Tensor):
        values = [[float("nan") if x is None else x for x in row] for row in values]
    v = torch.as_tensor(values, dtype=torch.float32)
    fig, ax = plt.subplots(figsize=(0.38 * len(cols) + 1.6, 0.32 * len(rows) + 1.0))
    im = ax.imshow(v.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=0)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    lo = float(v.nan_to_num().min()) if vmin is None else vmin
    hi = float(v.nan_to_num().max()) if vmax is None else vmax
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            x = float(v[i, j])
            if x == x:  # not NaN
                dark = (x - lo) / (hi - lo + 1e-12) < 0.55 if cmap == "viridis" else abs(x) > 0.6 * max(abs(lo), abs(hi))
                ax.text(j, i, fmt.format(x), ha="center", va="center", fontsize=5.5,
                        color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.04, pad=0.02)
    ax.set_title(title)
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)
    return fig


def head_heatmap(values: Tensor, *, title: str, cbar: str = "direct write onto r̂",
                 significant: Tensor | None = None, limit: float | None = None) -> Any:
    """Layer x head heatmap, diverging around zero; significant cells (a boolean mask) get a black frame."""
    plt = _plt()
    v = values.detach().float()
    lim = limit or float(v.abs().max()) or 1.0
    n_layers, n_heads = v.shape
    fig, ax = plt.subplots(figsize=(0.22 * n_heads + 1.4, 0.16 * n_layers + 0.9))
    im = ax.imshow(v.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, n_heads, max(1, n_heads // 8)))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 8)))
    if significant is not None:
        from matplotlib.patches import Rectangle  # matplotlib is imported on first use, as in _plt

        for layer, head in significant.nonzero().tolist():
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, lw=0.8, ec="black"))
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.05, pad=0.02)
    ax.set_title(title)
    return fig


def projection_heatmap(attribution: Attribution, *, lang: str, label: str = "harmful", last: int = 12) -> Any:
    """Layer x position heatmap of the mean projection on r̂ over the last ``last`` positions (aligned from the end,
    so the template tokens line up), labelled with the first prompt's tokens."""
    plt = _plt()
    sub = attribution.select(lang=lang, label=label)
    last = min(last, int(sub.mask.shape[1]))
    v = sub.resid[..., -last:].mean(0)  # [layer + 1, pos]
    tokens = sub.tokens[0][-last:]
    post = int(Span.POST)
    labels = [f"[{t.strip() or repr(t)}]" if int(sub.spans[0, -last + i]) == post else t.replace("\n", "\\n")
              for i, t in enumerate(tokens)]
    lim = float(v.abs().max()) or 1.0
    fig, ax = plt.subplots(figsize=(0.42 * last + 1.5, 0.13 * v.shape[0] + 1.2))
    im = ax.imshow(v.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
    ax.set_xticks(range(last), labels, rotation=60, ha="right")
    n = v.shape[0]
    ax.set_yticks(range(0, n, max(1, n // 8)))
    ax.set_ylabel("layer (last row: final residual)")
    ax.set_title(f"{lang} {label}: mean resid · r̂ (n={sub.n_prompts}); [template tokens]")
    fig.colorbar(im, ax=ax, label="projection on r̂", fraction=0.04, pad=0.02)
    return fig


def trajectories(curves: Mapping[str, Sequence[float]], *, title: str, marker_layer: int | None = None) -> Any:
    """Mean projection on r̂ across layers, one line per language."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 2.4))
    for name, ys in curves.items():
        ax.plot(range(len(ys)), list(ys), label=name, lw=1.1)
    if marker_layer is not None:
        ax.axvline(marker_layer, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("layer (resid_pre; last point: final residual)")
    ax.set_ylabel("projection on r̂")
    ax.set_title(title)
    if curves:
        ax.legend(frameon=False, ncol=2)
    return fig


def scatter(coords: Sequence[Sequence[float]], labels: Sequence[str], *, title: str,
            explained: Sequence[float] | None = None) -> Any:
    """Labelled points on two axes (the shared PCA of per-language directions)."""
    plt = _plt()
    xy = torch.as_tensor(coords, dtype=torch.float32)
    fig, ax = plt.subplots(figsize=(3.2, 2.8))
    ax.scatter(xy[:, 0].numpy(), xy[:, 1].numpy() if xy.shape[1] > 1 else [0.0] * len(xy), s=12, color="#3465a4")
    for i, name in enumerate(labels):
        ax.annotate(name, (float(xy[i, 0]), float(xy[i, 1]) if xy.shape[1] > 1 else 0.0), fontsize=7,
                    xytext=(3, 2), textcoords="offset points")
    ev = list(explained or [])
    ax.set_xlabel("PC1" + (f" ({ev[0]:.0%} of variance)" if ev else ""))
    ax.set_ylabel("PC2" + (f" ({ev[1]:.0%})" if len(ev) > 1 else ""))
    ax.set_title(title)
    return fig


def harm_vs_refusal(langs: Mapping[str, Mapping[str, Any]], *, base: str, title: str | None = None) -> Any:
    """Per language, harm retention (x) against refusal retention (y) with both 95% intervals as error bars.

    ``langs``: ``lang -> {"harm_retention": {"value", "ci_low", "ci_high"}, "refusal_retention": {...}}`` (the
    JSON of :class:`~refusal_circuits.crosslingual.harm.HarmRefusal`). 1 is the base language on both axes; a
    language below the diagonal recognises more harm than it turns into refusal."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    lows, highs = [0.0], [1.0]
    for lang, rec in langs.items():
        h, r = rec.get("harm_retention") or {}, rec.get("refusal_retention") or {}
        if h.get("value") is None or r.get("value") is None or h.get("ci_low") is None or r.get("ci_low") is None:
            continue
        x, y = float(h["value"]), float(r["value"])
        xerr = [[x - float(h["ci_low"])], [float(h["ci_high"]) - x]]
        yerr = [[y - float(r["ci_low"])], [float(r["ci_high"]) - y]]
        colour = "#204a87" if lang == base else "#cc0000" if y < x else "#4e9a06"
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", ms=3, lw=0.7, capsize=1.5, color=colour)
        ax.annotate(lang, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        lows += [float(h["ci_low"]), float(r["ci_low"]), x, y]
        highs += [float(h["ci_high"]), float(r["ci_high"]), x, y]
    lo, hi = min(lows) - 0.05, max(highs) + 0.05
    ax.plot([lo, hi], [lo, hi], ls=":", lw=0.7, color="#888888")
    for v in (0.0, 1.0):
        ax.axhline(v, ls="--", lw=0.5, color="#bbbbbb")
        ax.axvline(v, ls="--", lw=0.5, color="#bbbbbb")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"harm retention (gap on ĥ({base}) at the last instruction token, / {base}'s)")
    ax.set_ylabel(f"refusal retention (gap on r̂({base}) at its site, / {base}'s)")
    ax.set_title(title or "Harm recognised vs turned into refusal")
    return fig


def subspace_carried(langs: Mapping[str, Mapping[str, Any]], *, base: str, title: str | None = None) -> Any:
    """Per language, grouped bars with 95% intervals: the share of its refusal-score gap each ablation removes
    (``langs``: the JSON of :class:`~refusal_circuits.crosslingual.subspace.RefusalSubspaces`)."""
    names = {"r_hat": f"r̂({base})", "base_subspace": f"{base} subspace", "shared_subspace": "shared subspace",
             "own": "own direction", "residual": "r̂ + own residual", "control": "r̂ + 1 random (control)",
             "control_k": "r̂ + k−1 random (control)"}
    series: dict[str, dict[str, tuple[float, float, float]]] = {name: {} for name in names.values()}
    for lang, rec in langs.items():
        for key, name in names.items():
            got = _triple((rec.get("carried") or {}).get(key))
            if got is not None:
                series[name][lang] = got
    return _bars({name: row for name, row in series.items() if row}, title=title or "Refusal removed by each ablation",
                 ylabel="share of the refusal-score gap removed", ylim=None, langs=list(langs))


def paired_totals(obj: Mapping[str, Any], *, title: str | None = None) -> Any:
    """Per language, grouped bars with 95% intervals: the estimated change of r̂'s projection when each of the
    figure's nodes (every language's three largest) is patched from the base language into the translation,
    beside the language's whole gap (``obj``: the JSON of
    :class:`~refusal_circuits.crosslingual.totals.PairedTotals`)."""
    series: dict[str, dict[str, tuple[float, float, float]]] = {"whole gap": {}}
    for lang, rec in obj["langs"].items():
        got = _triple(rec.get("gap_projection"))
        if got is not None:
            series["whole gap"][lang] = got
        for name in obj.get("figure_nodes", []):
            node = _triple((rec.get("nodes") or {}).get(name))
            if node is not None:
                series.setdefault(name, {})[lang] = node
    return _bars(series, title=title or f"What {obj['base']}'s values would recover, per node",
                 ylabel=f"Δ r̂ projection ({obj['base']} → translation)", ylim=None, langs=list(obj["langs"]))


def _triple(s: Mapping[str, Any] | None) -> tuple[float, float, float] | None:
    if not s or s.get("value") is None or s.get("ci_low") is None:
        return None
    return float(s["value"]), float(s["ci_low"]), float(s["ci_high"])


def token_projection_html(tokens: Sequence[str], values: Sequence[float], *, limit: float | None = None) -> str:
    """Tokens coloured by their projection on r̂ (red positive, blue negative); escaped, no script."""
    lim = limit or max((abs(float(v)) for v in values), default=1.0) or 1.0
    out = []
    for t, v in zip(tokens, values, strict=True):
        a = min(1.0, abs(float(v)) / lim)
        rgb = "214,39,40" if v > 0 else "31,119,180"
        shown = esc(t).replace("\n", "↵<br>") or "&nbsp;"
        out.append(f"<span title='{float(v):+.3f}' style='background:rgba({rgb},{a:.2f});padding:0 1px'>{shown}</span>")
    return "<div style='font-family:monospace;line-height:1.8'>" + "".join(out) + "</div>"


def attention_view(tokens: Sequence[str], patterns: Tensor, head_names: Sequence[str]) -> str:
    """circuitsvis attention heads view (``patterns`` ``[head, dest, src]``) with its JavaScript bundle inline."""
    return attention_views([(tokens, patterns, head_names)])[0]


def attention_views(views: Sequence[tuple[Sequence[str], Tensor, Sequence[str]]]) -> list[str]:
    """Several circuitsvis attention views; circuitsvis's JavaScript bundle (1.3 MB) is inlined once, in the first.

    circuitsvis's ``local_src`` inlines the bundle in every view (``str()`` would load it from a CDN instead); we
    keep one copy, as a classic script that defines ``CircuitsVis`` for the page, and one small ``render`` call per
    view. Token text is made inert for the inline JSON (``<`` and ``>`` shown as ‹ ›).
    """
    # Imported here: circuitsvis takes about 5 s to import, and only attention views need it.
    from circuitsvis.attention import attention_heads

    out = []
    for i, (tokens, patterns, names) in enumerate(views):
        safe = [t.replace("<", "‹").replace(">", "›") for t in tokens]
        src = attention_heads(attention=patterns.float().numpy(), tokens=safe,
                              attention_head_names=list(names)).local_src
        opening = '<script crossorigin type="module">'
        div, rest = src.split(opening, 1)
        bundle, call = rest.split("CircuitsVis.render(", 1)
        call = "CircuitsVis.render(" + call.replace("</script>", "").replace("</", "<\\/")
        div = div.strip().replace("/>", "></div>", 1) if div.strip().endswith("/>") else div.strip()
        head = f"<script>{bundle}</script>" if i == 0 else ""
        out.append(f"{head}{div}<script>{call}</script>")
    return out
