"""``python -m refusal_circuits.cli``: the same as the ``refusal-circuits`` command."""

from __future__ import annotations

import sys

from refusal_circuits.cli.app import main

sys.exit(main())
