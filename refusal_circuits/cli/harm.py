"""``harm``: does each language fail to recognise harm, or fail to refuse? (issue 18, item 1)"""

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
from refusal_circuits.report.harm import harm_section
from refusal_circuits.workflows.harm import study_harm
from refusal_circuits.workflows.splits import load_split_prompts
from refusal_circuits.workflows.tokens import resolve_refusal_tokens, saved_refusal_tokens


def cmd_harm(args: argparse.Namespace) -> None:
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
    if args.harm_layer is not None and not 0 <= args.harm_layer < int(model.cfg.n_layers):
        raise InputError(f"--harm-layer {args.harm_layer} out of range: the model has {model.cfg.n_layers} layers")
    check_context(model, prompts)
    tokens = (resolve_refusal_tokens(model, args.refusal_tokens, prompts, progress=progress()) if args.refusal_tokens
              else saved_refusal_tokens(direction, f"--direction {args.direction}"))
    if tokens is None:
        say(f"--direction {args.direction} records no refusal tokens: the refusal-score rows are skipped "
            "(pass --refusal-tokens for them)", err=True)
    found = study_harm(model, direction, prompts, langs, tokens=tokens, harm_layer=args.harm_layer,
                       max_fit=args.fit_prompts, max_test=args.max_prompts, heads=not args.no_heads,
                       n_boot=args.n_boot, batch_size=args.batch_size, progress=progress())
    say(repr(found))
    obj = {**found.to_json(), "prompts": args.prompts, "direction_dir": str(args.direction)}
    with atomic_path(out / "harm.safetensors") as tmp:
        tmp.write_bytes(safetensors_bytes(found.tensors(), {"model": found.model, "base": found.base}))
    write_json(out / "harm.json", obj)
    write_text(out / "harm.html", page("Harm vs refusal", harm_section(obj, Figures(out))))
    say(f"wrote {out / 'harm.json'}, {out / 'harm.safetensors'} (directions) and {out / 'harm.html'}")
