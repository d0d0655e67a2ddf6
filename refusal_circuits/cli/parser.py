"""The argument parser: one function per subcommand, each with its flags and their help.

The defaults come from one place: the study's from :class:`~refusal_circuits.study.StudyConfig`'s fields, the
commands' own from :mod:`refusal_circuits.workflows.defaults`; the help texts show them.
"""

from __future__ import annotations

import argparse
from typing import Any

from refusal_circuits._version import __version__
from refusal_circuits.cli.analysis import cmd_attribute, cmd_compare
from refusal_circuits.cli.args import (
    _langs_arg,
    _model_arg,
    _negative_ints,
    _placement_args,
    _positive,
    _prompts_arg,
    _refusal_filter_arg,
    _second_judge_args,
    _selection_args,
)
from refusal_circuits.cli.atp import cmd_atp
from refusal_circuits.cli.check import cmd_check
from refusal_circuits.cli.direction import cmd_directions, cmd_orthogonalize
from refusal_circuits.cli.evaluate import cmd_evaluate
from refusal_circuits.cli.harm import cmd_harm
from refusal_circuits.cli.run import cmd_report, cmd_run
from refusal_circuits.cli.subspace import cmd_subspace
from refusal_circuits.study import StudyConfig
from refusal_circuits.workflows import defaults
from refusal_circuits.workflows.harm import HARM_MODES

DEFAULT_OUT = "refusal-report"
SPLITS = ["train", "val", "test", "all"]
_SPLIT_HELP = ("which prompts (default: test when the direction came from these prompts, all of them when it came "
               "from another prompt set; a file without a split key is split by a hash of each id, 3:1:1 "
               "train:val:test)")
_Sub = Any  # argparse's _SubParsersAction, which it does not export


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors follow our contract: one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}\n")


def _add_run(sub: _Sub) -> None:
    run = sub.add_parser("run", help="the whole study on the defaults; writes report.html and results.json",
                         description=(
                             "Run the whole study: the base language's refusal direction (selection on the last "
                             "two template tokens), refusal with and without it per language (generation + phrase "
                             "judge), per-language directions, cosines and transfer, per-head attribution, the paired "
                             "comparison with patching, and an offline report. Each stage is cached under "
                             "OUT/stages and skipped on a rerun unless its inputs changed. Writes OUT/report.html, "
                             "OUT/results.json and OUT/figures/*.svg."))
    # The study's defaults live in StudyConfig alone; the flags show them.
    study = StudyConfig.defaults()
    _model_arg(run)
    _prompts_arg(run)
    _langs_arg(run)
    run.add_argument("--base", default=study["base"], help=f"the language whose direction is selected (default: {study['base']})")
    run.add_argument("--max-prompts", type=_positive, default=None,
                     help="at most this many test prompts per language and label (a quicker, smaller study)")
    run.add_argument("--train-prompts", type=_positive, default=None,
                     help="at most this many train (and val) prompts per label for the directions (default: all, "
                          "as `directions` does)")
    run.add_argument("--positions", type=_negative_ints, default=list(study["positions"]),
                     help="post-instruction positions of the selection grid (default "
                          + ",".join(map(str, study["positions"])) + ")")
    run.add_argument("--lang-train-prompts", type=_positive, default=study["lang_train_prompts"],
                     help="at most this many train prompts per label for each language's own direction (default "
                          f"{study['lang_train_prompts']}; the cosines, PCA and transfer sources)")
    _selection_args(run, study["filter"], "selection filter (default polyrefuse: KL < 0.2; on the packaged 0.5B "
                    "`auto` falls back to it after scoring every candidate)")
    run.add_argument("--refusal-tokens", default=None, help="comma-separated refusal tokens (default: discovered)")
    run.add_argument("--compliance-tokens", default=None, help="comma-separated compliance tokens for DLA")
    run.add_argument("--transfer", default=study["transfer"], choices=["base", "all"],
                     help="transfer matrix: the base direction on every language plus each language's own "
                          "(base), or every language's direction on every language (all)")
    run.add_argument("--transfer-check", type=int, default=study["transfer_check"], metavar="N",
                     help="check the transfer matrix's first-token judge against generation + the phrase judge on N "
                          "harmful (ablated) and N harmless (added) test prompts per language, kappa per language "
                          f"and intervention, and on every baseline completion at no cost (default {study['transfer_check']}; "
                          "0: no check)")
    run.add_argument("--total-effects", type=int, default=study["total_effects"], metavar="K", help="patch K heads for total effects")
    run.add_argument("--patch-top-k", type=int, default=study["patch_top_k"], metavar="K",
                     help="patch K heads from the base run into each translation")
    run.add_argument("--max-new-tokens", type=_positive, default=study["max_new_tokens"],
                     help=f"tokens generated per prompt (default {study['max_new_tokens']}: enough for the phrase judge to see the opening)")
    run.add_argument("--harm", default=study["harm"], choices=HARM_MODES,
                     help="the harm-vs-refusal stage (does each language recognise harm, and turn it into refusal?): "
                          "full, no-heads (without the per-head attribution) or none (default: "
                          f"{study['harm']})")
    run.add_argument("--compare-totals", type=int, default=study["compare_totals"], metavar="N",
                     help="the compare stage also estimates every head's and MLP's paired total effect by attribution "
                          "patching, validated on N largest and N random nodes per language (0: skip; default: "
                          f"{study['compare_totals']})")
    run.add_argument("--subspace-k", type=int, default=study["subspace_k"], metavar="K",
                     help="the subspace stage (one refusal direction or a subspace per language?) with K-dimensional "
                          f"subspaces; 0: skip it (default: {study['subspace_k']})")
    _second_judge_args(run, study["second_judge"], study["second_judge_sample"])
    _refusal_filter_arg(run, study["refusal_filter"])
    run.add_argument("--batch-size", type=_positive, default=study["batch_size"],
                     help=f"prompts per forward pass and per generation batch (default {study['batch_size']}: "
                          "generation on 2 CPU cores is 28%% faster than with 16)")
    run.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: ./{DEFAULT_OUT})")
    run.set_defaults(func=cmd_run)


