"""What every command shares: printing, progress bars, where the model runs, output paths."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from refusal_circuits.errors import InputError
from refusal_circuits.workflows import defaults


def say(text: str, *, err: bool = False, flush: bool = False) -> None:
    """Print one line for the user (stderr with ``err``): the command line's one place that prints."""
    print(text, file=sys.stderr if err else sys.stdout, flush=flush)  # noqa: T201


def progress() -> bool:
    """Whether to show progress bars (``-q`` turns them off through ``TQDM_DISABLE``)."""
    return os.environ.get("TQDM_DISABLE") != "1"


def placement(args: argparse.Namespace) -> dict[str, Any]:
    """load_model's keyword arguments from --device, --dtype and --device-map (named in the error, before any
    work, where load_model would name its own arguments)."""
    if args.device_map is not None and args.device != defaults.DEVICE:
        raise InputError("--device and --device-map: give one of them")
    return {"device": args.device, "dtype": args.dtype, "device_map": args.device_map}


def out_dir(path: str, flag: str = "--out") -> Path:
    """``path`` as an output directory (it may exist, as a directory)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out} exists and is not a directory")
    return out


def recorded_path(source: str) -> str:
    """A prompt source as later commands should find it: a local file as its absolute path (``compare`` may run in
    another directory), ``bundled`` and ``hf:`` presets as they are."""
    local = source != "bundled" and not source.startswith("hf:")
    return str(Path(source).resolve()) if local else source
