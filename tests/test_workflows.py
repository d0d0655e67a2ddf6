"""The one split policy that `run`, `directions`, `evaluate`, `attribute` and `compare` share."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from safetensors.torch import load_file

from refusal_circuits.cli import main
from refusal_circuits.data import PromptRecord, PromptSet
from refusal_circuits.errors import InputError
from refusal_circuits.workflows import direction_splits, evaluation_split, hash_split, with_splits
from tests.test_golden import TINY, _prompts


def _set(n: int, *, langs=("en", "de"), split=None) -> PromptSet:
    return PromptSet(tuple(PromptRecord(f"p{i}", lang, label, f"{lang} {label} {i}",
                                        {"split": split} if split else {})
                           for i in range(n) for lang in langs for label in ("harmful", "harmless")), "mem")


@pytest.mark.unit
def test_hash_split_is_stable_shared_by_translations_and_three_to_one_to_one():
    prompts, policy = with_splits(_set(2000))
    assert policy.source == "hash" and "sha256(id)" in policy.to_json()["rule"]
    by_id: dict[str, set[str]] = {}
    for r in prompts:
        by_id.setdefault(r.id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_id.values()), "translations of one prompt share its split"
    counts = Counter(next(iter(s)) for s in by_id.values())
    assert abs(counts["train"] / 2000 - 0.6) < 0.04 and abs(counts["val"] / 2000 - 0.2) < 0.04
    assert abs(counts["test"] / 2000 - 0.2) < 0.04
    assert [hash_split(f"p{i}") for i in range(50)] == [r.split for r in prompts if r.lang == "en"
                                                         and r.label == "harmful"][:50]
    assert policy.counts["train"]["harmful"] == counts["train"] * 2  # two languages


@pytest.mark.unit
def test_a_file_with_splits_keeps_them_and_a_split_without_a_label_is_named():
    prompts, policy = with_splits(_set(3, split="train"))
    assert policy.source == "file" and {r.split for r in prompts} == {"train"}
    with pytest.raises(InputError, match="the val split of 'en' needs harmful and harmless prompts"):
        direction_splits(prompts, "en", policy)
    hashed, hpolicy = with_splits(_set(2))
    with pytest.raises(InputError, match="split by a hash of each id"):
        direction_splits(hashed, "en", hpolicy)


@pytest.mark.unit
def test_evaluation_split_holds_out_a_direction_from_other_prompts_as_a_whole():
    prompts, _ = with_splits(_set(10))
    own = prompts.filter(lang="en").sha256
    assert evaluation_split(None, prompts, own, "en") == "test"
    assert evaluation_split(None, prompts, "0" * 64, "en") == "all"
    assert evaluation_split(None, prompts, None, None) == "test"
    assert evaluation_split("train", prompts, "0" * 64, "en") == "train"


@pytest.mark.tiny
def test_run_and_directions_choose_the_same_direction_on_a_file_without_splits(tiny_dir, tmp_path):
    prompts = _prompts(tmp_path / "p.jsonl", splits=False)
    common = ["--model", str(tiny_dir), "--prompts", str(prompts), *TINY, "--positions", "-2,-1"]
    assert main(["-q", "directions", "--lang", "en", *common, "--out", str(tmp_path / "d")]) == 0
    assert main(["-q", "run", *common, "--compliance-tokens", "T", "--max-new-tokens", "2", "--total-effects", "0",
                 "--patch-top-k", "0", "--out", str(tmp_path / "r")]) == 0
    alone = json.loads((tmp_path / "d" / "direction.json").read_text())
    study = json.loads((tmp_path / "r" / "stages" / "direction" / "direction.json").read_text())
    assert (alone["layer"], alone["position"]) == (study["layer"], study["position"])
    assert alone["n_harmful"] == study["n_harmful"] and alone["split_policy"] == study["split_policy"]
    assert alone["split_policy"]["source"] == "hash"
    a = load_file(str(tmp_path / "d" / "direction.safetensors"))["direction"]
    b = load_file(str(tmp_path / "r" / "stages" / "direction" / "direction.safetensors"))["direction"]
    assert (a - b).abs().max() < 1e-6
    # Never selected or evaluated on the prompts the direction came from: train, val and test are disjoint.
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    split_of = {r["id"]: hash_split(r["id"]) for r in rows}
    baseline = json.loads((tmp_path / "r" / "stages" / "evaluate" / "baseline.json").read_text())
    assert baseline["completions"] and {split_of[c["id"]] for c in baseline["completions"]} == {"test"}
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["config"]["split_policy"]["source"] == "hash"


@pytest.mark.tiny
def test_evaluate_takes_the_test_split_of_the_directions_file_and_all_of_another(tiny_dir, tmp_path):
    own = _prompts(tmp_path / "own.jsonl", splits=False)
    assert main(["-q", "directions", "--lang", "en", "--model", str(tiny_dir), "--prompts", str(own), *TINY,
                 "--out", str(tmp_path / "d")]) == 0
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"o{i}-{label}", "lang": "en", "label": label, "instruction": f"x {i}"}) + "\n"
                             for i in range(5) for label in ("harmful", "harmless")), encoding="utf-8")
    for name, path, split, n in (("own", own, "test", None), ("other", other, "all", 10)):
        out = tmp_path / f"{name}.json"
        assert main(["-q", "evaluate", "--model", str(tiny_dir), "--prompts", str(path), "--direction",
                     str(tmp_path / "d"), "--intervention", "ablate", "--max-new-tokens", "2", "--refusal-tokens",
                     "I", "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["split"] == split and result["split_policy"]["source"] == "hash"
        ids = {c["id"] for c in result["completions"]}
        if n is not None:
            assert len(result["completions"]) == n
        else:
            assert ids and {hash_split(i) for i in ids} == {"test"}


# ------------------------------------------------------------------------------------- the shared science path


@pytest.mark.unit
def test_split_and_cap_filters_caps_and_names_an_empty_split():
    from refusal_circuits.workflows import split_and_cap

    prompts, _ = with_splits(_set(40))
    test = split_and_cap(prompts, "test", 2)
    assert {r.split for r in test} == {"test"} and set(test.counts()["en"].values()) == {2}
    assert len(split_and_cap(prompts, "all")) == len(prompts)
    with pytest.raises(InputError, match="p.jsonl has no prompts in split 'val'"):
        split_and_cap(with_splits(_set(3, split="train"))[0], "val", what="p.jsonl")


@pytest.mark.unit
def test_baselines_read_from_an_evaluation_keep_missing_labels_as_none():
    from refusal_circuits.workflows.compare import baseline_from_results

    got = baseline_from_results({"en": {"harmful": {"n": 4, "refusal_rate": 0.75}},
                                 "de": {"harmful": {"n": 3, "refused": 1, "refusal_rate": 0.3333333},
                                        "harmless": {"n": 2, "refusal_rate": 0.0}}})
    assert (got["en"][0].k, got["en"][0].n, got["en"][1]) == (3, 4, None)
    assert (got["de"][0].k, got["de"][1].k, got["de"][1].n) == (1, 0, 2)
    with pytest.raises(KeyError):
        baseline_from_results({"en": {}})


@pytest.mark.unit
def test_transfer_cells_are_the_base_row_and_the_diagonal_or_everything():
    from refusal_circuits.workflows.languages import transfer_cells

    assert transfer_cells("all", "en", ["en", "de"]) is None
    assert transfer_cells("base", "en", ["en", "de", "fr"]) == {("en", "en"), ("en", "de"), ("en", "fr"),
                                                                ("de", "de"), ("fr", "fr")}


@pytest.mark.unit
def test_token_strings_need_one_token():
    from refusal_circuits.workflows.tokens import token_strings

    assert token_strings("I, S,", "--refusal-tokens") == ["I", " S"]
    with pytest.raises(InputError, match="--compliance-tokens needs at least one token"):
        token_strings(" , ", "--compliance-tokens")


@pytest.mark.unit
def test_the_flags_read_their_defaults_from_one_place():
    """`run` shows StudyConfig's defaults; the other commands' are the named ones of workflows.defaults, and the
    baseline `compare` generates without --evaluation has its token count there too."""
    import inspect

    from refusal_circuits.cli import build_parser
    from refusal_circuits.study import StudyConfig
    from refusal_circuits.workflows import defaults
    from refusal_circuits.workflows.compare import measured_baseline

    parser = build_parser()
    run = vars(parser.parse_args(["run"]))
    study = StudyConfig.defaults()
    for name in ("base", "lang_train_prompts", "filter", "transfer", "total_effects", "patch_top_k", "max_new_tokens",
                 "batch_size", "prompts", "device", "dtype"):
        assert run[name] == study[name], name
    assert tuple(run["positions"]) == study["positions"]
    compare = vars(parser.parse_args(["compare", "--attributions", "a", "--out", "o"]))
    assert (compare["base"], compare["alpha"], compare["patch_top_k"]) == (
        defaults.BASE_LANG, defaults.ALPHA, defaults.COMPARE_PATCH_TOP_K)
    evaluate = vars(parser.parse_args(["evaluate", "--out", "e.json"]))
    assert evaluate["max_new_tokens"] == defaults.EVALUATE_NEW_TOKENS
    assert inspect.signature(measured_baseline).parameters["max_new_tokens"].default == \
        defaults.COMPARE_BASELINE_NEW_TOKENS
    assert StudyConfig(model="m", train_prompts=16).lang_cap == 16 and StudyConfig(model="m").lang_cap == 64


@pytest.mark.unit
def test_the_orchestration_modules_stay_small_and_import_at_the_top():
    """cli, study and workflows: one idea per module (at most 400 lines), the old import paths still work, and no
    import hides inside a function (the layers have no cycle to hide)."""
    import ast
    from pathlib import Path

    from refusal_circuits.cli import build_parser, main  # noqa: F401  (the old import paths)
    from refusal_circuits.study import STAGE_FILE, STAGES, Study, StudyConfig  # noqa: F401

    root = Path(__file__).resolve().parent.parent / "refusal_circuits"
    files = [p for pkg in ("cli", "study", "workflows") for p in sorted((root / pkg).glob("*.py"))]
    assert len(files) >= 15 and not (root / "cli.py").exists() and not (root / "study.py").exists()
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 400, f"{path.name}: {len(text.splitlines())} lines"
        tree = ast.parse(text)
        top = set(map(id, tree.body))
        inner = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top]
        assert not inner, f"{path.relative_to(root)}: imports inside a function or block at lines {inner}"
