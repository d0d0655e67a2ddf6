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
