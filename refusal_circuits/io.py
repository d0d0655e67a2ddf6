"""Atomic file writing: a crash or Ctrl-C never leaves a half-written result behind.

Every writer goes to a temporary file in the destination directory and is moved into place with
``os.replace``, which is atomic on POSIX and Windows when source and destination share a filesystem.
Files that belong together (a direction's tensors and its JSON) are all written first and renamed together.
What is written depends only on what is saved: the same inputs give the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
    """``obj`` as the library writes JSON: indented, UTF-8 text, no NaN or infinity, a trailing newline."""
    return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


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
