"""The study's offline HTML report and its ``results.json``, built from the stage directories alone.

The page loads nothing: figures are inline SVG (each also saved under ``figures/`` as SVG for papers), the
attention views carry circuitsvis's JavaScript bundle inline, and a Content-Security-Policy with
``default-src 'none'`` forbids every request. All prompt, completion and token text goes through :func:`esc`
(HTML escaping, plus visible markers for the bidirectional-control characters that could reorder what a reader
sees).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from refusal_circuits.evaluation import RefusalEvaluation
from refusal_circuits.markup import esc, page

_page = page  # the former private name


def baseline_report_html(evaluation: RefusalEvaluation) -> str:
    """A report of one refusal evaluation: rates with 95% Wilson intervals and every completion."""
    parts = [f"<h1>Refusal evaluation: {esc(evaluation.model)}</h1>", "<h2>Refusal rates</h2>",
             evaluation._repr_html_(), "<h2>Completions</h2>", _completions(evaluation.to_dict()["completions"])]
    return _page(f"refusal_circuits: {evaluation.model}", "".join(parts))


def _completions(rows: list[dict[str, Any]]) -> str:
    out = []
    for c in rows:
        verdict = "refused" if c["refused"] else "complied"
        out.append(f"<details><summary>{esc(c['lang'])} · {esc(c['label'])} · {esc(c['id'])} · "
                   f"<span class='{verdict}'>{verdict}</span></summary><pre>{esc(c['completion'])}</pre></details>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------------ results


def _judge_tokens_text(transfer: dict[str, Any]) -> str:
    judged = transfer.get("judge_tokens")
    if not judged:
        return ""
    parts = [f"{lang}: {', '.join(repr(t) for t in v['strings'])}" for lang, v in judged.items()]
    return " First tokens counted as refusals: " + "; ".join(parts) + "."


def _rate(g: dict[str, Any]) -> tuple[float, float, float]:
    from refusal_circuits.stats import wilson_interval

    n = int(g["n"])
    k = int(g["refused"]) if "refused" in g else round(float(g.get("refusal_rate", g.get("rate", 0.0))) * n)
    lo, hi = wilson_interval(k, n)
    return (k / n if n else math.nan, lo, hi)


def collect_results(stage_dirs: dict[str, Path], config: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
    """``results.json``: the configuration, stage times, and the headline numbers of every stage."""
    from refusal_circuits._version import __version__

    d = json.loads((stage_dirs["direction"] / "direction.json").read_text(encoding="utf-8"))
    ev = {k: json.loads((stage_dirs["evaluate"] / f"{k}.json").read_text(encoding="utf-8"))
          for k in ("baseline", "ablate", "actadd")}
    langs = json.loads((stage_dirs["languages"] / "languages.json").read_text(encoding="utf-8"))
    summary = json.loads((stage_dirs["attribute"] / "attribution" / "summary.json").read_text(encoding="utf-8"))
    div = json.loads((stage_dirs["compare"] / "divergence.json").read_text(encoding="utf-8"))
    effects_file = stage_dirs["attribute"] / "effects.json"
    return {
        "version": __version__, "config": config, "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1),
        "direction": {k: d.get(k) for k in ("model", "lang", "layer", "position", "norm", "n_harmful", "n_harmless",
                                            "selection", "actadd")},
        "refusal": {k: v["results"] for k, v in ev.items()},
        "actadd": {"alpha": ev["actadd"].get("alpha"), "layer": ev["actadd"].get("layer")},
        "languages": langs,
        "attribution": summary,
        "effects": json.loads(effects_file.read_text(encoding="utf-8")) if effects_file.exists() else None,
        "divergence": div,
        "files": {name: str(p) for name, p in stage_dirs.items()},
    }


# ------------------------------------------------------------------------------------------------------- report


class _Figures:
    """Collects figures: inline SVG for the page, and the same figure saved as ``figures/NAME.svg``."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []

    def add(self, name: str, fig: Any, caption: str) -> str:
        from refusal_circuits import viz
        from refusal_circuits.io import write_text

        document = viz.svg_document(fig)  # rendered once: the file and the page show the same drawing
        write_text(self.dir / f"{name}.svg", document)
        svg = document[document.index("<svg"):]
        self.names.append(name)
        return (f"<figure id='fig-{esc(name)}' data-figure='{esc(name)}'>{svg}<figcaption>{esc(caption)} "
                f"<span class='muted'>(figures/{esc(name)}.svg)</span></figcaption></figure>")


