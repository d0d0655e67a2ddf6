"""``evaluate``: generate, judge, and report refusal rates per language and label, optionally under an intervention,
on the model itself or on a serving engine."""

from __future__ import annotations

import argparse
from pathlib import Path

from refusal_circuits.backends import make_generator
from refusal_circuits.cli.common import placement, progress, say
from refusal_circuits.data import PromptSet
from refusal_circuits.directions import check_compatible, load_direction
from refusal_circuits.errors import InputError
from refusal_circuits.evaluation import evaluate_refusal
from refusal_circuits.forward import check_context
from refusal_circuits.io import write_json
from refusal_circuits.models import ModelSpec, load_model
from refusal_circuits.workflows.evaluate import evaluate_under
from refusal_circuits.workflows.splits import evaluation_split, load_split_prompts, split_and_cap
from refusal_circuits.workflows.tokens import evaluation_refusal_tokens


def cmd_evaluate(args: argparse.Namespace) -> None:
    ModelSpec.parse(args.model)
    if Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a directory; give a .json file path")
    if args.backend != "hf" and (args.intervention != "none" or args.direction):
        raise InputError(f"--backend {args.backend} runs no hooks: use --intervention none, and evaluate an "
                         "`orthogonalize` export (--model EXPORT_DIR) for the ablated model")
    if args.intervention != "none" and args.direction is None:
        raise InputError(f"--intervention {args.intervention} needs --direction")
    direction = load_direction(args.direction) if args.direction else None
    everything, policy = load_split_prompts(args.prompts, langs=args.langs)
    split = evaluation_split(args.split, everything, direction.prompts_sha256 if direction else None,
                             direction.lang if direction else None)
    prompts = split_and_cap(everything, split, args.max_prompts, what=args.prompts)
    if args.backend != "hf":
        _evaluate_on_backend(args, prompts, split)
        return
    model = load_model(args.model, **placement(args))
    if direction is not None:
        check_compatible(direction, model, f"--direction {args.direction}")
        if args.layer is not None and not 0 <= args.layer < int(model.cfg.n_layers):
            raise InputError(f"--layer {args.layer} out of range; the model has {int(model.cfg.n_layers)} layers")
    check_context(model, prompts)
    tokens = evaluation_refusal_tokens(model, everything, prompts, direction, args.refusal_tokens,
                                       where=f"--direction {args.direction}", progress=progress())
    result = evaluate_under(model, prompts, tokens, direction=direction, intervention=args.intervention,
                            layer=args.layer, alpha=args.alpha, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, second_judge=args.second_judge,
                            second_judge_sample=args.second_judge_sample, progress=progress())
    result["direction"] = str(args.direction) if args.direction else None
    result["prompts"] = args.prompts
    result["split"] = split
    result["split_policy"] = policy.to_json()
    write_json(args.out, result)
    for lang, groups in result["results"].items():
        rates = "  ".join(f"{lab} {g['refusal_rate']:5.1%} (n={g['n']}"
                          + (f", score {g['refusal_score']:+.2f})" if "refusal_score" in g else ")")
                          for lab, g in groups.items())
        say(f"{lang} [{args.intervention}]: {rates}")
    if result.get("capability"):
        c = result["capability"]
        say(f"capability: KL {c['kl_harmless']:.3f}, CE {c['ce_harmless_base']:.3f} -> "
            f"{c['ce_harmless_intervened']:.3f}")
    say(f"wrote {args.out}")


def _evaluate_on_backend(args: argparse.Namespace, prompts: PromptSet, split: str) -> None:
    """``evaluate --backend vllm``: generation by a serving engine, judged the same way; no hooks, no scores."""
    if args.model.startswith("packaged:"):
        raise InputError(f"--backend {args.backend} needs a Hugging Face id or model directory, not {args.model}")
    generator = make_generator(args.backend, args.model, tensor_parallel_size=args.tensor_parallel_size)
    ev = evaluate_refusal(None, prompts, max_new_tokens=args.max_new_tokens, generator=generator,
                          progress=progress())
    write_json(args.out, {**ev.to_dict(), "direction": None, "backend": args.backend, "prompts": args.prompts,
                          "split": split})
    for lang, groups in ev.results.items():
        say(f"{lang} [{args.backend}]: " + "  ".join(f"{lab} {g.refusal_rate:5.1%} (n={g.n})"
                                                 for lab, g in groups.items()))
    say(f"wrote {args.out}")
