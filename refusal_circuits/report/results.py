"""What the report reads: ``results.json`` collected from the stage directories, and the study it describes.

:func:`collect_results` gathers every stage's headline numbers into the one ``results.json``;
:class:`StudyView` is what the page's sections read of a finished study: the results, the stage directories, and
the attribution record that several sections draw.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from refusal_circuits._version import __version__
from refusal_circuits.attribution import Attribution, load_attribution
from refusal_circuits.stats import wilson_interval


def read_json(path: Path) -> Any:
    """One of a stage's JSON files."""
    return json.loads(path.read_text(encoding="utf-8"))


def collect_results(stage_dirs: dict[str, Path], config: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
    """``results.json``: the configuration, stage times, and the headline numbers of every stage."""
    d = read_json(stage_dirs["direction"] / "direction.json")
    ev = {k: read_json(stage_dirs["evaluate"] / f"{k}.json") for k in ("baseline", "ablate", "actadd")}
    langs = read_json(stage_dirs["languages"] / "languages.json")
    summary = read_json(stage_dirs["attribute"] / "attribution" / "summary.json")
    div = read_json(stage_dirs["compare"] / "divergence.json")
    effects_file = stage_dirs["attribute"] / "effects.json"
    harm = read_json(stage_dirs["harm"] / "harm.json")
    subspace = read_json(stage_dirs["subspace"] / "subspace.json")
    return {
        "version": __version__, "config": config, "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1),
        "direction": {k: d.get(k) for k in ("model", "lang", "layer", "position", "norm", "n_harmful", "n_harmless",
                                            "selection", "actadd")},
        "refusal": {k: v["results"] for k, v in ev.items()},
        "response_language": ev["baseline"].get("response_language"),
        **{k: ev["baseline"][k] for k in ("second_judge", "second_judge_why") if k in ev["baseline"]},
        "actadd": {"alpha": ev["actadd"].get("alpha"), "layer": ev["actadd"].get("layer")},
        "languages": langs,
        "attribution": summary,
        "effects": read_json(effects_file) if effects_file.exists() else None,
        "divergence": div,
        **harm,
        **subspace,
        "files": {name: str(p) for name, p in stage_dirs.items()},
    }


def rate(g: dict[str, Any]) -> tuple[float, float, float]:
    """A rate entry of the results (``refused`` and ``n``, or a ``refusal_rate``/``rate`` and ``n``) as
    (rate, 95% Wilson low, high)."""
    n = int(g["n"])
    k = int(g["refused"]) if "refused" in g else round(float(g.get("refusal_rate", g.get("rate", 0.0))) * n)
    lo, hi = wilson_interval(k, n)
    return (k / n if n else math.nan, float(lo), float(hi))


@dataclass(frozen=True)
class StudyView:
    """A finished study as the report's sections read it: ``results.json`` and the stage files behind it."""

    results: dict[str, Any]
    stages: dict[str, Path]
    attribution: Attribution

    @classmethod
    def load(cls, results: dict[str, Any]) -> StudyView:
        """The study whose stage directories ``results["files"]`` names."""
        stages = {k: Path(v) for k, v in results["files"].items()}
        return cls(results, stages, load_attribution(stages["attribute"] / "attribution"))

    @property
    def config(self) -> dict[str, Any]:
        return self.results["config"]

    @property
    def direction(self) -> dict[str, Any]:
        return self.results["direction"]

    @property
    def base(self) -> str:
        return self.config["base"]

    @property
    def refusal(self) -> dict[str, Any]:
        return self.results["refusal"]

    @property
    def languages(self) -> dict[str, Any]:
        return self.results["languages"]

    @property
    def transfer(self) -> dict[str, Any]:
        return self.languages["transfer"]

    @property
    def langs(self) -> list[str]:
        """The studied languages, in the transfer matrix's order."""
        return list(self.transfer["targets"])

    @property
    def divergence(self) -> dict[str, Any]:
        return self.results["divergence"]

    def completions(self, name: str) -> list[dict[str, Any]]:
        """The completions of one evaluation (``baseline``, ``ablate``, ``actadd``)."""
        return read_json(self.stages["evaluate"] / f"{name}.json")["completions"]

    def paired(self) -> dict[str, Tensor]:
        """The paired comparison's tensors (``LANG.mean``, ``LANG.diff``, ``LANG.significant``); empty when the
        compare stage wrote none."""
        path = self.stages["compare"] / "paired.safetensors"
        return load_file(str(path)) if path.exists() else {}
