"""Chat formatting and the post-instruction token positions, derived from the tokenizer's own template.

Arditi et al. read the refusal direction at the tokens that follow the instruction: the chat template's
end-of-turn and assistant header (for Qwen ``<|im_end|>\\n<|im_start|>assistant\\n``). Nothing here knows a
model family: the template is rendered once with a sentinel instruction, and what stands after the sentinel is
the post-instruction text. Each prompt is tokenized in pieces (template prefix, instruction, optional
adversarial suffix, post-instruction text) that are concatenated, so

* the post-instruction tokens are identical for every prompt and always the last ``n_post`` positions
  (prompts are left-padded), and
* every position carries an exact span label, which attribution aggregates over.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from refusal_circuits.errors import InputError

_SENTINEL = "\u2063RC_INSTRUCTION_SENTINEL\u2063"
#: The template used when a tokenizer has none (base models).
PLAIN_PREFIX = "User: "
PLAIN_SUFFIX = "\nAssistant:"


class Span(enum.IntEnum):
    """What a token position belongs to."""

    PAD = 0
    PREFIX = 1  # template text before the instruction (system prompt, user header)
    INSTRUCTION = 2
    ADV_SUFFIX = 3  # an adversarial suffix appended to the instruction
    POST = 4  # template text after the instruction: the post-instruction positions


SPAN_NAMES: tuple[str, ...] = tuple(s.name.lower() for s in Span)


@dataclass(frozen=True)
class ChatFormat:
    """How a tokenizer wraps one user instruction.

    Attributes:
        prefix: template text before the instruction.
        post: template text after the instruction (ends with the assistant header).
        prefix_ids / post_ids: their token ids (tokenized without extra special tokens, as
            ``apply_chat_template`` does).
        uses_template: False when the tokenizer has no chat template and the plain fallback is used.
        system_prompt: the system prompt passed explicitly, or None for the template's default.
    """

    prefix: str
    post: str
    prefix_ids: tuple[int, ...]
    post_ids: tuple[int, ...]
    uses_template: bool
    system_prompt: str | None

    @property
    def n_post(self) -> int:
        """Number of post-instruction positions."""
        return len(self.post_ids)

    def render(self, tokenizer: Any, instruction: str) -> str:
        """The full prompt text for ``instruction``, as the model sees it."""
        if not self.uses_template:
            return self.prefix + instruction + self.post
        return _apply(tokenizer, instruction, self.system_prompt)

    def instruction_text(self, tokenizer: Any, instruction: str) -> str:
        """The instruction as the template places it (some templates trim or rewrite content)."""
        text = self.render(tokenizer, instruction)
        if not (text.startswith(self.prefix) and text.endswith(self.post)):
            raise InputError(
                "the chat template does not wrap every instruction in the same prefix and suffix; "
                "pass an explicit system_prompt or a simpler template"
            )
        return text[len(self.prefix) : len(text) - len(self.post)]


def _apply(tokenizer: Any, content: str, system_prompt: str | None) -> str:
    messages = [{"role": "user", "content": content}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises its own types; the template may refuse a system role
        raise InputError(f"the tokenizer's chat template failed on a user message: {e}") from e


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def chat_format(tokenizer: Any, system_prompt: str | None = None) -> ChatFormat:
    """Derive the prefix and post-instruction text from ``tokenizer``'s chat template.

    Args:
        tokenizer: a Hugging Face tokenizer.
        system_prompt: an explicit system prompt; None keeps the template's own default (Qwen inserts
            "You are Qwen, created by Alibaba Cloud. ..."), which is what a deployed model sees.

    Returns:
        The :class:`ChatFormat`; without a template, the plain ``User: ...\\nAssistant:`` fallback.
    """
    if getattr(tokenizer, "chat_template", None):
        rendered = _apply(tokenizer, _SENTINEL, system_prompt)
        if rendered.count(_SENTINEL) != 1:
            raise InputError("the chat template does not place the user message exactly once")
        prefix, post = rendered.split(_SENTINEL)
        if not post:
            raise InputError("the chat template adds nothing after the instruction; no post-instruction tokens")
        return ChatFormat(prefix, post, tuple(_encode(tokenizer, prefix)), tuple(_encode(tokenizer, post)),
                          True, system_prompt)
    bos = tokenizer.bos_token or ""
    prefix = bos + (system_prompt + "\n\n" if system_prompt else "") + PLAIN_PREFIX
    return ChatFormat(prefix, PLAIN_SUFFIX, tuple(_encode(tokenizer, prefix)),
                      tuple(_encode(tokenizer, PLAIN_SUFFIX)), False, system_prompt)


def check_positions(tokenizer: Any, positions: Sequence[int] | None, what: str = "--positions") -> None:
    """Raise :class:`InputError` unless every position names a post-instruction token of ``tokenizer``'s chat
    template (``-n_post`` .. ``-1``)."""
    n_post = chat_format(tokenizer).n_post
    bad = [p for p in positions or () if not -n_post <= p < 0]
    if bad:
        raise InputError(f"{what} {bad} out of range: the chat template has {n_post} post-instruction tokens")


@dataclass(frozen=True)
class ChatBatch:
    """A left-padded batch of chat prompts.

    Attributes:
        input_ids: ``[batch, seq]`` token ids, left-padded.
        attention_mask: ``[batch, seq]``, 1 on real tokens.
        spans: ``[batch, seq]`` :class:`Span` codes of every position.
        n_post: the last ``n_post`` positions of every row are the post-instruction tokens.
    """

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    spans: Int[Tensor, "batch seq"]
    n_post: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        return self.attention_mask.sum(-1)

    @property
    def position_ids(self) -> Int[Tensor, "batch seq"]:
        """Positions counted from each row's first real token, so left padding does not shift rotary phases."""
        return position_ids(self.attention_mask)

    def to(self, device: str | torch.device) -> ChatBatch:
        return ChatBatch(self.input_ids.to(device), self.attention_mask.to(device), self.spans.to(device),
                         self.n_post)


