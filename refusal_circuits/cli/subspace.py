"""``subspace``: one refusal direction or a subspace, per language? (issue 18, item 3)"""

from __future__ import annotations

import argparse

from refusal_circuits.cli.common import progress
from refusal_circuits.cli.per_language import read_inputs, write_record
from refusal_circuits.errors import InputError
from refusal_circuits.report.subspace import subspace_section
from refusal_circuits.workflows.subspace import study_subspaces


def cmd_subspace(args: argparse.Namespace) -> None:
    if args.k < 2:
        raise InputError(f"--k must be at least 2 (one dimension is the direction itself), got {args.k}")
    got = read_inputs(args)
    found = study_subspaces(got.model, got.direction, got.prompts, got.langs, tokens=got.tokens, k=args.k,
                            max_fit=args.fit_prompts, max_test=args.max_prompts, n_boot=args.n_boot,
                            batch_size=args.batch_size, progress=progress())
    write_record(args, got.out, "subspace", found, "Refusal subspaces", subspace_section, "subspaces")
