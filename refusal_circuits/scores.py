"""Cheap scores that stand in for generation: first-token refusal log-odds, KL, and completion cross-entropy.

Refusal score (Arditi et al.): the log-odds that the first generated token is a refusal token,
``log p(T) - log(1 - p(T))`` with ``T`` the set of refusal tokens. Which tokens those are is not hard-coded:
:func:`discover_refusal_tokens` reads them off the model's own refusals in each language (the first token of
completions the judge calls refusals, kept if it rarely starts a compliant answer).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_circuits.chat import chat_format, tokenize_chat
from refusal_circuits.data import PromptSet
from refusal_circuits.errors import InputError
from refusal_circuits.forward import batches, device_of, last_logits, packed_last_logits, token_logprobs
from refusal_circuits.generation import generate_ids
from refusal_circuits.judges import ENGLISH, REFUSAL_PHRASES, Judge, PhraseJudge
from refusal_circuits.markup import esc
from refusal_circuits.models import HookedModel


@dataclass(frozen=True)
class RefusalTokens:
    """The token ids whose probability at the first generated position measures refusal.

    Attributes:
        by_lang: discovered ids per language (empty where the model never refused).
        strings: id -> token text, for reports.
        counts: per language, id -> (times it began a refusal, times it began a compliant answer).
        source: ``discovered`` or ``given``.
        origin: per language, where its tokens come from: ``discovered`` (its own refusals), ``native phrases``
            (it refused too rarely to discover any: the first tokens of its native refusal phrases that began
            none of its compliant discovery answers, so English "I" does not stand in for it) or ``none``.
    """

    by_lang: dict[str, tuple[int, ...]]
    strings: dict[int, str] = field(default_factory=dict)
    counts: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict, repr=False)
    source: str = "discovered"
    origin: dict[str, str] = field(default_factory=dict)

    @property
    def ids(self) -> tuple[int, ...]:
        """Every language's tokens together, in order of first appearance."""
        return tuple(dict.fromkeys(t for ids in self.by_lang.values() for t in ids))

    def for_lang(self, lang: str) -> tuple[int, ...]:
        """The tokens of ``lang``; the union over languages where none were found for it."""
        own = self.by_lang.get(lang, ())
        if own:
            return own
        if not self.ids:
            raise InputError("no refusal tokens: the model refused none of the discovery prompts; pass them "
                             "explicitly (--refusal-tokens on the command line, refusal_tokens_from_strings in Python)")
        return self.ids

    @classmethod
    def from_json(cls, obj: dict[str, Any], source: str = "saved") -> RefusalTokens:
        """Inverse of :meth:`to_json` (the counts are not kept)."""
        ids = {lang: tuple(int(t) for t in v) for lang, v in obj["ids"].items()}
        strings = {int(t): s for lang in ids for t, s in zip(obj["ids"][lang], obj["by_lang"][lang], strict=True)}
        return cls(ids, strings, {}, source, dict(obj.get("origin") or {}))

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source,
                "by_lang": {lang: [self.strings.get(t, str(t)) for t in ids] for lang, ids in self.by_lang.items()},
                "ids": {lang: list(ids) for lang, ids in self.by_lang.items()},
                **({"origin": dict(self.origin)} if self.origin else {})}

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{esc(lang)}</td><td>{esc(', '.join(repr(self.strings.get(t, t)) for t in ids)) or '–'}</td></tr>"
                       for lang, ids in self.by_lang.items())
        return f"<b>Refusal tokens</b> ({self.source})<table><tr><th>lang</th><th>tokens</th></tr>{rows}</table>"


def first_token_ids(tokenizer: Any, strings: Iterable[str], what: str = "refusal token"
                    ) -> tuple[tuple[int, ...], dict[int, str]]:
    """Each string's first token id (``"I"`` -> the id of ``I``), without repeats, and id -> token text.

    ``what`` names the strings in the error raised for one that encodes to nothing.
    """
    ids: list[int] = []
    names: dict[int, str] = {}
    for s in strings:
        enc = tokenizer(s, add_special_tokens=False)["input_ids"]
        if not enc:
            raise InputError(f"{what} {s!r} encodes to nothing")
        ids.append(int(enc[0]))
        names[int(enc[0])] = tokenizer.decode([enc[0]])
    return tuple(dict.fromkeys(ids)), names


def refusal_tokens_from_strings(tokenizer: Any, strings: Iterable[str], langs: Iterable[str] = ("*",)) -> RefusalTokens:
    """Refusal tokens given by hand: each string's first token (``"I"`` -> the id of ``I``)."""
    uniq, names = first_token_ids(tokenizer, strings)
    return RefusalTokens({lang: uniq for lang in langs}, names, {}, "given")


