"""Test tiers (see tests/README.md): ``unit`` (no model), ``tiny`` (a tiny random model, exact checks),
``packaged`` (the real packaged Qwen2.5-Coder-0.5B-Instruct; slow, still run in CI)."""

from __future__ import annotations

import os

import pytest

from tests.helpers import tiny_qwen_dir


def pytest_configure(config: pytest.Config) -> None:
    # beartype checks the jaxtyping shape annotations at test time only.
    os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    return tiny_qwen_dir(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from refusal_circuits.models import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="session")
def packaged_model():
    from refusal_circuits.models import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def plain_hf_model():
    """The packaged 0.5B loaded by plain transformers on its own (no bridge): the reference for generation."""
    from transformers import AutoModelForCausalLM

    from refusal_circuits.models import materialise_packaged

    model = AutoModelForCausalLM.from_pretrained(materialise_packaged("qwen2.5-coder-0.5b-instruct"), dtype="float32")
    return model.eval()


@pytest.fixture(scope="session")
def packaged_selection(packaged_model):
    """The English refusal direction of the packaged 0.5B, selected as in the README but on a reduced grid.

    The grid is cut to the last two template tokens and the middle layers to keep CI fast; the method is the full
    one (Arditi filter, PolyRefuse fallback, calibrated activation addition). Shared by every packaged test.
    """
    from refusal_circuits.data import load_bundled
    from refusal_circuits.directions import extract_candidates
    from refusal_circuits.scores import discover_refusal_tokens
    from refusal_circuits.selection import ARDITI, POLYREFUSE, select_direction

    english = load_bundled(["en"])
    train, val = english.filter(split="train"), english.filter(split="val")
    tokens = discover_refusal_tokens(packaged_model, train.head(16), max_new_tokens=8, progress=False)
    assert tokens.strings[tokens.for_lang("en")[0]] == "I"  # "I'm sorry, but I can't ..."
    cands = extract_candidates(packaged_model, train.filter(label="harmful").instructions[:64],
                               train.filter(label="harmless").instructions[:64], lang="en", progress=False)
    return select_direction(packaged_model, cands, val.filter(label="harmful").instructions[:16],
                            val.filter(label="harmless").instructions[:16], tokens, config=ARDITI,
                            fallback=POLYREFUSE, positions=[-1, -2], layers=range(8, 20), progress=False)
