"""The command line: help, bad input (exit 2, one line, nothing written), and a real run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from refusal_circuits.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.unit
def test_help_explains_itself(capsys):
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model" in out and "packaged:qwen2.5-coder-0.5b-instruct" in out and "--max-prompts" in out


BAD = [
    (["run", "--model", "packaged:nope"], "unknown packaged model"),
    (["run", "--model", "./nowhere"], "no such model directory"),
    (["run", "--prompts", "missing.jsonl"], "missing.jsonl: no such file"),
    (["run", "--langs", "xx"], "not in the bundled set"),
    (["run", "--max-prompts", "0"], "expected a positive whole number"),
    (["run", "--langs", ","], "at least one language"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *argv, *(["--out", "o"] if argv[0] == "run" else []))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.unit
def test_bad_prompt_file_line_is_named_through_the_cli(tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "1", "lang": "en", "label": "harmful", "instruction": "x"}\n{"id": 2}\n')
    code, _, err = _run(capsys, "run", "--prompts", str(p), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{p}:2: missing key(s) lang, label, instruction" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.packaged
def test_run_on_the_packaged_model_writes_report_and_results(tmp_path):
    """The real entry point, as a user runs it, on a small slice of the bundled set: every stage on the real model."""
    out = tmp_path / "rep"
    proc = subprocess.run(
        [sys.executable, "-m", "refusal_circuits.cli", "-q", "run", "--langs", "en,yo", "--max-prompts", "4",
         "--train-prompts", "16", "--positions", "-1", "--max-new-tokens", "12", "--total-effects", "1",
         "--patch-top-k", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["direction"]["model"] == "packaged:qwen2.5-coder-0.5b-instruct"
    assert 0 <= results["direction"]["layer"] < 24 * 0.8 and results["direction"]["position"] == -1
    base = results["refusal"]["baseline"]
    assert set(base) == {"en", "yo"} and base["en"]["harmful"]["n"] == 4
    completions = json.loads((out / "stages" / "evaluate" / "baseline.json").read_text())["completions"]
    assert len(completions) == 16 and all(c["completion"] for c in completions)
    assert results["divergence"]["languages"]["yo"]["n_pairs"] == 4
    # The transfer matrix's first-token judge, checked against generation + phrases on the real model.
    check = results["languages"]["transfer"]["check"]
    assert check["judges"] == ["first_token", "phrases"] and check["source"] == "en"
    assert {"baseline harmful", "baseline harmless", "ablate en", "actadd en"} <= set(check["cells"])
    baseline = check["cells"]["baseline harmful"]["languages"]
    assert {"en", "yo", "all"} <= set(baseline) and baseline["en"]["n"] == 4
    assert all(0.0 <= cell["languages"]["all"]["agreement"]["rate"] <= 1.0 for cell in check["cells"].values())
    html = (out / "report.html").read_text()
    assert "Refusal per language" in html and html.count("<figure ") >= 12
    assert not list(out.rglob(".*tmp")), "no temporary files left behind"
