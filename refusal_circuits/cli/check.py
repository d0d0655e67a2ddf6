"""``check``: every self-check on one model, what is exact for it and what is refused."""

from __future__ import annotations

import argparse
from pathlib import Path

from refusal_circuits.cli.common import placement, say
from refusal_circuits.errors import InputError
from refusal_circuits.io import write_json
from refusal_circuits.models import ModelSpec, load_model
from refusal_circuits.selfcheck import check


def cmd_check(args: argparse.Namespace) -> int:
    ModelSpec.parse(args.model)
    if args.json_out and not Path(args.json_out).resolve().parent.is_dir():
        raise InputError(f"--json {args.json_out}: its directory does not exist")
    report = check(load_model(args.model, **placement(args)))
    say(report.table())
    if args.json_out:
        write_json(args.json_out, report.to_json())
    return 0 if report.ok else 1
