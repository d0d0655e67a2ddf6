"""Prompt records, the bundled 14-language set, and loaders for JSONL, CSV and hub datasets.

A prompt file holds one object per line (JSONL) or row (CSV) with ``id``, ``lang`` (ISO 639-1), ``label``
(``harmful`` or ``harmless``) and ``instruction``; extra keys are kept in :attr:`PromptRecord.extra`. The same
``id`` in two languages marks translations of one prompt. Every problem is reported as a
:class:`~refusal_circuits.errors.PromptFileError` naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from refusal_circuits.errors import InputError, MissingExtraError, PromptFileError
from refusal_circuits.markup import esc, table
from refusal_circuits.sampling import stratified_halves, stratified_ids

LABELS = ("harmful", "harmless")
REQUIRED_KEYS = ("id", "lang", "label", "instruction")
#: The languages of the bundled set: English plus the PolyRefuse languages.
BUNDLED_LANGS = ("en", "ar", "de", "es", "fr", "it", "ja", "ko", "nl", "pl", "ru", "th", "yo", "zh")
SPLITS = ("train", "val", "test")

# ISO 639-1, all 183 two-letter codes: an unknown code is far more often a typo than a new language.
ISO_639_1 = frozenset(
    ["aa", "ab", "ae", "af", "ak", "am", "an", "ar", "as", "av", "ay", "az", "ba", "be", "bg", "bi", "bm", "bn", "bo", "br", "bs", "ca", "ce", "ch", "co", "cr", "cs", "cu", "cv", "cy", "da", "de", "dv", "dz", "ee", "el", "en", "eo", "es", "et", "eu", "fa", "ff", "fi", "fj", "fo", "fr", "fy", "ga", "gd", "gl", "gn", "gu", "gv", "ha", "he", "hi", "ho", "hr", "ht", "hu", "hy", "hz", "ia", "id", "ie", "ig", "ii", "ik", "io", "is", "it", "iu", "ja", "jv", "ka", "kg", "ki", "kj", "kk", "kl", "km", "kn", "ko", "kr", "ks", "ku", "kv", "kw", "ky", "la", "lb", "lg", "li", "ln", "lo", "lt", "lu", "lv", "mg", "mh", "mi", "mk", "ml", "mn", "mr", "ms", "mt", "my", "na", "nb", "nd", "ne", "ng", "nl", "nn", "no", "nr", "nv", "ny", "oc", "oj", "om", "or", "os", "pa", "pi", "pl", "ps", "pt", "qu", "rm", "rn", "ro", "ru", "rw", "sa", "sc", "sd", "se", "sg", "si", "sk", "sl", "sm", "sn", "so", "sq", "sr", "ss", "st", "su", "sv", "sw", "ta", "te", "tg", "th", "ti", "tk", "tl", "tn", "to", "tr", "ts", "tt", "tw", "ty", "ug", "uk", "ur", "uz", "ve", "vi", "vo", "wa", "wo", "xh", "yi", "yo", "za", "zh", "zu"]
)


@dataclass(frozen=True)
class PromptRecord:
    """One instruction. ``extra`` keeps any further keys of the source (``category``, ``split``, ...)."""

    id: str
    lang: str
    label: str
    instruction: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def split(self) -> str | None:
        return self.extra.get("split")

    @property
    def category(self) -> str | None:
        return self.extra.get("category")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "lang": self.lang, "label": self.label, "instruction": self.instruction,
                **self.extra}


@dataclass(frozen=True)
class PromptSet(Sequence[PromptRecord]):
    """An immutable, validated collection of prompts with the filters a study needs.

    ``source`` names where the prompts came from and ``sha256`` hashes their content, so every result can
    say exactly which prompts fed it. ``records`` may be given as any sequence; it is kept as a tuple.
    """

    records: tuple[PromptRecord, ...] | Sequence[PromptRecord]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not isinstance(self.records, tuple):
            object.__setattr__(self, "records", tuple(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return PromptSet(self.records[i], self.source)
        return self.records[i]

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()

    @property
    def langs(self) -> tuple[str, ...]:
        """Languages in order of first appearance."""
        return tuple(dict.fromkeys(r.lang for r in self.records))

    def filter(self, *, lang: str | Iterable[str] | None = None, label: str | None = None,
               split: str | Iterable[str] | None = None, ids: Iterable[str] | None = None) -> PromptSet:
        """The prompts matching every given criterion (None means any)."""
        langs = {lang} if isinstance(lang, str) else (set(lang) if lang is not None else None)
        splits = {split} if isinstance(split, str) else (set(split) if split is not None else None)
        idset = set(ids) if ids is not None else None
        if label is not None and label not in LABELS:
            raise InputError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
        keep = tuple(
            r for r in self.records
            if (langs is None or r.lang in langs) and (label is None or r.label == label)
            and (splits is None or r.split in splits) and (idset is None or r.id in idset)
        )
        return PromptSet(keep, self.source)

    def head(self, n: int) -> PromptSet:
        """The first ``n`` prompts of every (lang, label) group in file order (a block of categories when the file
        is sorted by category: measured subsets use :meth:`sample`)."""
        seen: Counter[tuple[str, str]] = Counter()
        keep = []
        for r in self.records:
            if seen[(r.lang, r.label)] < n:
                seen[(r.lang, r.label)] += 1
                keep.append(r)
        return PromptSet(tuple(keep), self.source)

    def sample(self, n: int, *, seed: int = 0) -> PromptSet:
        """``n`` prompts of every (lang, label) group, stratified by category and seeded, keeping file order.

        Translations share ids and categories, so every language gets the same prompts
        (:func:`~refusal_circuits.sampling.stratified_ids`). Use this, not :meth:`head`, for any subset that is
        measured: files sorted by category make the first ``n`` a block of categories.
        """
        groups: dict[tuple[str, str], dict[str, str | None]] = {}
        for r in self.records:
            groups.setdefault((r.lang, r.label), {})[r.id] = r.category
        keep = {key: stratified_ids(cats, n, seed=seed) for key, cats in groups.items()}
        return PromptSet(tuple(r for r in self.records if r.id in keep[(r.lang, r.label)]), self.source)

    def halves(self, *, seed: int = 0) -> tuple[PromptSet, PromptSet]:
        """Two disjoint halves of every (lang, label) group, each with half of every category, seeded."""
        groups: dict[tuple[str, str], dict[str, str | None]] = {}
        for r in self.records:
            groups.setdefault((r.lang, r.label), {})[r.id] = r.category
        cut = {key: stratified_halves(cats, seed=seed)[0] for key, cats in groups.items()}
        first = tuple(r for r in self.records if r.id in cut[(r.lang, r.label)])
        second = tuple(r for r in self.records if r.id not in cut[(r.lang, r.label)])
        return PromptSet(first, self.source), PromptSet(second, self.source)

    @property
    def instructions(self) -> list[str]:
        return [r.instruction for r in self.records]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{lang: {label: n}}``."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            out.setdefault(r.lang, {k: 0 for k in LABELS})[r.label] += 1
        return out

    def pairs(self, base: str, other: str) -> list[tuple[PromptRecord, PromptRecord]]:
        """(base, translation) pairs of prompts that share an id, in the base language's order."""
        by_id = {r.id: r for r in self.records if r.lang == other}
        return [(r, by_id[r.id]) for r in self.records if r.lang == base and r.id in by_id]

    def _repr_html_(self) -> str:
        rows = (f"<tr><td>{esc(lang)}</td><td>{c['harmful']}</td><td>{c['harmless']}</td></tr>"
                for lang, c in self.counts().items())
        return (f"<b>PromptSet</b> {len(self)} prompts from {esc(self.source)}"
                + table("", ["lang", "harmful", "harmless"], rows))


