"""Response-language detection and the language-confusion record (unit: no model)."""

from __future__ import annotations

import json

import pytest

from refusal_circuits.response_language import detect, language_confusion, supported
from tests.fixtures.real_completions import REAL_COMPLETIONS

pytestmark = pytest.mark.unit


def test_every_bundled_language_is_supported():
    from refusal_circuits.data import BUNDLED_LANGS

    assert all(supported(code) for code in BUNDLED_LANGS) and not supported("xx")


def test_the_packaged_models_real_completions_are_detected_in_their_language():
    langs = sorted({lang for lang, *_ in REAL_COMPLETIONS})
    found = detect([text for _, _, text, _ in REAL_COMPLETIONS], langs)
    wrong = [(lang, text[:40], got) for (lang, _, text, _), got in zip(REAL_COMPLETIONS, found, strict=True)
             if got is not None and got not in (lang, "en")]
    assert len(wrong) <= len(found) / 20, wrong  # measured: 1 of 37 (an Italian fragment read as Spanish)
    yoruba = [got for (lang, _, text, _), got in zip(REAL_COMPLETIONS, found, strict=True) if lang == "yo"]
    assert yoruba and all(g == "en" for g in yoruba)  # the 0.5B answers Yoruba prompts in English


def test_short_text_is_not_judged():
    assert detect(["ok", "", "1. 2. 3."], ["de"]) == [None, None, None]


def test_language_confusion_counts_refusals_in_english():
    langs = ["yo", "yo", "yo", "de", "de", "en"]
    texts = ["I'm sorry, but I can't help with that.", "I apologize, but I cannot assist with that request.",
             "Ẹ jọ̀ọ́, mo fẹ́ ràn yín lọ́wọ́ pẹ̀lú iṣẹ́ yìí lónìí.", "Es tut mir leid, dabei kann ich nicht helfen.",
             "Hier ist ein Rezept für einen einfachen Kuchen.", "Sure, here it is."]
    refused = [True, True, False, True, False, False]
    out = language_confusion(langs, texts, refused)
    yo, de = out.rows["yo"], out.rows["de"]
    assert (yo.n, yo.english.k, yo.refused, yo.refused_in_english.k) == (3, 2, 2, 2)
    assert (de.own.k, de.refused, de.refused_in_english.k) == (2, 1, 0)
    assert out.confused() == ["yo"]
    lo, hi = yo.refused_in_english.ci
    assert 0 < lo < 1 == hi
    json.dumps(out.to_json())
    assert "<table>" in out._repr_html_()
    with pytest.raises(ValueError):
        language_confusion(["en"], [], [])
