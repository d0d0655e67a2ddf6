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
