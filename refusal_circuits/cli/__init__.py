"""The ``refusal-circuits`` command line: parse → workflow → print.

Exit codes: 0 on success, 2 on bad input (one line ``error: ...`` naming what was wrong, nothing written),
130 on Ctrl-C. Only this layer (and :mod:`refusal_circuits.report`) writes files, always atomically. Each command
checks its flags, calls the workflows of :mod:`refusal_circuits.workflows` (the same ones the study's stages call),
writes what they return and prints a summary.

Modules: :mod:`~refusal_circuits.cli.app` (:func:`main`), :mod:`~refusal_circuits.cli.parser` (:func:`build_parser`,
one function per subcommand), and one module per group of commands: :mod:`~refusal_circuits.cli.run` (``run``,
``report``), :mod:`~refusal_circuits.cli.direction` (``directions``, ``orthogonalize``),
:mod:`~refusal_circuits.cli.evaluate`, :mod:`~refusal_circuits.cli.analysis` (``attribute``, ``compare``) and
:mod:`~refusal_circuits.cli.check`.
"""

from __future__ import annotations

from refusal_circuits.cli.app import main
from refusal_circuits.cli.parser import build_parser

__all__ = ["build_parser", "main"]
