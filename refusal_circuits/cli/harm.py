"""``harm``: does each language fail to recognise harm, or fail to refuse? (issue 18, item 1)"""

from __future__ import annotations

import argparse

from refusal_circuits.cli.common import progress
from refusal_circuits.cli.per_language import read_inputs, write_record
from refusal_circuits.errors import InputError
from refusal_circuits.models import HookedModel
from refusal_circuits.report.harm import harm_section
from refusal_circuits.workflows.harm import study_harm


def cmd_harm(args: argparse.Namespace) -> None:
    def check_layer(model: HookedModel) -> None:
        if args.harm_layer is not None and not 0 <= args.harm_layer < int(model.cfg.n_layers):
            raise InputError(f"--harm-layer {args.harm_layer} out of range: the model has {model.cfg.n_layers} layers")

    got = read_inputs(args, check_layer)
    found = study_harm(got.model, got.direction, got.prompts, got.langs, tokens=got.tokens, harm_layer=args.harm_layer,
                       max_fit=args.fit_prompts, max_test=args.max_prompts, heads=not args.no_heads,
                       n_boot=args.n_boot, batch_size=args.batch_size, progress=progress())
    write_record(args, got.out, "harm", found, "Harm vs refusal", harm_section, "directions")
