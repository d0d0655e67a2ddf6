"""Batched greedy generation (under any hooks) and refusal rates per language and label."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from refusal_circuits import fastpaths
from refusal_circuits import forward as fwd
from refusal_circuits.backends import Generator
from refusal_circuits.chat import ChatBatch, ChatFormat
from refusal_circuits.compat import cache_kwargs
from refusal_circuits.data import LABELS, PromptSet
from refusal_circuits.forward import batches
from refusal_circuits.judges import Judge, PhraseJudge
from refusal_circuits.models import hf_model_of, model_id
from refusal_circuits.stats import Rate
from refusal_circuits.stats import wilson_interval as wilson_interval  # re-exported: its former home

if TYPE_CHECKING:
    from refusal_circuits.scores import RefusalTokens


@torch.inference_mode()
def generate_ids(
    model: Any,
    instructions: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    fmt: ChatFormat | None = None,
    adv_suffix: str | None = None,
    progress: bool = True,
    desc: str = "generate",
    first_logits: list[torch.Tensor | None] | None = None,
) -> list[list[int]]:
    """Greedy new token ids for chat-formatted ``instructions``, in input order (padding after EOS removed).

    Any hooks registered on ``model`` (for example an intervention) act during generation: for a
    TransformerBridge the Hugging Face ``generate`` runs through the bridge's hook points, with its KV cache.
    Models without a Hugging Face twin fall back to a plain greedy loop without a cache. Pass a list as
    ``first_logits`` to receive each prompt's first-step logits (float32 ``[vocab]``, in input order; the
    refusal score needs no second forward pass then).
    """
    tokenizer = model.tokenizer
    out: list[list[int]] = [[] for _ in instructions]
    if first_logits is not None:
        first_logits[:] = [None] * len(instructions)
    hf = hf_model_of(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model)
    for idx, batch in batches(model, instructions, batch_size, fmt=fmt, adv_suffix=adv_suffix, progress=progress,
                              desc=desc):
        ids, mask = batch.input_ids, batch.attention_mask
        if hf is not None and _cached_generation_holds(model, batch, pad_id):
            step_logits, gen = _cached_generate(model, batch, max_new_tokens, pad_id, first_logits is not None)
        elif hf is not None:  # the cache-free reference: slower, and right whatever the cache does
            gen, step_logits = _uncached_greedy(hf, ids, mask, max_new_tokens)
        else:
            gen, step_logits = _greedy_loop(model, ids, mask, max_new_tokens, tokenizer.eos_token_id), None
        if first_logits is not None and step_logits is not None:
            for row, i in enumerate(idx):
                first_logits[i] = step_logits[0][row].float().cpu()
        for row, i in enumerate(idx):
            new = gen[row, ids.shape[1] :].tolist()
            cut = next((j for j, t in enumerate(new) if t in eos), None)
            out[i] = new if cut is None else new[: cut + 1]
    return out


def _cached_generate(model: Any, batch: ChatBatch, max_new_tokens: int, pad_id: int | None, logits: bool
                     ) -> tuple[Any, torch.Tensor]:
    """Hugging Face ``generate`` with its key-value cache, prefilled from the shared template prefix where the
    model allows it; returns ``(logits per step or None, sequences)``, the sequences in the batch's own layout."""
    hf = hf_model_of(model)
    assert hf is not None, "cached generation needs a Hugging Face twin"
    ids, mask, extra = batch.input_ids, batch.attention_mask, {}
    if n_prefix := fwd.shared_prefix(model, batch):
        # The template prefix runs once (interventions apply to it); every row's prefill starts after it.
        cont = fwd.prefix_continuation(model, batch, n_prefix)
        ids, mask, extra = cont.full_input_ids, cont.attention_mask, cache_kwargs(hf, cont.cache)
    res = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=pad_id, top_p=None, top_k=None, temperature=None, output_logits=logits,
                      return_dict_in_generate=True, **extra)
    # With a shared prefix the rows were re-laid (prefix, then pads, then the rest): same width, so the new tokens
    # start at the same column as in the batch.
    return (res.logits if logits else None), res.sequences


