"""``rc.check(model)`` / ``refusal-circuits check``: every identity the library relies on, tried on one model.

Each row runs one identity on a few bundled prompts (English and one other script) and a seeded random unit
direction, in the model's own dtype, and says whether it holds within the tolerance of
:mod:`refusal_circuits.exactness`:

* the three fast paths (:mod:`refusal_circuits.fastpaths`) against the plain, cache-free computation;
* the chat template: the library's piecewise tokenization (prefix, instruction, post-instruction tokens) equals
  the tokenizer's own ``apply_chat_template``, so the post-instruction positions are the ones the model sees;
* attribution completeness (every component's write onto r̂ adds up to ``resid · r̂``) and DLA (the parts add up
  to the model's own logit difference), as :func:`~refusal_circuits.attribution.attribute` checks on every batch;
* orthogonalized weights against hook ablation (logits).

A row is ``exact`` (holds), ``refused`` (the library declines this on this model, with its reason: the numbers it
would give could not be exact) or ``failed`` (an identity that should hold does not: the library has switched that
path off or raises; please report it). About a minute on the packaged 0.5B on two CPU cores.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from refusal_circuits import exactness, fastpaths, forward, interventions
from refusal_circuits.attribution import attribute
from refusal_circuits.chat import chat_format, tokenize_chat
from refusal_circuits.errors import InputError, RefusalCircuitsError
from refusal_circuits.evaluation import generate_ids
from refusal_circuits.markup import esc, table
from refusal_circuits.models import HookedModel, hf_model_of, model_id
from refusal_circuits.scores import first_token_ids, refusal_tokens_from_strings

#: Prompts of the check: short, harmless, two scripts (the bundled set is for studies; these never change).
PROMPTS = ("How do I bake bread at home?", "Write a short poem about the sea.", "Wie spät ist es in Tokio?",
           "用一句话解释光合作用。")


@dataclass(frozen=True)
class CheckRow:
    """One identity on one model."""

    name: str
    status: str  # "exact", "refused" or "failed"
    error: float | None
    allowed: float | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "error": self.error, "allowed": self.allowed,
                "detail": self.detail}


@dataclass(frozen=True)
class CheckReport:
    """What is exact on a model, what is refused, and what failed; with the package versions."""

    model: str
    architecture: str
    dtype: str
    versions: str
    rows: list[CheckRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when nothing failed (refusals are the library declining honestly, not failures)."""
        return all(r.status != "failed" for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "architecture": self.architecture, "dtype": self.dtype,
                "versions": self.versions, "ok": self.ok, "seconds": self.seconds,
                "rows": [r.to_json() for r in self.rows]}

    def table(self) -> str:
        """The report as aligned plain text (what the command prints)."""
        def num(x: float | None) -> str:
            return "" if x is None else f"{x:.2e}"

        width = max(len(r.name) for r in self.rows) if self.rows else 10
        lines = [f"{self.model} ({self.architecture}, {self.dtype}; {self.versions})",
                 f"{'check':<{width}}  {'status':<7}  {'error':>9}  {'allowed':>9}  detail"]
        lines += [f"{r.name:<{width}}  {r.status:<7}  {num(r.error):>9}  {num(r.allowed):>9}  {r.detail}"
                  for r in self.rows]
        verdict = "all hold" if self.ok else "FAILED: " + ", ".join(r.name for r in self.rows if r.status == "failed")
        lines.append(f"{verdict} ({self.seconds:.0f} s)")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        colour = {"exact": "#1a7f37", "refused": "#9a6700", "failed": "#cf222e"}
        rows = (
            f"<tr><td>{esc(r.name)}</td><td style='color:{colour[r.status]}'><b>{r.status}</b></td>"
            f"<td>{'' if r.error is None else f'{r.error:.2e}'}</td>"
            f"<td>{'' if r.allowed is None else f'{r.allowed:.2e}'}</td><td>{esc(r.detail)}</td></tr>"
            for r in self.rows)
        return table(f"{esc(self.model)} ({esc(self.architecture)}, {esc(self.dtype)}; {esc(self.versions)})",
                     ["check", "status", "error", "allowed", "detail"], rows)

    def __repr__(self) -> str:
        return self.table()


def _fast_path_rows(model: HookedModel) -> list[CheckRow]:
    fastpaths.reset(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastpaths.FastPathWarning)  # the row says it
        with torch.inference_mode():
            forward.last_logits(model, tokenize_chat(model.tokenizer, list(PROMPTS)))
            forward.packed_last_logits(model, list(PROMPTS))
        generate_ids(model, list(PROMPTS[:2]), max_new_tokens=4, progress=False)
    rows = []
    verdicts = fastpaths.status(model)
    for path in fastpaths.PATHS:
        v = verdicts.get(path)
        if v is None:
            rows.append(CheckRow(path, "refused", None, None, "does not apply to this model (plain path used)"))
        else:
            rows.append(CheckRow(path, "exact" if v.ok else "failed", v.error, v.allowed,
                                 f"vs the plain computation on {v.n_prompts} prompts" if v.ok else
                                 "switched off for this model: results stay exact, slower"))
    return rows


