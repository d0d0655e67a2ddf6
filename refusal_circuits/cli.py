"""The ``refusal-circuits`` command line.

Exit codes: 0 on success, 2 on bad input (one line ``error: ...`` naming what was wrong, nothing written),
130 on Ctrl-C. Only this layer (and :mod:`refusal_circuits.report`) writes files, always atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def _negative_ints(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated negative positions like -2,-1, got {value!r}") from None
    if not out or any(v >= 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated negative positions like -2,-1, got {value!r}")
    return out


_SPLIT_HELP = ("which prompts (default: test when the direction came from these prompts, all of them when it came "
               "from another prompt set; a file without a split key is split by a hash of each id, 3:1:1 "
               "train:val:test)")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors follow our contract: one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from refusal_circuits.study import StudyConfig

    parser = _Parser(prog="refusal-circuits", description=(
        "Find, remove and explain the refusal direction of chat LLMs: which heads write it, at which token "
        "positions, in which language."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="the whole study on the defaults; writes report.html and results.json",
                         description=(
                             "Run the whole study: the base language's refusal direction (selection on the last "
                             "two template tokens), refusal with and without it per language (generation + phrase "
                             "judge), per-language directions, cosines and transfer, per-head attribution, the paired "
                             "comparison with patching, and an offline report. Each stage is cached under "
                             "OUT/stages and skipped on a rerun unless its inputs changed. Writes OUT/report.html, "
                             "OUT/results.json and OUT/figures/*.svg."))
    # The study's defaults live in StudyConfig alone; the flags show them.
    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(StudyConfig)}
    _model_arg(run)
    _prompts_arg(run)
    run.add_argument("--langs", type=_langs, default=None, help="comma-separated ISO 639-1 codes (default: all)")
    run.add_argument("--base", default=defaults["base"], help=f"the language whose direction is selected (default: {defaults['base']})")
    run.add_argument("--max-prompts", type=_positive, default=None,
                     help="at most this many test prompts per language and label (a quicker, smaller study)")
    run.add_argument("--train-prompts", type=_positive, default=None,
                     help="at most this many train (and val) prompts per label for the directions (default: all, "
                          "as `directions` does)")
    run.add_argument("--positions", type=_negative_ints, default=list(defaults["positions"]),
                     help="post-instruction positions of the selection grid (default "
                          + ",".join(map(str, defaults["positions"])) + ")")
    run.add_argument("--lang-train-prompts", type=_positive, default=defaults["lang_train_prompts"],
                     help="at most this many train prompts per label for each language's own direction (default "
                          f"{defaults['lang_train_prompts']}; the cosines, PCA and transfer sources)")
    run.add_argument("--filter", default=defaults["filter"], choices=["auto", "arditi", "polyrefuse"],
                     help="selection filter (default polyrefuse: KL < 0.2; on the packaged 0.5B `auto` falls back "
                          "to it after scoring every candidate)")
    run.add_argument("--kl-max", type=float, default=None, help="override the filter's KL threshold")
    run.add_argument("--max-layer-frac", type=float, default=None, help="override the layer cap (default 0.8)")
    run.add_argument("--refusal-tokens", default=None, help="comma-separated refusal tokens (default: discovered)")
    run.add_argument("--compliance-tokens", default=None, help="comma-separated compliance tokens for DLA")
    run.add_argument("--transfer", default=defaults["transfer"], choices=["base", "all"],
                     help="transfer matrix: the base direction on every language plus each language's own "
                          "(base), or every language's direction on every language (all)")
    run.add_argument("--total-effects", type=int, default=defaults["total_effects"], metavar="K", help="patch K heads for total effects")
    run.add_argument("--patch-top-k", type=int, default=defaults["patch_top_k"], metavar="K",
                     help="patch K heads from the base run into each translation")
    run.add_argument("--max-new-tokens", type=_positive, default=defaults["max_new_tokens"],
                     help=f"tokens generated per prompt (default {defaults['max_new_tokens']}: enough for the phrase judge to see the opening)")
    run.add_argument("--batch-size", type=_positive, default=defaults["batch_size"],
                     help=f"prompts per forward pass and per generation batch (default {defaults['batch_size']}: "
                          "generation on 2 CPU cores is 28%% faster than with 16)")
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
    d.add_argument("--positions", type=_negative_ints, default=None,
                   help="only these post-instruction positions, e.g. -2,-1 (default: all; a smaller grid for big "
                        "models)")
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
    e.add_argument("--split", default=None, choices=["train", "val", "test", "all"], help=_SPLIT_HELP)
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
    e.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="generation backend: hf (the model itself; interventions act through hooks) or vllm (a "
                        "serving engine for big models: no hooks, so --intervention none; evaluate an "
                        "`orthogonalize` export for the ablated model; needs the vllm extra and a GPU)")
    e.add_argument("--tensor-parallel-size", type=_positive, default=1, help="vllm: GPUs per model")
    e.add_argument("--out", required=True, help="output JSON file")
    e.set_defaults(func=cmd_evaluate)

    a = sub.add_parser("attribute", help="per-head / per-position direct attribution onto the refusal direction",
                       description=(
                           "For every prompt, every component (embedding, each attention head, each MLP) and every "
                           "token position: its direct write into the residual stream projected on r̂; each "
                           "head's write at the post-instruction tokens split by source span; attention mass per "
                           "span; direct logit attribution on refusal vs compliance tokens; and, for the top heads "
                           "of the direction's language, the total effect on the refusal score by activation "
                           "patching. Writes OUT/attributions.safetensors, OUT/attributions.json (tokens and "
                           "spans), OUT/summary.json and OUT/effects.json."))
    _model_arg(a)
    _prompts_arg(a)
    a.add_argument("--direction", required=True, help="a directory written by `directions`")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--langs", type=_langs, default=None, help="comma-separated ISO 639-1 codes (default: all)")
    a.add_argument("--split", default=None, choices=["train", "val", "test", "all"], help=_SPLIT_HELP)
    a.add_argument("--max-prompts", type=_positive, default=None, help="at most this many per language and label")
    a.add_argument("--batch-size", type=_positive, default=16)
    a.add_argument("--adv-suffix", default=None, help="text appended to every instruction (its own span)")
    a.add_argument("--refusal-tokens", default=None,
                   help="comma-separated refusal tokens for DLA (default: the direction's)")
    a.add_argument("--compliance-tokens", default=None, help="comma-separated compliance tokens for DLA "
                   "(default: the most frequent greedy first tokens on each language's harmless prompts)")
    a.add_argument("--no-dla", action="store_true", help="skip direct logit attribution")
    a.add_argument("--total-effects", type=int, default=8, metavar="K",
                   help="activation-patch the K heads with the largest harmful-minus-harmless write (0: skip)")
    a.set_defaults(func=cmd_attribute)

    c = sub.add_parser("compare", help="English vs each language, paired by prompt id: where refusal diverges",
                       description=(
                           "Read an `attribute` directory and compare every language with the base language, "
                           "prompt by prompt (same id): per-head differences of the write onto r̂ with bootstrap "
                           "intervals and Benjamini-Hochberg-controlled significance, per layer and source span, "
                           "the layer from which the projections separate, how well r̂ separates harmful from "
                           "harmless prompts per language, baseline refusal, and how much of the gap the top heads "
                           "close when patched from the base run. Writes OUT/divergence.json."))
    c.add_argument("--attributions", required=True, help="a directory written by `attribute`")
    c.add_argument("--base", default="en", help="the base language (default: en)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--langs", type=_langs, default=None, help="languages to compare (default: all but the base)")
    c.add_argument("--model", default=None, help="model spec for baseline refusal and patching (default: the "
                   "one the attributions came from)")
    _placement_args(c)
    c.add_argument("--direction", default=None, help="direction directory (default: the one recorded by attribute)")
    c.add_argument("--prompts", default=None, help="the prompts attributed (default: the ones recorded)")
    c.add_argument("--evaluation", default=None, help="an `evaluate` JSON with baseline refusal rates (default: "
                   "generate on the attributed prompts)")
    c.add_argument("--patch-top-k", type=int, default=5, metavar="K",
                   help="patch the K heads with the largest paired difference from the base run (0: skip)")
    c.add_argument("--no-model", action="store_true", help="only what the attribution file gives (no baseline "
                   "refusal, no patching)")
    c.add_argument("--alpha", type=float, default=0.05, help="false discovery rate across heads (default 0.05)")
    c.add_argument("--directions", action="store_true",
                   help="also extract every language's direction at r̂'s site (train split): cosine matrix across "
                        "layers, shared PCA, and the transfer matrix (each language's direction ablated on every "
                        "language's harmful test prompts, added on the harmless ones; first-token judge)")
    c.add_argument("--max-prompts", type=_positive, default=None,
                   help="with --directions: at most this many train prompts per language and label, and test "
                        "prompts per transfer cell")
    c.add_argument("--batch-size", type=_positive, default=32)
    c.set_defaults(func=cmd_compare)

    r = sub.add_parser("report", help="rebuild report.html (and figures) from a finished `run` directory",
                       description="Rebuild OUT/report.html, OUT/figures/*.svg and OUT/results.json from the stage "
                                   "directories of a finished `run`, without the model.")
    r.add_argument("out", help="a directory written by `run`")
    r.set_defaults(func=cmd_report)

    o = sub.add_parser("orthogonalize", help="make the ablation permanent and export a Hugging Face model",
                       description=(
                           "Project the refusal direction out of every weight that writes into the residual "
                           "stream (embedding, attention and MLP outputs, their biases) and write a Hugging Face "
                           "model directory that transformers and refusal-circuits load."))
    _model_arg(o)
    o.add_argument("--direction", required=True, help="a directory written by `directions`")
    o.add_argument("--out", required=True, help="output model directory")
    o.set_defaults(func=cmd_orthogonalize)

    k = sub.add_parser("check", help="run every self-check on a model: what is exact for it and what is refused",
                       description=(
                           "Compare every fast path with the plain computation, the chat-template positions with "
                           "the tokenizer's own template, attribution and DLA with what they must add up to, and "
                           "orthogonalized weights with hook ablation, on a few fixed prompts; print the table with "
                           "the package versions. Exit code 0 when nothing failed, 1 when something did."))
    _model_arg(k)
    k.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON to this file")
    k.set_defaults(func=cmd_check)
    return parser


def _prompts_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default="bundled", help="bundled, a .jsonl/.csv prompt file, or hf:PRESET")


def _model_arg(p: argparse.ArgumentParser) -> None:
    from refusal_circuits.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model spec: packaged:NAME, a Hugging Face id, a local directory or a .gguf file "
                        f"(default: {DEFAULT_MODEL})")
    _placement_args(p)


def _placement_args(p: argparse.ArgumentParser) -> None:
    from refusal_circuits.models import DTYPES

    g = p.add_argument_group("where the model runs")
    g.add_argument("--device", default="cpu", help="torch device for the whole model, e.g. cuda (default: cpu)")
    g.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="parameter dtype (default: float32, what every measurement in the README uses)")
    g.add_argument("--device-map", default=None, metavar="MAP",
                   help="split the model across devices as transformers does: auto, balanced, sequential "
                        "(needs accelerate; instead of --device). Attribution needs one device")


def _placement(args: argparse.Namespace) -> dict[str, Any]:
    """load_model's keyword arguments from --device, --dtype and --device-map (named in the error, before any
    work, where load_model would name its own arguments)."""
    if args.device_map is not None and args.device != "cpu":
        raise InputError("--device and --device-map: give one of them")
    return {"device": args.device, "dtype": args.dtype, "device_map": args.device_map}


def cmd_run(args: argparse.Namespace) -> None:
    from refusal_circuits.chat import check_positions
    from refusal_circuits.selection import filter_configs
    from refusal_circuits.study import Study, StudyConfig

    filter_configs(args.filter, kl_max=args.kl_max, max_layer_frac=args.max_layer_frac)  # fail before any work
    _placement(args)
    if args.total_effects < 0 or args.patch_top_k < 0:
        raise InputError("--total-effects and --patch-top-k must be 0 or more")
    config = StudyConfig(
        model=args.model, prompts=args.prompts, langs=tuple(args.langs) if args.langs else None, base=args.base,
        max_prompts=args.max_prompts, train_prompts=args.train_prompts, lang_train_prompts=args.lang_train_prompts,
        positions=tuple(args.positions),
        filter=args.filter, kl_max=args.kl_max, max_layer_frac=args.max_layer_frac,
        refusal_tokens=args.refusal_tokens, compliance_tokens=args.compliance_tokens,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, transfer=args.transfer,
        total_effects=args.total_effects, patch_top_k=args.patch_top_k, device=args.device, dtype=args.dtype,
        device_map=args.device_map)
    out = Path(args.out)
    fresh = not out.exists()
    try:
        study = Study(config, out, progress=_progress())
        if not all(info.cached for info in study.stages.values()):  # bad input fails here, before any stage
            check_positions(study.model().tokenizer, args.positions)  # loading the model checks prompt lengths
        t0 = time.perf_counter()
        study.run(echo=lambda line: print(line, flush=True))
    except BaseException:
        if fresh:  # finished stages stay (the next run resumes); directories with nothing in them go
            for d in (out / "stages", out):
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise
    results = _write_report(study.out, config.to_json() | {"langs": study.langs,
                                                           "split_policy": study.split_policy.to_json()},
                            {k: v.seconds for k, v in study.stages.items()})
    _print_headline(results)
    print(f"study took {time.perf_counter() - t0:.0f} s this time; wrote {study.out / 'report.html'} and "
          f"{study.out / 'results.json'}")


def _write_report(out: Path, config: dict, seconds: dict) -> dict:
    from refusal_circuits.io import write_json, write_text
    from refusal_circuits.report import build_report, collect_results
    from refusal_circuits.study import STAGES

    results = collect_results({name: out / "stages" / name for name in STAGES}, config, seconds)
    write_text(out / "report.html", build_report(out, results))
    write_json(out / "results.json", results)
    return results


def _print_headline(results: dict) -> None:
    d = results["direction"]
    print(f"direction: layer {d['layer']}, position {d['position']} ({d['lang']})")
    base = results["refusal"]["baseline"]
    transfer = results["languages"]["transfer"]
    ablated = transfer["ablate"].get(d["lang"], {})

    def pct(g: dict | None, key: str) -> str:
        return "  n/a" if g is None or g.get(key) is None else f"{g[key]:5.1%}"

    for lang, groups in base.items():
        h, s = groups.get("harmful"), groups.get("harmless")
        a, b = ablated.get(lang), transfer["baseline"].get(lang, {}).get("harmful")
        print(f"{lang}: refusal harmful {pct(h, 'refusal_rate')}  harmless {pct(s, 'refusal_rate')}"
              + (f"  | first token, harmful: {pct(b, 'rate')}, with r̂({d['lang']}) ablated {pct(a, 'rate')}"
                 if a and b else ""))


def cmd_report(args: argparse.Namespace) -> None:
    import json

    from refusal_circuits.study import STAGE_FILE, STAGES

    out = Path(args.out)
    missing = [name for name in STAGES if not (out / "stages" / name / STAGE_FILE).is_file()]
    if missing:
        raise InputError(f"{out}: not a finished `run` directory (missing stages: {', '.join(missing)})")
    try:
        old = json.loads((out / "results.json").read_text(encoding="utf-8"))
        config, seconds = old["config"], old["seconds"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{out / 'results.json'}: unreadable ({e})") from None
    try:
        _write_report(out, config, seconds)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as e:  # a stage file deleted or damaged
        raise InputError(f"{out}: a stage's files are missing or damaged ({e})") from None
    print(f"wrote {out / 'report.html'}")


def _split_and_cap(prompts, split: str, args: argparse.Namespace):
    """The prompts of ``split`` (every one for ``all``; the split policy has given every prompt one) and
    ``--max-prompts`` per language and label."""
    if split != "all":
        prompts = prompts.filter(split=split)
        if not len(prompts):
            raise InputError(f"{args.prompts} has no prompts in split {split!r}")
    if args.max_prompts:
        prompts = prompts.head(args.max_prompts)
    return prompts


def _saved_refusal_tokens(direction, flag: str):
    """The refusal tokens stored with a direction, or None; a malformed record is a one-line error."""
    from refusal_circuits.scores import RefusalTokens

    if "refusal_tokens" not in direction.meta:
        return None
    try:
        return RefusalTokens.from_json(direction.meta["refusal_tokens"], source="direction")
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{flag}: direction.json has malformed refusal_tokens ({e})") from None


def _out_dir(path: str, flag: str = "--out") -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out} exists and is not a directory")
    return out


def _token_strings(value: str, flag: str) -> list[str]:
    """The comma-separated token strings of ``flag`` (at least one)."""
    strings = [v for v in value.split(",") if v.strip()]
    if not strings:
        raise InputError(f"{flag} needs at least one token")
    return strings


def _refusal_tokens(model, value: str | None, prompts):
    """``--refusal-tokens`` for every language of ``prompts``; without it, discovered on (up to 32 of) them."""
    from refusal_circuits.scores import discover_refusal_tokens, refusal_tokens_from_strings

    if value:
        return refusal_tokens_from_strings(model.tokenizer, _token_strings(value, "--refusal-tokens"),
                                           langs=prompts.langs)
    return discover_refusal_tokens(model, prompts.head(32), progress=_progress())


def _progress() -> bool:
    import os

    return os.environ.get("TQDM_DISABLE") != "1"


def cmd_directions(args: argparse.Namespace) -> None:
    from refusal_circuits.chat import check_positions
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.forward import check_context
    from refusal_circuits.models import ModelSpec, load_model
    from refusal_circuits.selection import filter_configs, select_direction
    from refusal_circuits.workflows import direction_splits, load_split_prompts

    ModelSpec.parse(args.model)
    out = _out_dir(args.out)
    prompts, policy = load_split_prompts(args.prompts)
    train, val = direction_splits(prompts, args.lang, policy, max_prompts=args.max_prompts)
    config, fallback = filter_configs(args.filter, kl_max=args.kl_max, max_layer_frac=args.max_layer_frac)
    model = load_model(args.model, **_placement(args))
    check_positions(model.tokenizer, args.positions)
    for part in (train, val):
        check_context(model, part)
    tokens = _refusal_tokens(model, args.refusal_tokens, train)
    candidates = extract_candidates(
        model, train.filter(label="harmful").instructions, train.filter(label="harmless").instructions,
        lang=args.lang, prompts_sha256=prompts.filter(lang=args.lang).sha256, batch_size=args.batch_size,
        progress=_progress())
    selection = select_direction(
        model, candidates, val.filter(label="harmful").instructions, val.filter(label="harmless").instructions,
        tokens, config=config, fallback=fallback, positions=args.positions, batch_size=args.batch_size,
        progress=_progress())
    direction = selection.direction
    direction.meta["prompts"] = args.prompts
    direction.meta["split_policy"] = policy.to_json()
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
    from refusal_circuits.directions import Direction, check_compatible, load_direction
    from refusal_circuits.evaluation import evaluate_with_scores
    from refusal_circuits.forward import check_context
    from refusal_circuits.io import nullable, write_json
    from refusal_circuits.models import ModelSpec, load_model
    from refusal_circuits.workflows import evaluation_split, load_split_prompts

    ModelSpec.parse(args.model)
    if Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a directory; give a .json file path")
    if args.backend != "hf" and (args.intervention != "none" or args.direction):
        raise InputError(f"--backend {args.backend} runs no hooks: use --intervention none, and evaluate an "
                         "`orthogonalize` export (--model EXPORT_DIR) for the ablated model")
    if args.intervention != "none" and args.direction is None:
        raise InputError(f"--intervention {args.intervention} needs --direction")
    direction = load_direction(args.direction) if args.direction else None
    all_prompts, policy = load_split_prompts(args.prompts, langs=args.langs)
    split = evaluation_split(args.split, all_prompts, direction.prompts_sha256 if direction else None,
                             direction.lang if direction else None)
    prompts = _split_and_cap(all_prompts, split, args)
    if args.backend != "hf":
        _evaluate_on_backend(args, prompts, split)
        return
    model = load_model(args.model, **_placement(args))
    if direction is not None:
        check_compatible(direction, model, f"--direction {args.direction}")
        if args.layer is not None and not 0 <= args.layer < int(model.cfg.n_layers):
            raise InputError(f"--layer {args.layer} out of range; the model has {int(model.cfg.n_layers)} layers")
    check_context(model, prompts)
    if args.refusal_tokens or direction is None or "refusal_tokens" not in direction.meta:
        train = all_prompts.filter(split="train")  # refusal tokens are learned on train prompts, never on test
        train = train if len(train) else prompts
        if not args.refusal_tokens:
            check_context(model, train.head(32))  # the prompts the refusal tokens are discovered on
        tokens = _refusal_tokens(model, args.refusal_tokens, train)
        if not tokens.ids:
            logging.getLogger(__name__).warning(
                "the model refused none of the discovery prompts, so no refusal tokens were found: refusal scores "
                "are left out (pass --refusal-tokens to score them); refusal rates still come from the judge")
    else:
        tokens = _saved_refusal_tokens(direction, f"--direction {args.direction}")
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
    if make is not None and "capability" not in result:
        result.update(nullable("capability", None, "no harmless prompts to measure it on"))
    result["prompts"] = args.prompts
    result["split"] = split
    result["split_policy"] = policy.to_json()
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


def _evaluate_on_backend(args: argparse.Namespace, prompts, split: str) -> None:
    """``evaluate --backend vllm``: generation by a serving engine, judged the same way; no hooks, no scores."""
    from refusal_circuits.backends import make_generator
    from refusal_circuits.evaluation import evaluate_refusal
    from refusal_circuits.io import write_json

    if args.model.startswith("packaged:"):
        raise InputError(f"--backend {args.backend} needs a Hugging Face id or model directory, not {args.model}")
    generator = make_generator(args.backend, args.model, tensor_parallel_size=args.tensor_parallel_size)
    ev = evaluate_refusal(None, prompts, max_new_tokens=args.max_new_tokens, generator=generator,
                          progress=_progress())
    write_json(args.out, {**ev.to_dict(), "direction": None, "backend": args.backend, "prompts": args.prompts,
                          "split": split})
    for lang, groups in ev.results.items():
        print(f"{lang} [{args.backend}]: " + "  ".join(f"{lab} {g.refusal_rate:5.1%} (n={g.n})"
                                                     for lab, g in groups.items()))
    print(f"wrote {args.out}")


def cmd_attribute(args: argparse.Namespace) -> None:
    from refusal_circuits.attribution import attribute, top_k_heads
    from refusal_circuits.directions import check_compatible, load_direction
    from refusal_circuits.forward import check_context
    from refusal_circuits.io import write_json
    from refusal_circuits.models import ModelSpec, load_model
    from refusal_circuits.patching import total_effects
    from refusal_circuits.scores import first_token_ids
    from refusal_circuits.workflows import evaluation_split, load_split_prompts

    ModelSpec.parse(args.model)
    out = _out_dir(args.out)
    if args.total_effects < 0:
        raise InputError("--total-effects must be 0 or more")
    direction = load_direction(args.direction)
    all_prompts, policy = load_split_prompts(args.prompts, langs=args.langs)
    split = evaluation_split(args.split, all_prompts, direction.prompts_sha256, direction.lang)
    prompts = _split_and_cap(all_prompts, split, args)
    model = load_model(args.model, **_placement(args))
    check_compatible(direction, model, f"--direction {args.direction}")
    check_context(model, prompts, adv_suffix=args.adv_suffix)
    if args.refusal_tokens:
        tokens = _refusal_tokens(model, args.refusal_tokens, prompts)
    else:
        tokens = _saved_refusal_tokens(direction, f"--direction {args.direction}")
    compliance = None
    if args.compliance_tokens:
        compliance = list(first_token_ids(model.tokenizer, _token_strings(args.compliance_tokens, "--compliance-tokens"),
                                          "--compliance-tokens token")[0])
    result = attribute(model, direction, prompts, adv_suffix=args.adv_suffix, refusal_tokens=tokens,
                       compliance_tokens=compliance, dla=not args.no_dla, batch_size=args.batch_size,
                       progress=_progress())
    # `compare` reads the prompts again from what is recorded here, maybe from another directory.
    local = args.prompts != "bundled" and not args.prompts.startswith("hf:")
    result.save(out, extra={"prompts": str(Path(args.prompts).resolve()) if local else args.prompts,
                            "split": split, "split_policy": policy.to_json(),
                            "direction_path": str(Path(args.direction).resolve())})
    err = result.completeness_error()
    print(f"attributed {result.n_prompts} prompts ({', '.join(prompts.langs)}); completeness error {err:.2e}")
    print(repr(result.top_heads(5, positions="post").where(label="harmful")))
    effects = None
    if args.total_effects and tokens is not None:
        lang = direction.lang if direction.lang in prompts.langs else prompts.langs[0]
        own = result.select(lang=lang)
        if {"harmful", "harmless"} <= set(own.labels):
            gap = own.select(label="harmful").head_scores().mean(0) - own.select(label="harmless").head_scores().mean(0)
            top = top_k_heads(gap, args.total_effects)
            effects = total_effects(model, direction, prompts.filter(lang=lang, label="harmful").instructions,
                                    prompts.filter(lang=lang, label="harmless").instructions, top,
                                    tokens.for_lang(lang), batch_size=args.batch_size, progress=_progress())
            write_json(out / "effects.json", effects.to_json())
            print(repr(effects))
        else:
            print(f"total effects skipped: they patch harmless means into harmful prompts and back, and the {lang} "
                  f"prompts are {', '.join(sorted(set(own.labels)))} only")
    print(f"wrote {out / 'attributions.safetensors'}, {out / 'attributions.json'}, {out / 'summary.json'}"
          + (f" and {out / 'effects.json'}" if effects is not None else ""))


def _baseline_from_evaluation(path: str) -> dict:
    """Baseline (harmful, harmless) rates per language from an `evaluate` JSON; a label it lacks is None."""
    import json

    from refusal_circuits.crosslingual import Rate

    def rate(g: dict | None) -> Rate | None:
        if g is None:
            return None
        refused = g["refused"] if "refused" in g else round((g["refusal_rate"] or 0.0) * g["n"])
        return Rate(int(refused), int(g["n"]))

    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        out = {}
        for lang, groups in obj["results"].items():
            if not {"harmful", "harmless"} & set(groups):
                raise KeyError("harmful or harmless")
            out[lang] = (rate(groups.get("harmful")), rate(groups.get("harmless")))
        return out
    except FileNotFoundError:
        raise InputError(f"--evaluation {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--evaluation {path}: not an `evaluate` JSON with harmful and harmless rates ({e})") from None


def cmd_compare(args: argparse.Namespace) -> None:
    import json

    from refusal_circuits.attribution import TOKENS_FILE, load_attribution
    from refusal_circuits.crosslingual import Rate, divergence, patch_json, patch_top_heads, unpaired_why
    from refusal_circuits.io import write_json

    if not 0 < args.alpha < 1:
        raise InputError("--alpha must be between 0 and 1")
    if args.patch_top_k < 0:
        raise InputError("--patch-top-k must be 0 or more")
    if args.directions and args.no_model:
        raise InputError("--directions needs the model (drop --no-model)")
    out = _out_dir(args.out)
    attribution = load_attribution(args.attributions)
    meta = json.loads((Path(args.attributions) / TOKENS_FILE).read_text(encoding="utf-8"))
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
    paired_langs = [x for x in langs if not unpaired[x]]
    baseline: dict[str, tuple[Rate | None, Rate | None]] | None = None
    patches = {}
    if args.evaluation:
        baseline = _baseline_from_evaluation(args.evaluation)
    if not args.no_model:
        from refusal_circuits.data import PromptSet
        from refusal_circuits.directions import check_compatible, load_direction
        from refusal_circuits.forward import check_context
        from refusal_circuits.models import ModelSpec, load_model
        from refusal_circuits.workflows import load_split_prompts

        spec = args.model or attribution.model
        ModelSpec.parse(spec)
        dpath = args.direction or meta.get("direction_path")
        if not dpath:
            raise InputError("--direction is needed: the attributions do not record theirs")
        direction = load_direction(dpath)
        source = args.prompts or meta.get("prompts") or "bundled"
        prompts, _ = load_split_prompts(source, langs=[args.base, *langs])
        if args.directions:  # every language's direction needs both labels: say so before the model loads
            from refusal_circuits.crosslingual import check_language_groups

            check_language_groups(prompts, [args.base, *langs], split="train", max_prompts=args.max_prompts,
                                  what="--directions")
            check_language_groups(prompts, [args.base, *langs], split="test", max_prompts=args.max_prompts,
                                  what="--directions (the transfer matrix)")
        by_key = {(r.id, r.lang, r.label): r for r in prompts}
        missing = [k for k in zip(attribution.ids, attribution.langs, attribution.labels, strict=True)
                   if k[1] in (args.base, *langs) and k not in by_key]
        if missing:
            raise InputError(f"--prompts {source}: lacks {len(missing)} attributed prompts, e.g. {missing[0]}")
        model = load_model(spec, **_placement(args))
        check_compatible(direction, model, f"--direction {dpath}")
        chosen = PromptSet(tuple(by_key[k] for k in zip(attribution.ids, attribution.langs, attribution.labels,
                                                        strict=True) if k[1] in (args.base, *langs)), source)
        check_context(model, prompts if args.directions else chosen)
        if baseline is None:
            from refusal_circuits.evaluation import evaluate_refusal

            ev = evaluate_refusal(model, chosen, max_new_tokens=24, batch_size=args.batch_size, progress=_progress())

            def rate(g: dict, label: str) -> Rate | None:
                return Rate(g[label].refused, g[label].n) if label in g else None

            baseline = {lang: (rate(g, "harmful"), rate(g, "harmless")) for lang, g in ev.results.items()}
        tokens = direction.meta.get("refusal_tokens", {}).get("ids", {}).get(direction.lang)
        if args.patch_top_k and tokens:
            patches = patch_top_heads(model, direction, attribution, prompts, args.base, paired_langs,
                                      args.patch_top_k, tokens, alpha=args.alpha, batch_size=args.batch_size,
                                      progress=_progress())
    result = divergence(attribution, args.base, langs, baseline=baseline, patch=patches, alpha=args.alpha)
    obj = result.to_json()
    from refusal_circuits.crosslingual import separation

    obj["separation"] = separation(attribution).to_json()
    if args.directions:
        obj.update(_directions_study(model, direction, prompts, [args.base, *langs], args))
    for lang, pp in patches.items():
        obj["languages"][lang]["patch"] = patch_json(pp)
    write_json(out / "divergence.json", obj)
    for d in result.languages.values():
        print(d.summary())
    for lang, why in result.skipped.items():
        print(f"{lang}: not compared ({why})")
    print(f"wrote {out / 'divergence.json'}")


def _directions_study(model, direction, prompts, langs: list[str], args: argparse.Namespace) -> dict:
    """Per-language directions at r̂'s site: cosines, shared PCA, transfer matrix (JSON-ready)."""
    from refusal_circuits.crosslingual import (
        direction_cosines,
        language_candidates,
        shared_pca,
        site_directions,
        transfer_matrix,
    )

    cands = language_candidates(model, prompts, langs, split="train", max_prompts=args.max_prompts,
                                batch_size=args.batch_size, progress=_progress())
    cos = direction_cosines(cands, direction.layer, direction.position)
    pca = shared_pca(cands, direction.layer, direction.position)
    test = prompts.filter(split="test")
    if args.max_prompts:
        test = test.head(args.max_prompts)
    ids = direction.meta.get("refusal_tokens", {}).get("ids", {})
    refusal_ids = sorted({int(t) for v in ids.values() for t in v})
    if not refusal_ids:
        raise InputError("--directions needs the direction's refusal tokens (direction.json refusal_tokens)")
    dirs = site_directions(cands, direction)
    dirs[direction.lang] = direction  # the selected direction itself for its own language
    transfer = transfer_matrix(model, dirs, test, targets=langs, refusal_ids=refusal_ids, batch_size=args.batch_size,
                               progress=_progress())
    return {"directions": {"cosines": cos.to_json(), "pca": pca.to_json(),
                           "norms": {k: d.norm for k, d in dirs.items()}},
            "transfer": transfer.to_json()}