def discover_refusal_tokens(
    model: HookedModel,
    prompts: PromptSet,
    *,
    judge: Judge | None = None,
    max_new_tokens: int = 12,
    min_precision: float = 0.8,
    min_refusals: int = 2,
    batch_size: int = 32,
    progress: bool = True,
) -> RefusalTokens:
    """Find each language's refusal tokens from the model's own greedy completions.

    For every language in ``prompts`` (harmful and harmless prompts; use the train split), generate a short
    completion, judge it, and count each first token among refusals and among compliant answers. A token is a
    refusal token of that language if it began at least ``min_refusals`` refusals and at least
    ``min_precision`` of the completions it began were refusals.
    """
    judge = judge or PhraseJudge()
    records = list(prompts)
    if not records:
        raise InputError("no prompts to discover refusal tokens from")
    ids = generate_ids(model, [r.instruction for r in records], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress=progress, desc="discover refusal tokens")
    tok = model.tokenizer
    texts = [tok.decode(row, skip_special_tokens=True) for row in ids]
    verdicts = judge.judge(texts, [r.lang for r in records])
    return refusal_tokens_from_completions(tok, [r.lang for r in records], [row[0] if row else None for row in ids],
                                           verdicts, report=prompts.langs, min_precision=min_precision,
                                           min_refusals=min_refusals)


def refusal_tokens_from_completions(tokenizer: Any, langs: Sequence[str], first_tokens: Sequence[int | None],
                                    refused: Sequence[bool], *, report: Sequence[str] | None = None,
                                    min_precision: float = 0.8,
                                    min_refusals: int = 2, native: bool = True) -> RefusalTokens:
    """Refusal tokens per language from judged completions (their first tokens and the judge's verdicts).

    A token is a refusal token of a language if it began at least ``min_refusals`` of its refusals and at least
    ``min_precision`` of the completions it began there were refusals. ``langs``: each completion's language;
    ``report``: the languages to report (default: those of the completions). Completions without a first token
    (empty) are skipped. A language with no token that qualifies gets its :func:`native_refusal_tokens` (those
    that began none of its compliant completions) unless ``native`` is False; :attr:`RefusalTokens.origin` says
    which languages did.
    """
    counts: dict[str, dict[int, list[int]]] = {}
    for lang, first, verdict in zip(langs, first_tokens, refused, strict=True):
        if first is None:
            continue
        c = counts.setdefault(lang, {}).setdefault(int(first), [0, 0])
        c[0 if verdict else 1] += 1
    by_lang: dict[str, tuple[int, ...]] = {}
    origin: dict[str, str] = {}
    for lang in dict.fromkeys(report or langs):
        table = counts.get(lang, {})
        keep = [t for t, (ref, comp) in table.items() if ref >= min_refusals and ref / (ref + comp) >= min_precision]
        by_lang[lang] = tuple(sorted(keep, key=lambda t: -table[t][0]))
        origin[lang] = "discovered"
        if not by_lang[lang] and native:
            answered = {t for t, (_, comp) in table.items() if comp}
            by_lang[lang] = tuple(t for t in native_refusal_tokens(tokenizer, lang) if t not in answered)
            origin[lang] = "native phrases"
        if not by_lang[lang]:
            origin[lang] = "none"
    strings = {t: tokenizer.decode([t]) for ids_ in by_lang.values() for t in ids_}
    frozen = {lang: {t: (v[0], v[1]) for t, v in table.items()} for lang, table in counts.items()}
    return RefusalTokens(by_lang, strings, frozen, "discovered", origin)


def native_refusal_tokens(tokenizer: Any, lang: str) -> tuple[int, ...]:
    """The first tokens of ``lang``'s own refusal phrases that open a sentence (:data:`~refusal_circuits.judges.
    REFUSAL_PHRASES`, without the English ones and the phrases with a gap): what a refusal in that language would
    begin with, known before any completion is seen. Empty for a language without native phrases (and English)."""
    phrases = [p for p in REFUSAL_PHRASES.get(lang, ()) if lang != "en" and p not in ENGLISH and "…" not in p
               and (p[0].isupper() or not p[0].isalpha() or p[0].lower() == p[0].upper())]
    if not phrases:
        return ()
    ids, names = first_token_ids(tokenizer, phrases)
    return tuple(t for t in ids if _is_word_start(names[t].strip()))