@torch.inference_mode()
def _uncached_greedy(hf: Any, ids: torch.Tensor, mask: torch.Tensor, n: int
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding with a full forward pass per step and no cache: ``(sequences, logits per step)``."""
    from refusal_circuits.chat import position_ids

    steps: list[torch.Tensor] = []
    for _ in range(n):
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits[:, -1]
        steps.append(logits)
        nxt = logits.argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
    return ids, steps


def _cached_generation_holds(model: Any, batch: ChatBatch, pad_id: int | None) -> bool:
    """Whether generation may use Hugging Face ``generate`` with its key-value cache (and the shared prefix).

    Checked once per model: the first time, the batch's first two rows generate four greedy tokens through the
    cached path and through :func:`_uncached_greedy` (a full forward pass per step, no cache at all; both under the
    hooks registered now). Their step logits must agree up to and including the first step at which a token differs
    (:func:`~refusal_circuits.fastpaths.generation_error`). A mismatch switches the cached path off for the model.
    """
    known = fastpaths.allowed(model, fastpaths.GENERATE)
    if known is not None:
        return known
    small = fwd.first_rows(batch, 2)
    width = small.input_ids.shape[1]
    fast_logits, fast_seq = _cached_generate(model, small, 4, pad_id, True)
    plain_seq, plain_logits = _uncached_greedy(hf_model_of(model), small.input_ids, small.attention_mask, 4)
    a, b = fastpaths.generation_error((fast_seq[:, width:], fast_logits), (plain_seq[:, width:], plain_logits))
    return fastpaths.record(model, fastpaths.GENERATE, a, b, n_terms=fastpaths.n_terms(model), n_prompts=len(small))


def _eos_ids(model: Any) -> set[int]:
    eos: set[int] = set()
    hf = hf_model_of(model)
    gen_eos = getattr(getattr(hf, "generation_config", None), "eos_token_id", None)
    for value in (model.tokenizer.eos_token_id, gen_eos):
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(int(v) for v in value)
    return eos


def generate(model: Any, instructions: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 16,
             fmt: ChatFormat | None = None, adv_suffix: str | None = None, progress: bool = True,
             desc: str = "generate") -> list[str]:
    """Greedy completions (text) for chat-formatted ``instructions``, in input order; see :func:`generate_ids`."""
    ids = generate_ids(model, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size, fmt=fmt,
                       adv_suffix=adv_suffix, progress=progress, desc=desc)
    return [model.tokenizer.decode(row, skip_special_tokens=True) for row in ids]


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


class GroupRate(Rate):
    """The former name of :class:`~refusal_circuits.stats.Rate` for a (language, label) group of the evaluation,
    with its former argument order ``(n, refused, refusal_score)``; new code builds a ``Rate(k, n, ...)``."""

    def __init__(self, n: int, refused: int, refusal_score: float | None = None) -> None:
        super().__init__(refused, n, refusal_score)


@dataclass(frozen=True)
class Completion:
    id: str
    lang: str
    label: str
    completion: str
    refused: bool
    first_token: int | None = None  # the greedy first token's id (None from a generator backend)


@dataclass(frozen=True)
class RefusalEvaluation:
    """Refusal rates per language × label, with every completion and its provenance."""

    model: str
    intervention: str
    judge: str
    results: dict[str, dict[str, Rate]]
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
    refusal_tokens: RefusalTokens | None = None,
    generator: Generator | None = None,
    progress: bool = True,
) -> RefusalEvaluation:
    """Generate greedily for every prompt and judge refusal; rates per (language, label).

    Hooks already registered on the model (an intervention's context manager) apply; ``intervention`` only
    names them in the record. With ``refusal_tokens`` each group also gets its mean first-token refusal score
    (log-odds, see :mod:`refusal_circuits.scores`). ``generator`` replaces the model's own generation (e.g. a
    :class:`~refusal_circuits.backends.VLLMGenerator` serving an orthogonalized export); hooks do not reach it.
    """
    from refusal_circuits.scores import first_token_logits, refusal_score

    judge = judge or PhraseJudge()
    records = list(prompts)
    if generator is not None:
        texts: list[str] = list(generator([r.instruction for r in records], max_new_tokens=max_new_tokens))
        if len(texts) != len(records):
            raise ValueError(f"generator {generator.name!r} returned {len(texts)} completions for {len(records)} prompts")
    first: list[torch.Tensor | None] = []
    ids: list[list[int]] = []
    if generator is None:
        ids = generate_ids(model, [r.instruction for r in records], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress, desc=f"generate ({intervention})",
                           first_logits=first if refusal_tokens is not None else None)
        texts = [model.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    verdicts = judge.judge(texts, [r.lang for r in records])
    scores: list[float] = []
    if refusal_tokens is not None:
        if first and all(x is not None for x in first):
            logits = torch.stack([x for x in first if x is not None])  # generation's own first step
        else:
            logits = first_token_logits(model, [r.instruction for r in records], batch_size=batch_size)
        scores = [float(refusal_score(logits[i : i + 1], refusal_tokens.for_lang(r.lang))[0])
                  for i, r in enumerate(records)]
    counts: dict[str, dict[str, list[float]]] = {}
    completions = []
    for i, (r, text, refused) in enumerate(zip(records, texts, verdicts, strict=True)):
        c = counts.setdefault(r.lang, {}).setdefault(r.label, [0, 0, 0.0])
        c[0] += 1
        c[1] += int(refused)
        c[2] += scores[i] if scores else 0.0
        completions.append(Completion(r.id, r.lang, r.label, text, bool(refused),
                                      int(ids[i][0]) if ids and ids[i] else None))
    results = {lang: {lab: Rate(int(k), int(n), sc / n if scores else None)
                      for lab, (n, k, sc) in groups.items()} for lang, groups in counts.items()}
    name = model_id(model) if model is not None else str(getattr(generator, "model", "unknown"))
    return RefusalEvaluation(name, intervention, judge.name, results, tuple(completions),
                             prompts.sha256, max_new_tokens)


@torch.inference_mode()
def capability_cost(model: Any, instructions: Sequence[str],
                    intervention: Callable[[], AbstractContextManager[Any]], *, max_new_tokens: int = 32,
                    batch_size: int = 32, progress: bool = True) -> dict[str, float]:
    """What an intervention costs on harmless prompts: next-token KL and completion cross-entropy.

    ``intervention`` makes a fresh context manager each call (e.g. ``lambda: ablate(model, r)``). The
    cross-entropy is teacher-forced on the *unintervened* model's own greedy completions, with and without the
    intervention, so both numbers score the same tokens.
    """
    from refusal_circuits.scores import completion_cross_entropy, first_token_logits, kl_divergence

    base_logits = first_token_logits(model, instructions, batch_size=batch_size)
    completions = generate_ids(model, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=progress, desc="generate (capability baseline)")
    ce_base = completion_cross_entropy(model, instructions, completions, batch_size=batch_size)
    with intervention():
        new_logits = first_token_logits(model, instructions, batch_size=batch_size)
        ce_new = completion_cross_entropy(model, instructions, completions, batch_size=batch_size)
    return {"kl_harmless": float(kl_divergence(base_logits, new_logits).mean()),
            "ce_harmless_base": ce_base, "ce_harmless_intervened": ce_new, "n_harmless": len(instructions)}


def evaluate_with_scores(model: Any, prompts: PromptSet, refusal_tokens: RefusalTokens | None, *,
                         intervention: Callable[[], AbstractContextManager[Any]] | None = None,
                         intervention_name: str = "none", judge: Judge | None = None, max_new_tokens: int = 32,
                         batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
    """The ``evaluate`` command's JSON: refusal rates and scores per language x label under an intervention,
    every completion, and (under an intervention) its capability cost on the harmless prompts. Without refusal
    tokens (None, or none discovered) the refusal scores are left out and the rates still come from the judge."""
    import contextlib

    make = intervention or contextlib.nullcontext
    tokens = refusal_tokens if refusal_tokens is not None and refusal_tokens.ids else None
    with make():
        ev = evaluate_refusal(model, prompts, judge=judge, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              intervention=intervention_name, refusal_tokens=tokens, progress=progress)
    out = ev.to_dict()
    out["refusal_tokens"] = tokens.to_json() if tokens is not None else None
    harmless = prompts.filter(label="harmless").instructions
    if intervention is not None and harmless:
        out["capability"] = capability_cost(model, harmless, make, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size, progress=progress)
    return out