def _add_directions(sub: _Sub) -> None:
    d = sub.add_parser("directions", help="extract and select one language's refusal direction",
                       description=(
                           "Extract refusal direction candidates (difference in means of resid_pre at every layer "
                           "and post-instruction position, on the train split) and select one on the val split "
                           "by bypass, induce and KL scores (Arditi et al.). Writes OUT/direction.safetensors and "
                           "OUT/direction.json."))
    _model_arg(d)
    _prompts_arg(d)
    d.add_argument("--lang", default=defaults.BASE_LANG, help=f"the language whose direction to extract (default: {defaults.BASE_LANG})")
    d.add_argument("--out", required=True, help="output directory")
    _selection_args(d, defaults.DIRECTIONS_FILTER, "selection filter: arditi (induce > 0, KL < 0.1), polyrefuse (KL < 0.2), "
                    "or auto: arditi, falling back to polyrefuse if nothing passes (recorded in direction.json)")
    d.add_argument("--max-prompts", type=_positive, default=None,
                   help="at most this many prompts per label for extraction and for selection")
    d.add_argument("--refusal-tokens", default=None,
                   help="comma-separated refusal tokens (first token of each string), instead of discovering them")
    d.add_argument("--positions", type=_negative_ints, default=None,
                   help="only these post-instruction positions, e.g. -2,-1 (default: all; a smaller grid for big "
                        "models)")
    _refusal_filter_arg(d, "none")
    d.add_argument("--strategy", default="arditi", choices=["arditi", "cosmic", "both"],
                   help="selection by the refusal score (arditi; COSMIC where the language has no refusal tokens), "
                        "by COSMIC's activation similarities without refusal tokens (cosmic), or arditi with "
                        "COSMIC's choice and their agreement recorded in direction.json (both)")
    d.add_argument("--batch-size", type=_positive, default=defaults.BATCH_SIZE)
    d.set_defaults(func=cmd_directions)


