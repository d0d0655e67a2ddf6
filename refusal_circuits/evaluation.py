"""Batched greedy generation (under any hooks) and refusal rates per language and label."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from refusal_circuits.chat import ChatFormat, chat_format, tokenize_chat
from refusal_circuits.data import LABELS, PromptSet
from refusal_circuits.judges import Judge, PhraseJudge
from refusal_circuits.models import hf_model_of, model_id


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding costs little."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def context_length(model: Any) -> int | None:
    n_ctx = getattr(model.cfg, "n_ctx", None)
    return int(n_ctx) if n_ctx else None


@torch.inference_mode()
def generate(
    model: Any,
    instructions: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    fmt: ChatFormat | None = None,
    adv_suffix: str | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy completions for chat-formatted ``instructions``, in input order.

    Any hooks registered on ``model`` (for example an intervention) act during generation: for a
    TransformerBridge the Hugging Face ``generate`` runs through the bridge's hook points, with its KV cache.
    Models without a Hugging Face twin fall back to a plain greedy loop without a cache.
    """
    tokenizer = model.tokenizer
    fmt = fmt or chat_format(tokenizer)
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in instructions]
    out: list[str] = [""] * len(instructions)
    hf = hf_model_of(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = length_buckets(lengths, batch_size)
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = tokenize_chat(tokenizer, [instructions[i] for i in idx], fmt=fmt, adv_suffix=adv_suffix,
                              max_length=context_length(model))
        ids, mask = batch.input_ids.to(_device(model)), batch.attention_mask.to(_device(model))
        if hf is not None:
            gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=pad_id, top_p=None, top_k=None, temperature=None)
        else:
            gen = _greedy_loop(model, ids, mask, max_new_tokens, tokenizer.eos_token_id)
        new = gen[:, ids.shape[1] :]
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(new[row], skip_special_tokens=True)
    return out


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _greedy_loop(model: Any, ids: torch.Tensor, mask: torch.Tensor, n: int, eos: int | None) -> torch.Tensor:
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(n):
        logits = model(ids, attention_mask=mask)
        nxt = logits[:, -1].argmax(-1)
        if eos is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
        if bool(done.all()):
            break
    return ids


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class GroupRate:
    """Refusal rate of one (language, label) group."""

    n: int
    refused: int

    @property
    def refusal_rate(self) -> float:
        return self.refused / self.n if self.n else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.refused, self.n)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.ci
        return {"n": self.n, "refusal_rate": self.refusal_rate, "ci_low": lo, "ci_high": hi}


@dataclass(frozen=True)
class Completion:
    id: str
    lang: str
    label: str
    completion: str
    refused: bool


@dataclass(frozen=True)
class RefusalEvaluation:
    """Refusal rates per language × label, with every completion and its provenance."""

    model: str
    intervention: str
    judge: str
    results: dict[str, dict[str, GroupRate]]
    completions: tuple[Completion, ...] = field(repr=False)
    prompts_sha256: str = ""
    max_new_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "intervention": self.intervention,
            "judge": self.judge,
            "prompts_sha256": self.prompts_sha256,
            "max_new_tokens": self.max_new_tokens,
            "results": {lang: {lab: g.to_dict() for lab, g in groups.items()} for lang, groups in self.results.items()},
            "completions": [c.__dict__ for c in self.completions],
        }

    def rate(self, lang: str, label: str) -> float:
        return self.results[lang][label].refusal_rate

    def _repr_html_(self) -> str:
        rows = []
        for lang, groups in self.results.items():
            cells = []
            for lab in LABELS:
                g = groups.get(lab)
                if g is None:
                    cells.append("<td>–</td>")
                    continue
                lo, hi = g.ci
                cells.append(f"<td>{g.refusal_rate:.0%} <small>[{lo:.0%}, {hi:.0%}] n={g.n}</small></td>")
            rows.append(f"<tr><td>{html.escape(lang)}</td>{''.join(cells)}</tr>")
        return (f"<b>Refusal rates</b> · {html.escape(self.model)} · intervention: {html.escape(self.intervention)}"
                f" · judge: {html.escape(self.judge)}<table><tr><th>lang</th><th>harmful</th><th>harmless</th></tr>"
                f"{''.join(rows)}</table>")


def evaluate_refusal(
    model: Any,
    prompts: PromptSet,
    *,
    judge: Judge | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    intervention: str = "none",
    progress: bool = True,
) -> RefusalEvaluation:
    """Generate greedily for every prompt and judge refusal; rates per (language, label).

    Hooks already registered on the model (an intervention's context manager) apply; ``intervention`` only
    names them in the record.
    """
    judge = judge or PhraseJudge()
    records = list(prompts)
    texts = generate(model, [r.instruction for r in records], max_new_tokens=max_new_tokens,
                     batch_size=batch_size, progress=progress, desc=f"generate ({intervention})")
    verdicts = judge.judge(texts, [r.lang for r in records])
    counts: dict[str, dict[str, list[int]]] = {}
    completions = []
    for r, text, refused in zip(records, texts, verdicts, strict=True):
        c = counts.setdefault(r.lang, {}).setdefault(r.label, [0, 0])
        c[0] += 1
        c[1] += int(refused)
        completions.append(Completion(r.id, r.lang, r.label, text, bool(refused)))
    results = {lang: {lab: GroupRate(n, k) for lab, (n, k) in groups.items()} for lang, groups in counts.items()}
    return RefusalEvaluation(model_id(model), intervention, judge.name, results, tuple(completions),
                             prompts.sha256, max_new_tokens)
