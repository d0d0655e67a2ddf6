"""``atp``: attribution patching of every head and MLP at every post-instruction token, validated against exact
patching on the packaged model the user runs."""

from __future__ import annotations

import argparse

from refusal_circuits.atp import METRICS, attribution_patching, validate_atp
from refusal_circuits.cli.common import out_dir, placement, progress, say
from refusal_circuits.directions import check_compatible, load_direction
from refusal_circuits.errors import InputError
from refusal_circuits.forward import check_context
from refusal_circuits.io import atomic_path, safetensors_bytes, write_json
from refusal_circuits.models import ModelSpec, load_model
from refusal_circuits.workflows.splits import evaluation_split, load_split_prompts, split_and_cap
from refusal_circuits.workflows.tokens import resolve_refusal_tokens, saved_refusal_tokens


def cmd_atp(args: argparse.Namespace) -> None:
    ModelSpec.parse(args.model)
    if args.validate < 0:
        raise InputError("--validate must be 0 or more")
    out = out_dir(args.out)
    direction = load_direction(args.direction)
    lang = args.lang or direction.lang
    everything, _policy = load_split_prompts(args.prompts, langs=[lang])
    split = evaluation_split(args.split, everything, direction.prompts_sha256, direction.lang)
    prompts = split_and_cap(everything, split, args.max_prompts, what=args.prompts)
    harmful, harmless = prompts.filter(label="harmful"), prompts.filter(label="harmless")
    if not len(harmful) or not len(harmless):
        raise InputError(f"--prompts {args.prompts}: the {split} split has no harmful or no harmless {lang} prompts")
    model = load_model(args.model, **placement(args))
    check_compatible(direction, model, f"--direction {args.direction}")
    check_context(model, prompts)
    tokens = (resolve_refusal_tokens(model, args.refusal_tokens, prompts, progress=progress()) if args.refusal_tokens
              else saved_refusal_tokens(direction, f"--direction {args.direction}"))
    if tokens is None:
        raise InputError(f"--direction {args.direction} records no refusal tokens: pass --refusal-tokens")
    ids = tokens.for_lang(lang)
    est = attribution_patching(model, direction, harmful.instructions, harmless.instructions, ids,
                               batch_size=args.batch_size, progress=progress())
    say(repr(est))
    summary = {"model": est.model, "direction": est.direction, "lang": lang, "split": split,
               "n_harmful": len(harmful), "n_harmless": len(harmless), "reference": "harmless mean",
               "linear_check_error": est.linear_check,
               "top": {m: [{"node": n, "mean": float(est.estimate(n, m).mean())} for n in est.top_nodes(20, m)]
                       for m in METRICS}}
    if args.validate:
        val = validate_atp(model, direction, harmful.instructions, harmless.instructions, ids, est,
                           n_top=args.validate, n_random=args.validate, batch_size=args.batch_size, progress=progress())
        summary["validation"] = val.to_json()
        say(repr(val))
    tensors = {f"{kind}.{m}": getattr(est, kind)[m].float().contiguous() for kind in ("heads", "mlps") for m in METRICS}
    tensors.update({f"baseline.{m}": est.baseline[m].float() for m in METRICS})
    with atomic_path(out / "atp.safetensors") as tmp:
        tmp.write_bytes(safetensors_bytes(tensors, {"lang": lang, "model": est.model}))
    write_json(out / "atp.json", summary)
    say(f"wrote {out / 'atp.safetensors'} (per prompt: heads [prompt, layer, head, post], mlps [prompt, layer, "
        f"post], per metric) and {out / 'atp.json'}")
