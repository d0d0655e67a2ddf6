"""One language's difference-in-means direction at a site chosen elsewhere, without selection.

    python scripts/site_direction.py --model SPEC --layer L --position P --out DIR [--lang en] [--prompts bundled]

For measuring at a site a study already selected (docs/findings.md names it) when the selection itself would cost
more than the measurement: the 1.5B's selection takes about 45 minutes on 2 CPU cores. The candidate is the
difference in means over the language's train split, as in `directions`; the refusal tokens are discovered on that
train split (the language's own). The direction.json records ``site: "given"`` and no selection scores; every
command that reads a direction reads this one.
"""

from __future__ import annotations

import argparse

from refusal_circuits.directions import extract_candidates
from refusal_circuits.models import load_model
from refusal_circuits.workflows.direction import plan_direction
from refusal_circuits.workflows.splits import load_split_prompts
from refusal_circuits.workflows.tokens import resolve_refusal_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", default="bundled")
    ap.add_argument("--lang", default="en")
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--position", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    prompts, policy = load_split_prompts(args.prompts)
    plan = plan_direction(prompts, policy, args.lang, filter_name="polyrefuse")
    model = load_model(args.model)
    tokens = resolve_refusal_tokens(model, None, plan.train)
    cands = extract_candidates(model, plan.train.filter(label="harmful").instructions,
                               plan.train.filter(label="harmless").instructions, lang=args.lang,
                               prompts_sha256=prompts.filter(lang=args.lang).sha256, batch_size=args.batch_size)
    direction = cands.direction(args.position, args.layer, site="given", prompts=args.prompts,
                                split_policy=policy.to_json(), refusal_tokens=tokens.to_json())
    direction.save(args.out)
    print(f"{args.lang}: layer {args.layer}, position {args.position} (given), refusal tokens "  # noqa: T201
          f"{tokens.to_json()['by_lang']}; wrote {args.out}")


if __name__ == "__main__":
    main()
