"""Edge-case prompt sets through every command: one label only, one language only, one prompt per group (tiny tier),
and the null-with-a-reason convention of the JSON outputs (unit tier).

A statistic the prompts cannot give is ``null`` with ``<key>_why`` beside it (:func:`refusal_circuits.io.nullable`)
and the rest of the output is written; where a command cannot do its job at all (a direction without harmless
prompts) it exits with 2, one ``error: ...`` line naming what is missing, and writes nothing.
"""

from __future__ import annotations

import doctest
import json
import math
import re
from pathlib import Path

import pytest
import torch

from refusal_circuits.cli import main
from refusal_circuits.errors import NonFiniteJSONError, RefusalCircuitsError

WORDS = {"harmful": ["bad", "evil", "harm", "hurt", "break", "steal"],
         "harmless": ["bread", "poem", "sum", "sea", "tree", "song"]}
SPLITS = ["train", "train", "val", "val", "test", "test"]


def _rows(langs=("en", "de"), labels=("harmful", "harmless"), n=6, splits=True, split_names=SPLITS):
    """Translations (same id across languages) of ``n`` prompts per label, with a train/val/test split."""
    rows = []
    for label in labels:
        for i, word in enumerate(WORDS[label][:n]):
            for lang in langs:
                row = {"id": f"{label}-{i}", "lang": lang, "label": label, "instruction": f"{lang}: tell me about {word}"}
                if splits:
                    row["split"] = split_names[i]
                rows.append(row)
    return rows


#: The edge cases: one label only (AdvBench-style harmful-only, and harmless-only), one language only, one prompt
#: per language x label (no split key), and languages where one has no harmful translations at all.
CASES = {
    "harmful-only": _rows(labels=("harmful",)),
    "harmless-only": _rows(labels=("harmless",)),
    "one-language": _rows(langs=("en",)),
    "single-prompt": _rows(n=1, splits=False),
    # one prompt per language x label x split: the smallest file a study can use without ever selecting or
    # evaluating on the prompts its direction came from
    "one-per-split": _rows(n=3, split_names=["train", "val", "test"]),
    "mixed": _rows(langs=("en", "de")) + [r | {"lang": "fr"} for r in _rows(langs=("en",), labels=("harmless",))],
}
RUN_FLAGS = ["--refusal-tokens", "I,S", "--compliance-tokens", "T", "--filter", "polyrefuse", "--kl-max", "1e9",
             "--max-layer-frac", "1.0", "--positions", "-1", "--max-new-tokens", "2", "--total-effects", "1",
             "--patch-top-k", "1", "--lang-train-prompts", "4", "--batch-size", "8"]
DIRECTIONS_FLAGS = ["--refusal-tokens", "I,S", "--filter", "polyrefuse", "--kl-max", "1e9", "--max-layer-frac",
                    "1.0", "--positions", "-1"]

#: Statistics that may never be null without a reason beside them (``trajectory_split_layer`` may: null there is
#: the answer "they never separate", and ``_why`` comes only when it could not be computed).
STATS = {"auroc", "auroc_at_site", "effect_size", "rank_correlation", "slope", "pattern", "rate", "ci_low", "ci_high",
         "q", "p", "fraction", "score_fraction", "patched_fraction", "patched_score_fraction", "within", "disjoint",
         "paired", "corrected", "at_site", "per_layer", "explained_variance_ratio", "refusal_rate", "aligned",
         "capability", "baseline_refusal"}


