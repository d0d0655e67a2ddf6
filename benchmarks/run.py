"""Speed and memory of refusal_circuits against a plain Hugging Face forward pass, measured in one process.

    python benchmarks/run.py --json bench.json [--model packaged:qwen2.5-coder-0.5b-instruct] [--repeats 3]

Every ratio compares two things measured here, on the same fixed batch (the first 16 harmful and 16 harmless
English test prompts of the bundled set), as the median of ``--repeats`` runs:

* ``collect_vs_forward``: streaming the mean ``resid_pre`` at every layer and post-instruction position (what
  direction extraction does) vs a plain Hugging Face forward (full logits).
* ``attribute_vs_forward``: :func:`refusal_circuits.attribution.attribute` (every head, MLP and the embedding at
  every position, source spans, DLA) vs the plain forward.
* ``attribute_speedup_vs_naive`` / ``attribute_memory_saving_vs_naive``: against the naive TransformerLens route,
  ``run_with_cache`` of everything, ``cache.stack_head_results()`` (per-head ``d_model`` outputs), then project
  on r̂ (the head scores of both routes are compared, so the ratio is between equal answers).
* ``attribute_peak_rss_vs_hf``: peak resident memory above the loaded model during attribution vs during the plain
  forward.
* ``generate_ablate_vs_plain``: greedy generation of 32 new tokens with r̂ ablated (hooks on every residual
  write, through the bridge's hook points), as ``evaluate`` runs it (the template prefix once, shared through
  the key-value cache), vs plain Hugging Face ``generate`` on the same batch.
* ``atp_vs_forward``: attribution patching (:func:`refusal_circuits.atp.attribution_patching`: every head and MLP
  at every post-instruction token, two metrics, the harmful half patched with the harmless half's mean, its
  run-time check included) vs the plain forward of the whole batch; ``atp_speedup_vs_exact``: exact activation
  patching of every one of those nodes (one patched pass over the harmful half each, timed on 4 nodes and scaled
  to all) vs attribution patching.
* ``selection_seconds_per_candidate``: bypass, induce and KL scores of 4 candidates (2 layers x 2 positions) on
  16 + 16 prompts, per candidate.

Every step runs in a fresh process that loads the model and then measures: memory is the peak resident set size
of the step's first call (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident size after
loading (freed heap handed back with ``malloc_trim``): memory above the loaded model. Times are the median of
``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS, so resident size measures what is in use (glibc only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Peak memory of the first call above the resident size before it (MiB), and the median time of all calls.

    Run in a fresh process that has only loaded the model (see ``--step``): then "before" is the loaded model,
    and the heap holds no free memory left by an earlier step that would hide this step's own allocations.
    """
    gc.collect()
    _malloc_trim()
    can_reset = _reset_peak()
    before = _rss_kib("VmRSS")
    times = []
    out = None
    for i in range(repeats):
        out = None
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = (_rss_kib("VmHWM") - before) / 1024 if can_reset else float("nan")
    return {"seconds": statistics.median(times), "peak_mib_above": peak, "times": times, "result": out}


STEPS = ("forward", "collect", "attribute", "atp", "exact_patch", "generate", "generate_ablate", "selection", "naive",
         "study")
#: The languages of the ``study`` step (the default ``run`` on three languages, measured once, end to end).
STUDY_LANGS = "en,de,ja"