def _add_evaluate(sub: _Sub) -> None:
    e = sub.add_parser("evaluate", help="generate, judge, and report refusal rates (optionally under an intervention)",
                       description=(
                           "Greedy generation on the chosen split, judged by the refusal-phrase judge, with the "
                           "first-token refusal score per language and label; under an intervention also the "
                           "capability cost (KL and cross-entropy on harmless prompts). Writes one JSON file."))
    _model_arg(e)
    _prompts_arg(e)
    _langs_arg(e)
    e.add_argument("--split", default=None, choices=SPLITS, help=_SPLIT_HELP)
    e.add_argument("--direction", default=None, help="a directory written by `directions`")
    e.add_argument("--intervention", default="none", choices=["none", "ablate", "actadd"])
    e.add_argument("--alpha", type=float, default=None,
                   help="actadd coefficient (default: the one calibrated at selection, else the direction's norm)")
    e.add_argument("--layer", type=int, default=None, help="actadd layer (default: the direction's layer)")
    e.add_argument("--max-prompts", type=_positive, default=None, help="at most this many per language and label")
    e.add_argument("--max-new-tokens", type=_positive, default=defaults.EVALUATE_NEW_TOKENS)
    e.add_argument("--batch-size", type=_positive, default=defaults.BATCH_SIZE)
    e.add_argument("--refusal-tokens", default=None, help="comma-separated refusal tokens (default: the "
                   "direction's, else discovered on the train split)")
    _second_judge_args(e, "none", None)
    e.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="generation backend: hf (the model itself; interventions act through hooks) or vllm (a "
                        "serving engine for big models: no hooks, so --intervention none; evaluate an "
                        "`orthogonalize` export for the ablated model; needs the vllm extra and a GPU)")
    e.add_argument("--tensor-parallel-size", type=_positive, default=1, help="vllm: GPUs per model")
    e.add_argument("--out", required=True, help="output JSON file")
    e.set_defaults(func=cmd_evaluate)


def _add_attribute(sub: _Sub) -> None:
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
    _langs_arg(a)
    a.add_argument("--split", default=None, choices=SPLITS, help=_SPLIT_HELP)
    a.add_argument("--max-prompts", type=_positive, default=None, help="at most this many per language and label")
    a.add_argument("--batch-size", type=_positive, default=defaults.ATTRIBUTE_BATCH_SIZE)
    a.add_argument("--adv-suffix", default=None, help="text appended to every instruction (its own span)")
    a.add_argument("--refusal-tokens", default=None,
                   help="comma-separated refusal tokens for DLA (default: the direction's)")
    a.add_argument("--compliance-tokens", default=None, help="comma-separated compliance tokens for DLA "
                   "(default: the most frequent greedy first tokens on each language's harmless prompts)")
    a.add_argument("--no-dla", action="store_true", help="skip direct logit attribution")
    a.add_argument("--total-effects", type=int, default=defaults.ATTRIBUTE_TOTAL_EFFECTS, metavar="K",
                   help="activation-patch the K heads with the largest harmful-minus-harmless write (0: skip)")
    a.set_defaults(func=cmd_attribute)


def _add_atp(sub: _Sub) -> None:
    a = sub.add_parser("atp", help="attribution patching: every head and MLP at every post-instruction token",
                       description=(
                           "Attribution patching (first-order estimates of activation patching, one forward and "
                           "two backward passes per batch): for every head's output and every MLP's write at every "
                           "post-instruction token of the harmful prompts of one language, the change of r̂'s "
                           "projection at its site and of the refusal score (that language's own tokens) when it "
                           "is set to its mean over the harmless prompts. Checked on the model against exact "
                           "patching where the path is linear; --validate K also patches the K largest and K "
                           "random nodes exactly and reports the correlation and worst error. Writes "
                           "OUT/atp.safetensors and OUT/atp.json."))
    _model_arg(a)
    _prompts_arg(a)
    a.add_argument("--direction", required=True, help="a directory written by `directions`")
    a.add_argument("--lang", default=None, help="the language whose prompts are patched (default: the direction's)")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--split", default=None, choices=SPLITS, help=_SPLIT_HELP)
    a.add_argument("--max-prompts", type=_positive, default=None, help="at most this many per label")
    a.add_argument("--batch-size", type=_positive, default=8)
    a.add_argument("--refusal-tokens", default=None, help="comma-separated refusal tokens (default: the direction's)")
    a.add_argument("--validate", type=int, default=8, metavar="K",
                   help="exactly patch the K largest and K random nodes to validate the estimates (0: skip)")
    a.set_defaults(func=cmd_atp)


