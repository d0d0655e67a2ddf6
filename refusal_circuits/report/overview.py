"""The report's opening sections: what was studied, the refusal direction, and refusal per language."""

from __future__ import annotations

from refusal_circuits import viz
from refusal_circuits.judges import kappa_html
from refusal_circuits.markup import esc, table
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


def _pct(r: dict | None) -> str:
    """A rate's JSON (:meth:`~refusal_circuits.stats.Rate.to_json`) as ``p [lo, hi]``."""
    if not r or r.get("rate") is None:
        return "n/a"
    return f"{r['rate']:.0%} <small>[{r['ci_low']:.0%}, {r['ci_high']:.0%}]</small>"


def judging_section(study: StudyView) -> str:
    """In which language each language's prompts were answered (and refused), and how far a second, independent
    judge agrees with the phrase judge, per language, with 95% intervals."""
    body = ["<h2>Response language and judges</h2>"]
    lang = study.results.get("response_language")
    if lang:
        rows = [f"<tr><td>{esc(k)}</td><td>{r['n']}</td><td>{_pct(r['own'])}</td><td>{_pct(r['english'])}</td>"
                f"<td>{_pct(r['other'])}</td><td>{_pct(r['unknown'])}</td><td>{r['refused']}</td>"
                f"<td>{_pct(r['refused_in_english'])}</td></tr>" for k, r in lang["languages"].items()]
        confused = [k for k, r in lang["languages"].items()
                    if k != study.base and r["refused"] and (r["refused_in_english"].get("rate") or 0) > 0.5]
        body.append(table(f"Baseline completions by detected language ({esc(lang['method'])}). A refusal in "
                          "English to a prompt in another language is language confusion, not that language's "
                          "alignment: " + (f"<b>{esc(', '.join(confused))}</b>" if confused else "none here") + ".",
                          ["prompt lang", "n", "answered in it", "in English", "other", "unknown", "refused",
                           "refusals in English"], rows))
    second = study.results.get("second_judge")
    if second:
        rows = [f"<tr><td>{esc(k)}</td><td>{v['n']}</td><td>{_pct(v['agreement'])}</td><td>"
                + kappa_html(v)
                + f"</td><td>{_pct(v['first_rate'])}</td><td>{_pct(v['second_rate'])}</td></tr>"
                for k, v in second["languages"].items()]
        body.append(table(f"Agreement of {esc(second['first'])} and {esc(second['second'])} on a stratified "
                          "sample of the baseline completions (Cohen's kappa with a bootstrap interval)",
                          ["lang", "n", "agreement", "kappa", f"refused ({second['first']})",
                           f"refused ({second['second']})"], rows))
    else:
        body.append(f"<p>No second judge: {esc(study.results.get('second_judge_why') or 'not run')}.</p>")
    return "".join(body)


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
                     "refusal token: each language's own refusal tokens, discovered on its train split or, where it "
                     "refused too rarely, its native refusal openers, plus every language's together; none is read "
                     "off the test completions). 95% Wilson intervals." + judge_tokens_text(transfer))]
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
