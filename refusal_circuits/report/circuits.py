"""The report's sections on where r̂ is written: attribution (top heads, separation, trajectories, projections) and
where translations diverge (paired per-head differences, attention views of the top heads)."""

from __future__ import annotations

from typing import Any

from safetensors.torch import load_file

from refusal_circuits import viz
from refusal_circuits.markup import esc, table
from refusal_circuits.report.figures import Figures
from refusal_circuits.report.results import StudyView, read_json
from refusal_circuits.report.text import missing_text


def attribution_section(study: StudyView) -> str:
    """How many prompts were attributed, how exactly the parts add up, and the base language's top heads."""
    attribution = study.attribution
    return ("<h2>Where r̂ is written: attribution</h2>"
            f"<p>{attribution.n_prompts} prompts; every component's direct write adds up to the residual "
            f"stream's projection on r̂ within {attribution.completeness_error():.1e}.</p>"
            + attribution.top_heads(8).where(lang=study.base)._repr_html_())


def effects_section(study: StudyView) -> str:
    """Direct write versus total effect of the base language's top heads, like with like: the write at r̂'s own
    position beside the projection change at that position, split into the head's own write, the MLPs and later
    heads, with intervals (empty where the study measured no total effects)."""
    eff = study.results.get("effects")
    if not eff:
        return ""
    direction = eff["direction"]

    def cell(obj: dict[str, Any] | None, key: str) -> str:
        if obj is None:
            return "n/a"
        value = _num(obj, key)
        return value if obj.get(key) is None or f"{key}_ci_low" not in obj else f"{value} {_ci(obj, key)}"

    rows = []
    for h in eff["heads"]:
        path = h.get("path")
        rows.append(f"<tr><td>L{h['layer']}.H{h['head']}</td><td>{_num(h, 'site_gap')}</td>"
                    f"<td>{cell(h, 'projection_harmful')}</td><td>{cell(path, 'own')}</td>"
                    f"<td>{cell(path, 'via_mlps')}</td><td>{cell(path, 'via_heads')}</td>"
                    f"<td>{cell(h, 'patch_harmful')}</td><td>{cell(h, 'patch_harmless')}</td></tr>")
    no_path = {h.get("path_why") for h in eff["heads"] if h.get("path") is None} - {None}
    note = f" Heads without a decomposition: {esc('; '.join(sorted(no_path)))}." if no_path else ""
    return ("<h3>Direct write versus total effect</h3>"
            f"<p>{esc(direction['lang'])} heads patched at the post-instruction tokens ({eff['n_harmful']} harmful "
            f"prompts get each head's harmless mean, {eff['n_harmless']} harmless ones its harmful mean). r̂ is "
            f"read at layer {direction['layer']}, position {direction['position']}: the direct-write gap at that "
            "position is compared with the change of r̂'s projection there, which attributing the patched run "
            "splits exactly into the head's own write, what the MLPs and the later heads make of it. Intervals: "
            f"95% paired bootstrap over prompts.{note}</p>"
            + table("", ["head", "direct gap at r̂'s position", "Δ r̂ projection (harmful→harmless patch)",
                         "own write", "via MLPs", "via later heads", "Δ refusal score (harmful→harmless)",
                         "Δ refusal score (harmless→harmful)"], rows))


def separation_section(study: StudyView, figs: Figures) -> str:
    """AUROC of harmful vs harmless along r̂ per language and layer (empty where compare wrote none)."""
    sep = study.divergence.get("separation")
    if not sep:
        return ""
    return figs.add("separation", viz.matrix(sep["auroc"], sep["langs"], [str(i) for i in range(len(sep["auroc"][0]))],
                                             vmin=0.5, vmax=1.0, fmt="{:.2f}", title="AUROC harmful vs "
                                             "harmless along r̂", cbar="AUROC", xlabel="layer"),
                    f"Projection on r̂ at position {sep['position']}, per language and layer."
                    + missing_text(sep, ("auroc",)))