def run_step(name: str, spec: str, n_prompts: int, repeats: int, scores_path: str | None) -> dict[str, Any]:
    """Load the model, build the fixed batch and direction, measure one step (in this process)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import refusal_circuits as rc
    from refusal_circuits.activations import mean_resid_pre
    from refusal_circuits.attribution import attribute
    from refusal_circuits.compat import cache_kwargs
    from refusal_circuits.data import PromptSet, load_bundled
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.forward import batches, prefix_continuation, shared_prefix_length
    from refusal_circuits.models import model_id
    from refusal_circuits.selection import score_candidates

    torch.set_grad_enabled(False)
    test = load_bundled(["en"]).filter(split="test")
    half = n_prompts // 2
    prompts = PromptSet(tuple(test.filter(label="harmful"))[:half] + tuple(test.filter(label="harmless"))[:half],
                        test.source)
    instructions = prompts.instructions
    if name in PLAIN_STEPS:
        return _plain_step(name, spec, instructions, repeats)
    model = rc.load_model(spec)
    hf = model.original_model
    # One padded batch of exactly these prompts, as the plain forward sees it.
    (rows, batch), = list(batches(model, instructions, len(instructions)))  # rows: input index of each batch row
    # A fixed direction: the difference in means at 2/3 depth, last template token.
    layer = 2 * int(model.cfg.n_layers) // 3
    means_h = mean_resid_pre(model, prompts.filter(label="harmful").instructions, layers=[layer], progress=False)
    means_l = mean_resid_pre(model, prompts.filter(label="harmless").instructions, layers=[layer], progress=False)
    r = (means_h.mean[-1, 0] - means_l.mean[-1, 0]).float()
    r = r / r.norm()
    tok = model.tokenizer
    refusal = rc.refusal_tokens_from_strings(tok, ["I"])
    compliance = [tok(x, add_special_tokens=False)["input_ids"][0] for x in ("To", "Sure", "Here")]
    gen_kwargs = _gen_kwargs(tok)
    sel_harmful = prompts.filter(label="harmful").instructions[:16]
    sel_harmless = prompts.filter(label="harmless").instructions[:16]
    cands = extract_candidates(model, sel_harmful, sel_harmless, progress=False) if name == "selection" else None
    mid = int(model.cfg.n_layers) // 2

    def collect():
        return mean_resid_pre(model, instructions, batch_size=len(instructions), progress=False)

    def attribute_():
        return attribute(model, r, prompts, refusal_tokens=refusal, compliance_tokens=compliance,
                         batch_size=len(instructions), progress=False)

    def generate_ablate():
        # What `evaluate` does under an intervention: the shared template prefix once, every row's prefill and
        # decoding from its cache (refusal_circuits.evaluation.generate_ids), here with a fixed 32 new tokens.
        with rc.ablate(model, r):
            cont = prefix_continuation(model, batch, shared_prefix_length(batch))
            return hf.generate(input_ids=cont.full_input_ids, attention_mask=cont.attention_mask,
                               **cache_kwargs(hf, cont.cache), **gen_kwargs)

    def selection():
        assert cands is not None
        return score_candidates(model, cands, sel_harmful, sel_harmless, list(refusal.ids), positions=[-1, -2],
                                layers=[mid - 1, mid], progress=False)

    def naive():
        _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask)
        stacked = cache.stack_head_results(layer=-1)  # [layer * head, batch, pos, d_model]
        return stacked @ r

    harmful_half = prompts.filter(label="harmful").instructions
    harmless_half = prompts.filter(label="harmless").instructions
    direction = rc.Direction(vector=r, norm=1.0, layer=layer, position=-1, model=model_id(model), lang="en",
                             n_harmful=half, n_harmless=half, prompts_sha256="")

    def atp():
        from refusal_circuits.atp import attribution_patching

        with torch.enable_grad():
            return attribution_patching(model, direction, harmful_half, harmless_half, list(refusal.ids),
                                        batch_size=half, progress=False)

    def exact_patch():
        # Four single-node patches, each one patched pass over the harmful half, as validate_atp runs them.
        from refusal_circuits.atp import _patch_for, _references
        from refusal_circuits.patching import prompt_run

        n_post = rc.chat_format(tok).n_post
        ref_z, ref_m = _references(model, harmless_half, n_post, half, paired=False)
        for node in (("head", layer - 1, 0, n_post - 1), ("head", 1, 1, n_post - 2), ("mlp", mid, -1, n_post - 1),
                     ("head", mid, 2, n_post - 1)):
            prompt_run(model, direction, harmful_half, list(refusal.ids),
                       patch_for=_patch_for(model, node, ref_z, ref_m, False, n_post), batch_size=half)

    fns = {"collect": collect, "attribute": attribute_, "atp": atp, "exact_patch": exact_patch,
           "generate_ablate": generate_ablate, "selection": selection, "naive": naive}
    with torch.inference_mode():
        hf(input_ids=batch.input_ids[:1, -4:])  # warm the thread pool the same small way before every step
    if name == "atp":  # gradients: outside inference mode
        m = measure(fns[name], repeats)
    else:
        with torch.inference_mode():
            m = measure(fns[name], repeats)
    result = m.pop("result")
    extra: dict[str, Any] = {"tokens": int(batch.attention_mask.sum()), "padded_len": int(batch.input_ids.shape[1])}
    if name == "selection":
        extra["candidates"] = len(result[0])
    if name == "atp":
        extra["nodes"] = int(result.heads["score"][0].numel() + result.mlps["score"][0].numel())
        extra["linear_check_error"] = result.linear_check
    if name == "attribute":
        extra["completeness_error"] = result.completeness_error()
    if scores_path and name in ("attribute", "naive"):
        from safetensors.torch import save_file

        from refusal_circuits.io import atomic_path

        n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
        s_len = batch.input_ids.shape[1]
        if name == "naive":
            scores = result.view(n_layers, n_heads, *result.shape[1:]).float()
        else:
            scores = result.heads[rows][..., -s_len:].permute(1, 2, 0, 3).contiguous()
        with atomic_path(scores_path) as tmp:
            save_file({"scores": scores.contiguous(), "mask": batch.attention_mask.contiguous()}, str(tmp))
    return {**m, **extra}


#: Steps measured on a plain Hugging Face model, loaded without TransformerLens: the bridge wraps the Hugging Face
#: modules it shares in place, so its ``original_model`` is no longer plain.
PLAIN_STEPS = ("forward", "generate")


def _gen_kwargs(tok: Any) -> dict[str, Any]:
    return {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False, "pad_token_id": tok.pad_token_id,
            "top_p": None, "top_k": None, "temperature": None}


def _plain_step(name: str, spec: str, instructions: list[str], repeats: int) -> dict[str, Any]:
    """The reference: ``transformers`` alone, on the same padded batch (full logits, as a plain forward gives)."""
    from refusal_circuits.chat import tokenize_chat
    from refusal_circuits.models import load_hf

    hf, tok, _ = load_hf(spec)
    hf.eval()
    batch = tokenize_chat(tok, instructions)  # the same padded rows as `batches` gives the other steps

    def forward():
        return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False).logits[:, -1].clone()

    def generate():
        return hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **_gen_kwargs(tok))

    with torch.inference_mode():
        hf(input_ids=batch.input_ids[:1, -4:])  # warm the thread pool the same small way before every step
        m = measure({"forward": forward, "generate": generate}[name], repeats)
    m.pop("result")
    return {**m, "tokens": int(batch.attention_mask.sum()), "padded_len": int(batch.input_ids.shape[1]),
            "model": "transformers alone (no TransformerLens)"}


def _study_step(spec: str, tmpdir: str) -> dict[str, Any]:
    """The default ``refusal-circuits run`` on :data:`STUDY_LANGS`, from a fresh output directory, once (the
    study takes minutes; its stages are cached, so a repeat in the same directory would measure nothing)."""
    import subprocess

    out = Path(tmpdir) / "study"
    cmd = [sys.executable, "-m", "refusal_circuits.cli", "-q", "run", "--model", spec, "--langs", STUDY_LANGS,
           "--out", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit("step study failed")
    stages = json.loads((out / "results.json").read_text())["seconds"]
    return {"seconds": seconds, "langs": STUDY_LANGS, "stages": stages, "times": [seconds]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--model", default=None, help="model spec (default: the packaged 0.5B)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="prompts in the fixed batch (half harmful)")
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive TransformerLens route")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--step", choices=STEPS, default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--scores", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from refusal_circuits.models import DEFAULT_MODEL

    spec = args.model or DEFAULT_MODEL
    if args.step:
        print(json.dumps(run_step(args.step, spec, args.batch, args.repeats, args.scores)))
        return 0

    import subprocess
    import tempfile

    raw: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        chosen = [x for x in args.steps.split(",") if x] + ["forward"]  # every ratio is against the forward
        unknown = sorted(set(chosen) - set(STEPS))
        if unknown:
            raise SystemExit(f"--steps: unknown {unknown}; choose from {', '.join(STEPS)}")
        for name in STEPS:
            if name not in chosen or (name == "naive" and args.skip_naive):
                continue
            print(f"measuring {name} (fresh process) ...", file=sys.stderr, flush=True)
            if name == "study":
                raw[name] = _study_step(spec, tmpdir)
                continue
            cmd = [sys.executable, __file__, "--json", "-", "--step", name, "--model", spec, "--batch",
                   str(args.batch), "--repeats", str(args.repeats), "--scores", str(Path(tmpdir) / f"{name}.st")]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"step {name} failed")
            raw[name] = json.loads(done.stdout.strip().splitlines()[-1])
        equal = None
        if "naive" in raw and "attribute" in raw:
            from safetensors.torch import load_file

            a, b = load_file(str(Path(tmpdir) / "attribute.st")), load_file(str(Path(tmpdir) / "naive.st"))
            m = a["mask"].bool()[None, None].expand_as(a["scores"])
            equal = float((a["scores"] - b["scores"])[m].abs().max())
    fwd = raw["forward"]
    ratios: dict[str, float] = {}
    if "collect" in raw:
        ratios["collect_vs_forward"] = raw["collect"]["seconds"] / fwd["seconds"]
    if "attribute" in raw:
        ratios["attribute_vs_forward"] = raw["attribute"]["seconds"] / fwd["seconds"]
        ratios["attribute_peak_rss_vs_hf"] = raw["attribute"]["peak_mib_above"] / fwd["peak_mib_above"]
    if "generate" in raw and "generate_ablate" in raw:
        ratios["generate_ablate_vs_plain"] = raw["generate_ablate"]["seconds"] / raw["generate"]["seconds"]
    if "atp" in raw:
        ratios["atp_vs_forward"] = raw["atp"]["seconds"] / fwd["seconds"]
        if "exact_patch" in raw:
            ratios["atp_speedup_vs_exact"] = raw["exact_patch"]["seconds"] / 4 * raw["atp"]["nodes"] / raw["atp"]["seconds"]
    if "selection" in raw:
        ratios["selection_seconds_per_candidate"] = raw["selection"]["seconds"] / raw["selection"]["candidates"]
    if "study" in raw:
        ratios["study_seconds"] = raw["study"]["seconds"]
    if "naive" in raw and "attribute" in raw:
        ratios["attribute_speedup_vs_naive"] = raw["naive"]["seconds"] / raw["attribute"]["seconds"]
        ratios["attribute_memory_saving_vs_naive"] = raw["naive"]["peak_mib_above"] / raw["attribute"]["peak_mib_above"]
    results = {
        "model": spec, "batch": args.batch, "tokens": fwd["tokens"], "padded_len": fwd["padded_len"],
        "repeats": args.repeats, "ratios": ratios, "naive_vs_ours_max_abs_diff": equal,
        "attribute_completeness_error": raw.get("attribute", {}).get("completeness_error"),
        "machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "raw": raw,
    }
    out = Path(args.json)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
