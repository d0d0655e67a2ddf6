"""The argument types and the flag groups several subcommands share (the parser's building blocks)."""

from __future__ import annotations

import argparse

from refusal_circuits.models import DEFAULT_MODEL, DTYPES
from refusal_circuits.workflows import defaults
from refusal_circuits.workflows.filtering import RULES

FILTERS = ["auto", "arditi", "polyrefuse"]


# ---------------------------------------------------------------------------------------------- value types


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


def _negative_ints(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated negative positions like -2,-1, got {value!r}") from None
    if not out or any(v >= 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated negative positions like -2,-1, got {value!r}")
    return out


# ------------------------------------------------------------------------------------------- shared flags


def _prompts_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=defaults.PROMPTS, help=f"{defaults.PROMPTS} (default), a .jsonl/.csv prompt "
                   "file, or hf:PRESET")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model spec: packaged:NAME, a Hugging Face id, a local directory or a .gguf file "
                        f"(default: {DEFAULT_MODEL})")
    _placement_args(p)


def _placement_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the model runs")
    g.add_argument("--device", default=defaults.DEVICE,
                   help=f"torch device for the whole model, e.g. cuda (default: {defaults.DEVICE})")
    g.add_argument("--dtype", default=defaults.DTYPE, choices=DTYPES,
                   help=f"parameter dtype (default: {defaults.DTYPE}, what every measurement in docs/findings.md uses)")
    g.add_argument("--device-map", default=None, metavar="MAP",
                   help="split the model across devices as transformers does: auto, balanced, sequential "
                        "(needs accelerate; instead of --device). Attribution needs one device")


def _langs_arg(p: argparse.ArgumentParser, text: str = "comma-separated ISO 639-1 codes (default: all)") -> None:
    p.add_argument("--langs", type=_langs, default=None, help=text)


def _selection_args(p: argparse.ArgumentParser, default: str, text: str) -> None:
    p.add_argument("--filter", default=default, choices=FILTERS, help=text)
    p.add_argument("--kl-max", type=float, default=None, help="override the filter's KL threshold")
    p.add_argument("--max-layer-frac", type=float, default=None, help="override the layer cap (default 0.8)")


# ---------------------------------------------------------------------------------------------- commands


def _refusal_filter_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--refusal-filter", default=default, choices=RULES,
                   help="before extraction and selection, set aside harmful train/val prompts the model does not "
                        "refuse and harmless ones it refuses: score (Arditi's, first-token refusal log-odds > 0), "
                        f"verdict (a short generation judged by phrases), or none (default: {default}); the direction "
                        "records how many each label kept")


def _second_judge_args(p: argparse.ArgumentParser, default: str, sample: int | None) -> None:
    p.add_argument("--second-judge", default=default, metavar="SPEC",
                   help="an independent LLM judge of the baseline, compared with the phrase judge per language: "
                        "none, auto (the packaged Qwen2.5-Coder-1.5B when its extra packaged-1-5b is installed, "
                        f"else none with the reason), or a model spec or directory (default: {default})")
    p.add_argument("--second-judge-sample", type=_positive, default=sample, metavar="N",
                   help="completions per language and label the second judge reads, a stratified sample "
                        f"(default: {sample if sample else 'all'})")
