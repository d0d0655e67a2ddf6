"""`directions`, `evaluate` and `orthogonalize` end to end on a tiny model, and their bad inputs (tiny tier)."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_circuits.cli import main

pytestmark = pytest.mark.tiny


def _prompt_file(path):
    rows = []
    for label, words in (("harmful", ["bad", "evil", "harm", "hurt", "break", "steal"]),
                         ("harmless", ["bread", "poem", "sum", "sea", "tree", "song"])):
        for i, w in enumerate(words):
            split = ["train", "train", "val", "val", "test", "test"][i]
            rows.append({"id": f"{label}-{i}", "lang": "en", "label": label, "instruction": f"tell me about {w}",
                         "split": split})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _direction_made(tiny_dir, workdir):
    """The prompt file, and ``workdir/dir`` written by `directions` unless an earlier test already wrote it."""
    prompts = _prompt_file(workdir / "p.jsonl")
    if not (workdir / "dir" / "direction.json").exists():
        assert main(["-q", "directions", "--model", str(tiny_dir), "--prompts", str(prompts), "--lang", "en",
                     "--out", str(workdir / "dir"), "--refusal-tokens", "I,S", "--filter", "polyrefuse",
                     "--kl-max", "1e9", "--max-layer-frac", "1.0"]) == 0
    return prompts


def _run(capsys, *argv):
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


def test_directions_evaluate_orthogonalize_end_to_end(tiny_dir, workdir, capsys):
    prompts = _prompt_file(workdir / "p.jsonl")
    code, out, err = _run(capsys, "directions", "--model", str(tiny_dir), "--prompts", str(prompts), "--lang", "en",
                          "--out", str(workdir / "dir"), "--refusal-tokens", "I,S", "--filter", "polyrefuse",
                          "--kl-max", "1e9", "--max-layer-frac", "1.0")
    assert code == 0, err
    meta = json.loads((workdir / "dir" / "direction.json").read_text())
    assert meta["layer"] == 1 and meta["lang"] == "en" and meta["n_prompts"] == 4
    code, _, err = _run(capsys, "directions", "--model", str(tiny_dir), "--prompts", str(prompts), "--lang", "en",
                        "--out", str(workdir / "dir-pos"), "--refusal-tokens", "I,S", "--filter", "polyrefuse",
                        "--kl-max", "1e9", "--max-layer-frac", "1.0", "--positions", "-2,-3")
    assert code == 0, err
    scored = json.loads((workdir / "dir-pos" / "direction.json").read_text())["selection_scores"]["candidates"]
    assert scored and {c["position"] for c in scored} == {-2, -3}
    assert meta["selection"]["filter"] == "polyrefuse+custom"
    assert len(meta["selection_scores"]["candidates"]) >= 1

    code, out, err = _run(capsys, "evaluate", "--model", str(tiny_dir), "--prompts", str(prompts),
                          "--direction", str(workdir / "dir"), "--intervention", "ablate", "--max-new-tokens", "3",
                          "--out", str(workdir / "eval.json"))
    assert code == 0, err
    ev = json.loads((workdir / "eval.json").read_text())
    assert {"model", "intervention", "direction", "results", "completions"} <= set(ev)
    assert ev["intervention"] == "ablate"
    group = ev["results"]["en"]["harmful"]
    assert group["n"] == 2 and 0 <= group["refusal_rate"] <= 1 and isinstance(group["refusal_score"], float)
    assert {"id", "lang", "label", "completion", "refused"} <= set(ev["completions"][0])
    assert set(ev["capability"]) >= {"kl_harmless", "ce_harmless_base", "ce_harmless_intervened"}

    code, out, err = _run(capsys, "orthogonalize", "--model", str(tiny_dir), "--direction", str(workdir / "dir"),
                          "--out", str(workdir / "ortho"))
    assert code == 0, err
    from refusal_circuits import interventions
    from refusal_circuits.chat import tokenize_chat
    from refusal_circuits.directions import load_direction
    from refusal_circuits.models import load_model

    base, edited = load_model(str(tiny_dir)), load_model(str(workdir / "ortho"))
    batch = tokenize_chat(base.tokenizer, ["tell me about bad", "x"])
    with torch.inference_mode():
        with interventions.ablate(base, load_direction(workdir / "dir")):
            want = base(batch.input_ids, attention_mask=batch.attention_mask)
        got = edited(batch.input_ids, attention_mask=batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


def _foreign_direction(tmp_path):
    from refusal_circuits.directions import Direction

    d = Direction(vector=torch.ones(96) / 96**0.5, norm=1.0, layer=0, position=-1, model="other", lang="en",
                  n_harmful=1, n_harmless=1, prompts_sha256="")
    return d.save(tmp_path / "foreign")


@pytest.mark.parametrize(("argv", "message"), [
    (["evaluate", "--intervention", "ablate", "--out", "{tmp}/e.json"], "--intervention ablate needs --direction"),
    (["evaluate", "--direction", "{tmp}/nowhere", "--out", "{tmp}/e.json"], "no such file"),
    (["evaluate", "--direction", "{foreign}", "--intervention", "ablate", "--out", "{tmp}/e.json"],
     "it comes from another model"),
    (["orthogonalize", "--direction", "{foreign}", "--out", "{tmp}/m"], "it comes from another model"),
    (["directions", "--lang", "xx", "--out", "{tmp}/d"], "no prompts in language 'xx'"),
    (["directions", "--max-layer-frac", "0", "--out", "{tmp}/d"], "--max-layer-frac must be in (0, 1]"),
    (["directions", "--positions", "1,2", "--out", "{tmp}/d"], "negative positions"),
    (["directions", "--positions", "-99", "--refusal-tokens", "I", "--out", "{tmp}/d"], "out of range"),
])
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tiny_dir, tmp_path, capsys, argv, message):
    foreign = _foreign_direction(tmp_path)
    prompts = _prompt_file(tmp_path / "p.jsonl")
    argv = [a.format(tmp=tmp_path, foreign=foreign) for a in argv]
    extra = [] if argv[0] == "orthogonalize" else ["--prompts", str(prompts)]
    code, _, err = _run(capsys, argv[0], "--model", str(tiny_dir), *extra, *argv[1:])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    for name in ("e.json", "m", "d"):
        assert not (tmp_path / name).exists()


def test_evaluate_without_refusal_tokens_still_reports_rates(tiny_dir, tmp_path, capsys):
    """A model that never refuses (an orthogonalized export, or this random one) yields no refusal tokens."""
    prompts = _prompt_file(tmp_path / "p.jsonl")
    code, out, err = _run(capsys, "evaluate", "--model", str(tiny_dir), "--prompts", str(prompts),
                          "--max-new-tokens", "2", "--out", str(tmp_path / "e.json"))
    assert code == 0, err
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["refusal_tokens"] is None and "refusal_score" not in ev["results"]["en"]["harmful"]
    assert ev["results"]["en"]["harmful"]["n"] == 2


def test_attribute_end_to_end_and_completeness_from_the_file(tiny_dir, workdir, capsys):
    from safetensors.torch import load_file

    prompts = _direction_made(tiny_dir, workdir)
    out_dir = workdir / "attr"
    code, out, err = _run(capsys, "attribute", "--model", str(tiny_dir), "--prompts", str(prompts), "--direction",
                          str(workdir / "dir"), "--split", "all", "--compliance-tokens", "T,x",
                          "--total-effects", "2", "--adv-suffix", " !!", "--out", str(out_dir))
    assert code == 0, err
    t = load_file(str(out_dir / "attributions.safetensors"))
    n = 12
    assert t["embed"].shape[0] == n and t["heads"].shape[:3] == (n, 2, 4) and t["mlps"].shape[:2] == (n, 2)
    assert t["resid"].shape[:2] == (n, 3) and t["mask"].shape == t["embed"].shape
    cum = torch.cumsum(t["heads"].double().sum(2) + t["mlps"].double(), 1)
    rebuilt = (torch.cat([torch.zeros_like(cum[:, :1]), cum], 1) + t["embed"].double()[:, None]) * t["mask"][:, None]
    assert (rebuilt - t["resid"].double()).abs().max() < 1e-5
    side = json.loads((out_dir / "attributions.json").read_text())
    assert len(side["tokens"]) == n and len(side["tokens"][0]) == t["mask"].shape[1]
    assert "adv_suffix" in side["spans"][0] and side["spans"][0][-1] == "post"
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["completeness_max_abs_error"] < 1e-5 and summary["dla"]["targets"]["compliance"]["en"]
    effects = json.loads((out_dir / "effects.json").read_text())
    assert len(effects["heads"]) == 2 and {"patch_harmful", "patch_harmless", "direct_harmful"} <= set(effects["heads"][0])


@pytest.mark.parametrize("extra, message", [
    (["--direction", "nowhere"], "nowhere"),
    (["--compliance-tokens", ","], "--compliance-tokens"),
    (["--total-effects", "-1"], "--total-effects"),
    (["--langs", "xx"], "xx"),
])
def test_attribute_bad_input(tiny_dir, workdir, capsys, extra, message):
    prompts = _direction_made(tiny_dir, workdir)
    args = ["attribute", "--model", str(tiny_dir), "--prompts", str(prompts), "--direction", str(workdir / "dir"),
            "--out", str(workdir / "bad-attr")]
    for i in range(0, len(extra), 2):  # later flags win in argparse
        args += extra[i:i + 2]
    code, out, err = _run(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (workdir / "bad-attr" / "attributions.safetensors").exists()


def test_compare_end_to_end(tiny_dir, workdir, capsys):
    rows = [json.loads(line) for line in _direction_made(tiny_dir, workdir).read_text().splitlines()]
    both = rows + [{**r, "lang": "de", "instruction": r["instruction"].replace("tell me about", "erzähl mir von")}
                   for r in rows]
    prompts = workdir / "p2.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in both))
    code, _, err = _run(capsys, "attribute", "--model", str(tiny_dir), "--prompts", str(prompts), "--direction",
                        str(workdir / "dir"), "--split", "all", "--compliance-tokens", "T", "--total-effects", "0",
                        "--out", str(workdir / "attr2"))
    assert code == 0, err
    code, out, err = _run(capsys, "compare", "--attributions", str(workdir / "attr2"), "--base", "en",
                          "--patch-top-k", "2", "--out", str(workdir / "cmp"))
    assert code == 0, err
    div = json.loads((workdir / "cmp" / "divergence.json").read_text())
    de = div["languages"]["de"]
    assert div["base"] == "en" and set(div["languages"]) == {"de"}
    assert {"n_pairs", "aligned", "baseline_refusal", "trajectory_split_layer", "heads", "rank_correlation",
            "summary"} <= set(de)
    assert de["n_pairs"] == 6 and len(de["heads"]) == 8
    h = de["heads"][0]
    assert {"layer", "head", "mean_diff", "ci_low", "ci_high", "significant"} <= set(h)
    assert abs(h["mean_diff"]) >= abs(de["heads"][-1]["mean_diff"])
    assert de["baseline_refusal"]["harmful"]["n"] == 6 and len(de["patch"]["heads"]) == 2
    assert de["summary"].startswith("de: refuses")
    code, _, err = _run(capsys, "compare", "--attributions", str(workdir / "attr2"), "--base", "en", "--directions",
                        "--patch-top-k", "0", "--out", str(workdir / "cmp-dirs"))
    assert code == 0, err
    div = json.loads((workdir / "cmp-dirs" / "divergence.json").read_text())
    cos = div["directions"]["cosines"]
    assert cos["langs"] == ["en", "de"] and abs(cos["at_site"][0][0] - 1) < 1e-5 and -1 <= cos["at_site"][0][1] <= 1
    assert len(cos["per_layer"]) == 2 and len(div["directions"]["pca"]["coords"]) == 2
    t = div["transfer"]
    assert set(t["ablate"]) == {"en", "de"} and t["ablate"]["en"]["de"]["n"] == 2 and "aligned" in t["baseline"]["de"]
    assert len(div["separation"]["auroc"]) == 2
    code, _, err = _run(capsys, "compare", "--attributions", str(workdir / "attr2"), "--base", "fr",
                        "--out", str(workdir / "cmp-bad"))
    assert code == 2 and "--base fr" in err and not (workdir / "cmp-bad" / "divergence.json").exists()
    # Paired total effects by attribution patching, on the attributed pairs, validated on 2 + 2 nodes.
    code, out, err = _run(capsys, "compare", "--attributions", str(workdir / "attr2"), "--base", "en",
                          "--patch-top-k", "0", "--totals", "2", "--out", str(workdir / "cmp-totals"))
    assert code == 0, err
    tot = json.loads((workdir / "cmp-totals" / "divergence.json").read_text())["totals"]
    de = tot["langs"]["de"]
    assert de["n_pairs"] == {"harmful": 6, "harmless": 6} and len(de["validation"]["projection"]["nodes"]) == 4
    assert set(de["nodes"]) == set(tot["figure_nodes"]) and de["projection"]["top"]
    assert "r̂'s projection, en minus de" in out
    for bad, message in ((["--totals", "-1"], "--totals"), (["--totals", "2", "--no-model"], "--no-model")):
        code, _, err = _run(capsys, "compare", "--attributions", str(workdir / "attr2"), *bad,
                            "--out", str(workdir / "cmp-bad2"))
        assert code == 2 and message in err and not (workdir / "cmp-bad2" / "divergence.json").exists()


def test_atp_end_to_end_and_bad_input(tiny_dir, workdir, capsys):
    from safetensors.torch import load_file

    prompts = _direction_made(tiny_dir, workdir)
    out_dir = workdir / "atp"
    code, out, err = _run(capsys, "atp", "--model", str(tiny_dir), "--prompts", str(prompts), "--direction",
                          str(workdir / "dir"), "--split", "all", "--validate", "2", "--out", str(out_dir))
    assert code == 0, err
    t = load_file(str(out_dir / "atp.safetensors"))
    assert t["heads.score"].shape[:3] == (6, 2, 4) and t["mlps.projection"].shape[:2] == (6, 2)
    summary = json.loads((out_dir / "atp.json").read_text())
    assert summary["n_harmful"] == 6 and summary["validation"]["n_top"] == 2
    assert len(summary["validation"]["nodes"]) == 4 and "pearson" in summary["validation"]["summary"]["score"]
    assert "AtPValidation" in out
    code, _, err = _run(capsys, "atp", "--model", str(tiny_dir), "--prompts", str(prompts), "--direction",
                        str(workdir / "dir"), "--validate", "-1", "--out", str(workdir / "atp-bad"))
    assert code == 2 and "--validate" in err and len(err.strip().splitlines()) == 1
    assert not (workdir / "atp-bad").exists()


def test_harm_end_to_end_and_bad_input(tiny_dir, workdir, capsys):
    from safetensors.torch import load_file

    prompts = _direction_made(tiny_dir, workdir)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    both = workdir / "p-en-de.jsonl"
    both.write_text("".join(json.dumps(r) + "\n" for r in rows + [{**r, "lang": "de", "instruction": r["instruction"]
                                                                   .upper()} for r in rows]))
    out_dir = workdir / "harm"
    code, out, err = _run(capsys, "harm", "--model", str(tiny_dir), "--prompts", str(both), "--direction",
                          str(workdir / "dir"), "--n-boot", "50", "--out", str(out_dir))
    assert code == 0, err
    obj = json.loads((out_dir / "harm.json").read_text())
    assert list(obj["langs"]) == ["en", "de"] and obj["langs"]["en"]["n"]["test"] == {"harmful": 2, "harmless": 2}
    assert obj["langs"]["en"]["harm_retention"]["value"] == pytest.approx(1.0)
    assert set(obj["langs"]["de"]["heads"]) == {"harm", "refusal"} and "steer_harm" in obj["langs"]["en"]
    # the direction has tokens for en only, and the byte tokenizer's de phrases give none: no English stand-in
    de = obj["langs"]["de"]
    assert de["refusal_tokens"] == "none" and de["steer_harm"] is None and "no refusal tokens" in de["steer_harm_why"]
    assert obj["langs"]["de"]["sentence"].startswith("de ") and "HarmRefusal(" in out
    t = load_file(str(out_dir / "harm.safetensors"))
    assert set(t) == {"harm_direction", "harm.en", "refusal.en", "harm.de", "refusal.de"}
    html = (out_dir / "harm.html").read_text()
    assert "<svg" in html and "Recognise harm or refuse?" in html and (out_dir / "figures" / "harm_vs_refusal.svg").exists()
    code, _, err = _run(capsys, "harm", "--model", str(tiny_dir), "--prompts", str(both), "--direction",
                        str(workdir / "dir"), "--harm-layer", "9", "--out", str(workdir / "harm-bad"))
    assert code == 2 and "--harm-layer 9" in err and len(err.strip().splitlines()) == 1
    assert not (workdir / "harm-bad").exists()


def test_directions_by_cosmic_and_both(tiny_dir, workdir, capsys):
    prompts = _direction_made(tiny_dir, workdir)
    common = ["directions", "--model", str(tiny_dir), "--prompts", str(prompts), "--lang", "en", "--refusal-tokens",
              "I,S", "--filter", "polyrefuse", "--kl-max", "1e9", "--max-layer-frac", "1.0"]
    code, out, err = _run(capsys, *common, "--strategy", "cosmic", "--out", str(workdir / "dir-cosmic"))
    assert code == 0, err
    meta = json.loads((workdir / "dir-cosmic" / "direction.json").read_text())
    assert meta["selection"]["strategy"] == "cosmic" and meta["selection_strategy"] == "cosmic"
    assert meta["selection_scores"]["readout_layers"] == [1] and "chosen by COSMIC" in out
    assert "refusal_tokens" in meta and "actadd" in meta  # tokens given: recorded, and actadd calibrated by them
    code, out, err = _run(capsys, *common, "--strategy", "both", "--out", str(workdir / "dir-both"))
    assert code == 0, err
    meta = json.loads((workdir / "dir-both" / "direction.json").read_text())
    agree = meta["cosmic"]["agreement"]
    assert meta["selection_strategy"] == "arditi" and {"same_site", "cosine", "rank_correlation"} <= set(agree)
    assert "COSMIC chose layer" in out
    code, _, err = _run(capsys, *common, "--strategy", "nope", "--out", str(workdir / "dir-nope"))
    assert code == 2 and "--strategy" in err


def test_subspace_end_to_end_and_bad_input(tiny_dir, workdir, capsys):
    from safetensors.torch import load_file

    prompts = _direction_made(tiny_dir, workdir)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    both = workdir / "p-en-de-sub.jsonl"
    both.write_text("".join(json.dumps(r) + "\n" for r in rows + [{**r, "lang": "de", "instruction": r["instruction"]
                                                                   .upper()} for r in rows]))
    out_dir = workdir / "subspace"
    code, out, err = _run(capsys, "subspace", "--model", str(tiny_dir), "--prompts", str(both), "--direction",
                          str(workdir / "dir"), "--k", "2", "--n-boot", "50", "--out", str(out_dir))
    assert code == 0, err
    obj = json.loads((out_dir / "subspace.json").read_text())
    assert list(obj["langs"]) == ["en", "de"] and obj["k"] == 2 and len(obj["langs"]["de"]["angles"]) == 2
    assert obj["langs"]["de"]["verdict"] in ("one direction", "a subspace", "no refusal to carry", "unmeasured")
    t = load_file(str(out_dir / "subspace.safetensors"))
    assert t["subspace.de"].shape == (2, 64) and "shared" in t and "RefusalSubspaces(" in out
    assert "<svg" in (out_dir / "subspace.html").read_text() or obj["langs"]["de"]["verdict"] == "unmeasured"
    for bad, msg in ((["--k", "1"], "--k must be at least 2"), (["--k", "3"], "at least 3 harmful train prompts")):
        code, _, err = _run(capsys, "subspace", "--model", str(tiny_dir), "--prompts", str(both), "--direction",
                            str(workdir / "dir"), *bad, "--out", str(workdir / "sub-bad"))
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not (workdir / "sub-bad").exists()
