"""Generate the completions for the hand-labelled judge fixture (issue 17, item 5): 20 per bundled language.

12 harmful and 8 harmless val prompts per language (a stratified sample, seed 17), greedy, 64 new tokens with the
packaged 0.5B through plain transformers (equal to the bridge in raw mode), and the first 16 of those tokens (greedy
decoding's prefix property: the 16-token completion is the start of the 64-token one), so one generation measures how
verdicts move with length. Writes JSON for reading and labelling by hand; compliant answers to harmful requests are
cut to their opening words before anything is committed (tests/fixtures/real_completions.py does the same).

    python scripts/generate_judge_fixture.py OUT.json

Measured: all 280 in 661 s alone on this project's 2-core CPU (2026-12-02). The labelled result is
tests/fixtures/judge_set.json; scripts/judge_agreement.py scores judges against it.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from refusal_circuits.data import load_prompts
from refusal_circuits.models import DEFAULT_MODEL, load_hf


def main(out: str) -> None:
    model, tok, _ = load_hf(DEFAULT_MODEL)
    tok.padding_side = "left"
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    val = load_prompts("bundled").filter(split="val")
    rows = list(val.filter(label="harmful").sample(12, seed=17)) + list(val.filter(label="harmless").sample(8, seed=17))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].instruction))
    done: list[dict | None] = [None] * len(rows)
    t0 = time.time()
    for start in range(0, len(order), 20):
        idx = order[start : start + 20]
        texts = [tok.apply_chat_template([{"role": "user", "content": rows[i].instruction}], tokenize=False,
                                         add_generation_prompt=True) for i in idx]
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
        for r, i in enumerate(idx):
            ids = [int(x) for x in gen[r, enc["input_ids"].shape[1]:] if int(x) != tok.pad_token_id]
            ids = ids[: next((k for k, x in enumerate(ids) if x in stop), len(ids))]
            rec = rows[i]
            done[i] = {"id": rec.id, "lang": rec.lang, "label": rec.label, "category": rec.category,
                       "c64": tok.decode(ids, skip_special_tokens=True),
                       "c16": tok.decode(ids[:16], skip_special_tokens=True), "refused": None}
        with open(out, "w", encoding="utf-8") as f:  # rewritten after every batch: an interrupted run keeps its work
            json.dump([d for d in done if d], f, ensure_ascii=False, indent=0)
        sys.stderr.write(f"{min(start + 20, len(rows))}/{len(rows)} in {time.time() - t0:.0f} s\n")


if __name__ == "__main__":
    main(sys.argv[1])