def cmd_orthogonalize(args: argparse.Namespace) -> None:
    from refusal_circuits.directions import check_compatible, load_direction
    from refusal_circuits.interventions import export_hf, orthogonalize
    from refusal_circuits.models import ModelSpec, load_model

    ModelSpec.parse(args.model)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} exists and is not an empty directory")
    direction = load_direction(args.direction)
    model = load_model(args.model, **_placement(args))
    check_compatible(direction, model, f"--direction {args.direction}")
    edited = orthogonalize(model, direction)
    export_hf(edited, out, extra_meta={"orthogonalized_from": args.model, "direction": direction.to_json()})
    print(f"wrote {out} (load it with --model {out})")


def cmd_check(args: argparse.Namespace) -> int:
    from refusal_circuits.io import write_json
    from refusal_circuits.models import ModelSpec, load_model
    from refusal_circuits.selfcheck import check

    ModelSpec.parse(args.model)
    if args.json_out and not Path(args.json_out).resolve().parent.is_dir():
        raise InputError(f"--json {args.json_out}: its directory does not exist")
    report = check(load_model(args.model, **_placement(args)))
    print(report.table())
    if args.json_out:
        write_json(args.json_out, report.to_json())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse reads "-2,-1" as an option; glue list values that start with "-" to their flag.
    for i in range(len(argv) - 1):
        if argv[i] == "--positions" and argv[i + 1].startswith("-"):
            argv[i : i + 2] = [f"--positions={argv[i + 1]}"]
            break
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (one line, code 2) and --help / --version (code 0)
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # transformers' own "Loading weights" bars would break the one-line error contract; ours show progress.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.quiet:
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        code = args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished outputs are intact", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
