"""Test tiers (see tests/README.md): ``unit`` (no model), ``tiny`` (a tiny random model, exact checks),
``packaged`` (the real packaged Qwen2.5-Coder-0.5B-Instruct; slow, still run in CI)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jaxtyping
import pytest

# Under pytest only, every function and dataclass of the library is decorated with beartype as it is imported, so
# the jaxtyping shapes (``Float[Tensor, "prompt layer head"]``) and every other annotation are checked on each call.
# The hook must be installed before anything imports the library: this is the first thing the tests load.
# Modules named in UNCHECKED are left out, each with the annotation that beartype cannot check yet (fix it, then
# remove the entry).
UNCHECKED: dict[str, str] = {}


def _checked_modules() -> list[str]:
    root = Path(__file__).resolve().parent.parent / "refusal_circuits"
    names = sorted({f"refusal_circuits.{p.stem}" for p in root.glob("*.py") if p.stem != "__init__"}
                   | {f"refusal_circuits.{p.parent.name}" for p in root.glob("*/__init__.py")})
    return [name for name in names if name not in UNCHECKED]


# REFUSAL_CIRCUITS_TYPECHECK=0 turns the checks off (to time their cost); CI never sets it.
if os.environ.get("REFUSAL_CIRCUITS_TYPECHECK", "1") != "0":
    if "refusal_circuits" in sys.modules:  # pragma: no cover - the hook would silently check nothing
        raise RuntimeError("refusal_circuits was imported before tests/conftest.py installed the type-checking hook")
    # is_pep484_tower: an int is a float and a float a complex, as for mypy (which checks the same annotations).
    jaxtyping.install_import_hook(_checked_modules(),
                                  "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

from tests.helpers import tiny_qwen_dir  # noqa: E402  (after the hook: the helpers may import the library)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Docstring examples (--doctest-modules) need no model: they belong to the unit tier.
    for item in items:
        if isinstance(item, pytest.DoctestItem):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    return tiny_qwen_dir(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from refusal_circuits.models import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="session")
def deep_tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Qwen2 of 4 layers: room for nodes below, at and above a direction's layer (attribution
    patching, paired total effects)."""
    from refusal_circuits.models import load_model

    return load_model(str(tiny_qwen_dir(tmp_path_factory.mktemp("tiny-qwen-deep"), n_layers=4)))


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