def build_report(out: Path, results: dict[str, Any]) -> str:
    """The report page of a finished study in ``out`` (stage directories under ``out/stages``); figures are also
    written to ``out/figures``. Returns the HTML."""
    import torch
    from safetensors.torch import load_file

    from refusal_circuits import viz
    from refusal_circuits.attribution import load_attribution

    stages = {k: Path(v) for k, v in results["files"].items()}
    figs = _Figures(out)
    cfg, d = results["config"], results["direction"]
    base = cfg["base"]
    refusal = results["refusal"]
    langs_json = results["languages"]
    transfer = langs_json["transfer"]
    langs = list(transfer["targets"])
    div = results["divergence"]
    body: list[str] = []
    sel = d.get("selection") or {}
    body.append(f"<h1>Refusal circuits: {esc(d['model'])}</h1>")
    body.append(
        f"<p>Prompts <code>{esc(cfg['prompts'])}</code>, languages {esc(', '.join(langs))}; base language "
        f"<b>{esc(base)}</b>. Study time {results['total_seconds']:.0f} s ("
        + ", ".join(f"{esc(k)} {v:.0f} s" for k, v in results["seconds"].items())
        + f"); refusal_circuits {esc(results['version'])}.</p>")

    # Direction
    body.append("<h2>The refusal direction</h2>")
    body.append(
        f"<p>r̂ from {d['n_harmful']} harmful and {d['n_harmless']} harmless {esc(base)} train prompts, read at "
        f"<b>resid_pre of layer {d['layer']}</b>, post-instruction position <b>{d['position']}</b>; filter "
        f"{esc(sel.get('filter'))}{' (fallback from ' + esc(sel['fallback_from']) + ')' if sel.get('fallback_from') else ''}"
        f": bypass {_na(sel, 'bypass')} (baseline {_na(sel, 'baseline_harmful')}), "
        f"induce {_na(sel, 'induce')}, KL {_na(sel, 'kl', 3)}; ‖r‖ = {_na(d, 'norm')}, activation "
        f"addition α = {_na(results.get('actadd') or {}, 'alpha')}.</p>")

    # Refusal rates
    body.append("<h2>Refusal per language</h2>")
    abl_name, own_name = f"harmful, r̂({base}) ablated (1st token)", "harmful, own r̂ ablated (1st token)"
    first_name = "harmful, baseline (1st token)"
    rates: dict[str, dict[str, tuple[float, float, float]]] = {"harmful, baseline": {}, first_name: {}, abl_name: {},
                                                                own_name: {}, "harmless, baseline": {}}
    for lang in langs:
        g = refusal["baseline"].get(lang, {})
        if "harmful" in g:
            rates["harmful, baseline"][lang] = _rate(g["harmful"])
        if "harmful" in transfer["baseline"].get(lang, {}):
            rates[first_name][lang] = _rate(transfer["baseline"][lang]["harmful"])
        if "harmless" in g:
            rates["harmless, baseline"][lang] = _rate(g["harmless"])
        transferred = transfer["ablate"].get(base, {}).get(lang)
        if transferred:
            rates[abl_name][lang] = _rate(transferred)
        own = transfer["ablate"].get(lang, {}).get(lang)
        if own:
            rates[own_name][lang] = _rate(own)
    body.append(figs.add("refusal_rates", viz.refusal_rates(rates, title="Refusal rate per language"),
                         "Baseline: greedy generation judged by refusal phrases, and the same generation's first "
                         "token judged as the ablations are. Ablated: the base language's r̂, and each language's own "
                         "direction at r̂'s site, judged by the first token (greedy decoding would start with a "
                         "refusal token: the direction's refusal tokens, plus each language's own, read off its "
                         "baseline refusals). 95% Wilson intervals." + _judge_tokens_text(transfer)))
    generated = refusal["ablate"].get(base, {}).get("harmful")
    if generated:
        r = _rate(generated)
        body.append(f"<p>With r̂ ablated, greedy generation refuses {r[0]:.0%} of {esc(base)} harmful test prompts "
                    f"(95% CI {r[1]:.0%}–{r[2]:.0%}, n={generated['n']}; baseline "
                    f"{_rate(refusal['baseline'][base]['harmful'])[0]:.0%}).</p>")
    add = refusal["actadd"].get(base, {}).get("harmless")
    if add:
        r = _rate(add)
        body.append(f"<p>Activation addition of r̂ at layer {d['layer']} makes {r[0]:.0%} of {esc(base)} harmless "
                    f"test prompts refuse (95% CI {r[1]:.0%}–{r[2]:.0%}, n={add['n']}).</p>")
    aligned = [t for t in langs if transfer["baseline"].get(t, {}).get("aligned")]
    body.append(f"<p>Safety-aligned (baseline harmful refusal clearly above harmless, first-token judge): "
                f"<b>{esc(', '.join(aligned) or 'none')}</b>.</p>")

    # Cross-lingual directions and transfer
    body.append("<h2>Directions across languages</h2>")
    cos = langs_json["cosines"]
    body.append(figs.add("cosines", viz.matrix(cos["at_site"], cos["langs"], cos["langs"], vmin=0, vmax=1,
                                               title=f"cosine of per-language directions (layer {cos['layer']}, "
                                                     f"position {cos['position']})", cbar="cosine"),
                         "Difference-in-means directions of each language at r̂'s site (train split). The languages' "
                         "prompts are translations of each other, and shared content raises these cosines: the "
                         "split-half figure below separates it from a shared direction."
                         + _missing_text(cos, ("at_site",))))
    halved = langs_json.get("split_half")
    if halved:
        others = [x for x in halved["within"] if x != base]
        series = {"same prompts": {x: halved["paired"][x] for x in others},
                  "disjoint prompts": {x: halved["disjoint"][x] for x in others},
                  "within language": {x: halved["within"][x] for x in halved["within"]},
                  "disjoint, noise-corrected": {x: halved["corrected"][x] for x in others}}
        fig = viz.grouped_bars(series, ylabel=f"cosine (with {base})", langs=list(halved["within"]), title=(
            f"how much of the cosine is the shared direction (halves of the train prompts, layer {halved['layer']}, "
            f"position {halved['position']})"))
        fig.axes[0].axhline(1.0, color="grey", linewidth=0.5, linestyle=":")
        body.append(figs.add("split_half", fig,
            "Translations share their prompts' content, and a difference in means carries content too. "
            f"Same prompts: cosine of {base} and the language on halves of the same (translated) prompts. "
            "Disjoint prompts: on different halves. Within language: the language's own two halves (how well a "
            "half-size direction reproduces itself). Noise-corrected: disjoint / sqrt(within base × within "
            "language); near 1 means the directions are as parallel as their noise lets one see."
            + _missing_text(halved, ("within", "disjoint", "paired", "corrected"))))
    per_layer = torch.tensor(_nan_for_null(cos["per_layer"]), dtype=torch.float32)
    bi = cos["langs"].index(base)
    curves = {lang: per_layer[:, bi, i].tolist() for i, lang in enumerate(cos["langs"]) if lang != base}
    fig = viz.trajectories(curves, title=f"cosine with the {base} direction per layer", marker_layer=cos["layer"])
    fig.axes[0].set_ylabel(f"cosine with {base}")
    body.append(figs.add("cosines_per_layer", fig, "Per layer, at r̂'s position."))
    pca = langs_json["pca"]
    body.append(figs.add("pca", viz.scatter(pca["coords"], pca["langs"], title="shared PCA of the mean differences",
                                            explained=pca["explained_variance_ratio"]),
                         "Each language's harmful-minus-harmless mean at r̂'s site on the first two principal "
                         "components of all languages' means."))
    sources = [s for s in transfer["sources"] if transfer["ablate"].get(s)]
    grid = [[transfer["baseline"][t]["harmful"]["rate"] for t in langs]]
    grid += [[transfer["ablate"][s][t]["rate"] if t in transfer["ablate"][s] else math.nan for t in langs]
             for s in sources]
    body.append(figs.add("transfer", viz.matrix(grid, ["none", *sources], langs, vmin=0, vmax=1, cmap="viridis",
                                                fmt="{:.0%}", title="harmful refusal with a direction ablated",
                                                cbar="refusal rate", xlabel="prompts in", ylabel="direction from"),
                         "Rows: whose direction is ablated (first row: none); columns: the language of the harmful "
                         "test prompts; first-token judge. Empty cells were not measured (transfer='base'); n/a: no "
                         "prompts."))

    # Attribution
    body.append("<h2>Where r̂ is written: attribution</h2>")
    attribution = load_attribution(stages["attribute"] / "attribution")
    body.append(f"<p>{attribution.n_prompts} prompts; every component's direct write adds up to the residual "
                f"stream's projection on r̂ within {attribution.completeness_error():.1e}.</p>")
    body.append(attribution.top_heads(8).where(lang=base)._repr_html_())
    sep = div.get("separation")
    if sep:
        body.append(figs.add("separation", viz.matrix(sep["auroc"], sep["langs"],
                                                      [str(i) for i in range(len(sep["auroc"][0]))],
                                                      vmin=0.5, vmax=1, fmt="{:.2f}", title="AUROC harmful vs "
                                                      "harmless along r̂", cbar="AUROC", xlabel="layer"),
                             f"Projection on r̂ at position {sep['position']}, per language and layer."
                             + _missing_text(sep, ("auroc",))))
    site = int(d["position"])
    curves = {}
    for lang in langs:
        sub = attribution.select(lang=lang, label="harmful")
        if sub.n_prompts:
            curves[lang] = sub.resid[:, :, site].mean(0).tolist()
    body.append(figs.add("trajectories", viz.trajectories(curves, title="mean projection on r̂ (harmful prompts)",
                                                          marker_layer=int(d["layer"])),
                         f"resid_pre · r̂ at position {site}, per layer."))
    proj = [figs.add(f"projection_{lang}", viz.projection_heatmap(attribution, lang=lang),
                     f"{lang}: layer × position projection on r̂") for lang in langs
            if attribution.select(lang=lang, label="harmful").n_prompts]
    body.append("<details><summary>Layer × position projections per language</summary>" + "".join(proj)
                + "</details>")

    # Paired comparison
    body.append("<h2>Where translations diverge</h2>")
    paired_file = stages["compare"] / "paired.safetensors"
    paired = load_file(str(paired_file)) if paired_file.exists() else {}
    if f"{base}.mean" in paired:
        lim = float(max(v.abs().max() for k, v in paired.items() if k.endswith(".mean")))
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

    # Views
    views_file = stages["compare"] / "views.json"
    if views_file.exists():
        body.append(_views(stages["compare"], attribution, int(d["layer"])))

    body.append("<h2>Completions</h2><details><summary>Baseline</summary>"
                + _completions(json.loads((stages["evaluate"] / "baseline.json").read_text(encoding="utf-8"))["completions"])
                + f"</details><details><summary>r̂({esc(base)}) ablated</summary>"
                + _completions(json.loads((stages["evaluate"] / "ablate.json").read_text(encoding="utf-8"))["completions"])
                + "</details><details><summary>Activation addition</summary>"
                + _completions(json.loads((stages["evaluate"] / "actadd.json").read_text(encoding="utf-8"))["completions"])
                + "</details>")
    gaps = _gaps(results)
    if gaps:
        body.append("<h2>Not computed on these prompts</h2><p>Statistics that the prompts cannot give (the results "
                    f"hold them as null with the reason beside them): {len(gaps)}.</p><details><summary>Each, with "
                    "its reason</summary><ul>" + "".join(f"<li><code>{esc(path)}</code>: n/a ({esc(why)})</li>"
                                                       for path, why in gaps) + "</ul></details>")
    body.append("<script>document.body.dataset.figures=String(document.querySelectorAll('figure svg').length);"
                "</script>")
    return _page(f"refusal_circuits: {d['model']}", "".join(body), scripts=True)


