"""`run` (the whole study) and `report` on a tiny model: every stage, the report, caching and invalidation (tiny)."""

from __future__ import annotations

import json
import re

import pytest

from refusal_circuits.cli import main

pytestmark = pytest.mark.tiny

TINY_FLAGS = ["--refusal-tokens", "I,S", "--compliance-tokens", "T", "--filter", "polyrefuse", "--kl-max", "1e9",
              "--max-layer-frac", "1.0", "--max-new-tokens", "3", "--total-effects", "2", "--patch-top-k", "2",
]


def _prompts(path):
    rows = []
    for label, words in (("harmful", ["bad", "evil", "harm", "hurt", "break", "steal", "burn", "lie"]),
                         ("harmless", ["bread", "poem", "sum", "sea", "tree", "song", "cat", "sun"])):
        for i, w in enumerate(words):
            split = ["train", "train", "val", "val", "test", "test", "test", "test"][i]
            for lang, stem in (("en", "tell me about"), ("de", "erzähl mir von")):
                # a hostile-looking translation: the report must show it as text
                text = f"{stem} {w}" if i != 4 or lang == "en" else f"{stem} <script>alert(1)</script> {w}\u202e"
                rows.append({"id": f"{label}-{i}", "lang": lang, "label": label, "instruction": text, "split": split})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def study(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    prompts = _prompts(d / "p.jsonl")
    out = d / "out"
    argv = ["-q", "run", "--model", str(tiny_dir), "--prompts", str(prompts), "--out", str(out), *TINY_FLAGS]
    assert main(argv) == 0
    return out, argv


def test_run_writes_every_stage_the_report_and_results(study):
    out, _ = study
    results = json.loads((out / "results.json").read_text())
    assert set(results["seconds"]) == {"direction", "evaluate", "languages", "attribute", "compare", "harm", "subspace"}
    assert results["direction"]["lang"] == "en" and results["config"]["langs"] == ["en", "de"]
    assert set(results["refusal"]["baseline"]) == {"en", "de"}
    assert results["refusal"]["baseline"]["en"]["harmful"]["n"] == 4
    assert set(results["refusal"]["ablate"]) == {"en"} and set(results["refusal"]["ablate"]["en"]) == {"harmful"}
    assert set(results["refusal"]["actadd"]) == {"en"}
    transfer = results["languages"]["transfer"]
    assert set(transfer["ablate"]["en"]) == {"en", "de"} and set(transfer["ablate"]["de"]) == {"de"}
    assert results["languages"]["cosines"]["langs"] == ["en", "de"]
    halved = results["languages"]["split_half"]
    assert halved["within"].keys() == {"en", "de"} and halved["disjoint"]["en"] == pytest.approx(halved["within"]["en"])
    assert set(results["divergence"]["languages"]) == {"de"}
    de = results["divergence"]["languages"]["de"]
    assert de["n_pairs"] == 4 and len(de["patch"]["heads"]) == 2 and de["summary"].startswith("de: refuses")
    assert len(results["effects"]["heads"]) == 2
    harm = results["harm"]
    assert list(harm["langs"]) == ["en", "de"] and harm["langs"]["en"]["harm_retention"]["value"] == pytest.approx(1.0)
    assert set(harm["langs"]["de"]["heads"]) == {"harm", "refusal"} and "steer_harm" in harm["langs"]["de"]
    page = (out / "report.html").read_text()
    assert "Recognise harm or refuse?" in page and "fig-harm_vs_refusal" in page
    # the subspace stage is off by default: it says so
    assert results["subspace"] is None and "--subspace-k 0" in results["subspace_why"]
    assert "One refusal direction or a subspace?" in page
    # The effects table: like with like (the site gap beside the projection change) and every head's split or why not.
    table = page.split("Direct write versus total effect")[1].split("</table>")[0]
    for h in results["effects"]["heads"]:
        assert f"L{h['layer']}.H{h['head']}" in table
        assert (h["path"] is None) == (h["layer"] >= results["direction"]["layer"])
    assert "direct gap at r̂&#x27;s position" in table or "direct gap at r̂'s position" in table
    figures = sorted(p.stem for p in (out / "figures").glob("*.svg"))
    assert {"refusal_rates", "cosines", "split_half", "transfer", "pca", "trajectories", "heads_en", "heads_diff_de",
            "projection_de"} <= set(figures)
    assert all(f"data-figure='{name}'" in page for name in figures)
    assert "default-src 'none'" in page and "http://" not in page.split("</head>")[0]
    assert not re.search(r"<script[^>]*\bsrc=", page), "no script is loaded from anywhere"
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "\u202e" not in page and "U+202E" in page
    assert not list(out.rglob(".*.tmp")), "no temporary files left behind"


def test_rerun_is_cached_and_a_changed_input_reruns_only_what_depends_on_it(study, capsys):
    out, argv = study
    stamp = {p.parent.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*/stage.json")}
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("cached") == 7
    assert stamp == {p.parent.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*/stage.json")}
    changed = [a if a != "3" else "4" for a in argv]  # --max-new-tokens 3 -> 4
    assert main(changed) == 0
    now = {p.parent.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*/stage.json")}
    rerun = {k for k in now if now[k] != stamp[k]}
    assert rerun == {"evaluate", "languages", "attribute", "compare"}  # both read evaluate's first tokens


def test_transfer_baseline_from_generation_equals_the_first_token_judge(study, tiny_model):
    """The baseline row reuses the evaluate stage's greedy first tokens: it must equal a fresh measurement."""
    from refusal_circuits.crosslingual import first_token_refusals
    from refusal_circuits.data import load_prompts

    out, argv = study
    results = json.loads((out / "results.json").read_text())
    ids = json.loads((out / "stages" / "direction" / "direction.json").read_text())["refusal_tokens"]["ids"]
    judged = results["languages"]["transfer"]["judge_tokens"]
    prompts = load_prompts(argv[argv.index("--prompts") + 1]).filter(split="test")
    for lang in ("en", "de"):
        # the judge counts the direction's refusal tokens in every language, and each language's own on top
        assert set(judged[lang]["ids"]) >= {int(t) for v in ids.values() for t in v}
        for label in ("harmful", "harmless"):
            got = first_token_refusals(tiny_model, prompts.filter(lang=lang, label=label).instructions,
                                       judged[lang]["ids"])
            want = results["languages"]["transfer"]["baseline"][lang][label]
            assert (want["refused"], want["n"]) == (sum(got), len(got)), (lang, label)


def test_report_rebuilds_without_the_model(study, capsys):
    out, _ = study
    (out / "report.html").unlink()
    assert main(["-q", "report", str(out)]) == 0
    assert (out / "report.html").read_text().count("<figure") >= 8


def test_run_and_report_bad_input(tiny_dir, tmp_path, capsys):
    code = main(["-q", "run", "--model", str(tiny_dir), "--langs", "xx", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "xx" in err and "bundled" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    code = main(["-q", "report", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "not a finished `run` directory" in err
    for flag in ("--transfer-check", "--total-effects", "--patch-top-k"):
        code = main(["-q", "run", "--model", str(tiny_dir), flag, "-1", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and f"{flag} must be 0 or more, got -1" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()


def _chromium():
    import os
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed (the CI set-up installs Debian's chromium package)")
        pytest.skip("chromium is not installed (apt-get install chromium; CI installs it)")
    return found


def test_report_in_headless_chromium_offline_draws_every_figure_without_console_errors(study, tmp_path):
    """The page opened with networking disabled: every figure drawn, both attention views rendered, the hostile
    translation shown as text, and not one console message. The screenshot is kept as a test artefact."""
    import os
    import subprocess
    from pathlib import Path

    out, _ = study
    browser = _chromium()
    url = (out / "report.html").as_uri()
    offline = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
               "--virtual-time-budget=15000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *offline, "--enable-logging=stderr", "--v=0", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "\n".join(console[:10])
    html = dom.stdout
    n_figures = html.count("<figure ")
    assert n_figures >= 12 and f'data-figures="{n_figures}"' in html, "the page's own script counted every SVG"
    views = re.findall(r'<div id="circuits-vis-[^"]+"[^>]*>(.{0,80})', html)
    assert len(views) == 2 and all(v.startswith("<div") for v in views), "circuitsvis rendered both views"
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    artefacts = Path(os.environ.get("TEST_ARTIFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "report.png"
    proc = subprocess.run([browser, *offline, "--window-size=1400,5000", f"--screenshot={shot}", url],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and shot.stat().st_size > 50_000, proc.stderr[-2000:]


def test_ctrl_c_mid_stage_keeps_finished_stages_and_the_rerun_resumes_there(tiny_dir, tmp_path, monkeypatch, capsys):
    from refusal_circuits import study as study_mod

    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "out"
    argv = ["-q", "run", "--model", str(tiny_dir), "--prompts", str(prompts), "--out", str(out), *TINY_FLAGS]
    real = study_mod._RUNNERS["attribute"]

    def interrupted(study, tmp):
        real(study, tmp)  # the stage's files are written into its temporary directory ...
        raise KeyboardInterrupt  # ... and Ctrl-C arrives before the stage finishes

    monkeypatch.setitem(study_mod._RUNNERS, "attribute", interrupted)
    assert main(argv) == 130
    assert "finished outputs are intact" in capsys.readouterr().err
    done = {p.parent.name for p in (out / "stages").glob("*/stage.json")}
    assert done == {"direction", "evaluate", "languages"}
    assert not (out / "stages" / "attribute").exists() and not (out / "report.html").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "no temporary files or directories left"
    stamp = {p.parent.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*/stage.json")}
    monkeypatch.setitem(study_mod._RUNNERS, "attribute", real)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("cached") == 3 and "stage attribute: done" in printed and "stage compare: done" in printed
    assert all(p.stat().st_mtime_ns == stamp[p.parent.name] for p in (out / "stages").glob("*/stage.json")
               if p.parent.name in stamp)


def test_the_subspace_stage_runs_alone_on_a_finished_study(study, capsys):
    """Turning the subspace stage on reruns only that stage (the others do not read subspace_k)."""
    out, argv = study
    assert main(argv) == 0  # the study as the fixture made it (an earlier test changed a setting)
    capsys.readouterr()
    assert main([*argv, "--subspace-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("cached") == 6 and "stage subspace: done" in printed
    results = json.loads((out / "results.json").read_text())
    sub = results["subspace"]
    assert sub["k"] == 2 and list(sub["langs"]) == ["en", "de"] and len(sub["langs"]["de"]["angles"]) == 2
    assert set(sub["langs"]["de"]["carried"]) >= {"r_hat", "base_subspace", "control"}
    page = (out / "report.html").read_text()
    assert "One refusal direction or a subspace?" in page and "fig-subspace_carried" in page


def test_paired_total_effects_rerun_only_the_compare_stage(study, capsys):
    """--compare-totals reruns only the compare stage (the harm and subspace stages read the direction alone), and
    the report shows the paired total effects with their figure."""
    out, argv = study
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--compare-totals", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("cached") == 6 and "stage compare: done" in printed
    results = json.loads((out / "results.json").read_text())
    tot = results["divergence"]["totals"]
    assert list(tot["langs"]) == ["de"] and len(tot["langs"]["de"]["validation"]["projection"]["nodes"]) == 2
    assert (out / "stages" / "compare" / "totals.safetensors").exists()
    page = (out / "report.html").read_text()
    assert "Total effects, paired" in page and "fig-paired_totals" in page