def position_ids(attention_mask: Int[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """Left-padding-aware position ids (what Hugging Face ``generate`` and the TransformerBridge use).

    A plain Hugging Face forward given only ``attention_mask`` numbers positions from the left edge of the
    padded batch; pass these instead so that a padded row computes what it computes alone.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def tokenize_chat(
    tokenizer: Any,
    instructions: Sequence[str],
    *,
    fmt: ChatFormat | None = None,
    adv_suffix: str | Sequence[str] | None = None,
    max_length: int | None = None,
    names: Sequence[str] | None = None,
) -> ChatBatch:
    """Tokenize instructions into a left-padded chat batch with span labels.

    Args:
        tokenizer: a Hugging Face tokenizer (its pad token is used for padding).
        instructions: the user instructions.
        fmt: the chat format; derived from the tokenizer when None.
        adv_suffix: text appended to every instruction (or one per instruction), labelled ``ADV_SUFFIX``.
        max_length: the model's context; a longer prompt raises :class:`InputError` naming it.
        names: prompt ids, used in error messages.

    Returns:
        The :class:`ChatBatch`.
    """
    if len(instructions) == 0:
        raise InputError("no instructions to tokenize")
    fmt = fmt or chat_format(tokenizer)
    if isinstance(adv_suffix, str) or adv_suffix is None:
        suffixes: Sequence[str | None] = [adv_suffix] * len(instructions)
    else:
        suffixes = adv_suffix
        if len(suffixes) != len(instructions):
            raise InputError(f"got {len(suffixes)} adversarial suffixes for {len(instructions)} instructions")
    rows: list[tuple[list[int], list[int]]] = []
    for i, (instruction, suffix) in enumerate(zip(instructions, suffixes, strict=True)):
        text = fmt.instruction_text(tokenizer, instruction) if fmt.uses_template else instruction
        ids, spans = list(fmt.prefix_ids), [int(Span.PREFIX)] * len(fmt.prefix_ids)
        instr_ids = _encode(tokenizer, text)
        ids += instr_ids
        spans += [int(Span.INSTRUCTION)] * len(instr_ids)
        if suffix:
            adv_ids = _encode(tokenizer, suffix)
            ids += adv_ids
            spans += [int(Span.ADV_SUFFIX)] * len(adv_ids)
        ids += fmt.post_ids
        spans += [int(Span.POST)] * fmt.n_post
        if max_length is not None and len(ids) > max_length:
            name = names[i] if names is not None else f"#{i}"
            raise InputError(f"prompt {name} is {len(ids)} tokens long, more than the model's context of {max_length}")
        rows.append((ids, spans))
    seq = max(len(ids) for ids, _ in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise InputError("the tokenizer has neither a pad nor an eos token to pad with")
    input_ids = torch.full((len(rows), seq), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), seq), dtype=torch.long)
    span_t = torch.zeros((len(rows), seq), dtype=torch.long)
    for r, (ids, spans) in enumerate(rows):
        n = len(ids)
        input_ids[r, seq - n :] = torch.tensor(ids, dtype=torch.long)
        mask[r, seq - n :] = 1
        span_t[r, seq - n :] = torch.tensor(spans, dtype=torch.long)
    return ChatBatch(input_ids, mask, span_t, fmt.n_post)
