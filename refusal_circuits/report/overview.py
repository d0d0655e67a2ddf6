"""The report's opening sections: what was studied, the refusal direction, and refusal per language."""

from __future__ import annotations

from refusal_circuits import viz
from refusal_circuits.markup import esc
from refusal_circuits.report.figures import Figures
from refusal_circuits.report.results import StudyView, rate
from refusal_circuits.report.text import judge_tokens_text, na


def header_section(study: StudyView) -> str:
    """The title, the prompts and languages, the base language, and the study's time and version."""
    results, cfg = study.results, study.config
    return (f"<h1>Refusal circuits: {esc(study.direction['model'])}</h1>"
            f"<p>Prompts <code>{esc(cfg['prompts'])}</code>, languages {esc(', '.join(study.langs))}; base language "
            f"<b>{esc(study.base)}</b>. Study time {results['total_seconds']:.0f} s ("
            + ", ".join(f"{esc(k)} {v:.0f} s" for k, v in results["seconds"].items())
            + f"); refusal_circuits {esc(results['version'])}.</p>")


def direction_section(study: StudyView) -> str:
    """Where r̂ was read, from how many prompts, and the selection scores that chose it."""
    d, base = study.direction, study.base
    sel = d.get("selection") or {}
    fallback = " (fallback from " + esc(sel["fallback_from"]) + ")" if sel.get("fallback_from") else ""
    return ("<h2>The refusal direction</h2>"
            f"<p>r̂ from {d['n_harmful']} harmful and {d['n_harmless']} harmless {esc(base)} train prompts, read at "
            f"<b>resid_pre of layer {d['layer']}</b>, post-instruction position <b>{d['position']}</b>; filter "
            f"{esc(sel.get('filter'))}{fallback}"
            f": bypass {na(sel, 'bypass')} (baseline {na(sel, 'baseline_harmful')}), "
            f"induce {na(sel, 'induce')}, KL {na(sel, 'kl', 3)}; ‖r‖ = {na(d, 'norm')}, activation "
            f"addition α = {na(study.results.get('actadd') or {}, 'alpha')}.</p>")


def rates_section(study: StudyView, figs: Figures) -> str:
    """Refusal rates per language: at baseline, with r̂ (and each language's own direction) ablated, with r̂ added;
    and which languages are safety-aligned."""
    base, refusal, transfer = study.base, study.refusal, study.transfer
    abl_name, own_name = f"harmful, r̂({base}) ablated (1st token)", "harmful, own r̂ ablated (1st token)"
    first_name = "harmful, baseline (1st token)"
    rates: dict[str, dict[str, tuple[float, float, float]]] = {"harmful, baseline": {}, first_name: {}, abl_name: {},
                                                                own_name: {}, "harmless, baseline": {}}
    for lang in study.langs:
        g = refusal["baseline"].get(lang, {})
        if "harmful" in g:
            rates["harmful, baseline"][lang] = rate(g["harmful"])
        if "harmful" in transfer["baseline"].get(lang, {}):
            rates[first_name][lang] = rate(transfer["baseline"][lang]["harmful"])
        if "harmless" in g:
            rates["harmless, baseline"][lang] = rate(g["harmless"])
        transferred = transfer["ablate"].get(base, {}).get(lang)
        if transferred:
            rates[abl_name][lang] = rate(transferred)
        own = transfer["ablate"].get(lang, {}).get(lang)
        if own:
            rates[own_name][lang] = rate(own)
    body = ["<h2>Refusal per language</h2>",
            figs.add("refusal_rates", viz.refusal_rates(rates, title="Refusal rate per language"),
                     "Baseline: greedy generation judged by refusal phrases, and the same generation's first "
                     "token judged as the ablations are. Ablated: the base language's r̂, and each language's own "
                     "direction at r̂'s site, judged by the first token (greedy decoding would start with a "
                     "refusal token: the direction's refusal tokens, plus each language's own, read off its "
                     "baseline refusals). 95% Wilson intervals." + judge_tokens_text(transfer))]
    generated = refusal["ablate"].get(base, {}).get("harmful")
    if generated:
        r = rate(generated)
        body.append(f"<p>With r̂ ablated, greedy generation refuses {r[0]:.0%} of {esc(base)} harmful test prompts "
                    f"(95% CI {r[1]:.0%}–{r[2]:.0%}, n={generated['n']}; baseline "
                    f"{rate(refusal['baseline'][base]['harmful'])[0]:.0%}).</p>")
    add = refusal["actadd"].get(base, {}).get("harmless")
    if add:
        r = rate(add)
        body.append(f"<p>Activation addition of r̂ at layer {study.direction['layer']} makes {r[0]:.0%} of "
                    f"{esc(base)} harmless test prompts refuse (95% CI {r[1]:.0%}–{r[2]:.0%}, n={add['n']}).</p>")
    aligned = [t for t in study.langs if transfer["baseline"].get(t, {}).get("aligned")]
    body.append(f"<p>Safety-aligned (baseline harmful refusal clearly above harmless, first-token judge): "
                f"<b>{esc(', '.join(aligned) or 'none')}</b>.</p>")
    return "".join(body)
