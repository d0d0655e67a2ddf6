"""``rc.check`` / ``refusal-circuits check``: every row holds on a healthy model, a broken fast path shows as failed
(exit code 1), and the record renders itself."""

from __future__ import annotations

import json

import pytest

from refusal_circuits import fastpaths
from refusal_circuits.cli import main
from refusal_circuits.selfcheck import check

pytestmark = pytest.mark.canary


@pytest.mark.tiny
def test_every_identity_holds_on_the_tiny_model(tiny_model):
    report = check(tiny_model)
    assert report.ok
    assert {r.name: r.status for r in report.rows} == {
        fastpaths.PREFIX: "exact", fastpaths.PACK: "exact", fastpaths.GENERATE: "exact",
        "chat template positions": "exact", "attribution completeness": "exact",
        "direct logit attribution": "exact", "orthogonalized = hooked": "exact"}
    assert all(r.error <= r.allowed for r in report.rows)
    assert "transformers" in report.versions and "<table>" in report._repr_html_()
    assert "all hold" in report.table()


@pytest.mark.tiny
def test_the_command_prints_the_table_and_fails_when_a_fast_path_breaks(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "check.json"
    assert main(["check", "--model", str(tiny_dir), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "shared template prefix" in printed and "all hold" in printed
    assert json.loads(out.read_text())["ok"] is True

    from refusal_circuits import forward

    real = forward.packing._packed
    monkeypatch.setattr(forward.packing, "_packed", lambda hf, prefix, own, rows, *a, **k:
                        real(hf, prefix, [list(reversed(x)) for x in own], rows, *a, **k))
    assert main(["check", "--model", str(tiny_dir)]) == 1
    printed = capsys.readouterr().out
    assert "packed first-token logits  failed" in printed and "FAILED: packed first-token logits" in printed


@pytest.mark.packaged
def test_every_identity_holds_on_the_packaged_model(packaged_model):
    report = check(packaged_model)
    assert report.ok, report.table()
    assert all(r.status == "exact" for r in report.rows), report.table()
