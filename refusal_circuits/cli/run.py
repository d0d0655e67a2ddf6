"""``run`` (the whole study, as cached stages, then the report) and ``report`` (rebuild the report of a finished
``run`` without the model)."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from refusal_circuits.chat import check_positions
from refusal_circuits.cli.common import placement, progress, say
from refusal_circuits.errors import InputError
from refusal_circuits.io import write_json, write_text
from refusal_circuits.report import build_report, collect_results
from refusal_circuits.selection import filter_configs
from refusal_circuits.study import STAGE_FILE, STAGES, Study, StudyConfig


def cmd_run(args: argparse.Namespace) -> None:
    filter_configs(args.filter, kl_max=args.kl_max, max_layer_frac=args.max_layer_frac)  # fail before any work
    placement(args)
    for flag in ("total_effects", "patch_top_k", "transfer_check"):
        if getattr(args, flag) < 0:
            raise InputError(f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")
    if args.compare_totals < 0:
        raise InputError(f"--compare-totals must be 0 (not run) or more, got {args.compare_totals}")
    if args.subspace_k == 1 or args.subspace_k < 0:
        raise InputError(f"--subspace-k must be 0 (no subspace stage) or at least 2, got {args.subspace_k}")
    config = StudyConfig(
        model=args.model, prompts=args.prompts, langs=tuple(args.langs) if args.langs else None, base=args.base,
        max_prompts=args.max_prompts, train_prompts=args.train_prompts, lang_train_prompts=args.lang_train_prompts,
        positions=tuple(args.positions),
        filter=args.filter, kl_max=args.kl_max, max_layer_frac=args.max_layer_frac,
        refusal_tokens=args.refusal_tokens, refusal_filter=args.refusal_filter,
        compliance_tokens=args.compliance_tokens,
        max_new_tokens=args.max_new_tokens, second_judge=args.second_judge,
        second_judge_sample=args.second_judge_sample, batch_size=args.batch_size, transfer=args.transfer,
        transfer_check=args.transfer_check, harm=args.harm, subspace_k=args.subspace_k,
        compare_totals=args.compare_totals,
        total_effects=args.total_effects, patch_top_k=args.patch_top_k, device=args.device, dtype=args.dtype,
        device_map=args.device_map)
    out = Path(args.out)
    fresh = not out.exists()
    try:
        study = Study(config, out, progress=progress())
        if not all(info.cached for info in study.stages.values()):  # bad input fails here, before any stage
            check_positions(study.model().tokenizer, args.positions)  # loading the model checks prompt lengths
        t0 = time.perf_counter()
        study.run(echo=lambda line: say(line, flush=True))
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
    say(f"study took {time.perf_counter() - t0:.0f} s this time; wrote {study.out / 'report.html'} and "
        f"{study.out / 'results.json'}")


def _write_report(out: Path, config: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
    results = collect_results({name: out / "stages" / name for name in STAGES}, config, seconds)
    write_text(out / "report.html", build_report(out, results))
    write_json(out / "results.json", results)
    return results


def _print_headline(results: dict[str, Any]) -> None:
    d = results["direction"]
    say(f"direction: layer {d['layer']}, position {d['position']} ({d['lang']})")
    base = results["refusal"]["baseline"]
    transfer = results["languages"]["transfer"]
    ablated = transfer["ablate"].get(d["lang"], {})

    def pct(g: dict[str, Any] | None, key: str) -> str:
        return "  n/a" if g is None or g.get(key) is None else f"{g[key]:5.1%}"

    for lang, groups in base.items():
        h, s = groups.get("harmful"), groups.get("harmless")
        a, b = ablated.get(lang), transfer["baseline"].get(lang, {}).get("harmful")
        say(f"{lang}: refusal harmful {pct(h, 'refusal_rate')}  harmless {pct(s, 'refusal_rate')}"
            + (f"  | first token, harmful: {pct(b, 'rate')}, with r̂({d['lang']}) ablated {pct(a, 'rate')}"
               if a and b else ""))
    for key in ("harm", "subspace"):
        for rec in (results.get(key) or {}).get("langs", {}).values():
            say(rec["sentence"])


def cmd_report(args: argparse.Namespace) -> None:
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
    say(f"wrote {out / 'report.html'}")