def _validate_record(obj: Any, path: object, line: int, extra_required: Sequence[str] = ()) -> PromptRecord:
    if not isinstance(obj, dict):
        raise PromptFileError(path, f"expected a JSON object, got {type(obj).__name__}", line)
    missing = [k for k in (*REQUIRED_KEYS, *extra_required) if k not in obj or obj[k] in (None, "")]
    if missing:
        raise PromptFileError(path, f"missing key(s) {', '.join(missing)}", line)
    for k in REQUIRED_KEYS:
        if not isinstance(obj[k], str):
            raise PromptFileError(path, f"{k!r} must be a string, got {type(obj[k]).__name__}", line)
    if not obj["id"].strip():
        raise PromptFileError(path, "empty id", line)
    try:  # JSON can spell an unpaired surrogate (\ud800); such text cannot be hashed, tokenized or written
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise PromptFileError(path, "text with an unpaired surrogate escape such as \\ud800 (not valid Unicode)",
                              line) from None
    lang = obj["lang"].strip()
    if lang not in ISO_639_1:
        raise PromptFileError(path, f"unknown language code {obj['lang']!r} (expected ISO 639-1, e.g. en, de)", line)
    if obj["label"] not in LABELS:
        raise PromptFileError(path, f"unknown label {obj['label']!r}; expected harmful or harmless", line)
    instruction = obj["instruction"]
    if not instruction.strip():
        raise PromptFileError(path, "empty instruction", line)
    extra = {k: v for k, v in obj.items() if k not in REQUIRED_KEYS}
    if extra.get("split") in (None, ""):  # a blank CSV cell: no split
        extra.pop("split", None)
    elif extra["split"] not in SPLITS:  # a typo would otherwise drop the prompt from every split silently
        raise PromptFileError(path, f"unknown split {extra['split']!r}; expected {', '.join(SPLITS)} or none", line)
    return PromptRecord(obj["id"].strip(), lang, obj["label"], instruction, extra)