def _strict_json(path: Path) -> dict:
    """The file's JSON, refusing NaN and infinity as the library's writer does."""
    def no_constant(name):
        raise AssertionError(f"{path}: {name} in the JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constant)


def _has_null(value) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_has_null(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_null(v) for v in value)
    return False


def _bare_null(value) -> bool:
    """A null in ``value`` that no ``_why`` inside it explains (so its own ``_why`` must sit beside it)."""
    if value is None:
        return True
    if isinstance(value, list):
        return any(_bare_null(v) for v in value if not isinstance(v, dict))
    if isinstance(value, dict):
        return any((v is None and f"{k}_why" not in value) or (isinstance(v, list) and _bare_null(v))
                   for k, v in value.items())
    return False


def _check_reasons(obj, path: str = "") -> list[str]:
    """The convention, checked everywhere in ``obj``: every ``K_why`` sits beside a ``K`` that holds a null (its
    reasons keyed like K's entries), and every listed statistic that is null has its ``K_why``. Returns every
    reason, for the test to look at."""
    reasons: list[str] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            where = f"{path}.{key}"
            if key.endswith("_why"):
                stem = key[: -len("_why")]
                assert stem in obj and _has_null(obj[stem]), f"{where} explains no null"
                if isinstance(value, dict):
                    assert value and all(isinstance(v, str) and v for v in value.values()), where
                    reasons += value.values()
                else:
                    assert isinstance(value, str) and value, where
                    reasons.append(value)
                continue
            if key in STATS and _bare_null(value):
                assert f"{key}_why" in obj, f"{where} is null without {key}_why"
            reasons += _check_reasons(value, where)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            reasons += _check_reasons(v, f"{path}[{i}]")
    return reasons


def _leftovers(d: Path) -> list[Path]:
    return [p for p in d.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def env(tiny_dir, tiny_model, tmp_path_factory):
    """The tiny model, every edge-case prompt file, and a direction from a complete English file."""
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.scores import refusal_tokens_from_strings

    w = tmp_path_factory.mktemp("edges")
    files = {}
    for name, rows in CASES.items():
        files[name] = w / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    en = [r for r in _rows(langs=("en",)) if r["split"] == "train"]
    cands = extract_candidates(tiny_model, [r["instruction"] for r in en if r["label"] == "harmful"],
                               [r["instruction"] for r in en if r["label"] == "harmless"], lang="en", progress=False)
    tokens = refusal_tokens_from_strings(tiny_model.tokenizer, ["I", "S"], langs=["en", "de", "fr"])
    direction = cands.direction(-1, 1, refusal_tokens=tokens.to_json()).save(w / "dir")
    return {"w": w, "model": str(tiny_dir), "files": files, "dir": str(direction), "attr": {}}


def _ok(capsys, argv, out: Path) -> tuple[str, list[str]]:
    """Run a command that must succeed; check every JSON it wrote; return its stdout and the reasons written."""
    code = main(["-q", *argv])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    files = [out] if out.suffix == ".json" else sorted(out.rglob("*.json"))
    assert files, f"{out}: nothing written"
    reasons = [r for f in files for r in _check_reasons(_strict_json(f))]
    assert not _leftovers(out.parent), "temporary files left behind"
    return stdout, reasons


def _fails(capsys, argv, message: str, out: Path) -> str:
    """Run a command that cannot do its job: exit 2, one line naming what is missing, nothing written."""
    code = main(["-q", *argv])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists(), f"{out} was written"
    assert not _leftovers(out.parent)
    return lines[0]


def _attribution(env, capsys, case: str) -> Path:
    """``attribute`` on the case's prompts (every split), once per module."""
    if case not in env["attr"]:
        out = env["w"] / f"attr-{case}"
        _ok(capsys, ["attribute", "--model", env["model"], "--prompts", str(env["files"][case]), "--direction",
                     env["dir"], "--split", "all", "--total-effects", "2", "--compliance-tokens", "T",
                     "--out", str(out)], out)
        env["attr"][case] = out
    return env["attr"][case]


# ------------------------------------------------------------------------------------------------------ directions

@pytest.mark.tiny
@pytest.mark.parametrize(("case", "message"), [
    ("harmful-only", "the train split of 'en' needs harmful and harmless prompts (has 2 harmful, 0 harmless)"),
    ("harmless-only", "the train split of 'en' needs harmful and harmless prompts (has 0 harmful, 2 harmless)"),
    ("single-prompt", "needs harmful and harmless prompts (has 0 harmful, 1 harmless) (the prompts have no 'split' "
                      "key"),
])
def test_directions_without_both_labels_exits_2_naming_the_missing_label(env, tmp_path, capsys, case, message):
    _fails(capsys, ["directions", "--model", env["model"], "--prompts", str(env["files"][case]), "--out",
                    str(tmp_path / "d"), *DIRECTIONS_FLAGS], message, tmp_path / "d")


@pytest.mark.tiny
def test_directions_on_one_language(env, tmp_path, capsys):
    out = tmp_path / "d"
    _ok(capsys, ["directions", "--model", env["model"], "--prompts", str(env["files"]["one-language"]), "--out",
                 str(out), *DIRECTIONS_FLAGS], out)
    assert json.loads((out / "direction.json").read_text())["lang"] == "en"


# -------------------------------------------------------------------------------------------------------- evaluate

@pytest.mark.tiny
@pytest.mark.parametrize("case", ["harmful-only", "harmless-only", "one-language", "single-prompt"])
@pytest.mark.parametrize("intervention", ["none", "ablate"])
def test_evaluate_writes_rates_for_the_groups_there_are(env, tmp_path, capsys, case, intervention):
    out = tmp_path / "e.json"
    _, reasons = _ok(capsys, ["evaluate", "--model", env["model"], "--prompts", str(env["files"][case]), "--split",
                              "all", "--max-prompts", "2", "--max-new-tokens", "2", "--intervention", intervention,
                              "--direction", env["dir"], "--out", str(out)], out)
    ev = _strict_json(out)
    rows = CASES[case]
    for lang in {r["lang"] for r in rows}:
        assert set(ev["results"][lang]) == {r["label"] for r in rows if r["lang"] == lang}
        for label, group in ev["results"][lang].items():
            assert group["n"] == min(2, sum(r["lang"] == lang and r["label"] == label for r in rows))
            assert 0 <= group["refusal_rate"] <= 1
    if intervention == "ablate" and case == "harmful-only":  # its capability cost is measured on harmless prompts
        assert ev["capability"] is None and ev["capability_why"] == "no harmless prompts to measure it on"
    elif intervention == "ablate":
        assert ev["capability"]["n_harmless"] >= 1
    else:  # only what cannot be measured here: the share of refusals in English when nothing was refused, the judge
        assert set(reasons) <= {"no refusals", "no second judge was asked for (--second-judge none)"}, reasons
        assert "capability" not in ev


# ------------------------------------------------------------------------------------------------------- attribute

@pytest.mark.tiny
@pytest.mark.parametrize("case", ["harmful-only", "harmless-only", "one-language", "single-prompt"])
def test_attribute_writes_every_prompt(env, capsys, case):
    out = _attribution(env, capsys, case)
    summary = _strict_json(out / "summary.json")
    assert summary["n_prompts"] == len(CASES[case])
    # total effects patch one label's mean into the other: written only where both labels are there
    assert (out / "effects.json").exists() == (case in ("one-language", "single-prompt"))


# --------------------------------------------------------------------------------------------------------- compare

@pytest.mark.tiny
@pytest.mark.parametrize("model", [False, True], ids=["no-model", "model"])
def test_compare_harmful_only_writes_null_aurocs_with_the_reason(env, tmp_path, capsys, model):
    """The reported failure: AdvBench-style harmful-only attributions used to die in the JSON writer on a NaN AUROC,
    after all the work, writing nothing."""
    attr = _attribution(env, capsys, "harmful-only")
    out = tmp_path / "c"
    stdout, reasons = _ok(capsys, ["compare", "--attributions", str(attr), "--out", str(out), "--patch-top-k", "2",
                                   *([] if model else ["--no-model"])], out)
    div = _strict_json(out / "divergence.json")
    de = div["languages"]["de"]
    assert de["auroc_at_site"] is None and de["auroc_at_site_why"] == "no harmless prompts in de"
    sep = div["separation"]
    assert sep["auroc"] == [[None] * 3] * 2 and sep["auroc_why"] == {"en": "no harmless prompts",
                                                                     "de": "no harmless prompts"}
    assert de["n_pairs"] == 6 and isinstance(de["rank_correlation"], float) and de["heads"][0]["ci_low"] is not None
    assert "AUROC n/a (no harmless prompts in de)" in de["summary"] and "nan" not in stdout
    if model:
        assert de["baseline_refusal"]["harmful"]["n"] == 6 and de["baseline_refusal"]["harmless"] is None
        assert de["baseline_refusal"]["harmless_why"] == "no harmless prompts in de"
        assert de["aligned"] is None and "harmless: no harmless prompts in de" in de["aligned_why"]
        assert len(de["patch"]["heads"]) == 2
    else:
        assert de["baseline_refusal"] is None and de["baseline_refusal_why"] == "baseline refusal not measured"
    assert set(reasons) >= {"no harmless prompts"}


@pytest.mark.tiny
def test_compare_takes_harmful_only_baselines_from_an_evaluate_file(env, tmp_path, capsys):
    ev = tmp_path / "e.json"
    _ok(capsys, ["evaluate", "--model", env["model"], "--prompts", str(env["files"]["harmful-only"]), "--split", "all",
                 "--max-new-tokens", "2", "--direction", env["dir"], "--out", str(ev)], ev)
    out = tmp_path / "c"
    _ok(capsys, ["compare", "--attributions", str(_attribution(env, capsys, "harmful-only")), "--evaluation", str(ev),
                 "--patch-top-k", "0", "--out", str(out)], out)
    de = _strict_json(out / "divergence.json")["languages"]["de"]
    assert de["baseline_refusal"]["harmful"]["n"] == 6 and de["baseline_refusal"]["harmless"] is None
    assert de["patched_fraction"] is None and de["patched_fraction_why"] == "not patched"


@pytest.mark.tiny
def test_compare_single_prompt_pairs_gives_differences_without_intervals(env, tmp_path, capsys):
    attr = _attribution(env, capsys, "single-prompt")
    out = tmp_path / "c"
    _, reasons = _ok(capsys, ["compare", "--attributions", str(attr), "--out", str(out), "--patch-top-k", "2"], out)
    de = _strict_json(out / "divergence.json")["languages"]["de"]
    assert de["n_pairs"] == 1 and de["n_significant"] == 0
    one = "one pair: no interval or test from a single difference"
    head = de["heads"][0]
    assert isinstance(head["mean_diff"], float)
    assert (head["ci_low"], head["ci_high"], head["q"]) == (None, None, None) and head["ci_low_why"] == one
    assert not head["significant"]
    assert all(layer["ci_low"] is None and layer["ci_low_why"] == one for layer in de["layers"])
    assert de["trajectory_split_layer"] is None and de["trajectory_split_layer_why"] == one
    assert f"significance n/a ({one})" in de["summary"]
    assert de["baseline_refusal"]["harmful"]["n"] == 1 and de["patch"]["n_pairs"] == 1
    sep = _strict_json(out / "divergence.json")["separation"]
    # one prompt per label: an AUROC (of one pair of values), but no standardised difference
    assert all(isinstance(x, float) for row in sep["auroc"] for x in row)
    assert sep["effect_size_why"]["de"] == "fewer than 2 harmful prompts and fewer than 2 harmless prompts"
    assert one in reasons


@pytest.mark.tiny
def test_compare_skips_a_language_without_harmful_translations_with_the_reason(env, tmp_path, capsys):
    attr = _attribution(env, capsys, "mixed")
    out = tmp_path / "c"
    stdout, _ = _ok(capsys, ["compare", "--attributions", str(attr), "--out", str(out), "--no-model"], out)
    div = _strict_json(out / "divergence.json")
    assert div["languages"]["fr"] is None and div["languages"]["de"]["n_pairs"] == 6
    assert div["languages_why"]["fr"].startswith("no harmful prompt of fr shares an id with one of en")
    assert "fr: not compared (no harmful prompt" in stdout


@pytest.mark.tiny
@pytest.mark.parametrize(("case", "extra", "message"), [
    ("harmless-only", [], "nothing to pair: no harmful prompt of de shares an id with one of en"),
    ("one-language", [], "nothing to compare: the attributions hold only the base language en"),
    ("harmful-only", ["--directions"], "--directions: language 'en' needs harmful and harmless train prompts (has 2 "
                                       "harmful, 0 harmless)"),
])
def test_compare_exits_2_where_there_is_nothing_to_compare(env, tmp_path, capsys, case, extra, message):
    attr = _attribution(env, capsys, case)
    _fails(capsys, ["compare", "--attributions", str(attr), "--out", str(tmp_path / "c"), *extra], message,
           tmp_path / "c")


# ------------------------------------------------------------------------------------------------- run and report

def _text(page: str) -> str:
    """What a reader sees of the report: no scripts, no figures' SVG, no tags."""
    page = re.sub(r"<script.*?</script>|<svg.*?</svg>|<style.*?</style>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


@pytest.mark.tiny
@pytest.mark.parametrize(("case", "message"), [
    ("harmful-only", "language 'en' needs harmful and harmless train prompts (has 2 harmful, 0 harmless)"),
    ("harmless-only", "language 'en' needs harmful and harmless train prompts (has 0 harmful, 2 harmless)"),
])
def test_run_on_one_label_exits_2_before_any_stage(env, tmp_path, capsys, case, message):
    out = tmp_path / "run"
    _fails(capsys, ["run", "--model", env["model"], "--prompts", str(env["files"][case]), "--out", str(out),
                    *RUN_FLAGS], message, out)
    _fails(capsys, ["report", str(out)], "not a finished `run` directory", out / "report.html")


@pytest.mark.tiny
def test_run_on_one_prompt_per_label_without_splits_exits_2_naming_the_hash_split(env, tmp_path, capsys):
    """One prompt per language and label, no split key: the hash split cannot give the direction train and val
    prompts of both labels and test prompts to evaluate on, and the study says so before any stage."""
    out = tmp_path / "run"
    _fails(capsys, ["run", "--model", env["model"], "--prompts", str(env["files"]["single-prompt"]), "--out",
                    str(out), *RUN_FLAGS], "needs harmful and harmless", out)


@pytest.mark.tiny
def test_run_and_report_on_one_prompt_per_group_render_nulls_as_na_with_the_reason(env, tmp_path, capsys):
    out = tmp_path / "run"
    _, reasons = _ok(capsys, ["run", "--model", env["model"], "--prompts", str(env["files"]["one-per-split"]),
                              "--out", str(out), *RUN_FLAGS], out)
    results = _strict_json(out / "results.json")
    halved = results["languages"]["split_half"]
    assert halved["within"] == {"en": None, "de": None}
    assert halved["within_why"]["de"].startswith("too few train prompts to split in halves (1 harmful and 1 harmless")
    de = results["divergence"]["languages"]["de"]
    assert de["n_pairs"] == 1 and de["heads"][0]["ci_low"] is None and de["patch"]["n_pairs"] == 1
    assert len(results["effects"]["heads"]) == 1
    page = (out / "report.html").read_text(encoding="utf-8")
    seen = _text(page)
    assert "n/a (one pair: no interval or test from a single difference)" in seen
    assert "n/a (too few train prompts to split in halves" in seen and "Not computed on these prompts" in seen
    assert not re.search(r"\bnan\b|\bNaN\b|\binf\b", seen), "a NaN reached the page"
    assert any(r.startswith("too few train prompts") for r in reasons)
    (out / "report.html").unlink()
    assert main(["-q", "report", str(out)]) == 0, capsys.readouterr().err
    assert _text((out / "report.html").read_text(encoding="utf-8")) == seen


@pytest.mark.tiny
def test_run_and_report_on_one_language(env, tmp_path, capsys):
    out = tmp_path / "run"
    _ok(capsys, ["run", "--model", env["model"], "--prompts", str(env["files"]["one-language"]), "--out", str(out),
                 *RUN_FLAGS], out)
    results = _strict_json(out / "results.json")
    assert results["config"]["langs"] == ["en"] and results["divergence"]["languages"] == {}
    seen = _text((out / "report.html").read_text(encoding="utf-8"))
    assert "Only the base language (en) was studied" in seen
    assert not re.search(r"\bnan\b|\bNaN\b", seen)
    assert main(["-q", "report", str(out)]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the convention (unit)

@pytest.mark.unit
def test_json_text_names_the_key_path_of_a_nan_with_a_library_error():
    from refusal_circuits import io

    with pytest.raises(NonFiniteJSONError, match=r"at separation\.auroc\[1\]\[0\]") as e:
        io.json_text({"base": "en", "separation": {"auroc": [[0.5, 0.6], [math.nan, 0.7]]}})
    assert isinstance(e.value, RefusalCircuitsError) and isinstance(e.value, ValueError)
    assert e.value.path == "separation.auroc[1][0]"
    with pytest.raises(NonFiniteJSONError, match=r"at \[0\]\.x"):
        io.json_text([{"x": math.inf}])
    with pytest.raises(NonFiniteJSONError, match="at the top level"):
        io.json_text(-math.inf)
    with pytest.raises(NonFiniteJSONError, match="at a.b"):
        io.write_json(Path("never-written.json"), {"a": {"b": math.nan}})
    assert not Path("never-written.json").exists()
    assert doctest.testmod(io, optionflags=doctest.ELLIPSIS).failed == 0


@pytest.mark.unit
def test_nullable_writes_null_with_the_reason_and_refuses_a_nan_without_one():
    from refusal_circuits.io import nullable

    assert nullable("auroc", 0.5, "no harmless prompts") == {"auroc": 0.5}
    assert nullable("auroc", math.nan, "no harmless prompts") == {"auroc": None, "auroc_why": "no harmless prompts"}
    assert nullable("auroc", torch.tensor([[0.5, math.nan]]), {"de": "no harmless prompts"}) == {
        "auroc": [[0.5, None]], "auroc_why": {"de": "no harmless prompts"}}
    assert nullable("capability", None, "no harmless prompts") == {"capability": None,
                                                                   "capability_why": "no harmless prompts"}
    assert nullable("trajectory_split_layer", None, None) == {"trajectory_split_layer": None}  # an answer
    with pytest.raises(NonFiniteJSONError, match="at slope"):
        nullable("slope", math.nan, None)


@pytest.mark.unit
def test_statistics_that_cannot_be_computed_are_nan_with_a_reason():
    from refusal_circuits import crosslingual as xl

    empty, two = torch.tensor([]), torch.tensor([1.0, 2.0])
    assert math.isnan(xl.auroc(two, empty)) and xl.groups_why(2, 0) == "no harmless prompts"
    assert math.isnan(xl.cohens_d(torch.tensor([1.0]), two))
    assert xl.groups_why(1, 2, need=2) == "fewer than 2 harmful prompts"
    assert math.isnan(xl.cohens_d(torch.ones(3), torch.ones(4)))  # no spread to standardise by
    assert math.isnan(xl.spearman(two, two)) and xl.correlation_why(two, two) == "fewer than 3 points"
    flat = torch.ones(4)
    assert math.isnan(xl.spearman(flat, torch.arange(4.0))) and xl.correlation_why(flat, flat) == "the points do not vary"
    q = xl.benjamini_hochberg(torch.tensor([0.01, math.nan, 0.04]))
    assert math.isnan(q[1]) and torch.allclose(q[[0, 2]], torch.tensor([0.02, 0.04], dtype=torch.float64))
    assert xl.Rate(0, 0).to_json() == {"refused": 0, "n": 0, "rate": None, "rate_why": "no prompts", "ci_low": None,
                                       "ci_low_why": "no prompts", "ci_high": None, "ci_high_why": "no prompts"}
    assert math.isnan(xl._cosine(torch.zeros(3), torch.ones(3)))


@pytest.mark.unit
def test_a_patch_with_no_gap_to_close_is_null_with_the_reason():
    from refusal_circuits.crosslingual import patch_json
    from refusal_circuits.patching import PairPatch

    pp = PairPatch([(0, 1)], base_projection=1.0, other_projection=1.0, patched_projection=1.0, other_score=0.5,
                   patched_score=0.7, n_pairs=3, base_score=1.5)
    got = patch_json(pp)
    assert got["fraction"] is None and got["fraction_why"].startswith("no gap in the r̂ projection")
    assert got["score_fraction"] == pytest.approx(0.2) and "score_fraction_why" not in got
    json.loads(json.dumps(got, allow_nan=False))


@pytest.mark.tiny
def test_cosines_of_a_zero_direction_are_null(tiny_model):
    """Layer 0 at a template token is the same embedding in every prompt: the difference in means is zero there."""
    from refusal_circuits import crosslingual as xl
    from refusal_circuits.data import PromptRecord, PromptSet

    rows = [PromptRecord(id=f"{label}-{i}", lang=lang, label=label, instruction=f"{lang} {label} {i}")
            for lang in ("en", "de") for label in ("harmful", "harmless") for i in range(2)]
    prompts = PromptSet(tuple(rows), "test")
    cands = xl.language_candidates(tiny_model, prompts, ["en", "de"], progress=False)
    cos = xl.direction_cosines(cands, 1, -1).to_json()
    assert cos["per_layer"][0] == [[None, None], [None, None]]
    assert cos["per_layer_why"]["de"].startswith("zero direction") and "layer(s) 0" in cos["per_layer_why"]["de"]
    assert "at_site_why" not in cos and isinstance(cos["at_site"][0][1], float)
    assert xl.halves_why(prompts, ["en", "de"]) == {}  # 2 of each label split into halves of 1
    small = PromptSet(tuple(r for r in rows if r.id.endswith("-0")), "test")
    assert xl.halves_why(small, ["en", "de"])["de"].startswith("too few train prompts to split in halves")
    halves = xl.language_candidate_halves(tiny_model, prompts, ["en"], progress=False)
    got = xl.split_half_cosines(halves, "en", 1, -1, unsplit={"de": "too few"}, langs=["en", "de"]).to_json()
    assert got["within"]["de"] is None and got["within_why"] == {"de": "too few"}
    assert got["disjoint_why"] == {"de": "de: too few"} and isinstance(got["within"]["en"], float)
