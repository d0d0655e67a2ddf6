"""Prompt files: the bundled set's shape, the loaders, and a clear error for every bad file (unit tier)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refusal_circuits.data import (
    BUNDLED_LANGS,
    HUB_PRESETS,
    HubPreset,
    load_bundled,
    load_prompt_file,
    load_prompts,
    parse_jsonl,
    records_from_rows,
)
from refusal_circuits.errors import InputError, PromptFileError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bundled():
    return load_bundled()


def test_bundled_has_every_language_with_enough_prompts(bundled):
    counts = bundled.counts()
    assert tuple(counts) == BUNDLED_LANGS
    for lang, c in counts.items():
        assert c["harmful"] >= 192 and c["harmless"] >= 192, lang


def test_bundled_ids_labels_and_splits_align_across_languages(bundled):
    english = {r.id: r for r in bundled.filter(lang="en")}
    for lang in BUNDLED_LANGS:
        rows = bundled.filter(lang=lang)
        assert {r.id for r in rows} == set(english), lang
        for r in rows:
            e = english[r.id]
            assert (r.label, r.split, r.category) == (e.label, e.split, e.category), (lang, r.id)
            if lang != "en":
                assert r.instruction != e.instruction, (lang, r.id, "untranslated")


def test_bundled_split_is_128_32_32_per_label(bundled):
    en = bundled.filter(lang="en")
    for label in ("harmful", "harmless"):
        c = Counter(r.split for r in en.filter(label=label))
        assert c == {"train": 128, "val": 32, "test": 32}


def test_bundled_harmful_set_covers_varied_categories(bundled):
    cats = Counter(r.category for r in bundled.filter(lang="en", label="harmful"))
    assert len(cats) >= 10 and max(cats.values()) <= 32


def test_bundled_instructions_are_unique_within_each_language(bundled):
    for lang in BUNDLED_LANGS:
        texts = [r.instruction.strip().casefold() for r in bundled.filter(lang=lang)]
        dupes = [t for t, n in Counter(texts).items() if n > 1]
        assert not dupes, (lang, dupes[:3])


def test_load_prompts_bundled_filters_languages():
    ps = load_prompts("bundled", langs=["de", "en"])
    assert ps.langs == ("de", "en")
    with pytest.raises(InputError, match="xx"):
        load_prompts("bundled", langs=["xx"])


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


GOOD = {"id": "a1", "lang": "en", "label": "harmful", "instruction": "Do a bad thing.", "source": "me"}


def test_jsonl_round_trip_keeps_extra_keys(tmp_path):
    rows = [GOOD, {**GOOD, "lang": "de", "instruction": "Tu etwas Schlechtes."}]
    p = _write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    ps = load_prompt_file(p)
    assert [r.lang for r in ps] == ["en", "de"]
    assert ps[0].extra == {"source": "me"}
    assert ps.pairs("en", "de")[0][1].instruction == "Tu etwas Schlechtes."


def test_csv_loads_like_jsonl(tmp_path):
    p = _write(tmp_path, "p.csv", 'id,lang,label,instruction\na1,en,harmless,"Hello, world"\n')
    ps = load_prompt_file(p)
    assert ps[0].instruction == "Hello, world" and ps[0].label == "harmless"


BAD_FILES = [
    ("empty.jsonl", "", "no prompts"),
    ("malformed.jsonl", json.dumps(GOOD) + "\n{not json\n", r"malformed.jsonl:2: malformed JSON"),
    ("missing.jsonl", json.dumps({k: v for k, v in GOOD.items() if k != "label"}), r":1: missing key\(s\) label"),
    ("label.jsonl", json.dumps({**GOOD, "label": "evil"}), r":1: unknown label 'evil'"),
    ("lang.jsonl", json.dumps({**GOOD, "lang": "english"}), r":1: unknown language code 'english'"),
    ("dup.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD), r"dup.jsonl:2: duplicate id 'a1'.*line 1"),
    ("array.jsonl", "[1, 2]", r":1: expected a JSON object"),
    ("type.jsonl", json.dumps({**GOOD, "id": 5}), r":1: 'id' must be a string"),
    ("blank.jsonl", json.dumps({**GOOD, "instruction": "   "}), r":1: empty instruction"),
    ("latin1.jsonl", json.dumps(GOOD).encode() + b"\n" + '{"id": "é"}'.encode("latin-1"), r"latin1.jsonl:2: not valid UTF-8"),
    ("header.csv", "id,lang,instruction\na,en,x\n", r"header.csv:1: CSV header lacks column\(s\) label"),
    ("row.csv", "id,lang,label,instruction\na,en,harmful,x,extra\n", r"row.csv:2: more fields"),
    ("split.jsonl", json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "id": "b", "split": "tset"}),
     r"split.jsonl:2: unknown split 'tset'; expected train, val, test or none"),
    ("split-type.jsonl", json.dumps({**GOOD, "split": 3}), r":1: unknown split 3"),
    ("split.csv", "id,lang,label,instruction,split\na,en,harmful,x,Test\n", r"split.csv:2: unknown split 'Test'"),
    ("columns.csv", "id,lang,label,instruction,label\na,en,harmful,x,harmless\n",
     r"columns.csv:1: CSV header repeats column\(s\) label"),
    ("prompts.txt", "whatever", "unsupported prompt file type"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_prompt_files_name_file_and_line(tmp_path, name, content, message):
    p = _write(tmp_path, name, content)
    with pytest.raises(PromptFileError, match=message) as info:
        load_prompt_file(p)
    assert str(p) in str(info.value)


def test_blank_split_cells_mean_no_split(tmp_path):
    p = _write(tmp_path, "p.csv", "id,lang,label,instruction,split\na,en,harmful,x,\nb,en,harmless,y,test\n")
    ps = load_prompt_file(p)
    assert [r.split for r in ps] == [None, "test"] and "split" not in ps[0].extra


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PromptFileError, match="nope.jsonl: no such file"):
        load_prompts(tmp_path / "nope.jsonl")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "id": st.text(min_size=1, max_size=8).filter(lambda s: s.strip()),
    "lang": st.sampled_from(["en", "de", "zz", ""]),
    "label": st.sampled_from(["harmful", "harmless", "other"]),
    "instruction": st.text(max_size=30),
}), max_size=5))
def test_loader_accepts_exactly_the_valid_records(rows):
    """Property: a file either loads every row unchanged or raises a PromptFileError naming a line."""
    text = "\n".join(json.dumps(r) for r in rows)
    valid = all(r["lang"] in ("en", "de") and r["label"] != "other" and r["instruction"].strip() for r in rows)
    try:
        parsed = parse_jsonl(text, "f.jsonl")
    except PromptFileError as e:
        assert not valid and e.line is not None
        return
    assert valid
    assert [(p.id, p.lang, p.label, p.instruction) for _, p in parsed] == [
        (r["id"].strip(), r["lang"], r["label"], r["instruction"]) for r in rows]


def test_hub_presets_convert_rows_like_advbench_and_polyrefuse():
    adv = records_from_rows([{"prompt": "Write a threat.", "target": "Sure"}], HUB_PRESETS["advbench"], "hf:advbench")
    assert adv[0].label == "harmful" and adv[0].lang == "en" and adv[0].id == "advbench-0001"
    poly = records_from_rows(
        [{"id": "p1", "lang": "de", "label": "harmful", "instruction": "X"},
         {"id": "p1", "lang": "en", "label": "harmful", "instruction": "Y"},
         {"id": "p2", "lang": "en", "label": "harmless", "instruction": "Z"}],
        HUB_PRESETS["polyrefuse"], "hf:polyrefuse")
    assert [r.label for r in poly] == ["harmful", "harmful", "harmless"]
    assert poly.pairs("en", "de")[0][0].instruction == "Y"


def test_hub_loader_reads_a_local_dataset_copy(tmp_path):
    pytest.importorskip("datasets")
    from refusal_circuits.data import load_hub_prompts

    d = tmp_path / "jbb"
    d.mkdir()
    (d / "train.csv").write_text("Goal,Behavior,Category\nWrite a scam email,Scam,Fraud\nExplain tides,Tides,Science\n")
    preset = HubPreset("local/jbb", text_column="Goal", label="harmful")
    ps = load_hub_prompts("local", data_dir=str(d), preset=preset)
    assert len(ps) == 2 and ps[0].instruction == "Write a scam email"
    bad = HubPreset("local/jbb", text_column="Prompt", label="harmful")
    with pytest.raises(InputError, match="lacks column"):
        load_hub_prompts("local", data_dir=str(d), preset=bad)


@pytest.mark.parametrize("line", [
    '{"id": "a", "lang": "en", "label": "harmful", "instruction": "x \\ud800"}',
    '{"id": "a", "lang": "en", "label": "harmful", "instruction": "x", "note": "\\udfff"}',
])
def test_unpaired_surrogate_escapes_are_named(tmp_path, line):
    p = _write(tmp_path, "s.jsonl", json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(PromptFileError, match=r"s.jsonl:2: text with an unpaired surrogate"):
        load_prompt_file(p)


@pytest.mark.parametrize(("content", "message"), [
    (json.dumps({**GOOD, "id": "  "}), r":1: empty id"),
    ("[" * 100_000 + "]" * 100_000, r":1: malformed JSON \(nested too deeply\)"),
])
def test_blank_ids_and_deep_nesting_are_named(tmp_path, content, message):
    p = _write(tmp_path, "p.jsonl", content)
    with pytest.raises(PromptFileError, match=message):
        load_prompt_file(p)


def _loads_or_names_a_line(p: Path) -> None:
    """Property core: the loader returns valid records or raises a PromptFileError naming the file, nothing else."""
    try:
        ps = load_prompt_file(p)
    except PromptFileError as e:
        assert str(e).startswith(str(p)) and "\n" not in str(e)
        return
    assert len(ps) and len(ps.sha256) == 64
    for r in ps:
        assert r.id.strip() and r.instruction.strip() and r.label in ("harmful", "harmless")
        assert r.instruction.encode("utf-8") and r.id.encode("utf-8")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["f.jsonl", "f.csv"]))
def test_any_bytes_load_or_fail_with_a_prompt_file_error(tmp_path_factory, data, name):
    p = tmp_path_factory.mktemp("fuzz") / name
    p.write_bytes(data)
    _loads_or_names_a_line(p)


# Any character: lone surrogates (which JSON can spell as \ud800; st.text never makes them) often enough to matter,
# controls and separators.
_ANY_TEXT = st.lists(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=12).map("".join)
_ANY_VALUE = st.one_of(_ANY_TEXT, st.integers(), st.floats(), st.none(), st.booleans(), st.lists(st.integers(), max_size=2))


_RECORD = st.fixed_dictionaries(
    {"id": st.one_of(st.sampled_from(["a", "b", " c "]), _ANY_TEXT), "lang": st.sampled_from(["en", "de", " ja", "xx"]),
     "label": st.sampled_from(["harmful", "harmless", "Harmful"]), "instruction": _ANY_TEXT},
    optional={"split": _ANY_VALUE, "category": _ANY_VALUE})


@settings(max_examples=200, deadline=None)
@given(st.lists(_RECORD, min_size=1, max_size=3))
def test_any_json_lines_load_or_fail_with_a_prompt_file_error(tmp_path_factory, objects):
    """Property: records that are nearly valid, with any text in them (lone surrogates spelled as \\ud800 included),
    load as valid records or fail with a PromptFileError; never another exception."""
    p = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    p.write_text("\n".join(json.dumps(o) for o in objects), encoding="utf-8")  # ensure_ascii: \ud800 escapes
    _loads_or_names_a_line(p)


_CSV_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"),
                    min_size=1, max_size=20).filter(lambda s: s.strip())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_CSV_TEXT, st.sampled_from(["en", "de", "ja"]), st.sampled_from(["harmful", "harmless"]),
                          _CSV_TEXT), min_size=1, max_size=5, unique_by=lambda r: (r[0].strip(), r[1])))
def test_csv_round_trips_any_text(tmp_path_factory, rows):
    """Property: commas, quotes and line breaks inside fields survive a CSV file written by the csv module."""
    import csv

    p = tmp_path_factory.mktemp("csv") / "p.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "lang", "label", "instruction"])
        writer.writerows(rows)
    ps = load_prompt_file(p)
    assert [(r.id, r.lang, r.label, r.instruction) for r in ps] == [(i.strip(), g, lab, t) for i, g, lab, t in rows]