def _is_word_start(text: str) -> bool:
    """Two characters or more, or one Hangul syllable or CJK ideograph (which carries a word's meaning); a single
    Latin, Cyrillic or Arabic letter or kana begins too many words to stand for a refusal."""
    if len(text) >= 2:
        return True
    return len(text) == 1 and unicodedata.name(text, "").startswith(("HANGUL SYLLABLE", "CJK UNIFIED"))


def refusal_score(logits: Float[Tensor, "batch vocab"], token_ids: Sequence[int]) -> Float[Tensor, " batch"]:
    """Log-odds that the next token is one of ``token_ids``: ``log p(T) - log(1 - p(T))``, computed stably."""
    if not token_ids:
        raise InputError("refusal_score needs at least one refusal token")
    logits = logits.float()
    idx = torch.tensor(list(token_ids), device=logits.device)
    mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    mask[idx] = True
    refuse = torch.logsumexp(logits[:, mask], dim=-1)
    other = torch.logsumexp(logits[:, ~mask], dim=-1)
    return refuse - other


def kl_divergence(base_logits: Float[Tensor, "batch vocab"], new_logits: Float[Tensor, "batch vocab"]
                  ) -> Float[Tensor, " batch"]:
    """KL(base || new) of the next-token distributions, per row."""
    p = torch.log_softmax(base_logits.double(), -1)
    q = torch.log_softmax(new_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).float()


@torch.inference_mode()
def first_token_logits(model: HookedModel, instructions: Sequence[str], *, batch_size: int = 32,
                       progress: bool = False, desc: str = "first-token logits") -> Float[Tensor, "n vocab"]:
    """Last-position logits of every chat-formatted instruction, in input order (hooks on the model apply).

    Prompts are packed end to end where the model allows it (:func:`~refusal_circuits.forward.packed_last_logits`),
    otherwise run in length-bucketed batches of ``batch_size``."""
    packed = packed_last_logits(model, instructions, progress=progress, desc=desc)
    if packed is not None:
        return packed.float().cpu()
    out: list[Tensor | None] = [None] * len(instructions)
    for idx, batch in batches(model, instructions, batch_size, progress=progress, desc=desc):
        logits = last_logits(model, batch).float().cpu()
        for row, i in enumerate(idx):
            out[i] = logits[row]
    return torch.stack([t for t in out if t is not None])


@torch.inference_mode()
def completion_cross_entropy(model: HookedModel, instructions: Sequence[str], completions: Sequence[Sequence[int]], *,
                             batch_size: int = 16) -> float:
    """Mean per-token cross-entropy of ``completions`` (token ids) given their chat-formatted instructions.

    Teacher-forced; hooks on the model apply, so ``with ablate(...)`` measures the capability cost of an
    intervention on the same completions (Arditi et al. use the unablated model's own completions).
    """
    if len(instructions) != len(completions):
        raise InputError(f"{len(instructions)} instructions but {len(completions)} completions")
    tok = model.tokenizer
    fmt = chat_format(tok)
    total, count = 0.0, 0
    device = device_of(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for start in range(0, len(instructions), batch_size):
        chunk = range(start, min(start + batch_size, len(instructions)))
        prompt = tokenize_chat(tok, [instructions[i] for i in chunk], fmt=fmt)
        rows = []
        for r, i in enumerate(chunk):
            ids = prompt.input_ids[r][prompt.attention_mask[r].bool()].tolist()
            rows.append((ids, list(completions[i])))
        seq = max(len(a) + len(b) for a, b in rows)
        input_ids = torch.full((len(rows), seq), int(pad), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        target = torch.zeros_like(input_ids, dtype=torch.bool)
        for r, (a, b) in enumerate(rows):
            n = len(a) + len(b)
            input_ids[r, seq - n :] = torch.tensor(a + b)
            mask[r, seq - n :] = 1
            target[r, seq - len(b) :] = True
        logp = token_logprobs(model, input_ids.to(device), mask.to(device)).cpu()
        # The token at position t is predicted at position t - 1.
        pred = logp[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
        sel = target[:, 1:]
        total += float(-pred[sel].double().sum())
        count += int(sel.sum())
    if count == 0:
        raise InputError("the completions are empty")
    return total / count


def token_counts_table(tokens: RefusalTokens) -> list[tuple[str, str, int, int]]:
    """(lang, token, refusals begun, compliant answers begun) for every kept token, for reports."""
    rows = []
    for lang, ids in tokens.by_lang.items():
        for t in ids:
            ref, comp = tokens.counts.get(lang, {}).get(t, (0, 0))
            rows.append((lang, tokens.strings.get(t, str(t)), ref, comp))
    return rows

