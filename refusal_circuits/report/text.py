"""Small pieces of the report's text: numbers or "n/a (reason)", the reasons behind null statistics, completions."""

from __future__ import annotations

import math
from typing import Any

from refusal_circuits.markup import esc


def na(obj: dict[str, Any], key: str, digits: int = 2) -> str:
    """``obj[key]`` as a number, or "n/a (reason)" for a statistic written as null with ``key_why`` beside it
    (:func:`refusal_circuits.io.nullable`); "–" where it was never part of the record."""
    x = obj.get(key)
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        why = obj.get(f"{key}_why")
        return f"n/a ({esc(why)})" if isinstance(why, str) else "–"
    return f"{float(x):.{digits}f}"


def nan_for_null(value: Any) -> Any:
    """Nested lists with every null as NaN (what the figures draw as an empty, n/a cell)."""
    if isinstance(value, list):
        return [nan_for_null(v) for v in value]
    return math.nan if value is None else value


def missing_text(obj: dict[str, Any], keys: tuple[str, ...]) -> str:
    """A caption sentence giving the reasons for the null entries of ``obj[key]`` (its ``key_why``)."""
    by_reason: dict[str, list[str]] = {}  # one sentence per reason, naming everything it explains
    for key in keys:
        why = obj.get(f"{key}_why")
        if isinstance(why, str):
            by_reason.setdefault(why, []).append(key)
        elif isinstance(why, dict):
            for k, v in why.items():
                by_reason.setdefault(v, []).append(f"{key} {k}")
    parts = [f"{', '.join(what)}: n/a ({why})" for why, what in by_reason.items()]
    return (" " + "; ".join(parts) + ".") if parts else ""


def gaps(obj: Any, path: str = "") -> list[tuple[str, str]]:
    """Every statistic the results hold as null with a reason: (key path, reason), in file order."""
    out: list[tuple[str, str]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            where = f"{path}.{k}" if path else str(k)
            if k.endswith("_why"):
                stem = where[: -len("_why")]
                out += [(stem, v)] if isinstance(v, str) else [(f"{stem}.{a}", b) for a, b in v.items()]
            else:
                out += gaps(v, where)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += gaps(v, f"{path}[{i}]")
    return out


def judge_tokens_text(transfer: dict[str, Any]) -> str:
    """A caption sentence naming the first tokens that the first-token judge counted as refusals, per language."""
    judged = transfer.get("judge_tokens")
    if not judged:
        return ""
    parts = [f"{lang}: {', '.join(repr(t) for t in v['strings'])}" for lang, v in judged.items()]
    return " First tokens counted as refusals: " + "; ".join(parts) + "."


def completions_html(rows: list[dict[str, Any]]) -> str:
    """Every completion as a collapsed ``<details>``: language, label, id and verdict, the text escaped."""
    out = []
    for c in rows:
        verdict = "refused" if c["refused"] else "complied"
        out.append(f"<details><summary>{esc(c['lang'])} · {esc(c['label'])} · {esc(c['id'])} · "
                   f"<span class='{verdict}'>{verdict}</span></summary><pre>{esc(c['completion'])}</pre></details>")
    return "".join(out)
