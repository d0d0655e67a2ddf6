"""Stratified, seeded subsets (refusal_circuits.sampling and PromptSet.sample / halves)."""

from __future__ import annotations

from collections import Counter

import pytest

from refusal_circuits.data import load_prompts
from refusal_circuits.sampling import allocate, stratified_halves, stratified_ids

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def train():
    return load_prompts("bundled", langs=["en", "de", "ja"]).filter(split="train")


def test_a_sample_covers_every_category_where_the_first_n_is_a_block(train):
    harmful = train.filter(lang="en", label="harmful")
    n_categories = len({r.category for r in harmful})
    assert len({r.category for r in harmful.head(16)}) < n_categories / 2  # the bundled file is sorted by category
    sample = train.sample(16, seed=0).filter(lang="en", label="harmful")
    counts = Counter(r.category for r in sample)
    assert len(sample) == 16 and len(counts) == n_categories and max(counts.values()) <= 2


def test_the_same_prompts_in_every_language_and_file_order_kept(train):
    sample = train.sample(12, seed=5)
    ids = {lang: [r.id for r in sample.filter(lang=lang)] for lang in ("en", "de", "ja")}
    assert ids["en"] == ids["de"] == ids["ja"]
    order = {r.id: i for i, r in enumerate(train.filter(lang="en"))}
    assert ids["en"] == sorted(ids["en"], key=order.__getitem__)


def test_seeds_give_different_reproducible_samples(train):
    a, b, c = (frozenset(r.id for r in train.sample(16, seed=s)) for s in (0, 0, 1))
    assert a == b and a != c


def test_file_order_does_not_decide_the_sample(train):
    shuffled = type(train)(tuple(reversed(train.records)), train.source)
    assert {r.id for r in train.sample(10, seed=2)} == {r.id for r in shuffled.sample(10, seed=2)}


def test_halves_are_disjoint_and_balanced_per_category(train):
    a, b = train.filter(lang="en", label="harmful").halves(seed=0)
    assert {r.id for r in a}.isdisjoint({r.id for r in b}) and len(a) + len(b) == 128
    ca, cb = Counter(r.category for r in a), Counter(r.category for r in b)
    assert all(abs(ca[k] - cb[k]) <= 1 for k in ca | cb) and abs(len(a) - len(b)) <= 1
    other, _ = train.filter(lang="en", label="harmful").halves(seed=1)
    assert 0 < len({r.id for r in a} & {r.id for r in other}) < len(a)  # another random stratified split


def test_allocation_is_proportional_and_exact():
    assert allocate({"a": 6, "b": 3, "c": 1}, 5) == {"a": 3, "b": 2, "c": 0}
    assert sum(allocate({"a": 7, "b": 5, "c": 4}, 9).values()) == 9
    assert allocate({"a": 2}, 10) == {"a": 2}
    assert stratified_ids({"x": None, "y": None, "z": None}, 2, seed=0) <= {"x", "y", "z"}
    assert len(stratified_ids({"x": None, "y": None, "z": None}, 2, seed=0)) == 2
    with pytest.raises(ValueError, match="cannot choose"):
        stratified_ids({"x": None}, -1)
    first, second = stratified_halves({"a": "p", "b": "p", "c": "q"}, seed=0)
    assert first | second == {"a", "b", "c"} and not first & second
