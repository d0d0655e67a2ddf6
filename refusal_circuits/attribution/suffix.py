"""Arditi et al. §5: an adversarial suffix and the heads that write r̂ (:func:`compare_suffix`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refusal_circuits.attribution.records import Attribution, top_k_heads
from refusal_circuits.chat import Span
from refusal_circuits.errors import InputError
from refusal_circuits.markup import esc, table


@dataclass(frozen=True)
class SuffixComparison:
    """Arditi et al. §5: do the heads that write r̂ look away from the instruction when a suffix is appended?

    Per head (the ``k`` largest writers onto r̂ without the suffix): mean attention mass from the post-instruction
    tokens to the instruction (without and with the suffix) and to the suffix, and the mean write onto r̂.
    """

    heads: list[tuple[int, int]]
    instruction_mass_without: list[float]
    instruction_mass_with: list[float]
    suffix_mass_with: list[float]
    write_without: list[float]
    write_with: list[float]
    suffix: str
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"suffix": self.suffix, "n": self.n, "heads": [
            {"layer": a, "head": b, "instruction_mass_without": w0, "instruction_mass_with": w1, "suffix_mass_with": s1,
             "write_without": r0, "write_with": r1}
            for (a, b), w0, w1, s1, r0, r1 in zip(self.heads, self.instruction_mass_without, self.instruction_mass_with,
                                                  self.suffix_mass_with, self.write_without, self.write_with,
                                                  strict=True)]}

    def _repr_html_(self) -> str:
        rows = (
            f"<tr><td>L{h['layer']}.H{h['head']}</td><td>{h['instruction_mass_without']:.2f}</td>"
            f"<td>{h['instruction_mass_with']:.2f}</td><td>{h['suffix_mass_with']:.2f}</td>"
            f"<td>{h['write_without']:+.3f}</td><td>{h['write_with']:+.3f}</td></tr>" for h in self.to_json()["heads"])
        return table(f"Adversarial suffix {esc(repr(self.suffix))} ({self.n} prompts): attention from the "
                     "post-instruction tokens", ["head", "→ instruction (without)", "→ instruction (with)",
                                                 "→ suffix (with)", "write onto r̂ (without)", "write onto r̂ (with)"],
                     rows)


def compare_suffix(without: Attribution, with_suffix: Attribution, k: int = 10) -> SuffixComparison:
    """Compare two attributions of the same prompts, without and with an adversarial suffix."""
    if without.ids != with_suffix.ids or without.langs != with_suffix.langs:
        raise InputError("compare_suffix needs attributions of the same prompts, in the same order")
    if not with_suffix.adv_suffix:
        raise InputError("the second attribution has no adversarial suffix")
    w0 = without.head_scores("post").mean(0)
    w1 = with_suffix.head_scores("post").mean(0)
    heads = top_k_heads(w0, k)
    m0 = without.attn_mass.mean((0, 3))  # [layer, head, span]
    m1 = with_suffix.attn_mass.mean((0, 3))
    ins, suf = int(Span.INSTRUCTION), int(Span.ADV_SUFFIX)
    return SuffixComparison(heads, [float(m0[a, b, ins]) for a, b in heads], [float(m1[a, b, ins]) for a, b in heads],
                            [float(m1[a, b, suf]) for a, b in heads], [float(w0[a, b]) for a, b in heads],
                            [float(w1[a, b]) for a, b in heads], with_suffix.adv_suffix, without.n_prompts)
