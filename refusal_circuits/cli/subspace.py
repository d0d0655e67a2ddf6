"""``subspace``: one refusal direction or a subspace, per language? (issue 18, item 3)"""

from __future__ import annotations

import argparse

from refusal_circuits.cli.common import out_dir, placement, progress, say
from refusal_circuits.directions import check_compatible, load_direction
from refusal_circuits.errors import InputError
from refusal_circuits.forward import check_context
from refusal_circuits.io import atomic_path, safetensors_bytes, write_json, write_text
from refusal_circuits.markup import page
from refusal_circuits.models import ModelSpec, load_model
from refusal_circuits.report.figures import Figures
from refusal_circuits.report.subspace import subspace_section
from refusal_circuits.workflows.splits import load_split_prompts
from refusal_circuits.workflows.subspace import study_subspaces
from refusal_circuits.workflows.tokens import resolve_refusal_tokens, saved_refusal_tokens


def cmd_subspace(args: argparse.Namespace) -> None:
    ModelSpec.parse(args.model)
    if args.k < 2:
        raise InputError(f"--k must be at least 2 (one dimension is the direction itself), got {args.k}")
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
    check_context(model, prompts)
    tokens = (resolve_refusal_tokens(model, args.refusal_tokens, prompts, progress=progress()) if args.refusal_tokens
              else saved_refusal_tokens(direction, f"--direction {args.direction}"))
    found = study_subspaces(model, direction, prompts, langs, tokens=tokens, k=args.k, max_fit=args.fit_prompts,
                            max_test=args.max_prompts, n_boot=args.n_boot, batch_size=args.batch_size,
                            progress=progress())
    say(repr(found))
    obj = {**found.to_json(), "prompts": args.prompts, "direction_dir": str(args.direction)}
    with atomic_path(out / "subspace.safetensors") as tmp:
        tmp.write_bytes(safetensors_bytes(found.tensors(), {"model": found.model, "base": found.base}))
    write_json(out / "subspace.json", obj)
    write_text(out / "subspace.html", page("Refusal subspaces", subspace_section(obj, Figures(out))))
    say(f"wrote {out / 'subspace.json'}, {out / 'subspace.safetensors'} (subspaces) and {out / 'subspace.html'}")
