"""What the per-language analysis commands (``harm``, ``subspace``) share: reading a direction, the prompts, the model
and the refusal tokens, checked in that order before any work; and writing a record's JSON, tensors and page."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_circuits.cli.common import out_dir, placement, progress, say
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import Direction, check_compatible, load_direction
from refusal_circuits.errors import InputError
from refusal_circuits.forward import check_context
from refusal_circuits.io import atomic_path, safetensors_bytes, write_json, write_text
from refusal_circuits.markup import page
from refusal_circuits.models import HookedModel, ModelSpec, load_model
from refusal_circuits.report.figures import Figures
from refusal_circuits.scores import RefusalTokens
from refusal_circuits.workflows.splits import load_split_prompts
from refusal_circuits.workflows.tokens import resolve_refusal_tokens, saved_refusal_tokens


@dataclass(frozen=True)
class LanguageInputs:
    out: Path
    direction: Direction
    langs: list[str] | None
    prompts: PromptSet
    model: HookedModel
    tokens: RefusalTokens | None


def read_inputs(args: argparse.Namespace, check_model: Callable[[HookedModel], None] | None = None) -> LanguageInputs:
    """The direction (its language is the base), the prompts with their splits, the model and the refusal tokens
    (``--refusal-tokens``, else the direction's); ``check_model`` checks a flag against the loaded model."""
    ModelSpec.parse(args.model)
    if args.n_boot < 10:
        raise InputError(f"--n-boot must be at least 10, got {args.n_boot}")
    out = out_dir(args.out)
    direction = load_direction(args.direction)
    langs = args.langs or None
    prompts, _policy = load_split_prompts(args.prompts, langs=langs)
    if direction.lang not in prompts.langs:
        raise InputError(f"--prompts {args.prompts} has no {direction.lang} prompts (the direction's language, the base)")
    model = load_model(args.model, **placement(args))
    check_compatible(direction, model, f"--direction {args.direction}")
    if check_model is not None:
        check_model(model)
    check_context(model, prompts)
    tokens = (resolve_refusal_tokens(model, args.refusal_tokens, prompts, progress=progress()) if args.refusal_tokens
              else saved_refusal_tokens(direction, f"--direction {args.direction}"))
    if tokens is None:
        say(f"--direction {args.direction} records no refusal tokens: languages without native refusal phrases get "
            "no refusal-score rows (pass --refusal-tokens for them)", err=True)
    return LanguageInputs(out, direction, langs, prompts, model, tokens)


def write_record(args: argparse.Namespace, out: Path, name: str, record: Any, title: str,
                 section: Callable[[dict[str, Any], Figures], str], what: str) -> None:
    """``OUT/NAME.json`` (the record's JSON with the prompts and the direction named), ``OUT/NAME.safetensors`` and
    ``OUT/NAME.html`` (the report's section on its own page, figures under ``OUT/figures``)."""
    say(repr(record))
    obj = {**record.to_json(), "prompts": args.prompts, "direction_dir": str(args.direction)}
    with atomic_path(out / f"{name}.safetensors") as tmp:
        tmp.write_bytes(safetensors_bytes(record.tensors(), {"model": record.model, "base": record.base}))
    write_json(out / f"{name}.json", obj)
    write_text(out / f"{name}.html", page(title, section(obj, Figures(out))))
    say(f"wrote {out / f'{name}.json'}, {out / f'{name}.safetensors'} ({what}) and {out / f'{name}.html'}")
