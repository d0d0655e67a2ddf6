"""Atomic file writing: a crash or Ctrl-C never leaves a half-written result behind.

Every writer goes to a temporary file in the destination directory and is moved into place with
``os.replace``, which is atomic on POSIX and Windows when source and destination share a filesystem.
Files that belong together (a direction's tensors and its JSON) are all written first and renamed together.
What is written depends only on what is saved: the same inputs give the same bytes.

JSON never holds NaN or infinity: a statistic that cannot be computed is ``null`` with its reason beside it
(:func:`nullable`), and :func:`json_text` refuses anything else, naming the key that held it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from refusal_circuits.errors import NonFiniteJSONError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            # Move the old directory aside first so that the swap itself is a single rename.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """Temporary paths beside each of ``paths``; all of them are moved into place only if the block succeeds.

    The renames run back to back after the block, so a failure while writing leaves every old file as it was.
    """
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(p)) for p in paths]


def json_text(obj: Any) -> str:
    """``obj`` as the library writes JSON: indented, UTF-8 text, no NaN or infinity, a trailing newline.

    A NaN or an infinity is a bug of whatever built ``obj`` (it should have used :func:`nullable`): it raises
    :class:`~refusal_circuits.errors.NonFiniteJSONError` naming the key path that held it, before anything is
    written.

    >>> json_text({"auroc": 0.5})
    '{\\n  "auroc": 0.5\\n}\\n'
    >>> json_text({"languages": {"de": {"auroc": float("nan")}}})
    Traceback (most recent call last):
    refusal_circuits.errors.NonFiniteJSONError: refusing to write nan at languages.de.auroc: ...
    """
    try:
        return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError:
        found = _first_non_finite(obj, "")
        if found is None:  # not ours (json's own checks, e.g. a circular reference)
            raise
        raise NonFiniteJSONError(found[0] or "the top level", found[1]) from None


def _first_non_finite(obj: Any, path: str) -> tuple[str, float] | None:
    """The key path (``a.b[2].c``) and value of the first NaN or infinity in ``obj``, in the order json writes."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path, obj)
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            found = _first_non_finite(v, f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _first_non_finite(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def finite_or_none(value: Any) -> tuple[Any, bool]:
    """``value`` with every NaN or infinity (in nested lists, tuples, mappings and tensors) replaced by None, and
    whether there was any."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple, Mapping)):
        value = value.tolist()  # a tensor or a NumPy value
    if isinstance(value, float):
        return (value, False) if math.isfinite(value) else (None, True)
    if isinstance(value, Mapping):
        items = {k: finite_or_none(v) for k, v in value.items()}
        return {k: v for k, (v, _) in items.items()}, any(m for _, m in items.values())
    if isinstance(value, (list, tuple)):
        got = [finite_or_none(v) for v in value]
        return [v for v, _ in got], any(m for _, m in got)
    return value, False


def nullable(key: str, value: Any, why: str | Mapping[Any, str] | None) -> dict[str, Any]:
    """One statistic (or a list, table or mapping of them) as JSON, under ``key``, with reasons for what is missing.

    This is the library's one convention for a statistic that cannot be computed on the given prompts (an AUROC
    without harmless prompts, an interval or a test from one pair, a correlation of fewer than 3 points or of
    constant values, a rate of no prompts, the cosine of a zero vector): its value is ``null``, and the reason,
    a short phrase, sits beside it under the same key with ``_why`` appended::

        {"auroc_at_site": null, "auroc_at_site_why": "no harmless prompts in de"}

    Where ``value`` holds several statistics (per language, per layer) the missing entries are ``null`` in
    place, and ``why`` is either one reason for all of them or a mapping from what labels a row (a language) to
    its reason::

        {"auroc": [[0.9, 0.8], [null, null]], "auroc_why": {"de": "no harmless prompts"}}

    ``KEY_why`` is present exactly when something in ``KEY`` is missing. A non-finite value with no reason is a
    bug and raises :class:`~refusal_circuits.errors.NonFiniteJSONError`. A ``null`` written *without* a ``_why``
    is an answer, not a gap (e.g. ``trajectory_split_layer: null``: the projections never separate).

    >>> nullable("auroc", 0.75, "no harmless prompts")
    {'auroc': 0.75}
    >>> nullable("auroc", float("nan"), "no harmless prompts")
    {'auroc': None, 'auroc_why': 'no harmless prompts'}
    """
    clean, missing = finite_or_none(value)
    out: dict[str, Any] = {key: clean}
    if missing or (value is None and why):
        if not why:
            raise NonFiniteJSONError(key, float("nan"))
        out[f"{key}_why"] = why if isinstance(why, str) else dict(why)
    return out


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """``tensors`` serialised as safetensors, with bytes that depend only on the input.

    safetensors writes ``metadata`` in the order of a Rust hash map, which is seeded differently in every call,
    so the same tensors would give different files; the header is written here with sorted metadata instead.
    """
    from safetensors.torch import save

    raw = save(tensors)  # without metadata the header lists the tensors in a fixed order
    if not metadata:
        return raw
    n = int.from_bytes(raw[:8], "little")
    header = {"__metadata__": dict(sorted(metadata.items())), **json.loads(raw[8 : 8 + n])}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors itself pads
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically, with a trailing newline."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj), encoding="utf-8")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` as UTF-8, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