def trajectories_section(study: StudyView, figs: Figures) -> str:
    """The mean projection on r̂ of each language's harmful prompts across layers, at r̂'s position."""
    site = int(study.direction["position"])
    curves = {}
    for lang in study.langs:
        sub = study.attribution.select(lang=lang, label="harmful")
        if sub.n_prompts:
            curves[lang] = sub.resid[:, :, site].mean(0).tolist()
    return figs.add("trajectories", viz.trajectories(curves, title="mean projection on r̂ (harmful prompts)",
                                                     marker_layer=int(study.direction["layer"])),
                    f"resid_pre · r̂ at position {site}, per layer.")


def projections_section(study: StudyView, figs: Figures) -> str:
    """Layer × position projections on r̂, one figure per language with harmful prompts, collapsed."""
    proj = [figs.add(f"projection_{lang}", viz.projection_heatmap(study.attribution, lang=lang),
                     f"{lang}: layer × position projection on r̂") for lang in study.langs
            if study.attribution.select(lang=lang, label="harmful").n_prompts]
    return ("<details><summary>Layer × position projections per language</summary>" + "".join(proj)
            + "</details>")


def heads_section(study: StudyView, figs: Figures) -> str:
    """Per language: the comparison's summary, its mean head writes and the paired differences with English (or
    the base language), significant heads framed."""
    base, div = study.base, study.divergence
    paired = study.paired()
    means = [v.abs().max() for k, v in paired.items() if k.endswith(".mean")]
    lim = float(max(means)) if means else None  # one colour scale for every language's mean writes
    body = ["<h2>Where translations diverge</h2>"]
    if f"{base}.mean" in paired:
        body.append(figs.add(f"heads_{base}", viz.head_heatmap(paired[f"{base}.mean"], limit=lim,
                                                               title=f"{base}: mean head write onto r̂ (harmful)"),
                             "Mean direct write onto r̂ at the post-instruction tokens, paired prompts."))
    if not div["languages"]:
        body.append(f"<p>Only the base language ({esc(base)}) was studied: there is nothing to compare it with.</p>")
    for lang, entry in div["languages"].items():
        if entry is None:
            why = (div.get("languages_why") or {}).get(lang, "not compared")
            body.append(f"<h3>{esc(lang)}</h3><p class='summary'>n/a ({esc(why)})</p>")
            continue
        body.append(f"<h3>{esc(lang)}</h3><p class='summary'>{esc(entry['summary'])}</p>")
        if f"{lang}.diff" in paired:
            body.append(figs.add(f"heads_{lang}", viz.head_heatmap(paired[f"{lang}.mean"], limit=lim,
                                                                   title=f"{lang}: mean head write onto r̂"),
                                 f"{lang} translations of the same prompts."))
            body.append(figs.add(f"heads_diff_{lang}", viz.head_heatmap(
                paired[f"{lang}.diff"], significant=paired[f"{lang}.significant"].bool(),
                title=f"{lang} − {base} (framed: significant)", cbar="paired difference"),
                "Paired mean difference per head; framed cells pass the Benjamini-Hochberg control and the "
                "1% floor."))
        body.append(controls_tables(entry, base, lang))
    return "".join(body)


def _num(obj: dict[str, Any], key: str, spec: str = "+.3f") -> str:
    """``obj[key]`` formatted, or "n/a (reason)" from ``KEY_why`` where it is null."""
    value = obj.get(key)
    if value is None:
        why = obj.get(f"{key}_why")
        return f"n/a ({esc(why)})" if why else "n/a"
    return esc(format(value, spec))


def _ci(obj: dict[str, Any], key: str, spec: str = "+.3f") -> str:
    lo, hi = obj.get(f"{key}_ci_low"), obj.get(f"{key}_ci_high")
    if lo is None or hi is None:
        why = obj.get(f"{key}_ci_low_why") or obj.get(f"{key}_why")
        return f"n/a ({esc(why)})" if why else "n/a"
    return f"[{esc(format(lo, spec))}, {esc(format(hi, spec))}]"


