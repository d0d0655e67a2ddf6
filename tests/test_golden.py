"""The oracle: every output file of `directions`, `evaluate`, `attribute`, `compare` and a small `run` on the tiny
random model, as committed values (tests/golden/tiny.json), so that a redesign is proven to change no number.

Every JSON value is compared (floats within 2e-3 relative, 1e-5 absolute; everything else exactly), every tensor by
its shape, sum and sum of absolute values (the sum within 1e-4 of the sum of absolute values), every other file by its
presence. The tolerances are float32's across CPUs, not a refactor's: the summation order of the BLAS kernels differs
between CPU families, and the file written on one machine differed on an AMD EPYC by at most 4e-4 relative (in
``score_fraction``, a ratio of two small differences) and 2e-5 of a tensor's absolute sum; a moved or changed
computation moves these numbers by far more. What depends on the machine or the
clock (seconds, versions, temporary paths) is left out. Where a change of the science changes a number on purpose,
regenerate the file (``REFUSAL_CIRCUITS_REGOLD=1 python -m pytest tests/test_golden.py``) in the same commit and
say in its message which numbers changed and why.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from refusal_circuits.cli import main

pytestmark = pytest.mark.tiny

GOLDEN = Path(__file__).parent / "golden" / "tiny.json"
VOLATILE = {"seconds", "total_seconds", "version", "versions", "library_version", "elapsed", "created", "time"}
TINY = ["--refusal-tokens", "I,S", "--filter", "polyrefuse", "--kl-max", "1e9", "--max-layer-frac", "1.0"]


def _prompts(path: Path, *, splits: bool) -> Path:
    rows = []
    for label, words in (("harmful", ["bad", "evil", "harm", "hurt", "break", "steal", "burn", "lie", "cheat", "rob"]),
                         ("harmless", ["bread", "poem", "sum", "sea", "tree", "song", "cat", "sun", "rain", "map"])):
        for i, w in enumerate(words):
            for lang, stem in (("en", "tell me about"), ("de", "erzähl mir von")):
                row = {"id": f"{label}-{i}", "lang": lang, "label": label, "instruction": f"{stem} {w}"}
                if splits:
                    row["split"] = (["train"] * 4 + ["val"] * 2 + ["test"] * 4)[i]
                rows.append(row)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _digest(root: Path, placeholders: dict[str, str]) -> dict[str, object]:
    """Every file under ``root``: JSON as values, tensors as (shape, sum, sum of |x|), others as present."""
    from safetensors.torch import load_file

    out: dict[str, object] = {}

    def scrub(value: object) -> object:
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if isinstance(value, str):
            for real, name in placeholders.items():
                value = value.replace(real, name)
        return value

    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if path.name == "stage.json":  # a stage's cache key hashes its inputs' paths: machine-dependent
            out[rel] = scrub({k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k != "key"})
        elif path.suffix == ".json":
            out[rel] = scrub(json.loads(path.read_text(encoding="utf-8")))
        elif path.suffix == ".safetensors":
            tensors = load_file(str(path))
            out[rel] = {k: [list(t.shape), float(t.double().sum()), float(t.double().abs().sum())]
                        for k, t in sorted(tensors.items())}
        else:
            out[rel] = "present"
    return out


def _close(a: object, b: object, where: str, problems: list[str]) -> None:
    if _is_tensor_digest(a) and _is_tensor_digest(b):
        (shape, total, size), (shape_b, total_b, size_b) = a, b  # type: ignore[misc]
        if math.isnan(size) and math.isnan(size_b):  # a tensor of nulls (a statistic that cannot be computed)
            if shape != shape_b:
                problems.append(f"{where}: {a!r} != golden {b!r}")
            return
        if shape != shape_b or not math.isclose(size, size_b, rel_tol=2e-3, abs_tol=1e-6) \
                or abs(total - total_b) > 1e-4 * max(size_b, 1e-6):
            problems.append(f"{where}: {a!r} != golden {b!r}")
        return
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                and math.isclose(float(a), float(b), rel_tol=2e-3, abs_tol=1e-5):
            return
        problems.append(f"{where}: {a!r} != golden {b!r}")
    elif isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                problems.append(f"{where}.{k}: {'missing' if k not in a else 'new'}")
            else:
                _close(a[k], b[k], f"{where}.{k}", problems)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]", problems)
    elif a != b:
        problems.append(f"{where}: {str(a)[:120]!r} != golden {str(b)[:120]!r}")


def _is_tensor_digest(x: object) -> bool:
    return isinstance(x, list) and len(x) == 3 and isinstance(x[0], list) and all(
        isinstance(v, float) for v in x[1:])


@pytest.fixture(scope="module")
def outputs(tiny_dir, tmp_path_factory):
    w = tmp_path_factory.mktemp("golden")
    split = _prompts(w / "split.jsonl", splits=True)
    nosplit = _prompts(w / "nosplit.jsonl", splits=False)
    model = str(tiny_dir)
    runs = {
        "directions": ["directions", "--model", model, "--prompts", str(nosplit), "--lang", "en", *TINY,
                       "--out", str(w / "out" / "directions")],
        "directions-split": ["directions", "--model", model, "--prompts", str(split), "--lang", "en", *TINY,
                             "--out", str(w / "out" / "directions-split")],
        "evaluate": ["evaluate", "--model", model, "--prompts", str(split), "--direction",
                     str(w / "out" / "directions-split"), "--intervention", "ablate", "--max-new-tokens", "4",
                     "--out", str(w / "out" / "evaluate.json")],
        "attribute": ["attribute", "--model", model, "--prompts", str(split), "--direction",
                      str(w / "out" / "directions-split"), "--refusal-tokens", "I", "--out",
                      str(w / "out" / "attribute")],
        "compare": ["compare", "--attributions", str(w / "out" / "attribute"), "--out", str(w / "out" / "compare")],
        "run-split": ["run", "--model", model, "--prompts", str(split), "--out", str(w / "out" / "run-split"), *TINY,
                      "--compliance-tokens", "T", "--max-new-tokens", "3", "--total-effects", "2",
                      "--patch-top-k", "2"],
        "run-nosplit": ["run", "--model", model, "--prompts", str(nosplit), "--out", str(w / "out" / "run-nosplit"),
                        *TINY, "--compliance-tokens", "T", "--max-new-tokens", "3", "--total-effects", "2",
                        "--patch-top-k", "2"],
    }
    for name, argv in runs.items():
        assert main(["-q", *argv]) == 0, name
    return _digest(w / "out", {str(w): "<tmp>", model: "<tiny-model>"})


def test_every_output_equals_the_golden_values(outputs):
    if os.environ.get("REFUSAL_CIRCUITS_REGOLD"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(outputs, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    problems: list[str] = []
    _close(outputs, golden, "outputs", problems)
    assert not problems, f"{len(problems)} differences from {GOLDEN.name}, first ones:\n" + "\n".join(problems[:30])
