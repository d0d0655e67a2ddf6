"""The report package and the markup it shares with every ``_repr_html_``: layering, escaping, text helpers (unit).

The page itself is checked end to end by tests/test_study.py and tests/test_edges.py (a study on the tiny model),
and its files by tests/test_golden.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from refusal_circuits.markup import esc, table

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "refusal_circuits"
HOSTILE = "<b onclick='x'>\u202eevil</b>"
SHOWN = "&lt;b onclick=&#x27;x&#x27;&gt;⟨U+202E⟩evil&lt;/b&gt;"


def _imports(path: Path, *, nested: bool) -> list[str]:
    """The modules ``path`` imports: at module level (``nested=False``) or inside functions (``nested=True``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if (id(node) not in top) != nested:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def test_old_import_paths_still_work():
    from refusal_circuits import viz
    from refusal_circuits.report import _page, baseline_report_html, build_report, collect_results
    from refusal_circuits.report import esc as report_esc

    assert report_esc is esc and callable(_page) and callable(viz.matrix)
    assert all(callable(f) for f in (baseline_report_html, build_report, collect_results))


def test_viz_never_imports_the_report_and_the_report_imports_viz_at_module_level():
    viz = PACKAGE / "viz.py"
    assert not [m for m in _imports(viz, nested=False) + _imports(viz, nested=True) if m.startswith(
        "refusal_circuits.report")]
    for path in [viz, *sorted((PACKAGE / "report").glob("*.py"))]:
        hidden = [m for m in _imports(path, nested=True) if m.startswith("refusal_circuits")]
        assert not hidden, f"{path.name} imports {hidden} inside a function"
    assert "refusal_circuits" in _imports(PACKAGE / "report" / "figures.py", nested=False)


def test_html_escape_only_in_markup():
    """Every page and ``_repr_html_`` escapes through markup.esc, which also shows bidi controls."""
    users = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if path.name != "markup.py" and ("html.escape" in text or "import html\n" in text):
            users.append(str(path.relative_to(PACKAGE)))
    assert not users


def test_table_escapes_its_header_and_leaves_out_what_is_empty():
    assert table("", [], ["<tr><td>1</td></tr>"]) == "<table><tr><td>1</td></tr></table>"
    assert table("c", ["", HOSTILE], []) == f"<table><caption>c</caption><tr><th></th><th>{SHOWN}</th></tr></table>"


def test_repr_html_shows_bidi_controls_and_markup_as_text():
    from refusal_circuits.attribution.records import HeadTable
    from refusal_circuits.data import PromptRecord, PromptSet

    prompts = PromptSet((PromptRecord("a", "en", "harmful", "x"),), HOSTILE)
    heads = HeadTable([{"lang": HOSTILE, "label": "harmful", "rank": 1, "layer": 0, "head": 1, "mean": 0.5,
                        "std": 0.1, "n": 2, "from": {"instruction": 0.25}}], HOSTILE, "m")
    for out in (prompts._repr_html_(), heads._repr_html_()):
        assert SHOWN in out and "\u202e" not in out and "<b onclick" not in out


def test_text_helpers_render_nulls_with_their_reasons():
    from refusal_circuits.report.text import gaps, missing_text, na

    assert na({"x": 0.123}, "x") == "0.12" and na({}, "x") == "–"
    assert na({"x": None, "x_why": "<one> prompt"}, "x") == "n/a (&lt;one&gt; prompt)"
    assert na({"x": float("nan"), "x_why": "r"}, "x", 3) == "n/a (r)"
    obj = {"a": [None], "a_why": "few", "b": {"de": None}, "b_why": {"de": "few"}}
    assert missing_text(obj, ("a", "b")) == " a, b de: n/a (few)."
    assert missing_text({}, ("a",)) == ""
    assert gaps({"s": obj, "l": [{"c_why": "why"}]}) == [("s.a", "few"), ("s.b.de", "few"), ("l[0].c", "why")]
