"""Which fast paths the forward passes take: one immutable record, changed only for the extent of a ``with``.

The settings live in a :class:`contextvars.ContextVar`, not in module globals: a change made with
:func:`forward_options` is seen by the code inside the ``with`` (in this thread or asyncio task) and by nothing
else, and the previous settings come back when the block ends, also when it ends with an exception.

>>> from refusal_circuits.forward import current_options, forward_options
>>> with forward_options(share_prefix=False):
...     current_options().share_prefix
False
>>> current_options().share_prefix
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ForwardOptions:
    """The switches and sizes of the fast paths (:mod:`refusal_circuits.forward`).

    Attributes:
        share_prefix: run the chat template's prefix once per batch and continue every row from its key-value
            cache (:func:`~refusal_circuits.forward.shared_prefix`). False runs every batch as one plain forward
            pass, e.g. to compare against it; packing needs the shared prefix, so it is off too.
        pack: pack prompts end to end for first-token logits
            (:func:`~refusal_circuits.forward.packed_last_logits`). False uses padded batches, e.g. to compare.
        pack_tokens: tokens per packed row: about this many, so attention over a row (computed for every pair of
            its tokens, masked to each prompt's own) adds a few percent; several rows go through each forward pass
            (see ``pack_batch_tokens``).
        pack_batch_tokens: tokens per forward pass of packed rows. On a CPU every forward pass streams all the
            weights from memory, so a pass should carry many tokens: on the 0.5B here, 64-token passes ran at
            110-130 tokens/s, 256-512-token passes at 150-200; 60 French and Yoruba prompts took 9.6-12.7 s packed
            (rows of 384-768 tokens, passes of 512-2048) against 15.8-16.9 s in padded batches of 32.
    """

    share_prefix: bool = True
    pack: bool = True
    pack_tokens: int = 384
    pack_batch_tokens: int = 1536

    def __post_init__(self) -> None:
        for name in ("pack_tokens", "pack_batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ForwardOptions.{name} must be a positive int, not {value!r}")


# The default is a frozen dataclass, so sharing one instance between every context is safe.
_OPTIONS: ContextVar[ForwardOptions] = ContextVar("refusal_circuits_forward_options",
                                                  default=ForwardOptions())  # noqa: B039


def current_options() -> ForwardOptions:
    """The options in force here (the defaults unless inside :func:`forward_options`)."""
    return _OPTIONS.get()


@contextmanager
def forward_options(**changes: Any) -> Iterator[ForwardOptions]:
    """Change some of the :class:`ForwardOptions` for the extent of the ``with`` block; yields the new options.

    Unknown names raise :class:`TypeError` before anything changes. Blocks nest: each starts from the options in
    force where it is entered.
    """
    new = dataclasses.replace(current_options(), **changes)
    token = _OPTIONS.set(new)
    try:
        yield new
    finally:
        _OPTIONS.reset(token)
