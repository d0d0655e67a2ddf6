"""The language of every completion, and "refused in English to a Yoruba prompt" as its own finding.

A refusal counted in a language is two things at once: whether the model refused, and in which language it
answered. The packaged 0.5B answers Yoruba prompts with English refusals; counted as Yoruba refusals they make
Yoruba look aligned, and any score built from English tokens ("I") mixes "does not refuse" with "does not answer
in English". So every completion's language is detected (offline, with the ``lingua`` identifier from PyPI,
restricted to the study's languages plus English) and :func:`language_confusion` reports, per prompt language,
how often the model answered in that language, in English, in another language, or undetectably (too short, code),
and how the refusals split between the prompt's language and English, each with a Wilson interval.

Detection uses lingua's own decision rule (nothing is fitted to the prompts); a text with fewer than
:data:`MIN_LETTERS` letters is not judged.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from refusal_circuits.errors import RefusalCircuitsError
from refusal_circuits.markup import esc
from refusal_circuits.stats import Rate

#: Texts with fewer letters than this are not judged (``None``): a few characters do not name a language.
MIN_LETTERS = 4

#: What a completion's language is called when it could not be detected.
UNKNOWN = "unknown"


@functools.lru_cache(maxsize=8)
def _detector(langs: tuple[str, ...]) -> tuple[Any, dict[Any, str]]:
    try:
        from lingua import IsoCode639_1, Language, LanguageDetectorBuilder
    except ImportError as e:  # a dependency; a broken environment gets the library's error, not a traceback
        raise RefusalCircuitsError("language identification needs the 'lingua-language-detector' package, a "
                                   "dependency of refusal-circuits: reinstall refusal-circuits") from e
    known = []
    for code in langs:
        iso = getattr(IsoCode639_1, code.upper(), None)
        if iso is not None:
            known.append(Language.from_iso_code_639_1(iso))
    if len(known) < 2:
        known = [*known, *[lang for lang in (Language.ENGLISH, Language.FRENCH) if lang not in known]][:2]
    names = {lang: lang.iso_code_639_1.name.lower() for lang in known}
    return LanguageDetectorBuilder.from_languages(*known).build(), names


def supported(code: str) -> bool:
    """Whether the identifier knows the ISO 639-1 ``code``."""
    try:
        from lingua import IsoCode639_1
    except ImportError:
        return False
    return getattr(IsoCode639_1, code.upper(), None) is not None


def detect(texts: Sequence[str], langs: Iterable[str]) -> list[str | None]:
    """The ISO 639-1 language of each text among ``langs`` (English always included); None if undecidable.

    >>> detect(["Lo siento, no puedo ayudarte con eso.", "I'm sorry, but I can't help.", "ok"], ["es"])
    ['es', 'en', None]
    """
    detector, names = _detector(tuple(sorted({"en", *langs})))
    out: list[str | None] = []
    for text in texts:
        if sum(c.isalpha() for c in text) < MIN_LETTERS:
            out.append(None)
            continue
        found = detector.detect_language_of(text)
        out.append(names.get(found) if found is not None else None)
    return out


@dataclass(frozen=True)
class LanguageRow:
    """One prompt language: where its answers went, and where its refusals went."""

    lang: str
    n: int
    own: Rate  # answered in the prompt's language
    english: Rate  # answered in English (for English prompts: the same as own)
    other: Rate  # answered in a third language
    unknown: Rate  # too short or undetectable
    refused: int
    refused_in_english: Rate  # of the refusals, how many were in English

    def to_json(self) -> dict[str, Any]:
        return {"lang": self.lang, "n": self.n, "own": self.own.to_json(), "english": self.english.to_json(),
                "other": self.other.to_json(), "unknown": self.unknown.to_json(), "refused": self.refused,
                "refused_in_english": _no_refusals(self.refused_in_english.to_json())}


def _no_refusals(rate: dict[str, Any]) -> dict[str, Any]:
    """A share of no refusals is missing because nothing was refused: say so rather than "no prompts"."""
    return {k: ("no refusals" if k.endswith("_why") else v) for k, v in rate.items()}


@dataclass(frozen=True)
class LanguageConfusion:
    """Per prompt language, the response languages and the language of the refusals (:func:`language_confusion`)."""

    rows: dict[str, LanguageRow]

    def to_json(self) -> dict[str, Any]:
        return {"method": f"lingua, restricted to the study's languages and English; under {MIN_LETTERS} "
                          "letters: unknown", "languages": {k: r.to_json() for k, r in self.rows.items()}}

    def confused(self) -> list[str]:
        """Languages (not English) most of whose refusals were in English."""
        return [k for k, r in self.rows.items() if k != "en" and r.refused and r.refused_in_english.rate > 0.5]

    def _repr_html_(self) -> str:
        def pct(r: Rate) -> str:
            lo, hi = r.ci
            return f"{r.rate:.0%} <small>[{lo:.0%}, {hi:.0%}]</small>" if r.n else "n/a"

        rows = "".join(
            f"<tr><td>{esc(k)}</td><td>{r.n}</td><td>{pct(r.own)}</td><td>{pct(r.english)}</td><td>{pct(r.other)}"
            f"</td><td>{pct(r.unknown)}</td><td>{r.refused}</td><td>{pct(r.refused_in_english)}</td></tr>"
            for k, r in self.rows.items())
        return ("<table><caption>Response language per prompt language (95% Wilson intervals)</caption><tr>"
                "<th>lang</th><th>n</th><th>own</th><th>English</th><th>other</th><th>unknown</th><th>refused</th>"
                f"<th>refusals in English</th></tr>{rows}</table>")


def language_confusion(langs: Sequence[str], completions: Sequence[str], refused: Sequence[bool],
                       detected: Sequence[str | None] | None = None) -> LanguageConfusion:
    """Response languages and refusal languages per prompt language (``detected``: from :func:`detect`)."""
    if not len(langs) == len(completions) == len(refused):
        raise ValueError(f"{len(langs)} languages, {len(completions)} completions, {len(refused)} verdicts")
    found = list(detect(completions, set(langs))) if detected is None else list(detected)
    rows = {}
    for lang in dict.fromkeys(langs):
        idx = [i for i, x in enumerate(langs) if x == lang]
        got = [found[i] for i in idx]
        n = len(idx)
        refusals = [found[i] for i in idx if refused[i]]
        rows[lang] = LanguageRow(
            lang, n,
            own=Rate(sum(g == lang for g in got), n), english=Rate(sum(g == "en" for g in got), n),
            other=Rate(sum(g is not None and g not in (lang, "en") for g in got), n),
            unknown=Rate(sum(g is None for g in got), n), refused=len(refusals),
            refused_in_english=Rate(sum(g == "en" for g in refusals), len(refusals)))
    return LanguageConfusion(rows)
