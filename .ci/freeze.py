"""Print the installed distributions as a constraints file body (what `constraints.txt` holds below its header).

The library itself is left out, and torch is written without its local build label (``2.13.0+cpu`` -> ``2.13.0``)
so that the constraint matches the CPU build and the PyPI release alike.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

HEADER_END = "# To upgrade"


def installed() -> dict[str, str]:
    out = {}
    for dist in md.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name in ("refusal-circuits", "pip", "setuptools", "wheel"):
            continue
        out[name] = dist.version.split("+")[0] if name == "torch" else dist.version
    return out


def pinned(path: str) -> dict[str, str]:
    pins = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--diff":
        # The packages whose installed version differs from the lock: what a canary failure points at.
        pins, now = pinned(sys.argv[2]), installed()
        rows = [f"{name} {now[name]} (lock {pins[name]})" for name in sorted(now) if name in pins and now[name] != pins[name]]
        rows += [f"{name} {now[name]} (not in the lock)" for name in sorted(now) if name not in pins]
        print("\n".join(rows) if rows else "none: every installed version equals the lock")
        return 0
    for name, version in sorted(installed().items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
