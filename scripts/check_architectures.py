"""`refusal-circuits check` on a tiny random model of every architecture of tests/helpers.py (the table in
docs/architectures.md). Usage: python scripts/check_architectures.py OUT_DIR  (writes OUT_DIR/checks.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refusal_circuits.models import load_model  # noqa: E402
from refusal_circuits.selfcheck import check  # noqa: E402
from tests.helpers import ARCHITECTURES, tiny_arch_dir  # noqa: E402


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for arch in ARCHITECTURES:
        report = check(load_model(str(tiny_arch_dir(arch, out / arch))))
        print(report.table(), flush=True)  # noqa: T201
        reports[arch] = report.to_json()
    (out / "checks.json").write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "architecture-checks"))