def _views(stage: Path, attribution: Any, layer: int) -> str:
    from safetensors.torch import load_file

    from refusal_circuits import viz

    meta = json.loads((stage / "views.json").read_text(encoding="utf-8"))
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


def _na(obj: dict[str, Any], key: str, digits: int = 2) -> str:
    """``obj[key]`` as a number, or "n/a (reason)" for a statistic written as null with ``key_why`` beside it
    (:func:`refusal_circuits.io.nullable`); "–" where it was never part of the record."""
    x = obj.get(key)
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        why = obj.get(f"{key}_why")
        return f"n/a ({esc(why)})" if isinstance(why, str) else "–"
    return f"{float(x):.{digits}f}"


def _nan_for_null(value: Any) -> Any:
    """Nested lists with every null as NaN (what the figures draw as an empty, n/a cell)."""
    if isinstance(value, list):
        return [_nan_for_null(v) for v in value]
    return math.nan if value is None else value


def _missing_text(obj: dict[str, Any], keys: tuple[str, ...]) -> str:
    """A caption sentence giving the reasons for the null entries of ``obj[key]`` (its ``key_why``)."""
    by_reason: dict[str, list[str]] = {}  # one sentence per reason, naming everything it explains
    for key in keys:
        why = obj.get(f"{key}_why")
        if isinstance(why, str):
            by_reason.setdefault(why, []).append(key)
        elif isinstance(why, dict):
            for k, v in why.items():
                by_reason.setdefault(v, []).append(f"{key} {k}")
    parts = [f"{', '.join(what)}: n/a ({why})" for why, what in by_reason.items()]
    return (" " + "; ".join(parts) + ".") if parts else ""


def _gaps(obj: Any, path: str = "") -> list[tuple[str, str]]:
    """Every statistic the results hold as null with a reason: (key path, reason), in file order."""
    out: list[tuple[str, str]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            where = f"{path}.{k}" if path else str(k)
            if k.endswith("_why"):
                stem = where[: -len("_why")]
                out += [(stem, v)] if isinstance(v, str) else [(f"{stem}.{a}", b) for a, b in v.items()]
            else:
                out += _gaps(v, where)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _gaps(v, f"{path}[{i}]")
    return out