def _check_unique(records: list[PromptRecord], lines: list[int], path: object) -> None:
    seen: dict[tuple[str, str], int] = {}
    for r, line in zip(records, lines, strict=True):
        key = (r.lang, r.id)
        if key in seen:
            raise PromptFileError(path, f"duplicate id {r.id!r} for language {r.lang!r} (first on line {seen[key]})",
                                  line)
        seen[key] = line


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(path, "no such file") from None
    except IsADirectoryError:
        raise PromptFileError(path, "is a directory, not a prompt file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptFileError(path, "not valid UTF-8", line) from None


def parse_jsonl(text: str, path: object = "<string>") -> list[tuple[int, PromptRecord]]:
    """Parse JSONL text into (line number, record) pairs; blank lines are skipped."""
    out = []
    for n, raw in enumerate(io.StringIO(text), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PromptFileError(path, f"malformed JSON ({e.msg})", n) from None
        except RecursionError:
            raise PromptFileError(path, "malformed JSON (nested too deeply)", n) from None
        out.append((n, _validate_record(obj, path, n)))
    return out


def parse_csv(text: str, path: object = "<string>") -> list[tuple[int, PromptRecord]]:
    """Parse CSV text with a header row into (line number, record) pairs."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return []
    missing = [k for k in REQUIRED_KEYS if k not in reader.fieldnames]
    if missing:
        raise PromptFileError(path, f"CSV header lacks column(s) {', '.join(missing)}", 1)
    repeated = sorted({k for k in reader.fieldnames if reader.fieldnames.count(k) > 1})
    if repeated:  # DictReader would keep only the last of them
        raise PromptFileError(path, f"CSV header repeats column(s) {', '.join(repeated)}", 1)
    out = []
    try:
        for row in reader:
            if None in row:
                raise PromptFileError(path, "more fields than the header has", reader.line_num)
            out.append((reader.line_num, _validate_record(dict(row), path, reader.line_num)))
    except csv.Error as e:
        raise PromptFileError(path, f"malformed CSV ({e})", reader.line_num) from None
    return out


def _from_numbered(numbered: list[tuple[int, PromptRecord]], path: object, source: str) -> PromptSet:
    if not numbered:
        raise PromptFileError(path, "no prompts in file")
    records = [r for _, r in numbered]
    _check_unique(records, [n for n, _ in numbered], path)
    return PromptSet(tuple(records), source)


def load_prompt_file(path: str | os.PathLike[str]) -> PromptSet:
    """Load a JSONL (``.jsonl``/``.json``) or CSV (``.csv``) prompt file, validated."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise PromptFileError(p, "unsupported prompt file type; use .jsonl or .csv")
    text = _read_text(p)
    numbered = parse_csv(text, p) if suffix == ".csv" else parse_jsonl(text, p)
    return _from_numbered(numbered, p, str(p))


def bundled_dir() -> Path:
    """Directory of the bundled prompt files (one ``<lang>.jsonl`` per language)."""
    return Path(str(resources.files("refusal_circuits") / "data" / "prompts"))


def load_bundled(langs: Iterable[str] | None = None) -> PromptSet:
    """The bundled set: 192 harmful + 192 harmless prompts in each of 14 languages, ids aligned.

    Every record has ``category`` and ``split`` (train/val/test = 128/32/32 per label, identical across
    languages). See ``refusal_circuits/data/CARD.md``.
    """
    wanted = tuple(langs) if langs is not None else BUNDLED_LANGS
    unknown = [lang for lang in wanted if lang not in BUNDLED_LANGS]
    if unknown:
        raise InputError(f"language(s) {', '.join(unknown)} not in the bundled set ({', '.join(BUNDLED_LANGS)})")
    records: list[PromptRecord] = []
    for lang in wanted:
        records.extend(load_prompt_file(bundled_dir() / f"{lang}.jsonl"))
    return PromptSet(tuple(records), "bundled")


def load_prompts(source: str | os.PathLike[str] = "bundled", *, langs: Iterable[str] | None = None) -> PromptSet:
    """Load prompts from ``bundled``, a JSONL/CSV file, or ``hf:PRESET`` (see :func:`load_hub_prompts`).

    Args:
        source: where the prompts are.
        langs: keep only these languages (every language the source has if None).
    """
    s = str(source)
    if s == "bundled":
        return load_bundled(langs)
    prompts = load_hub_prompts(s.removeprefix("hf:")) if s.startswith("hf:") else load_prompt_file(s)
    if langs is not None:
        langs = list(langs)
        missing = [lang for lang in langs if lang not in prompts.langs]
        if missing:
            raise InputError(f"{s} has no prompts in language(s) {', '.join(missing)}; it has {', '.join(prompts.langs)}")
        prompts = prompts.filter(lang=langs)
    return prompts


@dataclass(frozen=True)
class HubPreset:
    """How to turn a hub dataset into prompt records."""

    path: str
    text_column: str
    label: str | None = None  # fixed label, or None to read ``label_column``
    label_column: str | None = None
    harmful_values: tuple[Any, ...] = ()
    lang: str | None = "en"  # fixed language, or None to read ``lang_column``
    lang_column: str | None = None
    id_column: str | None = None
    split: str = "train"
    config: str | None = None


HUB_PRESETS: dict[str, HubPreset] = {
    "advbench": HubPreset("walledai/AdvBench", text_column="prompt", label="harmful"),
    "jailbreakbench": HubPreset("JailbreakBench/JBB-Behaviors", text_column="Goal", label="harmful",
                                config="behaviors", split="harmful"),
    "jailbreakbench-benign": HubPreset("JailbreakBench/JBB-Behaviors", text_column="Goal", label="harmless",
                                       config="behaviors", split="benign"),
    # PolyRefuse-style multilingual sets: one row per (prompt, language) with a shared id.
    "polyrefuse": HubPreset("polyrefuse", text_column="instruction", label_column="label",
                            harmful_values=("harmful", 1, True), lang=None, lang_column="lang", id_column="id"),
}


def records_from_rows(rows: Iterable[dict[str, Any]], preset: HubPreset, source: str) -> PromptSet:
    """Convert dataset rows to a validated :class:`PromptSet` following ``preset``."""
    numbered: list[tuple[int, PromptRecord]] = []
    for n, row in enumerate(rows, start=1):
        if preset.label is not None:
            label = preset.label
        else:
            value = row.get(preset.label_column or "")
            label = "harmful" if value in preset.harmful_values else "harmless"
        obj = {
            "id": str(row[preset.id_column]) if preset.id_column and row.get(preset.id_column) is not None
            else f"{preset.path.split('/')[-1].lower()}-{n:04d}",
            "lang": preset.lang if preset.lang is not None else row.get(preset.lang_column or ""),
            "label": label,
            "instruction": row.get(preset.text_column),
        }
        numbered.append((n, _validate_record(obj, source, n)))
    return _from_numbered(numbered, source, source)


def load_hub_prompts(name: str, *, data_dir: str | None = None, preset: HubPreset | None = None) -> PromptSet:
    """Load a hub dataset through a preset (``advbench``, ``jailbreakbench``, ``jailbreakbench-benign``,
    ``polyrefuse``), or any dataset path with an explicit ``preset``. Needs network (or a local copy passed as
    ``data_dir``) and the ``hub`` extra.
    """
    try:
        import datasets
    except ImportError:
        raise MissingExtraError("loading hub datasets", "hub") from None
    if preset is None:
        if name not in HUB_PRESETS:
            raise InputError(f"unknown hub preset {name!r}; known: {', '.join(HUB_PRESETS)}")
        preset = HUB_PRESETS[name]
    try:
        if data_dir is not None:
            ds = datasets.load_dataset(data_dir, split=preset.split)
        else:
            ds = datasets.load_dataset(preset.path, preset.config, split=preset.split)
    except Exception as e:  # datasets raises many types (network, missing split, schema)
        raise InputError(f"could not load dataset {preset.path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    missing = [c for c in (preset.text_column, preset.label_column, preset.lang_column, preset.id_column)
               if c and c not in ds.column_names]
    if missing:
        raise InputError(f"dataset {preset.path} lacks column(s) {', '.join(missing)}; it has {', '.join(ds.column_names)}")
    return records_from_rows(ds, preset, f"hf:{name}")
