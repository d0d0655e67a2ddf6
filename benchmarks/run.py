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
  write, through the bridge's hook points) vs plain Hugging Face ``generate`` on the same batch.
* ``selection_seconds_per_candidate``: bypass, induce and KL scores of 4 candidates (2 layers x 2 positions) on
  16 + 16 prompts, per candidate.

Memory is the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` before each step) minus
the resident size just before the step: memory above the loaded model.
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


def measure(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Median wall time and median peak memory above the starting resident size (MiB) of ``fn``."""
    times, peaks = [], []
    out = None
    for _ in range(repeats):
        out = None
        gc.collect()
        can_reset = _reset_peak()
        before = _rss_kib("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        peaks.append((_rss_kib("VmHWM") - before) / 1024 if can_reset else float("nan"))
    return {"seconds": statistics.median(times), "peak_mib_above": statistics.median(peaks), "times": times,
            "peaks_mib": peaks, "result": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--model", default=None, help="model spec (default: the packaged 0.5B)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="prompts in the fixed batch (half harmful)")
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive TransformerLens route")
    args = parser.parse_args(argv)

    os.environ.setdefault("TQDM_DISABLE", "1")
    import refusal_circuits as rc
    from refusal_circuits.activations import mean_resid_pre
    from refusal_circuits.attribution import attribute
    from refusal_circuits.data import PromptSet, load_bundled
    from refusal_circuits.forward import batches
    from refusal_circuits.models import DEFAULT_MODEL

    torch.set_grad_enabled(False)
    spec = args.model or DEFAULT_MODEL
    t0 = time.perf_counter()
    model = rc.load_model(spec)
    load_s = time.perf_counter() - t0
    hf = model.original_model
    test = load_bundled(["en"]).filter(split="test")
    half = args.batch // 2
    prompts = PromptSet(tuple(test.filter(label="harmful"))[:half] + tuple(test.filter(label="harmless"))[:half],
                        test.source)
    instructions = prompts.instructions
    # One padded batch of exactly these prompts, as the plain forward sees it.
    (rows, batch), = list(batches(model, instructions, len(instructions)))  # rows: input index of each batch row
    n_tokens = int(batch.attention_mask.sum())
    # A fixed direction for timing: the difference in means at layer 2/3 depth, last template token.
    layer = 2 * int(model.cfg.n_layers) // 3
    means_h = mean_resid_pre(model, prompts.filter(label="harmful").instructions, layers=[layer], progress=False)
    means_l = mean_resid_pre(model, prompts.filter(label="harmless").instructions, layers=[layer], progress=False)
    r = (means_h.mean[-1, 0] - means_l.mean[-1, 0]).float()
    r = r / r.norm()
    tok = model.tokenizer
    refusal = rc.refusal_tokens_from_strings(tok, ["I"])
    compliance = [tok(s, add_special_tokens=False)["input_ids"][0] for s in ("To", "Sure", "Here")]

    def plain_forward():
        with torch.inference_mode():
            return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, use_cache=False).logits[:, -1].clone()

    def collect():
        return mean_resid_pre(model, instructions, batch_size=len(instructions), progress=False)

    def ours():
        return attribute(model, r, prompts, refusal_tokens=refusal, compliance_tokens=compliance,
                         batch_size=len(instructions), progress=False)

    def plain_generate():
        with torch.inference_mode():
            return hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=32,
                               do_sample=False, pad_token_id=tok.pad_token_id, top_p=None, top_k=None,
                               temperature=None, min_new_tokens=32)

    def ablated_generate():
        with torch.inference_mode(), rc.ablate(model, r):
            return hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=32,
                               do_sample=False, pad_token_id=tok.pad_token_id, top_p=None, top_k=None,
                               temperature=None, min_new_tokens=32)

    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.selection import score_candidates

    sel_harmful = prompts.filter(label="harmful").instructions[:16]
    sel_harmless = prompts.filter(label="harmless").instructions[:16]
    cands = extract_candidates(model, sel_harmful, sel_harmless, progress=False)
    mid = int(model.cfg.n_layers) // 2

    def selection():
        return score_candidates(model, cands, sel_harmful, sel_harmless, list(refusal.ids), positions=[-1, -2],
                                layers=[mid - 1, mid], progress=False)

    def naive():
        with torch.inference_mode():
            _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask)
            stacked = cache.stack_head_results(layer=-1)  # [layer * head, batch, pos, d_model]
            scores = stacked @ r
            del stacked, cache
        return scores

    results: dict[str, Any] = {
        "model": spec, "batch": len(instructions), "tokens": n_tokens, "padded_len": int(batch.input_ids.shape[1]),
        "repeats": args.repeats, "load_seconds": load_s, "torch_threads": torch.get_num_threads(),
        "machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                    "torch": torch.__version__}}
    steps = {"forward": plain_forward, "collect": collect, "attribute": ours, "generate": plain_generate,
             "generate_ablate": ablated_generate, "selection": selection}
    if not args.skip_naive:
        steps["naive"] = naive
    raw: dict[str, dict[str, Any]] = {}
    plain_forward()  # warm-up (allocator, thread pool)
    for name, fn in steps.items():
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        raw[name] = measure(fn, args.repeats)
    fwd = raw["forward"]
    ratios = {
        "collect_vs_forward": raw["collect"]["seconds"] / fwd["seconds"],
        "attribute_vs_forward": raw["attribute"]["seconds"] / fwd["seconds"],
        "attribute_peak_rss_vs_hf": raw["attribute"]["peak_mib_above"] / max(fwd["peak_mib_above"], 1e-9),
        "generate_ablate_vs_plain": raw["generate_ablate"]["seconds"] / raw["generate"]["seconds"],
        "selection_seconds_per_candidate": raw["selection"]["seconds"] / len(raw["selection"]["result"][0]),
    }
    attribution = raw["attribute"]["result"]
    results["attribute_completeness_error"] = attribution.completeness_error()
    if "naive" in raw:
        ratios["attribute_speedup_vs_naive"] = raw["naive"]["seconds"] / raw["attribute"]["seconds"]
        ratios["attribute_memory_saving_vs_naive"] = (raw["naive"]["peak_mib_above"]
                                                      / max(raw["attribute"]["peak_mib_above"], 1e-9))
        # Same answer from both routes: naive scores [layer * head, batch, pos] vs ours [prompt, layer, head, pos].
        n_layers, n_heads = attribution.n_layers, attribution.n_heads
        naive_scores = raw["naive"]["result"].view(n_layers, n_heads, *raw["naive"]["result"].shape[1:])
        s = batch.input_ids.shape[1]
        ours_scores = attribution.heads[rows][..., -s:].permute(1, 2, 0, 3)
        m = batch.attention_mask.bool()[None, None].expand_as(naive_scores)
        results["naive_vs_ours_max_abs_diff"] = float((naive_scores.float() - ours_scores)[m].abs().max())
    results["ratios"] = ratios
    results["raw"] = {k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in raw.items()}
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
