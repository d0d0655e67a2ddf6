"""The ``refusal-circuits`` command line.

Exit codes: 0 on success, 2 on bad input (one line ``error: ...`` naming what was wrong, nothing written),
130 on Ctrl-C. Only this layer (and :mod:`refusal_circuits.report`) writes files, always atomically.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from refusal_circuits._version import __version__
from refusal_circuits.errors import InputError

DEFAULT_OUT = "refusal-report"


def _langs(value: str) -> list[str]:
    langs = [v.strip() for v in value.split(",") if v.strip()]
    if not langs:
        raise argparse.ArgumentTypeError("--langs needs at least one language code, e.g. en,de")
    return langs


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return n


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors follow our contract: one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from refusal_circuits.models import DEFAULT_MODEL

    parser = _Parser(prog="refusal-circuits", description=(
        "Find, remove and explain the refusal direction of chat LLMs: which heads write it, at which token "
        "positions, in which language."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="the whole study on the defaults; writes report.html and results.json",
                         description=(
                             "Run the study on a model and a prompt set: today, baseline refusal rates per "
                             "language and label with every completion. Writes OUT/report.html and "
                             "OUT/results.json."))
    run.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"model spec: packaged:NAME, a Hugging Face id, a local directory or a .gguf file "
                          f"(default: {DEFAULT_MODEL})")
    run.add_argument("--prompts", default="bundled", help="bundled, a .jsonl/.csv prompt file, or hf:PRESET")
    run.add_argument("--langs", type=_langs, default=None, help="comma-separated ISO 639-1 codes (default: all)")
    run.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                     help="which split of a prompt set with a 'split' key to evaluate (default: test)")
    run.add_argument("--max-prompts", type=_positive, default=None,
                     help="at most this many prompts per language and label (a quicker, smaller study)")
    run.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens generated per prompt")
    run.add_argument("--batch-size", type=_positive, default=16)
    run.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: ./{DEFAULT_OUT})")
    run.set_defaults(func=cmd_run)
    return parser


def cmd_run(args: argparse.Namespace) -> None:
    from refusal_circuits.data import load_prompts
    from refusal_circuits.evaluation import evaluate_refusal
    from refusal_circuits.io import write_json, write_text
    from refusal_circuits.models import ModelSpec, load_model
    from refusal_circuits.report import baseline_report_html

    ModelSpec.parse(args.model)  # a bad spec fails before anything slow happens
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    prompts = load_prompts(args.prompts, langs=args.langs)
    if args.split != "all" and any(r.split is not None for r in prompts):
        prompts = prompts.filter(split=args.split)
        if not len(prompts):
            raise InputError(f"{args.prompts} has no prompts in split {args.split!r}")
    if args.max_prompts:
        prompts = prompts.head(args.max_prompts)
    t0 = time.perf_counter()
    model = load_model(args.model)
    evaluation = evaluate_refusal(model, prompts, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, progress=not args.quiet)
    results = {"version": __version__, "prompts": args.prompts, "split": args.split,
               "seconds": round(time.perf_counter() - t0, 1), "baseline": evaluation.to_dict()}
    write_json(out / "results.json", results)
    write_text(out / "report.html", baseline_report_html(evaluation))
    for lang, groups in evaluation.results.items():
        rates = "  ".join(f"{lab} {g.refusal_rate:5.1%} (n={g.n})" for lab, g in groups.items())
        print(f"{lang}: refusal {rates}")
    print(f"wrote {out / 'report.html'} and {out / 'results.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished outputs are intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
