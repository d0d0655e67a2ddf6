"""``directions`` (extract and select one language's direction) and ``orthogonalize`` (make its ablation permanent)."""

from __future__ import annotations

import argparse
from pathlib import Path

from refusal_circuits.cli.common import out_dir, placement, progress, say
from refusal_circuits.directions import check_compatible, load_direction
from refusal_circuits.errors import InputError
from refusal_circuits.interventions import export_hf, orthogonalize
from refusal_circuits.models import ModelSpec, load_model
from refusal_circuits.workflows.direction import find_direction, plan_direction
from refusal_circuits.workflows.splits import load_split_prompts


def cmd_directions(args: argparse.Namespace) -> None:
    ModelSpec.parse(args.model)
    out = out_dir(args.out)
    prompts, policy = load_split_prompts(args.prompts)
    plan = plan_direction(prompts, policy, args.lang, max_prompts=args.max_prompts, filter_name=args.filter,
                          kl_max=args.kl_max, max_layer_frac=args.max_layer_frac)
    model = load_model(args.model, **placement(args))
    selection = find_direction(model, plan, source=args.prompts, refusal_tokens=args.refusal_tokens,
                               positions=args.positions, refusal_filter=args.refusal_filter, strategy=args.strategy,
                               batch_size=args.batch_size, progress=progress())
    direction = selection.direction
    direction.save(out)
    s = direction.meta["selection"]
    if s.get("strategy") == "cosmic":
        say(f"{args.lang}: layer {direction.layer}, position {direction.position}, chosen by COSMIC "
            f"({direction.meta['selection_strategy']}): score {s['score']:.3f} (ablation {s['ablation']:.3f}, "
            f"induction {s['induction']:.3f}), kl {s['kl']:.3f}, readout layers {s['readout_layers']}")
        say(f"wrote {out / 'direction.safetensors'} and {out / 'direction.json'}")
        return
    note = f" (fallback: nothing passed {selection.fallback_from})" if selection.fallback_from else ""
    act = direction.meta["actadd"]
    say(f"{args.lang}: layer {direction.layer}, position {direction.position}, filter {s['filter']}{note}; "
        f"bypass {s['bypass']:.2f} (baseline {s['baseline_harmful']:.2f}), induce {s['induce']:.2f}, "
        f"kl {s['kl']:.3f}; actadd alpha {act['alpha']:.2f} ({act['scale']}x norm: {act['fraction']:.0%} of "
        f"harmless val prompts start a refusal)")
    agreement = direction.meta.get("cosmic", {}).get("agreement")
    if agreement:
        c = agreement["cosmic"]
        say(f"COSMIC chose layer {c['layer']}, position {c['position']}: "
            f"{'the same site' if agreement['same_site'] else 'another site'}, cosine {agreement['cosine']:.3f} with "
            f"this direction, rank correlation of the candidates' scores {agreement['rank_correlation']}")
    say(f"wrote {out / 'direction.safetensors'} and {out / 'direction.json'}")


def cmd_orthogonalize(args: argparse.Namespace) -> None:
    ModelSpec.parse(args.model)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} exists and is not an empty directory")
    direction = load_direction(args.direction)
    model = load_model(args.model, **placement(args))
    check_compatible(direction, model, f"--direction {args.direction}")
    edited = orthogonalize(model, direction)
    export_hf(edited, out, extra_meta={"orthogonalized_from": args.model, "direction": direction.to_json()})
    say(f"wrote {out} (load it with --model {out})")