def controls_tables(entry: dict[str, Any], base: str, lang: str, k: int = 8) -> str:
    """The controls of one language's paired comparison (empty for a ``divergence.json`` written before them): the
    heads after the harmless control (difference in differences, with the harmful-only difference beside it), the
    correlations of the head contrasts against the English-vs-English null, and the cross-fitted patch; every
    number with its 95% interval."""
    c = entry.get("controls")
    if not c:
        return ""
    rows = []
    for h in c.get("did_heads", [])[:k]:
        rows.append(f"<tr><td>L{int(h['layer'])}.H{int(h['head'])}</td><td>{_num(h, 'harmful_diff')}</td>"
                    f"<td>{_num(h, 'harmless_diff')}</td><td>{_num(h, 'did')}</td><td>{_ci(h, 'did')}</td>"
                    f"<td>{_num(h, 'did_q', '.3g')}</td><td>{'✔' if h.get('did_significant') else ''}</td></tr>")
    out = [table(f"{esc(lang)} − {esc(base)} after the harmless control: "
                 + (f"{int(c['n_did_significant'])} heads significant" if c.get("n_did_significant") is not None
                    else f"no head can be tested ({esc(c.get('n_did_significant_why', 'n/a'))})")
                 + f" ({int(c['n_harmful_pairs'])} harmful, {int(c['n_harmless_pairs'])} harmless pairs)",
                 ["head", "harmful diff", "harmless diff", "difference in differences", "95% CI", "q", "sig."], rows)]
    r = c.get("correlations", {})
    names = [("rank_correlation", "Spearman of harmful − harmless contrasts"), ("slope", "slope of the contrasts"),
             ("raw_rank_correlation", "Spearman of raw harmful writes"),
             ("null_rank_correlation", f"{base} half vs {base} half (null, ceiling)"),
             ("halves_rank_correlation", f"{base} half vs {lang} half")]
    out.append(table(f"Same heads? Head contrasts ({esc(c.get('halves', ''))} halves)", ["statistic", "value", "95% CI"],
                     [f"<tr><td>{esc(label)}</td><td>{_num(r, key, '.2f')}</td><td>{_ci(r, key, '.2f')}</td></tr>"
                      for key, label in names if key in r]))
    cf = entry.get("patch_crossfit")
    if cf:
        frows = [f"<tr><td>{esc(label)}</td><td>{_num(cf, key, '.0%')}</td><td>{_ci(cf, key, '.0%')}</td></tr>"
                 for key, label in (("fraction", "r̂ projection, mean of both folds"),
                                    ("fold_a_fraction", "r̂ projection, fold A"),
                                    ("fold_b_fraction", "r̂ projection, fold B"),
                                    ("score_fraction", "refusal score, mean of both folds"))]
        out.append(table("Cross-fitted patching: share of the gap closed (heads chosen on one half, measured on "
                         "the other)", ["measure", "share", "95% CI"], frows))
    return "".join(out)


def views_section(study: StudyView) -> str:
    """circuitsvis attention views of the base language's top heads on one prompt pair, with each prompt's tokens
    coloured by their projection on r̂ (empty where compare saved no views)."""
    stage = study.stages["compare"]
    if not (stage / "views.json").exists():
        return ""
    attribution, layer = study.attribution, int(study.direction["layer"])
    meta = read_json(stage / "views.json")
    tensors = load_file(str(stage / "views.safetensors"))
    names = [f"L{a}.H{b}" for a, b in meta["heads"]]
    parts = ["<h2>Attention of the top heads on one prompt pair</h2>",
             f"<p>The base language's top heads ({esc(', '.join(names))}); tokens below are coloured by their "
             f"residual stream's projection on r̂ at layer {layer} (red: towards refusal).</p>"]
    shown = viz.attention_views([(meta["prompts"][lang]["tokens"], tensors[f"{lang}.pattern"], names)
                                 for lang in meta["pair"]])
    for lang, view in zip(meta["pair"], shown, strict=True):
        p = meta["prompts"][lang]
        row = int(p["row"])
        values = attribution.resid[row, layer][attribution.mask[row].bool()].tolist()
        parts.append(f"<h3>{esc(lang)} · {esc(p['id'])}: {esc(p['instruction'])}</h3>")
        parts.append(viz.token_projection_html(attribution.tokens[row], values))
        parts.append(f"<div class='attention-view' data-lang='{esc(lang)}'>{view}</div>")
    return "".join(parts)
