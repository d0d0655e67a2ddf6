"""The public API: every exported name resolves lazily to its module's object, type checkers see the same names,
and ``import refusal_circuits`` alone stays free of torch (unit tier)."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import refusal_circuits as rc

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
INIT = ROOT / "refusal_circuits" / "__init__.py"


def _type_checking_imports() -> dict[str, str]:
    """The names the ``if TYPE_CHECKING:`` block of ``__init__.py`` imports, with the module each comes from."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    blocks = [node for node in tree.body if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
              and node.test.id == "TYPE_CHECKING"]
    assert len(blocks) == 1, "refusal_circuits/__init__.py should hold one `if TYPE_CHECKING:` block"
    names: dict[str, str] = {}
    for node in blocks[0].body:
        assert isinstance(node, ast.ImportFrom) and node.module, ast.dump(node)
        for alias in node.names:
            assert alias.asname is None, f"{alias.name} is imported under another name"
            names[alias.name] = node.module
    return names


@pytest.mark.parametrize("name", sorted(rc._EXPORTS))
def test_every_export_resolves_to_its_module_object(name):
    module = importlib.import_module(rc._EXPORTS[name])
    assert getattr(rc, name) is getattr(module, name)


def test_all_and_dir_list_the_exports():
    assert set(rc.__all__) == {"__version__", *rc._EXPORTS}
    assert len(rc.__all__) == len(set(rc.__all__))
    assert set(rc.__all__) <= set(dir(rc))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rc.nope  # noqa: B018


def test_type_checking_block_matches_exports():
    assert _type_checking_imports() == rc._EXPORTS


def test_import_alone_does_not_import_torch():
    code = ("import sys, refusal_circuits; heavy = sorted(m for m in ('torch', 'transformers', 'transformer_lens') "
            "if m in sys.modules); print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, f"import refusal_circuits imported {out.stdout.strip()} {out.stderr[-2000:]}"


def test_py_typed_is_shipped():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert (ROOT / "refusal_circuits" / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"]["refusal_circuits"]
    assert "py.typed" in package_data


@pytest.mark.skipif(os.environ.get("REFUSAL_CIRCUITS_TYPECHECK", "1") == "0", reason="type checks turned off")
def test_shapes_and_types_are_checked_under_pytest():
    """tests/conftest.py's import hook decorates the library with beartype: a wrong jaxtyping shape, dtype or
    type raises at the call."""
    import jaxtyping
    import torch

    from refusal_circuits.chat import position_ids
    from refusal_circuits.stats import Rate

    mask = torch.ones(2, 5, dtype=torch.long)
    assert position_ids(mask).shape == (2, 5)
    with pytest.raises(jaxtyping.TypeCheckError):
        position_ids(torch.ones(5, dtype=torch.long))  # Int[Tensor, "batch seq"] needs two axes
    with pytest.raises(jaxtyping.TypeCheckError):
        position_ids(torch.ones(2, 5))  # a float mask is not an Int tensor
    with pytest.raises(jaxtyping.TypeCheckError):
        Rate("3", 4)  # type: ignore[arg-type]