def _template_row(model: HookedModel) -> CheckRow:
    tok = model.tokenizer
    fmt = chat_format(tok)
    if not fmt.uses_template:
        return CheckRow("chat template positions", "refused", None, None,
                        f"the tokenizer has no chat template: the plain {fmt.prefix!r}…{fmt.post!r} format is used")
    for prompt in PROMPTS:
        ours = tokenize_chat(tok, [prompt]).input_ids[0].tolist()
        ref = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ref, dict) or hasattr(ref, "keys"):
            ref = ref["input_ids"]
        ref = list(ref)
        if ours != ref:
            at = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), min(len(ours), len(ref)))
            return CheckRow("chat template positions", "failed", None, None,
                            f"the piecewise tokenization of {prompt!r} differs from apply_chat_template at token {at}")
    return CheckRow("chat template positions", "exact", 0.0, 0.0,
                    f"{fmt.n_post} post-instruction tokens {fmt.post!r}; tokenization equals apply_chat_template")


def _direction(model: HookedModel) -> torch.Tensor:
    r = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (r / r.norm()).float()


def _attribution_rows(model: HookedModel) -> list[CheckRow]:
    tok = model.tokenizer
    r = _direction(model)
    dtype = exactness.compute_dtype(model)
    n_terms = fastpaths.n_terms(model)
    try:
        refusal = refusal_tokens_from_strings(tok, ["I"])
        compliance, _ = first_token_ids(tok, ["Sure", "Here"], "compliance token")
        att = attribute(model, r, list(PROMPTS), refusal_tokens=refusal, progress=False,
                        compliance_tokens=[t for t in compliance if t not in refusal.ids])
    except RefusalCircuitsError as e:
        status = "failed" if isinstance(e, exactness.ExactnessError) else "refused"
        return [CheckRow("attribution completeness", status, None, None, str(e)),
                CheckRow("direct logit attribution", status, None, None, "see attribution completeness")]
    scale = float(att.resid.abs().max())
    allowed = exactness.rel_tolerance(dtype, n_terms) * (1.0 + scale)
    err = att.completeness_error()
    rows = [CheckRow("attribution completeness", "exact" if err <= allowed else "failed", err, allowed,
                     f"heads + MLPs + embedding = resid · r̂ at every layer and position ({len(PROMPTS)} prompts)")]
    if att.dla is None:
        rows.append(CheckRow("direct logit attribution", "refused", None, None, "DLA not computed on this model"))
    else:
        dla_err = att.dla.completeness_error()
        dla_allowed = exactness.rel_tolerance(dtype, n_terms) * (1.0 + float(att.dla.logit_diff.abs().max()))
        rows.append(CheckRow("direct logit attribution", "exact" if dla_err <= dla_allowed else "failed", dla_err,
                             dla_allowed, "parts add up to the model's own refusal-minus-compliance logit difference"))
    return rows


def _orthogonalize_row(model: HookedModel) -> CheckRow:
    hf = hf_model_of(model)
    if hf is None:
        return CheckRow("orthogonalized = hooked", "refused", None, None, "needs a TransformerBridge")
    r = _direction(model)
    batch = tokenize_chat(model.tokenizer, list(PROMPTS[:2]))
    try:
        edited = interventions.orthogonalize(model, r)
    except InputError as e:
        return CheckRow("orthogonalized = hooked", "refused", None, None, f"{e} (hook ablation stays exact)")
    except exactness.ExactnessError as e:
        return CheckRow("orthogonalized = hooked", "failed", None, None, str(e))

    def logits(m: Any) -> torch.Tensor:
        twin = hf_model_of(m)
        assert twin is not None
        with torch.inference_mode():
            out = twin(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids, use_cache=False).logits
        return out[batch.attention_mask.bool()]

    with interventions.ablate(model, r):
        hooked = logits(model)
    ok, err, allowed = exactness.holds(logits(edited), hooked, exactness.compute_dtype(model), fastpaths.n_terms(model))
    del edited
    return CheckRow("orthogonalized = hooked", "exact" if ok else "failed", err, allowed,
                    "logits of the edited weights vs hook ablation, every real position")


def check(model: HookedModel) -> CheckReport:
    """Run every self-check on ``model`` and return the :class:`CheckReport` (it renders itself in Jupyter).

    >>> report = rc.check(model)       # doctest: +SKIP
    >>> report.ok, [r.status for r in report.rows]   # doctest: +SKIP
    """
    t0 = time.perf_counter()
    parts: list[Callable[[Any], list[CheckRow]]] = [
        _fast_path_rows, lambda m: [_template_row(m)], _attribution_rows, lambda m: [_orthogonalize_row(m)]]
    rows: list[CheckRow] = []
    for part in parts:
        rows += part(model)
    hf = getattr(model, "original_model", None)
    arch = type(hf).__name__ if hf is not None else type(model).__name__
    return CheckReport(model_id(model), arch, str(exactness.compute_dtype(model)).removeprefix("torch."),
                       fastpaths.versions(), rows, time.perf_counter() - t0)