def _add_harm(sub: _Sub) -> None:
    h = sub.add_parser("harm", help="per language: is harm recognised, and is it turned into refusal? (Zhao et al.)",
                       description=(
                           "Per language, a harmfulness direction at the instruction's last token and the refusal "
                           "direction at r̂'s site (differences in means over the train split), and on held-out test "
                           "prompts: how far each language separates harmful from harmless prompts along the base "
                           "language's harm direction and along r̂ (AUROC and retention, the gap relative to the "
                           "base language's), the directions' cosines, the refusal score's change when the harm "
                           "direction is added at the last instruction token (harmless prompts) and when r̂ is "
                           "ablated (harmful prompts), the per-head writes onto both, and one sentence per "
                           "language; 95% bootstrap intervals over prompts. Writes OUT/harm.json, "
                           "OUT/harm.safetensors and OUT/harm.html."))
    _model_arg(h)
    _prompts_arg(h)
    h.add_argument("--direction", required=True, help="a directory written by `directions` (its language is the base)")
    h.add_argument("--out", required=True, help="output directory")
    _langs_arg(h)
    h.add_argument("--harm-layer", type=int, default=None, help="the layer of the harm direction (default: r̂'s)")
    h.add_argument("--fit-prompts", type=_positive, default=defaults.HARM_FIT_PROMPTS,
                   help=f"at most this many train prompts per language and label for the directions (default: "
                        f"{defaults.HARM_FIT_PROMPTS})")
    h.add_argument("--max-prompts", type=_positive, default=None, help="at most this many test prompts per language "
                   "and label")
    h.add_argument("--n-boot", type=int, default=defaults.HARM_N_BOOT,
                   help=f"bootstrap resamples for the intervals (default: {defaults.HARM_N_BOOT})")
    h.add_argument("--no-heads", action="store_true", help="skip the per-head attribution (one pass per test prompt "
                   "and direction)")
    h.add_argument("--batch-size", type=_positive, default=defaults.HARM_BATCH_SIZE)
    h.add_argument("--refusal-tokens", default=None, help="comma-separated refusal tokens (default: the direction's)")
    h.set_defaults(func=cmd_harm)


def _add_subspace(sub: _Sub) -> None:
    s = sub.add_parser("subspace", help="per language: one refusal direction or a subspace? (Wollschläger et al.)",
                       description=(
                           "At r̂'s site, per language: a k-dimensional refusal subspace (top singular vectors of the "
                           "category-wise differences in means, train split), its principal angles to the base "
                           "language's (beside a disjoint-halves noise floor), and on held-out harmful prompts the "
                           "refusal score (the language's own tokens) with r̂, the base subspace, the shared "
                           "subspace, the own direction, and r̂ with the language's residual component or with a "
                           "random second dimension ablated; whether that residual induces refusal with r̂ gone; "
                           "one verdict per language, 95% bootstrap intervals. Writes OUT/subspace.json, "
                           "OUT/subspace.safetensors and OUT/subspace.html."))
    _model_arg(s)
    _prompts_arg(s)
    s.add_argument("--direction", required=True, help="a directory written by `directions` (its language is the base)")
    s.add_argument("--out", required=True, help="output directory")
    _langs_arg(s)
    s.add_argument("--k", type=int, default=defaults.SUBSPACE_K,
                   help=f"the subspaces' dimension (default: {defaults.SUBSPACE_K})")
    s.add_argument("--fit-prompts", type=_positive, default=defaults.HARM_FIT_PROMPTS,
                   help=f"at most this many train prompts per language and label (default: {defaults.HARM_FIT_PROMPTS})")
    s.add_argument("--max-prompts", type=_positive, default=None, help="at most this many test prompts per language "
                   "and label")
    s.add_argument("--n-boot", type=int, default=defaults.HARM_N_BOOT,
                   help=f"bootstrap resamples for the intervals (default: {defaults.HARM_N_BOOT})")
    s.add_argument("--batch-size", type=_positive, default=defaults.HARM_BATCH_SIZE)
    s.add_argument("--refusal-tokens", default=None, help="comma-separated refusal tokens (default: the direction's)")
    s.set_defaults(func=cmd_subspace)


