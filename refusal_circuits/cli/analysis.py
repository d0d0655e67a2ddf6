"""``attribute`` (per-head / per-position attribution onto r̂, total effects) and ``compare`` (each language
against the base language, paired by prompt id)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from refusal_circuits.attribution import TOKENS_FILE, Attribution, load_attribution
from refusal_circuits.cli.common import out_dir, placement, progress, recorded_path, say
from refusal_circuits.crosslingual import check_language_groups, unpaired_why
from refusal_circuits.directions import check_compatible, load_direction
from refusal_circuits.errors import InputError
from refusal_circuits.forward import check_context
from refusal_circuits.io import write_json
from refusal_circuits.models import ModelSpec, load_model
from refusal_circuits.scores import RefusalTokens
from refusal_circuits.workflows.compare import (
    Baseline,
    attributed_prompts,
    baseline_from_results,
    compare_languages,
    measured_baseline,
)
from refusal_circuits.workflows.effects import attribute_with_effects
from refusal_circuits.workflows.languages import compare_directions
from refusal_circuits.workflows.splits import evaluation_split, load_split_prompts, split_and_cap
from refusal_circuits.workflows.tokens import (
    compliance_token_ids,
    resolve_refusal_tokens,
    saved_refusal_tokens,
)


def cmd_attribute(args: argparse.Namespace) -> None:
    ModelSpec.parse(args.model)
    out = out_dir(args.out)
    if args.total_effects < 0:
        raise InputError("--total-effects must be 0 or more")
    direction = load_direction(args.direction)
    everything, policy = load_split_prompts(args.prompts, langs=args.langs)
    split = evaluation_split(args.split, everything, direction.prompts_sha256, direction.lang)
    prompts = split_and_cap(everything, split, args.max_prompts, what=args.prompts)
    model = load_model(args.model, **placement(args))
    check_compatible(direction, model, f"--direction {args.direction}")
    check_context(model, prompts, adv_suffix=args.adv_suffix)
    tokens: RefusalTokens | None
    if args.refusal_tokens:
        tokens = resolve_refusal_tokens(model, args.refusal_tokens, prompts, progress=progress())
    else:
        tokens = saved_refusal_tokens(direction, f"--direction {args.direction}")
    compliance = compliance_token_ids(model.tokenizer, args.compliance_tokens) if args.compliance_tokens else None
    run = attribute_with_effects(model, direction, prompts, refusal_tokens=tokens, compliance_tokens=compliance,
                                 dla=not args.no_dla, adv_suffix=args.adv_suffix, total_effects_k=args.total_effects,
                                 batch_size=args.batch_size, progress=progress())
    result = run.attribution
    # `compare` reads the prompts again from what is recorded here, maybe from another directory.
    result.save(out, extra={"prompts": recorded_path(args.prompts), "split": split, "split_policy": policy.to_json(),
                            "direction_path": str(Path(args.direction).resolve())})
    err = result.completeness_error()
    say(f"attributed {result.n_prompts} prompts ({', '.join(prompts.langs)}); completeness error {err:.2e}")
    say(repr(result.top_heads(5, positions="post").where(label="harmful")))
    if run.effects is not None:
        write_json(out / "effects.json", run.effects.to_json())
        say(repr(run.effects))
    elif run.effects_skipped:
        say(f"total effects skipped: {run.effects_skipped}")
    say(f"wrote {out / 'attributions.safetensors'}, {out / 'attributions.json'}, {out / 'summary.json'}"
        + (f" and {out / 'effects.json'}" if run.effects is not None else ""))


def _evaluation_baseline(path: str) -> Baseline:
    """Baseline (harmful, harmless) rates per language from an `evaluate` JSON; a label it lacks is None."""
    try:
        return baseline_from_results(json.loads(Path(path).read_text(encoding="utf-8"))["results"])
    except FileNotFoundError:
        raise InputError(f"--evaluation {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"--evaluation {path}: not an `evaluate` JSON with harmful and harmless rates ({e})") from None


def _compared_langs(attribution: Attribution, args: argparse.Namespace) -> list[str]:
    """The languages ``compare`` compares with ``--base``: each one in the attributions, and at least one paired."""
    present = list(dict.fromkeys(attribution.langs))
    if args.base not in present:
        raise InputError(f"--base {args.base}: not in the attributions (they have {', '.join(present)})")
    langs = [x for x in (args.langs or present) if x != args.base]
    unknown = [x for x in langs if x not in present]
    if unknown:
        raise InputError(f"--langs: {', '.join(unknown)} not in the attributions (they have {', '.join(present)})")
    if not langs:
        raise InputError(f"nothing to compare: the attributions hold only the base language {args.base}")
    unpaired = {x: unpaired_why(attribution, args.base, x) for x in langs}
    if all(unpaired.values()):  # with some pairs the others are reported as skipped, with the reason
        raise InputError("nothing to pair: " + "; ".join(str(why) for why in unpaired.values()))
    return langs


def cmd_compare(args: argparse.Namespace) -> None:
    if not 0 < args.alpha < 1:
        raise InputError("--alpha must be between 0 and 1")
    if args.patch_top_k < 0:
        raise InputError("--patch-top-k must be 0 or more")
    if args.totals < 0:
        raise InputError("--totals must be 0 or more")
    if args.totals and args.no_model:
        raise InputError("--totals needs the model (drop --no-model)")
    if args.directions and args.no_model:
        raise InputError("--directions needs the model (drop --no-model)")
    out = out_dir(args.out)
    attribution = load_attribution(args.attributions)
    meta = json.loads((Path(args.attributions) / TOKENS_FILE).read_text(encoding="utf-8"))
    langs = _compared_langs(attribution, args)
    everyone = [args.base, *langs]
    baseline = _evaluation_baseline(args.evaluation) if args.evaluation else None
    model = direction = prompts = None
    if not args.no_model:
        spec = args.model or attribution.model
        ModelSpec.parse(spec)
        dpath = args.direction or meta.get("direction_path")
        if not dpath:
            raise InputError("--direction is needed: the attributions do not record theirs")
        direction = load_direction(dpath)
        source = args.prompts or meta.get("prompts") or "bundled"
        prompts, _ = load_split_prompts(source, langs=everyone)
        if args.directions:  # every language's direction needs both labels: say so before the model loads
            check_language_groups(prompts, everyone, split="train", max_prompts=args.max_prompts, what="--directions")
            check_language_groups(prompts, everyone, split="test", max_prompts=args.max_prompts,
                                  what="--directions (the transfer matrix)")
        chosen = attributed_prompts(attribution, prompts, everyone, f"--prompts {source}")
        model = load_model(spec, **placement(args))
        check_compatible(direction, model, f"--direction {dpath}")
        check_context(model, prompts if args.directions else chosen)
        if baseline is None:
            baseline = measured_baseline(model, chosen, batch_size=args.batch_size, progress=progress())
    comparison = compare_languages(attribution, args.base, langs, baseline=baseline, model=model, direction=direction,
                                   prompts=prompts, patch_top_k=args.patch_top_k, alpha=args.alpha,
                                   totals=args.totals, batch_size=args.batch_size, progress=progress())
    obj = comparison.to_json()
    if args.directions and model is not None and direction is not None and prompts is not None:
        test = split_and_cap(prompts, "test", args.max_prompts, what=str(prompts.source))
        obj.update(compare_directions(model, direction, prompts, test, everyone, max_prompts=args.max_prompts,
                                      batch_size=args.batch_size, progress=progress()))
    write_json(out / "divergence.json", obj)
    for d in comparison.divergence.languages.values():
        say(d.summary())
    for lang, why in comparison.divergence.skipped.items():
        say(f"{lang}: not compared ({why})")
    if comparison.totals is not None:
        for line in comparison.totals.summary():
            say(line)
    say(f"wrote {out / 'divergence.json'}")

