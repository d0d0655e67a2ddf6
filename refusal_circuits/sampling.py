"""Seeded subsets stratified by harm category, the same prompts in every language.

The bundled files (and many public ones) are sorted by category, so "the first n prompts" is a block of
categories, not a sample: the first 16 harmful prompts are mostly weapons, the first half of the harmful set is
weapons/cyber/fraud and the second half drugs/harassment/self-harm/privacy. Every subset the library takes goes
through this module instead:

* :func:`stratified_ids` chooses ``n`` ids with each category represented in proportion to its size (largest
  remainder), and within a category by a seeded hash of the id, so the choice is reproducible, independent of file
  order, and identical in every language (translations share ids and categories).
* :func:`stratified_halves` cuts a set of ids into two halves that each hold half of every category; different
  seeds give different random stratified splits, for split-half reliabilities repeated over many splits.

Prompts without a category form one stratum (the choice is then a seeded simple random sample).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping


def _key(seed: int, prompt_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{prompt_id}".encode()).hexdigest()


def _strata(categories: Mapping[str, str | None], seed: int) -> dict[str, list[str]]:
    strata: dict[str, list[str]] = {}
    for prompt_id, category in categories.items():
        strata.setdefault("" if category is None else str(category), []).append(prompt_id)
    return {c: sorted(ids, key=lambda i: _key(seed, i)) for c, ids in sorted(strata.items())}


def allocate(sizes: Mapping[str, int], n: int) -> dict[str, int]:
    """Proportional allocation of ``n`` draws over strata of the given sizes (largest remainder, ties by name).

    >>> allocate({"a": 6, "b": 3, "c": 1}, 5)
    {'a': 3, 'b': 2, 'c': 0}
    """
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    exact = {c: n * s / total for c, s in sizes.items()}
    out = {c: int(x) for c, x in exact.items()}
    for c in sorted(sizes, key=lambda c: (-(exact[c] - out[c]), c))[: n - sum(out.values())]:
        out[c] += 1
    return out


def stratified_ids(categories: Mapping[str, str | None], n: int, *, seed: int = 0) -> set[str]:
    """``n`` of the ids (all when there are fewer), each category in proportion to its size, seeded.

    >>> cats = {f"w{i}": "weapons" for i in range(8)} | {f"d{i}": "drugs" for i in range(8)}
    >>> chosen = stratified_ids(cats, 4, seed=1)
    >>> sorted(sum(i.startswith(c) for i in chosen) for c in "wd")
    [2, 2]
    """
    if n < 0:
        raise ValueError(f"cannot choose {n} prompts")
    strata = _strata(categories, seed)
    quota = allocate({c: len(ids) for c, ids in strata.items()}, n)
    return {i for c, ids in strata.items() for i in ids[: quota[c]]}


def stratified_halves(categories: Mapping[str, str | None], *, seed: int = 0) -> tuple[set[str], set[str]]:
    """Two disjoint halves of the ids, each with half of every category (odd ones alternate between halves).

    >>> a, b = stratified_halves({f"p{i}": "xy"[i % 2] for i in range(8)}, seed=3)
    >>> len(a), len(b), a.isdisjoint(b)
    (4, 4, True)
    """
    first: set[str] = set()
    second: set[str] = set()
    odd = 0
    for ids in _strata(categories, seed).values():
        for k, prompt_id in enumerate(ids):
            to_first = k % 2 == 0 if odd % 2 == 0 else k % 2 == 1
            (first if to_first else second).add(prompt_id)
        odd += len(ids) % 2
    return first, second