def _add_compare(sub: _Sub) -> None:
    c = sub.add_parser("compare", help="English vs each language, paired by prompt id: where refusal diverges",
                       description=(
                           "Read an `attribute` directory and compare every language with the base language, "
                           "prompt by prompt (same id): per-head differences of the write onto r̂ with bootstrap "
                           "intervals and Benjamini-Hochberg-controlled significance, per layer and source span, "
                           "the layer from which the projections separate, how well r̂ separates harmful from "
                           "harmless prompts per language, baseline refusal, and how much of the gap the top heads "
                           "close when patched from the base run. Writes OUT/divergence.json."))
    c.add_argument("--attributions", required=True, help="a directory written by `attribute`")
    c.add_argument("--base", default=defaults.BASE_LANG, help=f"the base language (default: {defaults.BASE_LANG})")
    c.add_argument("--out", required=True, help="output directory")
    _langs_arg(c, "languages to compare (default: all but the base)")
    c.add_argument("--model", default=None, help="model spec for baseline refusal and patching (default: the "
                   "one the attributions came from)")
    _placement_args(c)
    c.add_argument("--direction", default=None, help="direction directory (default: the one recorded by attribute)")
    c.add_argument("--prompts", default=None, help="the prompts attributed (default: the ones recorded)")
    c.add_argument("--evaluation", default=None, help="an `evaluate` JSON with baseline refusal rates (default: "
                   f"generate {defaults.COMPARE_BASELINE_NEW_TOKENS} tokens on the attributed prompts)")
    c.add_argument("--patch-top-k", type=int, default=defaults.COMPARE_PATCH_TOP_K, metavar="K",
                   help="patch the K heads with the largest paired difference from the base run (0: skip)")
    c.add_argument("--totals", type=int, default=0, metavar="N",
                   help="also the total effect of every head and MLP, patched from the base run into each paired "
                        "translation, by attribution patching, validated against exact patching of the N largest and "
                        "N random nodes per language and metric (0: skip; costs about 10 + 4N forward passes per pair)")
    c.add_argument("--no-model", action="store_true", help="only what the attribution file gives (no baseline "
                   "refusal, no patching)")
    c.add_argument("--alpha", type=float, default=defaults.ALPHA,
                   help=f"false discovery rate across heads (default {defaults.ALPHA})")
    c.add_argument("--directions", action="store_true",
                   help="also extract every language's direction at r̂'s site (train split): cosine matrix across "
                        "layers, shared PCA, and the transfer matrix (each language's direction ablated on every "
                        "language's harmful test prompts, added on the harmless ones; first-token judge)")
    c.add_argument("--max-prompts", type=_positive, default=None,
                   help="with --directions: at most this many train prompts per language and label, and test "
                        "prompts per transfer cell")
    c.add_argument("--batch-size", type=_positive, default=defaults.BATCH_SIZE)
    c.set_defaults(func=cmd_compare)


def _add_report(sub: _Sub) -> None:
    r = sub.add_parser("report", help="rebuild report.html (and figures) from a finished `run` directory",
                       description="Rebuild OUT/report.html, OUT/figures/*.svg and OUT/results.json from the stage "
                                   "directories of a finished `run`, without the model.")
    r.add_argument("out", help="a directory written by `run`")
    r.set_defaults(func=cmd_report)


def _add_orthogonalize(sub: _Sub) -> None:
    o = sub.add_parser("orthogonalize", help="make the ablation permanent and export a Hugging Face model",
                       description=(
                           "Project the refusal direction out of every weight that writes into the residual "
                           "stream (embedding, attention and MLP outputs, their biases) and write a Hugging Face "
                           "model directory that transformers and refusal-circuits load."))
    _model_arg(o)
    o.add_argument("--direction", required=True, help="a directory written by `directions`")
    o.add_argument("--out", required=True, help="output model directory")
    o.set_defaults(func=cmd_orthogonalize)


def _add_check(sub: _Sub) -> None:
    k = sub.add_parser("check", help="run every self-check on a model: what is exact for it and what is refused",
                       description=(
                           "Compare every fast path with the plain computation, the chat-template positions with "
                           "the tokenizer's own template, attribution and DLA with what they must add up to, and "
                           "orthogonalized weights with hook ablation, on a few fixed prompts; print the table with "
                           "the package versions. Exit code 0 when nothing failed, 1 when something did."))
    _model_arg(k)
    k.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON to this file")
    k.set_defaults(func=cmd_check)


def build_parser() -> argparse.ArgumentParser:
    """The ``refusal-circuits`` parser; each subcommand's ``func`` runs it."""
    parser = _Parser(prog="refusal-circuits", description=(
        "Find, remove and explain the refusal direction of chat LLMs: which heads write it, at which token "
        "positions, in which language."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_run, _add_directions, _add_evaluate, _add_attribute, _add_atp, _add_harm, _add_subspace, _add_compare, _add_report,
                _add_orthogonalize, _add_check):
        add(sub)
    return parser
