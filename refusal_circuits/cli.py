"""The ``refusal-circuits`` command line.

Exit codes: 0 on success, 2 on bad input (one line ``error: ...`` naming what was wrong, nothing written),
130 on Ctrl-C. Only this layer (and :mod:`refusal_circuits.report`) writes files, always atomically.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from refusal_circuits._version import __version__
from refusal_circuits.errors import InputError

DEFAULT_OUT = "refusal-report"


def _langs(value: str) -> list[str]:
    langs = [v.strip() for v in value.split(",") if v.strip()]
    if not langs:
        raise argparse.ArgumentTypeError("--langs needs at least one language code, e.g. en,de")
    return langs


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return n


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors follow our contract: one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:

    parser = _Parser(prog="refusal-circuits", description=(
        "Find, remove and explain the refusal direction of chat LLMs: which heads write it, at which token "
        "positions, in which language."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="the whole study on the defaults; writes report.html and results.json",
                         description=(
                             "Run the study on a model and a prompt set: today, baseline refusal rates per "
                             "language and label with every completion. Writes OUT/report.html and "
                             "OUT/results.json."))
    _model_arg(run)
    _prompts_arg(run)
    run.add_argument("--langs", type=_langs, default=None, help="comma-separated ISO 639-1 codes (default: all)")
    run.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                     help="which split of a prompt set with a 'split' key to evaluate (default: test)")
    run.add_argument("--max-prompts", type=_positive, default=None,
                     help="at most this many prompts per language and label (a quicker, smaller study)")
    run.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens generated per prompt")
    run.add_argument("--batch-size", type=_positive, default=16)
    run.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: ./{DEFAULT_OUT})")
    run.set_defaults(func=cmd_run)

    d = sub.add_parser("directions", help="extract and select one language's refusal direction",
                       description=(
                           "Extract refusal direction candidates (difference in means of resid_pre at every layer "
                           "and post-instruction position, on the train split) and select one on the val split "
                           "by bypass, induce and KL scores (Arditi et al.). Writes OUT/direction.safetensors and "
                           "OUT/direction.json."))
    _model_arg(d)
    _prompts_arg(d)
    d.add_argument("--lang", default="en", help="the language whose direction to extract (default: en)")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--filter", default="auto", choices=["auto", "arditi", "polyrefuse"],
                   help="selection filter: arditi (induce > 0, KL < 0.1), polyrefuse (KL < 0.2), or auto: arditi, "
                        "falling back to polyrefuse if nothing passes (recorded in direction.json)")
    d.add_argument("--kl-max", type=float, default=None, help="override the filter's KL threshold")
    d.add_argument("--max-layer-frac", type=float, default=None, help="override the layer cap (default 0.8)")
    d.add_argument("--max-prompts", type=_positive, default=None,
                   help="at most this many prompts per label for extraction and for selection")
    d.add_argument("--refusal-tokens", default=None,
                   help="comma-separated refusal tokens (first token of each string), instead of discovering them")
    d.add_argument("--batch-size", type=_positive, default=32)
    d.set_defaults(func=cmd_directions)

    e = sub.add_parser("evaluate", help="generate, judge, and report refusal rates (optionally under an intervention)",
                       description=(
                           "Greedy generation on the chosen split, judged by the refusal-phrase judge, with the "
                           "first-token refusal score per language and label; under an intervention also the "
                           "capability cost (KL and cross-entropy on harmless prompts). Writes one JSON file."))
    _model_arg(e)
    _prompts_arg(e)
    e.add_argument("--langs", type=_langs, default=None, help="comma-separated ISO 639-1 codes (default: all)")
    e.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    e.add_argument("--direction", default=None, help="a directory written by `directions`")
    e.add_argument("--intervention", default="none", choices=["none", "ablate", "actadd"])
    e.add_argument("--alpha", type=float, default=None,
                   help="actadd coefficient (default: the one calibrated at selection, else the direction's norm)")
    e.add_argument("--layer", type=int, default=None, help="actadd layer (default: the direction's layer)")
    e.add_argument("--max-prompts", type=_positive, default=None, help="at most this many per language and label")
    e.add_argument("--max-new-tokens", type=_positive, default=32)
    e.add_argument("--batch-size", type=_positive, default=32)
    e.add_argument("--refusal-tokens", default=None, help="comma-separated refusal tokens (default: the "
                   "direction's, else discovered on the train split)")
    e.add_argument("--out", required=True, help="output JSON file")
    e.set_defaults(func=cmd_evaluate)

    o = sub.add_parser("orthogonalize", help="make the ablation permanent and export a Hugging Face model",
                       description=(
                           "Project the refusal direction out of every weight that writes into the residual "
                           "stream (embedding, attention and MLP outputs, their biases) and write a Hugging Face "
                           "model directory that transformers and refusal-circuits load."))
    _model_arg(o)
    o.add_argument("--direction", required=True, help="a directory written by `directions`")
    o.add_argument("--out", required=True, help="output model directory")
    o.set_defaults(func=cmd_orthogonalize)
    return parser


def _prompts_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default="bundled", help="bundled, a .jsonl/.csv prompt file, or hf:PRESET")


def _model_arg(p: argparse.ArgumentParser) -> None:
    from refusal_circuits.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model spec: packaged:NAME, a Hugging Face id, a local directory or a .gguf file "
                        f"(default: {DEFAULT_MODEL})")


def cmd_run(args: argparse.Namespace) -> None:
    from refusal_circuits.data import load_prompts
    from refusal_circuits.evaluation import evaluate_refusal
    from refusal_circuits.io import write_json, write_text
    from refusal_circuits.models import ModelSpec, load_model
    from refusal_circuits.report import baseline_report_html

    ModelSpec.parse(args.model)  # a bad spec fails before anything slow happens
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    prompts = load_prompts(args.prompts, langs=args.langs)
    if args.split != "all" and any(r.split is not None for r in prompts):
        prompts = prompts.filter(split=args.split)
        if not len(prompts):
            raise InputError(f"{args.prompts} has no prompts in split {args.split!r}")
    if args.max_prompts:
        prompts = prompts.head(args.max_prompts)
    t0 = time.perf_counter()
    model = load_model(args.model)
    evaluation = evaluate_refusal(model, prompts, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, progress=not args.quiet)
    results = {"version": __version__, "prompts": args.prompts, "split": args.split,
               "seconds": round(time.perf_counter() - t0, 1), "baseline": evaluation.to_dict()}
    write_json(out / "results.json", results)
    write_text(out / "report.html", baseline_report_html(evaluation))
    for lang, groups in evaluation.results.items():
        rates = "  ".join(f"{lab} {g.refusal_rate:5.1%} (n={g.n})" for lab, g in groups.items())
        print(f"{lang}: refusal {rates}")
    print(f"wrote {out / 'report.html'} and {out / 'results.json'}")


def _out_dir(path: str, flag: str = "--out") -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out} exists and is not a directory")
    return out


def _splits(prompts, lang: str, max_prompts: int | None):
    """(train, val) of one language: the 'split' key when the prompts have one, else a stable hash split."""
    import hashlib

    from refusal_circuits.data import PromptSet

    own = prompts.filter(lang=lang)
    if not len(own):
        raise InputError(f"no prompts in language {lang!r}; the prompts have {', '.join(prompts.langs)}")
    if any(r.split is not None for r in own):
        train, val = own.filter(split="train"), own.filter(split="val")
    else:
        def bucket(r) -> str:
            return "val" if int(hashlib.sha256(r.id.encode()).hexdigest(), 16) % 5 == 0 else "train"

        train = PromptSet(tuple(r for r in own if bucket(r) == "train"), own.source)
        val = PromptSet(tuple(r for r in own if bucket(r) == "val"), own.source)
    if max_prompts:
        train, val = train.head(max_prompts), val.head(max_prompts)
    for name, part in (("train", train), ("val", val)):
        counts = part.counts().get(lang, {})
        if not counts.get("harmful") or not counts.get("harmless"):
            raise InputError(f"the {name} split of {lang!r} needs harmful and harmless prompts (has {counts or 'none'})")
    return train, val


def _refusal_tokens(model, value: str | None, train):
    from refusal_circuits.scores import discover_refusal_tokens, refusal_tokens_from_strings

    if value:
        strings = [v for v in value.split(",") if v.strip()]
        if not strings:
            raise InputError("--refusal-tokens needs at least one token")
        return refusal_tokens_from_strings(model.tokenizer, strings, langs=train.langs)
    return discover_refusal_tokens(model, train.head(32), progress=_progress())


def _progress() -> bool:
    import os

    return os.environ.get("TQDM_DISABLE") != "1"


def cmd_directions(args: argparse.Namespace) -> None:
    from refusal_circuits.data import load_prompts
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.models import ModelSpec, load_model
    from refusal_circuits.selection import ARDITI, POLYREFUSE, PRESETS, select_direction

    ModelSpec.parse(args.model)
    out = _out_dir(args.out)
    prompts = load_prompts(args.prompts)
    train, val = _splits(prompts, args.lang, args.max_prompts)
    config = ARDITI if args.filter == "auto" else PRESETS[args.filter]
    fallback = POLYREFUSE if args.filter == "auto" else None
    overrides = {k: v for k, v in (("kl_max", args.kl_max), ("max_layer_frac", args.max_layer_frac)) if v is not None}
    if overrides:
        import dataclasses

        if "max_layer_frac" in overrides and not 0 < overrides["max_layer_frac"] <= 1:
            raise InputError("--max-layer-frac must be in (0, 1]")
        config = dataclasses.replace(config, name=f"{config.name}+custom", **overrides)
        fallback = dataclasses.replace(fallback, **overrides) if fallback else None
    model = load_model(args.model)
    tokens = _refusal_tokens(model, args.refusal_tokens, train)
    candidates = extract_candidates(
        model, train.filter(label="harmful").instructions, train.filter(label="harmless").instructions,
        lang=args.lang, prompts_sha256=prompts.filter(lang=args.lang).sha256, batch_size=args.batch_size,
        progress=_progress())
    selection = select_direction(
        model, candidates, val.filter(label="harmful").instructions, val.filter(label="harmless").instructions,
        tokens, config=config, fallback=fallback, batch_size=args.batch_size, progress=_progress())
    direction = selection.direction
    direction.meta["prompts"] = args.prompts
    direction.meta["selection_scores"] = selection.to_json()
    direction.save(out)
    s = direction.meta["selection"]
    note = f" (fallback: nothing passed {selection.fallback_from})" if selection.fallback_from else ""
    act = direction.meta["actadd"]
    print(f"{args.lang}: layer {direction.layer}, position {direction.position}, filter {s['filter']}{note}; "
          f"bypass {s['bypass']:.2f} (baseline {s['baseline_harmful']:.2f}), induce {s['induce']:.2f}, "
          f"kl {s['kl']:.3f}; actadd alpha {act['alpha']:.2f} ({act['scale']}x norm: {act['fraction']:.0%} of "
          f"harmless val prompts start a refusal)")
    print(f"wrote {out / 'direction.safetensors'} and {out / 'direction.json'}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from refusal_circuits import interventions
    from refusal_circuits.data import load_prompts
    from refusal_circuits.directions import Direction, check_compatible, load_direction
    from refusal_circuits.evaluation import evaluate_with_scores
    from refusal_circuits.io import write_json
    from refusal_circuits.models import ModelSpec, load_model
    from refusal_circuits.scores import RefusalTokens

    ModelSpec.parse(args.model)
    if Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a directory; give a .json file path")
    if args.intervention != "none" and args.direction is None:
        raise InputError(f"--intervention {args.intervention} needs --direction")
    direction = load_direction(args.direction) if args.direction else None
    all_prompts = load_prompts(args.prompts, langs=args.langs)
    prompts = all_prompts
    if args.split != "all" and any(r.split is not None for r in prompts):
        prompts = prompts.filter(split=args.split)
        if not len(prompts):
            raise InputError(f"{args.prompts} has no prompts in split {args.split!r}")
    if args.max_prompts:
        prompts = prompts.head(args.max_prompts)
    model = load_model(args.model)
    if direction is not None:
        check_compatible(direction, model, f"--direction {args.direction}")
        if args.layer is not None and not 0 <= args.layer < int(model.cfg.n_layers):
            raise InputError(f"--layer {args.layer} out of range; the model has {int(model.cfg.n_layers)} layers")
    if args.refusal_tokens or direction is None or "refusal_tokens" not in direction.meta:
        train = all_prompts.filter(split="train") if any(r.split for r in all_prompts) else prompts
        tokens = _refusal_tokens(model, args.refusal_tokens, train if len(train) else prompts)
        if not tokens.ids:
            logging.getLogger(__name__).warning(
                "the model refused none of the discovery prompts, so no refusal tokens were found: refusal scores "
                "are left out (pass --refusal-tokens to score them); refusal rates still come from the judge")
    else:
        try:
            tokens = RefusalTokens.from_json(direction.meta["refusal_tokens"], source="direction")
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"--direction {args.direction}: direction.json has malformed refusal_tokens ({e})") from None
    make = None
    if direction is not None:
        chosen: Direction = direction
        if args.intervention == "ablate":
            def make():
                return interventions.ablate(model, chosen)
        elif args.intervention == "actadd":
            def make():
                return interventions.actadd(model, chosen, layer=args.layer, alpha=args.alpha)
    result = evaluate_with_scores(model, prompts, tokens, intervention=make, intervention_name=args.intervention,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                  progress=_progress())
    result["direction"] = str(args.direction) if args.direction else None
    if direction is not None and args.intervention == "actadd":
        result["actadd"] = {"layer": args.layer if args.layer is not None else direction.layer,
                            "alpha": args.alpha if args.alpha is not None else interventions.default_alpha(direction),
                            "norm": direction.norm}
    result["prompts"] = args.prompts
    result["split"] = args.split
    write_json(args.out, result)
    for lang, groups in result["results"].items():
        rates = "  ".join(f"{lab} {g['refusal_rate']:5.1%} (n={g['n']}"
                          + (f", score {g['refusal_score']:+.2f})" if "refusal_score" in g else ")")
                          for lab, g in groups.items())
        print(f"{lang} [{args.intervention}]: {rates}")
    if result.get("capability"):
        c = result["capability"]
        print(f"capability: KL {c['kl_harmless']:.3f}, CE {c['ce_harmless_base']:.3f} -> {c['ce_harmless_intervened']:.3f}")
    print(f"wrote {args.out}")


def cmd_orthogonalize(args: argparse.Namespace) -> None:
    from refusal_circuits.directions import check_compatible, load_direction
    from refusal_circuits.interventions import export_hf, orthogonalize
    from refusal_circuits.models import ModelSpec, load_model

    ModelSpec.parse(args.model)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} exists and is not an empty directory")
    direction = load_direction(args.direction)
    model = load_model(args.model)
    check_compatible(direction, model, f"--direction {args.direction}")
    edited = orthogonalize(model, direction)
    export_hf(edited, out, extra_meta={"orthogonalized_from": args.model, "direction": direction.to_json()})
    print(f"wrote {out} (load it with --model {out})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # transformers' own "Loading weights" bars would break the one-line error contract; ours show progress.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.quiet:
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished outputs are intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
