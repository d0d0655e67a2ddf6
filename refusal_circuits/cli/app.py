"""``main``: parse, run the command, turn bad input into exit code 2 and Ctrl-C into 130."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from transformers.utils import logging as hf_logging

from refusal_circuits.cli.common import say
from refusal_circuits.cli.parser import build_parser
from refusal_circuits.errors import InputError


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``refusal-circuits`` with ``argv`` (default: the process's arguments); returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse reads "-2,-1" as an option; glue list values that start with "-" to their flag.
    for i in range(len(argv) - 1):
        if argv[i] == "--positions" and argv[i + 1].startswith("-"):
            argv[i : i + 2] = [f"--positions={argv[i + 1]}"]
            break
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (one line, code 2) and --help / --version (code 0)
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # transformers' own "Loading weights" bars would break the one-line error contract; ours show progress.
    hf_logging.disable_progress_bar()
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        code = args.func(args)
    except InputError as e:
        say(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        say("interrupted; finished outputs are intact", err=True)
        return 130
    return int(code or 0)
