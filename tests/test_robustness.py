"""Robustness: every command's bad inputs, atomic and reproducible outputs, untrusted files (tiny and unit tiers).

The table-driven test runs each command on one bad input at a time and asks for the contract of the command line:
exit code 2, one line on stderr that starts with ``error: `` and names the problem (the file and line where there is
one), and nothing written.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from refusal_circuits.cli import main
from refusal_circuits.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "refusal_circuits"


def _rows():
    """en and de, 6 harmful + 6 harmless each, ids aligned, train/val/test 2/2/2 per label."""
    rows = []
    for label, words in (("harmful", ["bad", "evil", "harm", "hurt", "break", "steal"]),
                         ("harmless", ["bread", "poem", "sum", "sea", "tree", "song"])):
        for i, w in enumerate(words):
            for lang, stem in (("en", "tell me about"), ("de", "erzähl mir von")):
                rows.append({"id": f"{label}-{i}", "lang": lang, "label": label, "instruction": f"{stem} {w}",
                             "split": ["train", "train", "val", "val", "test", "test"][i]})
    return rows


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


ROW = _rows()[0]
LONG = "x" * 600  # the byte tokenizer makes this 600 tokens; the tiny model's context is 512

#: name: (file content, what the one-line error must say; {f} is the file's path)
BAD_PROMPT_FILES = {
    "malformed.jsonl": (json.dumps(ROW) + "\n{not json\n", "{f}:2: malformed JSON"),
    "empty.jsonl": ("", "{f}: no prompts in file"),
    "not-utf8.jsonl": (json.dumps(ROW).encode() + b"\n" + '{"id": "é"}'.encode("latin-1"), "{f}:2: not valid UTF-8"),
    "missing-key.jsonl": (json.dumps(ROW) + "\n" + json.dumps({k: v for k, v in ROW.items() if k != "label"}),
                          "{f}:2: missing key(s) label"),
    "unknown-label.jsonl": (json.dumps({**ROW, "label": "evil"}), "{f}:1: unknown label 'evil'"),
    "unknown-lang.jsonl": (json.dumps({**ROW, "lang": "english"}), "{f}:1: unknown language code 'english'"),
    "duplicate-id.jsonl": (json.dumps(ROW) + "\n" + json.dumps(ROW), "{f}:2: duplicate id 'harmful-0' for language 'en'"),
    "duplicate-id.csv": ("id,lang,label,instruction\na,en,harmful,x\na,en,harmless,y\n", "{f}:3: duplicate id 'a'"),
    "surrogate.jsonl": ('{"id": "a", "lang": "en", "label": "harmful", "instruction": "x \\ud800"}',
                        "{f}:1: text with an unpaired surrogate"),
    "no-such-file.jsonl": (None, "{f}: no such file"),
}


@pytest.fixture(scope="module")
def env(tiny_dir, tiny_model, tmp_path_factory):
    """Shared inputs: the tiny model, good and bad prompt files, good and bad directions and attributions, damaged
    `run` directories. Every bad input differs from a good one in one thing."""
    from refusal_circuits.directions import Direction, extract_candidates
    from refusal_circuits.io import write_json
    from refusal_circuits.scores import refusal_tokens_from_strings

    w = tmp_path_factory.mktemp("robust")
    paths = {"model": str(tiny_dir), "w": str(w)}
    good = w / "prompts.jsonl"
    good.write_text(_jsonl(_rows()), encoding="utf-8")
    paths["prompts"] = str(good)
    long_rows = [{**r, "instruction": LONG} if (r["id"], r["lang"]) in {("harmful-0", "en"), ("harmful-4", "en")}
                 else r for r in _rows()]
    (w / "long.jsonl").write_text(_jsonl(long_rows), encoding="utf-8")
    paths["long"] = str(w / "long.jsonl")
    for name, (content, _) in BAD_PROMPT_FILES.items():
        if content is not None:
            (w / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        paths[name] = str(w / name)

    # directions
    en = [r for r in _rows() if r["lang"] == "en" and r["split"] == "train"]
    cands = extract_candidates(tiny_model, [r["instruction"] for r in en if r["label"] == "harmful"],
                               [r["instruction"] for r in en if r["label"] == "harmless"], lang="en", progress=False)
    tokens = refusal_tokens_from_strings(tiny_model.tokenizer, ["I", "S"], langs=["en", "de"])
    direction = cands.direction(-1, 1, refusal_tokens=tokens.to_json())
    paths["dir"] = str(direction.save(w / "dir"))
    Direction(vector=torch.ones(96) / 96**0.5, norm=1.0, layer=0, position=-1, model="other", lang="en",
              n_harmful=1, n_harmless=1, prompts_sha256="").save(w / "dir-foreign")
    dataclasses.replace(direction, layer=99).save(w / "dir-layer99")
    dataclasses.replace(direction, position=-99).save(w / "dir-pos-99")
    dataclasses.replace(direction, position=3).save(w / "dir-pos3")
    for name, damage in {
        "dir-json-not-utf8": lambda d: (d / "direction.json").write_bytes(b"\xff{"),
        "dir-tensors-garbage": lambda d: (d / "direction.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{}"),
        "dir-pickle": lambda d: torch.save({"direction": torch.ones(64)}, d / "direction.safetensors"),
        "dir-nan-norm": lambda d: (d / "direction.json").write_text(
            (d / "direction.json").read_text().replace('"norm": ', '"norm": NaN, "old_norm": ', 1)),
        "dir-bad-alpha": lambda d: write_json(d / "direction.json", {
            **json.loads((d / "direction.json").read_text()), "actadd": {"alpha": "big"}}),
    }.items():
        shutil.copytree(w / "dir", w / name)
        damage(w / name)
    for name in ("dir-foreign", "dir-layer99", "dir-pos-99", "dir-pos3", "dir-json-not-utf8", "dir-tensors-garbage",
                 "dir-pickle", "dir-nan-norm", "dir-bad-alpha"):
        paths[name] = str(w / name)
    paths["dir-missing"] = str(w / "dir-missing")

    # attributions (both languages, every split, so that every prompt id is paired)
    assert main(["-q", "attribute", "--model", str(tiny_dir), "--prompts", str(good), "--direction", paths["dir"],
                 "--split", "all", "--no-dla", "--total-effects", "0", "--out", str(w / "attr")]) == 0
    paths["attr"] = str(w / "attr")
    for name, damage in {
        "attr-json-not-utf8": lambda d: (d / "attributions.json").write_bytes(b"\xff\xfe"),
        "attr-tensors-garbage": lambda d: (d / "attributions.safetensors").write_bytes(b"garbage"),
        "attr-json-shape": lambda d: (d / "attributions.json").write_text("[1, 2]"),
    }.items():
        shutil.copytree(w / "attr", w / name)
        damage(w / name)
        paths[name] = str(w / name)
    paths["attr-missing"] = str(w / "attr-missing")
    (w / "eval-keys.json").write_text('{"results": {"en": {}}}')
    (w / "eval-not-utf8.json").write_bytes(b'{"results": "\xff"}')
    paths |= {"eval-keys": str(w / "eval-keys.json"), "eval-not-utf8": str(w / "eval-not-utf8.json"),
              "eval-missing": str(w / "eval-missing.json")}

    # model specs
    (w / "no-config").mkdir()
    (w / "not-a-model.gguf").write_bytes(b"not a gguf file at all")
    (w / "truncated.gguf").write_bytes(b"GGUF\x03\0\0\0" + b"\x07" * 14)  # the magic, then a header cut short
    shutil.copytree(tiny_dir, w / "broken-weights")
    (w / "broken-weights" / "model.safetensors").write_bytes(b"garbage")
    paths |= {"no-config": str(w / "no-config"), "not-gguf": str(w / "not-a-model.gguf"),
              "truncated-gguf": str(w / "truncated.gguf"),
              "broken-weights": str(w / "broken-weights"), "no-model": str(w / "no-model")}

    # `run` directories for `report`: finished stages whose files were lost, or a broken results.json
    from refusal_circuits.study import STAGE_FILE, STAGES

    for name, results, stages in (("run-no-compare", b'{"config": {}, "seconds": {}}',
                                   tuple(x for x in STAGES if x != "compare")),
                                  ("run-results-not-utf8", b"\xff", STAGES),
                                  ("run-results-keys", b"{}", STAGES),
                                  ("run-stage-files-lost", b'{"config": {}, "seconds": {}}', STAGES)):
        for stage in stages:
            (w / name / "stages" / stage).mkdir(parents=True)
            (w / name / "stages" / stage / STAGE_FILE).write_text("{}")
        (w / name / "results.json").write_bytes(results)
        paths[name] = str(w / name)
    return paths


_USUAL_ARGS = {"{model}", "{prompts}", "{out}", "{out_json}", "{dir}", "{attr}", "--model", "--prompts", "--out",
               "--direction", "--attributions", "--refusal-tokens", "I", "--intervention", "ablate"}


def _case(cmd: str, argv: list[str], message: str, setup: str | None = None):
    """One row: the command line (``{name}`` stands for a path of :func:`env`) and what its error must say."""
    what = [a.strip("{}-") for a in argv[1:] if a not in _USUAL_ARGS or cmd == "report"] + ([setup] if setup else [])
    return pytest.param(cmd, argv, message, setup, id="-".join([cmd, *what]))


CASES: list = []

# 1. bad prompt files, for every command that reads prompts
_PROMPT_COMMANDS = {
    "run": ["run", "--model", "{model}", "--refusal-tokens", "I", "--out", "{out}", "--prompts"],
    "directions": ["directions", "--model", "{model}", "--refusal-tokens", "I", "--out", "{out}", "--prompts"],
    "evaluate": ["evaluate", "--model", "{model}", "--out", "{out_json}", "--prompts"],
    "attribute": ["attribute", "--model", "{model}", "--direction", "{dir}", "--out", "{out}", "--prompts"],
    "atp": ["atp", "--model", "{model}", "--direction", "{dir}", "--out", "{out}", "--prompts"],
    "harm": ["harm", "--model", "{model}", "--direction", "{dir}", "--out", "{out}", "--prompts"],
    "subspace": ["subspace", "--model", "{model}", "--direction", "{dir}", "--out", "{out}", "--prompts"],
    "compare": ["compare", "--attributions", "{attr}", "--out", "{out}", "--prompts"],
}
for _cmd, _argv in _PROMPT_COMMANDS.items():
    for _name, (_, _message) in BAD_PROMPT_FILES.items():
        CASES.append(_case(_cmd, [*_argv, "{" + _name + "}"], _message.replace("{f}", "{" + _name + "}")))
    # a prompt longer than the model's context: named with its id, language and file, before any work
    CASES.append(_case(_cmd, [*_argv, "{long}", *(["--directions"] if _cmd == "compare" else [])],
                       # attribute holds a direction from another file out whole: its first long prompt
                       "prompt 'harmful-0' (en) of {long} is 6" if _cmd in ("run", "directions", "compare", "attribute", "atp", "harm", "subspace")
                       else "prompt 'harmful-4' (en) of {long} is 6"))
    # prompts from the hub without the `hub` extra
    CASES.append(_case(_cmd, [*_argv, "hf:advbench"], "loading hub datasets needs the 'hub' extra: pip install",
                       setup="no-datasets"))

# 2. model specs, for every command that loads a model
_MODEL_COMMANDS = {
    "run": ["run", "--refusal-tokens", "I", "--out", "{out}", "--prompts", "{prompts}", "--model"],
    "directions": ["directions", "--refusal-tokens", "I", "--out", "{out}", "--prompts", "{prompts}", "--model"],
    "evaluate": ["evaluate", "--out", "{out_json}", "--prompts", "{prompts}", "--model"],
    "attribute": ["attribute", "--direction", "{dir}", "--out", "{out}", "--prompts", "{prompts}", "--model"],
    "atp": ["atp", "--direction", "{dir}", "--out", "{out}", "--prompts", "{prompts}", "--model"],
    "harm": ["harm", "--direction", "{dir}", "--out", "{out}", "--prompts", "{prompts}", "--model"],
    "subspace": ["subspace", "--direction", "{dir}", "--out", "{out}", "--prompts", "{prompts}", "--model"],
    "orthogonalize": ["orthogonalize", "--direction", "{dir}", "--out", "{out}", "--model"],
    "compare": ["compare", "--attributions", "{attr}", "--out", "{out}", "--model"],
    "check": ["check", "--json", "{out_json}", "--model"],
}
_BAD_MODELS = [
    ("packaged:nope", "unknown packaged model 'packaged:nope'; known: packaged:qwen2.5-coder-0.5b-instruct"),
    ("{no-model}", "no such model directory or file: {no-model}"),
    ("{no-config}", "model directory {no-config} has no config.json"),
    ("{not-gguf}", "{not-gguf}: not a GGUF file (it does not start with the GGUF magic bytes)"),
    ("{truncated-gguf}", "{truncated-gguf}: not a GGUF file transformers can load"),
    ("{broken-weights}", "could not load model {broken-weights}: "),
    ("packaged:fake-0.1b", "the packaged model 'fake-0.1b' needs the 'fake-extra' extra: pip install "
                           "'refusal-circuits[fake-extra]'"),
]
for _cmd, _argv in _MODEL_COMMANDS.items():
    for _spec, _message in _BAD_MODELS:
        CASES.append(_case(_cmd, [*_argv, _spec], _message))
    # a device and a device map at once: refused before the model loads
    CASES.append(_case(_cmd, [*_argv, "{model}", "--device", "cuda", "--device-map", "auto"],
                       "--device and --device-map: give one of them"))

# 3. direction files, for every command that reads one
_DIRECTION_COMMANDS = {
    "evaluate": ["evaluate", "--model", "{model}", "--prompts", "{prompts}", "--intervention", "ablate", "--out",
                 "{out_json}", "--direction"],
    "attribute": ["attribute", "--model", "{model}", "--prompts", "{prompts}", "--out", "{out}", "--direction"],
    "atp": ["atp", "--model", "{model}", "--prompts", "{prompts}", "--out", "{out}", "--direction"],
    "harm": ["harm", "--model", "{model}", "--prompts", "{prompts}", "--out", "{out}", "--direction"],
    "subspace": ["subspace", "--model", "{model}", "--prompts", "{prompts}", "--out", "{out}", "--direction"],
    "orthogonalize": ["orthogonalize", "--model", "{model}", "--out", "{out}", "--direction"],
    "compare": ["compare", "--attributions", "{attr}", "--out", "{out}", "--direction"],
}
_BAD_DIRECTIONS = [
    ("dir-foreign", "has d_model 96 (from other) but the model has 64: it comes from another model"),
    ("dir-layer99", "{dir-layer99} is at layer 99, out of range for a model with 2 layers"),
    ("dir-pos-99", "{dir-pos-99} is at position -99, out of range for this model's chat template"),
    ("dir-pos3", "{dir-pos3} is at position 3, out of range for this model's chat template"),
    ("dir-missing", "{dir-missing}: no such file or directory"),
    ("dir-json-not-utf8", "{dir-json-not-utf8}/direction.json: not valid JSON"),
    ("dir-tensors-garbage", "{dir-tensors-garbage}/direction.safetensors: not a readable safetensors file"),
    ("dir-pickle", "{dir-pickle}/direction.safetensors: not a readable safetensors file"),
    ("dir-nan-norm", "{dir-nan-norm}/direction.json: norm must be a finite number, got nan"),
]
for _cmd, _argv in _DIRECTION_COMMANDS.items():
    for _name, _message in _BAD_DIRECTIONS:
        CASES.append(_case(_cmd, [*_argv, "{" + _name + "}"], _message))
CASES += [
    _case("evaluate", ["evaluate", "--model", "{model}", "--prompts", "{prompts}", "--intervention", "actadd",
                       "--out", "{out_json}", "--direction", "{dir-bad-alpha}"],
          "{dir-bad-alpha}/direction.json: actadd alpha must be a finite number, got 'big'"),
    # 4. layers and positions out of range
    _case("evaluate", ["evaluate", "--model", "{model}", "--prompts", "{prompts}", "--direction", "{dir}",
                       "--intervention", "actadd", "--layer", "2", "--out", "{out_json}"],
          "--layer 2 out of range; the model has 2 layers"),
    _case("evaluate", ["evaluate", "--model", "{model}", "--prompts", "{prompts}", "--direction", "{dir}",
                       "--intervention", "actadd", "--layer=-1", "--out", "{out_json}"],
          "--layer -1 out of range; the model has 2 layers"),
    _case("directions", ["directions", "--model", "{model}", "--prompts", "{prompts}", "--refusal-tokens", "I",
                         "--positions", "-99", "--out", "{out}"], "--positions [-99] out of range: the chat template"),
    _case("run", ["run", "--model", "{model}", "--prompts", "{prompts}", "--refusal-tokens", "I", "--positions",
                  "-1,-99", "--out", "{out}"], "--positions [-99] out of range: the chat template"),
    # 5. language codes the prompts do not have
    _case("run", ["run", "--model", "{model}", "--prompts", "{prompts}", "--langs", "xx", "--out", "{out}"],
          "{prompts} has no prompts in language(s) xx; it has en, de"),
    _case("run", ["run", "--model", "{model}", "--langs", "xx", "--out", "{out}"],
          "language(s) xx not in the bundled set"),
    _case("run", ["run", "--model", "{model}", "--prompts", "{prompts}", "--base", "fr", "--out", "{out}"],
          "--base fr: not in {prompts} (it has en, de)"),
    _case("directions", ["directions", "--model", "{model}", "--prompts", "{prompts}", "--lang", "xx", "--out",
                         "{out}"], "no prompts in language 'xx'; the prompts have en, de"),
    _case("evaluate", ["evaluate", "--model", "{model}", "--prompts", "{prompts}", "--langs", "en,xx", "--out",
                       "{out_json}"], "{prompts} has no prompts in language(s) xx"),
    _case("attribute", ["attribute", "--model", "{model}", "--prompts", "{prompts}", "--direction", "{dir}",
                        "--langs", "zz", "--out", "{out}"], "{prompts} has no prompts in language(s) zz"),
    _case("compare", ["compare", "--attributions", "{attr}", "--langs", "xx", "--out", "{out}"],
          "--langs: xx not in the attributions (they have en, de)"),
    _case("compare", ["compare", "--attributions", "{attr}", "--base", "fr", "--out", "{out}"],
          "--base fr: not in the attributions (they have en, de)"),
    # 6. attribution and evaluation files for `compare`
    _case("compare", ["compare", "--attributions", "{attr-missing}", "--out", "{out}"],
          "{attr-missing}/attributions.safetensors: not found"),
    _case("compare", ["compare", "--attributions", "{attr-json-not-utf8}", "--out", "{out}"],
          "{attr-json-not-utf8}/attributions.json: not valid JSON"),
    _case("compare", ["compare", "--attributions", "{attr-tensors-garbage}", "--out", "{out}"],
          "{attr-tensors-garbage}/attributions.safetensors: not a readable safetensors file"),
    _case("compare", ["compare", "--attributions", "{attr-json-shape}", "--out", "{out}"],
          "{attr-json-shape}: missing ids, langs, labels, tokens"),
    _case("compare", ["compare", "--attributions", "{attr}", "--evaluation", "{eval-missing}", "--out", "{out}"],
          "--evaluation {eval-missing}: no such file"),
    _case("compare", ["compare", "--attributions", "{attr}", "--evaluation", "{eval-keys}", "--out", "{out}"],
          "--evaluation {eval-keys}: not an `evaluate` JSON with harmful and harmless rates"),
    _case("compare", ["compare", "--attributions", "{attr}", "--evaluation", "{eval-not-utf8}", "--out", "{out}"],
          "--evaluation {eval-not-utf8}: not an `evaluate` JSON"),
    _case("check", ["check", "--model", "{model}", "--json", "{no-model}/sub/check.json"],
          "--json {no-model}/sub/check.json: its directory does not exist"),
    # 7. `report` on what is not a finished `run` directory
    _case("report", ["report", "{no-model}"], "{no-model}: not a finished `run` directory"),
    _case("report", ["report", "{prompts}"], "{prompts}: not a finished `run` directory"),
    _case("report", ["report", "{run-no-compare}"], "not a finished `run` directory (missing stages: compare)"),
    _case("report", ["report", "{run-results-not-utf8}"], "{run-results-not-utf8}/results.json: unreadable"),
    _case("report", ["report", "{run-results-keys}"], "{run-results-keys}/results.json: unreadable"),
    _case("report", ["report", "{run-stage-files-lost}"],
          "{run-stage-files-lost}: a stage's files are missing or damaged"),
]
if importlib.util.find_spec("vllm") is None:
    CASES.append(_case("evaluate", ["evaluate", "--model", "{model}", "--prompts", "{prompts}", "--backend", "vllm",
                                    "--out", "{out_json}"], 'the vllm backend needs vLLM: pip install "refusal-circuits[vllm]"'))


@pytest.fixture(autouse=True)
def _fake_packaged_model(monkeypatch, tmp_path):
    """A packaged model whose part packages are not installed (the missing-extra case), and an empty cache."""
    from refusal_circuits import models

    monkeypatch.setitem(models.PACKAGED_MODELS, "fake-0.1b", models.PackagedModel(
        name="fake-0.1b", hf_name="nobody/fake", part_packages=("refusal_circuits_robustness_no_such_part1",),
        sha256="0" * 64, size=1, extra="fake-extra"))
    monkeypatch.setenv("REFUSAL_CIRCUITS_CACHE", str(tmp_path / "cache"))


def _leftovers(*dirs: Path) -> list[Path]:
    """Temporary files or directories of the atomic writers."""
    return [p for d in dirs for p in d.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.mark.tiny
@pytest.mark.parametrize(("cmd", "argv", "message", "setup"), CASES)
def test_bad_input_exits_2_with_one_line_naming_it_and_writes_nothing(env, tmp_path, monkeypatch, capsys,
                                                                      cmd, argv, message, setup):
    if setup == "no-datasets":
        monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    paths = {**env, "out": str(tmp_path / "out"), "out_json": str(tmp_path / "out.json")}
    fill = re.compile(r"\{([\w.-]+)\}")

    def expand(s: str) -> str:
        return fill.sub(lambda m: paths[m.group(1)], s)

    before = sorted(p.relative_to(env["w"]) for p in Path(env["w"]).rglob("*"))
    code = main(["-q", *[expand(a) for a in argv]])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expand(message) in lines[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.json").exists(), "an output was written"
    if cmd == "report":
        assert not (Path(expand(argv[1])) / "report.html").exists()
    assert sorted(p.relative_to(env["w"]) for p in Path(env["w"]).rglob("*")) == before, "an input was changed"
    assert not _leftovers(tmp_path, Path(env["w"]))


@pytest.mark.unit
def test_every_command_has_bad_input_cases():
    """The table covers every command the parser has (a new command needs its rows)."""
    from refusal_circuits.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {p.values[0] for p in CASES}


# ------------------------------------------------------------------------------------------------- determinism

_DIRECTIONS_ARGV = ["-q", "directions", "--lang", "en", "--refusal-tokens", "I,S", "--filter", "polyrefuse",
                    "--kl-max", "1e9", "--max-layer-frac", "1.0", "--positions", "-1"]


@pytest.mark.tiny
def test_directions_twice_gives_byte_identical_files(tiny_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(_jsonl(_rows()), encoding="utf-8")
    for name in ("a", "b"):
        assert main([*_DIRECTIONS_ARGV, "--model", str(tiny_dir), "--prompts", str(prompts),
                     "--out", str(tmp_path / name)]) == 0
    for f in ("direction.safetensors", "direction.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    meta = json.loads((tmp_path / "a" / "direction.json").read_text())
    assert not {k for k in meta if re.search("time|date|seconds", k)}, "direction.json holds no clock readings"


@pytest.mark.tiny
def test_evaluate_and_attribute_twice_give_byte_identical_files(env, tmp_path):
    common = ["--model", env["model"], "--prompts", env["prompts"], "--direction", env["dir"], "--langs", "en"]
    for name in ("a", "b"):
        assert main(["-q", "evaluate", *common, "--max-new-tokens", "2",
                     "--out", str(tmp_path / name / "eval.json")]) == 0
        assert main(["-q", "attribute", *common, "--no-dla", "--total-effects", "1",
                     "--out", str(tmp_path / name / "attr")]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["attr/attributions.json", "attr/attributions.safetensors", "attr/effects.json",
                                       "attr/summary.json", "eval.json"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


@pytest.mark.tiny
def test_a_saved_direction_has_the_same_bytes_every_time(env, tmp_path):
    """safetensors orders its metadata like a hash map seeded per call; our files must not depend on it."""
    from safetensors import safe_open

    from refusal_circuits.directions import load_direction

    direction = load_direction(env["dir"])
    blobs = {direction.save(tmp_path / str(i)).joinpath("direction.safetensors").read_bytes() for i in range(12)}
    assert len(blobs) == 1
    with safe_open(str(tmp_path / "0" / "direction.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "refusal_circuits.direction", "version": direction.version}
        assert torch.equal(f.get_tensor("direction"), direction.vector)
        assert torch.equal(f.get_tensor("candidates"), direction.candidates)


# ------------------------------------------------------------------------------------------------- atomic writes


@pytest.mark.tiny
def test_a_failed_direction_save_keeps_the_old_pair(env, tmp_path):
    """The tensors and the JSON are replaced together: a save that fails half-way changes neither."""
    from refusal_circuits.directions import load_direction

    out = load_direction(env["dir"]).save(tmp_path / "d")
    old = {f.name: f.read_bytes() for f in out.iterdir()}
    other = dataclasses.replace(load_direction(env["dir"]), vector=-load_direction(env["dir"]).vector, layer=0,
                                meta={"not json": float("nan")})
    with pytest.raises(ValueError, match="JSON compliant"):
        other.save(out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == old
    assert not _leftovers(tmp_path)


@pytest.mark.unit
def test_write_json_that_fails_keeps_the_old_file(tmp_path):
    from refusal_circuits.io import write_json

    write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(ValueError):
        write_json(tmp_path / "r.json", {"a": float("inf")})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert not _leftovers(tmp_path)


#: Library functions that write a file outside an atomic block, and why that is safe.
NOT_IN_AN_ATOMIC_BLOCK = {
    ("viz.py", "svg_document"): "savefig into an in-memory buffer",
    ("models.py", "_dequantise_gguf_to"): "writes into the temporary directory of its callers' atomic_dir",
}
_WRITES = {"write_text", "write_bytes", "save_file", "savefig", "save_pretrained", "dump", "to_csv", "tofile"}
_ATOMIC = {"atomic_path", "atomic_dir", "atomic_paths"}


def _unguarded_writes(source: str, filename: str) -> list[str]:
    """Calls that write a file (by name, or ``open`` in a writing mode) outside a ``with atomic_*(...)`` block."""
    found: list[str] = []

    def name_of(call: ast.Call) -> str:
        f = call.func
        return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""

    def writes(call: ast.Call) -> bool:
        name = name_of(call)
        if name == "open":
            modes = [a.value for a in call.args[1:2] if isinstance(a, ast.Constant)]
            modes += [k.value.value for k in call.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
            return any(isinstance(m, str) and set(m) & set("wax+") for m in modes)
        if name == "save" and isinstance(call.func, ast.Attribute):
            return isinstance(call.func.value, ast.Name) and call.func.value.id in ("torch", "np", "numpy")
        if name in ("write_text", "write_bytes"):  # Path methods; the bare names are refusal_circuits.io's helpers
            return isinstance(call.func, ast.Attribute)
        return name in _WRITES

    def visit(node: ast.AST, func: str, guarded: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and name_of(i.context_expr) in _ATOMIC for i in node.items):
            guarded = True
        if isinstance(node, ast.Call) and writes(node) and not guarded \
                and (filename, func) not in NOT_IN_AN_ATOMIC_BLOCK:
            found.append(f"{filename}:{node.lineno} {func}: {name_of(node)}")
        for child in ast.iter_child_nodes(node):
            visit(child, func, guarded)

    visit(ast.parse(source), "<module>", False)
    return found


def _library_files() -> list[Path]:
    """Every Python file of the library, subpackages included (checked: the walk reaches into them)."""
    files = sorted(LIBRARY.rglob("*.py"))
    assert LIBRARY / "attribution" / "storage.py" in files, "the walk misses the subpackages"
    return files


@pytest.mark.unit
def test_every_file_the_library_writes_goes_through_an_atomic_block():
    files = _library_files()
    found = [hit for f in files for hit in _unguarded_writes(f.read_text(), f.relative_to(LIBRARY).as_posix())]
    assert not found, found
    # the audit itself finds what it looks for
    bad = "def f(p):\n    p.write_text('x')\n    with open(p, 'w') as h:\n        json.dump({}, h)\n    save_file({}, p)\n"
    assert _unguarded_writes(bad, "x.py") == ["x.py:2 f: write_text", "x.py:3 f: open", "x.py:4 f: dump",
                                              "x.py:5 f: save_file"]
    assert not _unguarded_writes("with atomic_path(p) as t:\n    t.write_text('x')\n", "x.py")


# ------------------------------------------------------------------------------------------------- untrusted files

_RAN: list[str] = []


def _payload() -> dict:
    _RAN.append("payload")
    return {}


class _Pickled:
    """Unpickling this runs :func:`_payload`: what a hostile checkpoint would do."""

    def __reduce__(self):
        return (_payload, ())


@pytest.mark.unit
def test_the_library_never_unpickles():
    pattern = re.compile(r"torch\.load\((?!.*weights_only\s*=\s*True)|pickle\.loads?\(|(np|numpy)\.load\(|"
                         r"allow_pickle\s*=\s*True|import (dill|joblib|cloudpickle)|trust_remote_code\s*=\s*True")
    hits = [f"{f.relative_to(LIBRARY).as_posix()}:{n}" for f in _library_files()
            for n, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
    assert pattern.search("x = torch.load(p)") and not pattern.search("x = torch.load(p, weights_only=True)")


@pytest.mark.tiny
def test_pickles_in_place_of_our_files_are_refused_without_running(env, tiny_dir, tmp_path):
    from refusal_circuits.attribution import load_attribution
    from refusal_circuits.directions import load_direction
    from refusal_circuits.models import load_model

    _RAN.clear()
    shutil.copytree(env["dir"], tmp_path / "d")
    torch.save({"direction": _Pickled()}, tmp_path / "d" / "direction.safetensors")
    with pytest.raises(InputError, match="direction.safetensors: not a readable safetensors file"):
        load_direction(tmp_path / "d")
    shutil.copytree(env["attr"], tmp_path / "a")
    torch.save({"heads": _Pickled()}, tmp_path / "a" / "attributions.safetensors")
    with pytest.raises(InputError, match="attributions.safetensors: not a readable safetensors file"):
        load_attribution(tmp_path / "a")
    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(_Pickled(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(InputError, match="checkpoint is a pickle that holds more than weights, refused"):
        load_model(str(tmp_path / "m"))
    assert _RAN == []


@pytest.mark.tiny
def test_trust_remote_code_is_never_on_unless_asked(tiny_dir, monkeypatch):
    """Every loader a model spec reaches gets trust_remote_code=False, unless the caller asks for True."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    from refusal_circuits.models import load_model

    seen: list[tuple[str, object]] = []

    def spy(owner, name, static=False):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.append((name, kwargs.get("trust_remote_code", "absent")))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, staticmethod(wrapper) if static else wrapper)

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        spy(cls, "from_pretrained")
    spy(TransformerBridge, "boot_transformers", static=True)

    load_model(str(tiny_dir))
    names = {n for n, _ in seen}
    assert {"from_pretrained", "boot_transformers"} <= names
    assert all(v in (False, "absent") for _, v in seen), seen
    assert ("boot_transformers", False) in seen
    seen.clear()
    load_model(str(tiny_dir), trust_remote_code=True)
    asked = [v for n, v in seen if n == "boot_transformers" or v != "absent"]
    assert asked and all(v is True for v in asked), seen


@pytest.mark.tiny
def test_compare_finds_the_attributed_prompts_from_another_directory(env, tmp_path, monkeypatch, capsys):
    """`attribute` records where its prompts are; a relative path must still resolve when `compare` runs elsewhere."""
    monkeypatch.chdir(Path(env["prompts"]).parent)
    out = tmp_path / "attr"
    assert main(["-q", "attribute", "--model", env["model"], "--prompts", Path(env["prompts"]).name, "--direction",
                 env["dir"], "--split", "test", "--no-dla", "--total-effects", "0", "--out", str(out)]) == 0
    monkeypatch.chdir(tmp_path)
    rates = {label: {"n": 2, "refusal_rate": 0.5} for label in ("harmful", "harmless")}
    (tmp_path / "eval.json").write_text(json.dumps({"results": {"en": rates, "de": rates}}))
    capsys.readouterr()
    code = main(["-q", "compare", "--attributions", str(out), "--evaluation", "eval.json", "--patch-top-k", "0",
                 "--out", str(tmp_path / "cmp")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "attributions.json").read_text())["prompts"] == env["prompts"]
